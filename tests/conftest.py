import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def float64():
    """Float64 for a real network's steps: fp32 rounding through BatchNorm at a batch of 4-8 and
    LARS at a large lr depends on the CPU's kernels (AVX2 gives 2-5x the noise of AVX-512 on the
    same steps, up to 5e-5 of a tensor's magnitude); in float64 both sides agree to ~1e-12, so the
    1e-5 tolerances hold on any CPU and torch version."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)
