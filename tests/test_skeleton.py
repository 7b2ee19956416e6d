"""The house skeleton (shared/DESIGN.md §1-4): every method file has the same numbered sections,
the same boilerplate text and shared Args block, cited help texts, a fixed docstring layout,
and imports without side effects. Method files are picked up automatically as they are added."""

import dataclasses
import difflib
import importlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = [
    "instdisc",
    "invaspread",
    "cpc",
    "cmc",
    "moco",
    "simclr",
    "swav",
    "byol",
    "simsiam",
    "barlow_twins",
    "dino",
]
FILES = [m for m in METHODS if (ROOT / f"{m}.py").is_file()]
# common.py: ~750 lines of shared plumbing (DDP, checkpoints, CLI and its checks, logging) +
# ~400 of the data pipeline (image decoding, batched augmentation, device-resident data and
# evaluation) + ~150 guarding a run's checkpoints (no non-finite one, a checkpoint on SIGTERM,
# resume refusing changed settings and naming misfit tensors) + ~330 of semi-supervised
# fine-tuning (labelled subset, batch stream, the loop with gradient averaging and resume, the
# fine-tuned copy, the official recipes), which every method file runs: one copy for all
MAX_LINES, MAX_COMMON_LINES = 550, 2000


def text(name: str) -> str:
    return (ROOT / f"{name}.py").read_bytes().decode("utf-8")


def between(src: str, start, stop) -> str:
    """Lines from the first line matching `start` up to (excluding) the next line matching
    `stop`; both are predicates on the line stripped of leading whitespace."""
    lines = src.splitlines(keepends=True)
    i = next((k for k, l in enumerate(lines) if start(l.lstrip())), None)
    assert i is not None, "start line not found"
    j = next((k for k in range(i + 1, len(lines)) if stop(lines[k].lstrip())), None)
    assert j is not None, "end line not found"
    return "".join(lines[i:j])


def boilerplate(src: str) -> str:
    return between(src, lambda l: l.startswith("# ==== 6. boilerplate"), _banner(7))


def shared_block(src: str) -> str:
    return between(
        src,
        lambda l: l.startswith("# -- shared block"),
        lambda l: l.startswith("# -- method block --"),
    )


def method_block(src: str) -> str:
    return between(
        src,
        lambda l: l.startswith("# -- method block --"),
        lambda l: l.startswith("# -- derived at runtime"),
    )


def derived_block(src: str) -> str:
    return between(
        src,
        lambda l: l.startswith("# -- derived at runtime"),
        lambda l: not l.strip() or l[0] == "@",
    )


def _banner(i: int):
    return lambda l: l.startswith(f"# ==== {i}.")


def assert_same(name: str, section, what: str):
    ref_name = FILES[0]
    a, b = section(text(ref_name)), section(text(name))
    diff = "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), ref_name, name))
    assert a.encode() == b.encode(), f"{what} differs between {ref_name}.py and {name}.py:\n{diff}"


def module(name: str):
    return importlib.import_module(name)


def test_method_files_found():
    assert "simclr" in FILES and "moco" in FILES


# ==== identical text across files ===========================================================
@pytest.mark.parametrize("name", FILES)
def test_boilerplate_section_identical(name):
    sec = boilerplate(text(name))
    assert "def fit(" in sec and len(sec.splitlines()) > 20
    assert_same(name, boilerplate, "section 6 (boilerplate)")


@pytest.mark.parametrize("name", FILES)
def test_args_shared_block_identical(name):
    sec = shared_block(text(name))
    assert len(sec.splitlines()) > 5
    assert_same(name, shared_block, "the '# -- shared block' of Args")


@pytest.mark.parametrize("name", FILES)
def test_args_derived_block_identical(name):
    sec = derived_block(text(name))
    assert "derived=True" in sec
    assert_same(name, derived_block, "the '# -- derived at runtime' block of Args")


# ==== per-file structure ====================================================================
@pytest.mark.parametrize("name", FILES)
def test_banners_in_order_once_each(name):
    lines = text(name).splitlines()
    pos = []
    for i in range(8):
        hits = [k for k, l in enumerate(lines) if l.startswith(f"# ==== {i}.")]
        assert len(hits) == 1, f"{name}.py: banner '# ==== {i}.' found {len(hits)} times"
        pos.append(hits[0])
    assert pos == sorted(pos), f"{name}.py: banners out of order (lines {pos})"
    assert not [l for l in lines if l.startswith("# ==== 8.")]


