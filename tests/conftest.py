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


# `-m versions`: what CI also runs on the oldest supported torch and on 2.11 (README "Supported
# torch versions"): the official-loop parity tests, every multi-process test and the end-to-end
# runs; a test named otherwise carries @pytest.mark.versions
VERSIONS = (
    "test_official_",
    "test_ddp.py",
    "test_e2e.py",
    "two_processes",
    "torchrun",
    "end_to_end",
)


def pytest_collection_modifyitems(items):
    for item in items:
        if any(k in item.nodeid for k in VERSIONS):
            item.add_marker("versions")
