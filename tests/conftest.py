import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import helpers  # noqa: E402  (imports common: ROOT first)


@pytest.fixture
def float64():  # helpers.float64 for a whole test
    with helpers.float64():
        yield


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