@pytest.mark.parametrize("name", FILES)
def test_method_file_length(name):
    n = len(text(name).splitlines())
    assert n <= MAX_LINES, f"{name}.py has {n} lines (cap {MAX_LINES})"


def test_common_length():
    n = len((ROOT / "common.py").read_text().splitlines())
    assert n <= MAX_COMMON_LINES, f"common.py has {n} lines (cap {MAX_COMMON_LINES})"


@pytest.mark.parametrize("name", FILES)
def test_api_defined(name):
    mod = module(name)
    for attr in ("Args", "train_step", "features", "main"):
        assert callable(getattr(mod, attr, None)), f"{name}.py does not define {attr}"
        assert getattr(mod, attr).__module__ == name
    losses = [
        k
        for k, v in vars(mod).items()
        if k.endswith("_loss") and callable(v) and getattr(v, "__module__", None) == name
    ]
    assert losses, f"{name}.py defines no *_loss function"
    assert dataclasses.is_dataclass(mod.Args)
    args = mod.Args()
    assert args.world_size == 1 and args.rank == 0


@pytest.mark.parametrize("name", FILES)
def test_args_help_texts(name):
    fields = dataclasses.fields(module(name).Args)
    flags = [f for f in fields if not f.metadata.get("derived")]
    assert flags
    empty = [f.name for f in flags if not str(f.metadata.get("help", "")).strip()]
    assert not empty, f"{name}.py: flags without help: {empty}"
    derived_src = derived_block(text(name))
    for f in fields:
        if f.metadata.get("derived"):
            assert re.search(rf"^\s*{f.name}\s*:", derived_src, re.M), (
                f"{name}.py: derived field {f.name} outside the derived block"
            )


@pytest.mark.parametrize("name", FILES)
def test_method_block_help_cites(name):
    names = re.findall(r"^\s{4}(\w+)\s*:", method_block(text(name)), re.M)
    assert names, f"{name}.py: no fields in the method block"
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(module(name).Args)}
    missing = [n for n in names if n not in helps]
    assert not missing, f"{name}.py: method-block names not fields of Args: {missing}"
    uncited = [
        f"{n}: {helps[n]!r}"
        for n in names
        if not re.search(r"\[[^\]]+\]", helps[n]) and "DEVIATION" not in helps[n]
    ]
    assert not uncited, f"{name}.py: help without [citation] or DEVIATION:\n" + "\n".join(uncited)


# ==== docstring =============================================================================
def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


@pytest.mark.parametrize("name", FILES)
def test_module_docstring_layout(name):
    doc = module(name).__doc__
    assert doc, f"{name}.py has no module docstring"
    title = doc.lstrip().split(" - ", 1)[0]
    assert " - " in doc.splitlines()[0], f"{name}.py: first line is not '<Method> - <title> ...'"
    assert _norm(title).startswith(_norm(name)), f"{name}.py docstring starts with {title!r}"
    for needle in ("Reference code:", "Objective", "Run:"):
        assert needle in doc, f"{name}.py docstring lacks {needle!r}"
    assert re.search(r"^vs \w+\.py", doc, re.M), f"{name}.py docstring lacks 'vs <sibling>.py'"
    order = [doc.index(n) for n in ("Reference code:", "Objective", "\nvs ", "Run:")]
    assert order == sorted(order), f"{name}.py docstring sections out of order"


# ==== import side effects ===================================================================
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", FILES)
def test_import_has_no_side_effects(name, tmp_path):
    # torchrun-style env vars are set, so an import-time setup_ddp() would initialise
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    code = (
        f"import {name}\n"
        "import sys, torch.distributed as d\n"
        "sys.exit(7 if d.is_available() and d.is_initialized() else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert r.returncode != 7, f"importing {name} initialised torch.distributed"
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == b"" and r.stderr == b"", (r.stdout + r.stderr).decode()[-2000:]
    assert list(tmp_path.iterdir()) == [], f"importing {name} created files"


def test_the_package_ships_every_method_file():
    """pyproject's flat-layout module list (pip install .[bench]) names every top-level file."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted([*FILES, "common"])
