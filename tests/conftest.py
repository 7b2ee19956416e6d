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
# torch versions"): the official-loop parity tests, the 2-process tests (tests/test_ddp.py's
# processes: every method's train_step and main() on 2 ranks) and tests/test_e2e.py's runs under
# `python` and `torchrun`; each method file's own torchrun run only on the newest
FILES = ("tests/test_official_", "tests/test_ddp.py", "tests/test_e2e.py")


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.nodeid.partition("::")[2]
        if item.nodeid.startswith(FILES) or ("two_processes" in name and "torchrun" not in name):
            item.add_marker("versions")
