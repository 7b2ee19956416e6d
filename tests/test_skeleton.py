"""The house skeleton (shared/DESIGN.md §1-4): every method file has the same numbered sections,
the method first, the same run section, cited help texts, a fixed docstring layout, and imports
without side effects; common.py's Part 1 is copyable alone; the size limits. Method files are
picked up automatically as they are added."""

import ast
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
# The size limits of the house design (shared/DESIGN.md §1): a limit that fails means make room
# before adding, never a higher limit
MAX_LINES, MAX_LINES_BIG, BIG = 450, 520, ("moco", "dino")  # moco: three versions; dino: its ViT
# common.py: the design's target is 1,500 lines; the limit is its size after the restructure into
# two parts (2,007): it only goes down, a feature makes room first
MAX_COMMON_LINES, MAX_PART1_LINES = 2007, 600
PART1_MODULES = {"torch", "torchvision", "einops", "numpy", "PIL"}  # and the standard library


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


def _banner(i: int):
    return lambda l: l.startswith(f"# ==== {i}.")


def run_section(src: str) -> str:  # section 6, up to the next banner (7 or 8)
    return between(src, _banner(6), lambda l: l.startswith("# ==== "))


def method_sections(src: str) -> str:  # sections 1-4: the method
    return between(src, _banner(1), _banner(5))


def part1() -> str:
    """common.py up to the PART 2 banner (the block of banner lines around it excluded)."""
    lines = (ROOT / "common.py").read_text().splitlines(keepends=True)
    k = next(i for i, l in enumerate(lines) if l.startswith("# ==== PART 2"))
    while lines[k - 1].startswith("# ===="):
        k -= 1
    return "".join(lines[:k])


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
def test_run_section_identical(name):
    sec = run_section(text(name))
    assert "def fit(" in sec and "def linear_probe(" in sec and "def evaluate(" in sec
    assert_same(name, run_section, "section 6 (the run)")


# ==== per-file structure ====================================================================
@pytest.mark.parametrize("name", FILES)
def test_banners_in_order_once_each(name):
    """0-6 and 8 once each, in order; 7 (method-specific evaluation) at most once, before 8."""
    lines = text(name).splitlines()
    pos = []
    for i in range(9):
        hits = [k for k, l in enumerate(lines) if l.startswith(f"# ==== {i}.")]
        assert len(hits) == 1 or (i == 7 and not hits), f"{name}.py: '# ==== {i}.' x{len(hits)}"
        pos += hits
    assert pos == sorted(pos), f"{name}.py: banners out of order (lines {pos})"


@pytest.mark.parametrize("name", FILES)
def test_the_method_comes_first(name):
    """The model, loss, state and train_step (sections 1-4) precede the recipe (Args, section 5),
    and Args is defined in section 5 on top of common.RunArgs."""
    src = text(name)
    method, config = method_sections(src), between(src, _banner(5), _banner(6))
    assert "def train_step(" in method and "class Args" not in method
    assert re.search(r"^class Args\(C\.RunArgs\):", config, re.M), f"{name}.py: Args not here"
    assert issubclass(module(name).Args, importlib.import_module("common").RunArgs)


@pytest.mark.parametrize("name", FILES)
def test_method_file_length(name):
    n, cap = len(text(name).splitlines()), MAX_LINES_BIG if name in BIG else MAX_LINES
    assert n <= cap, f"{name}.py has {n} lines (limit {cap}): make room first"


def test_common_length():
    n, n1 = len((ROOT / "common.py").read_text().splitlines()), len(part1().splitlines())
    assert n <= MAX_COMMON_LINES, f"common.py has {n} lines (limit {MAX_COMMON_LINES})"
    assert n1 <= MAX_PART1_LINES, f"common.py Part 1 has {n1} lines (limit {MAX_PART1_LINES})"


# ==== common.py Part 1: copyable alone ======================================================
def test_part1_alone_defines_what_the_method_sections_use():
    """Part 1's text, executed alone in a fresh module, defines every C.<name> that sections 1-4
    of every method file use; it imports only the standard library and the allowed packages,
    and reads no name that only Part 2 defines."""
    src = part1()
    ns = {"__name__": "part1_alone"}
    exec(compile(src, "common.py (Part 1)", "exec"), ns)
    used = {n for f in FILES for n in re.findall(r"\bC\.(\w+)", method_sections(text(f)))}
    missing = sorted(n for n in used if n not in ns)
    assert used and not missing, f"sections 1-4 use names Part 1 lacks: {missing}"
    tree = ast.parse(src)
    mods = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    extra = mods - PART1_MODULES - set(sys.stdlib_module_names)
    assert not extra, f"Part 1 imports {extra}"
    full = importlib.import_module("common")
    part2_only = {k for k in vars(full) if k not in ns}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not read & part2_only, f"Part 1 reads Part 2 names: {sorted(read & part2_only)}"


def test_common_imports_without_fcntl(tmp_path):
    """Where fcntl does not exist (Windows) common.py imports, and the out-dir lock becomes a
    note."""
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import common\n"
        f"common.claim_out_dir({str(tmp_path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"note: cannot lock" in r.stderr


# ==== plain statements ======================================================================
@pytest.mark.parametrize("name", [*FILES, "common"])
def test_plain_statements(name):
    """No tuple statements for side effects, no chained comparison as an if's condition, no
    `for ... in (x if c else [])`, no `"text" * bool`."""
    tree, bad = ast.parse(text(name)), []
    for n in ast.walk(tree):
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Tuple):
            bad.append(f"line {n.lineno}: a tuple statement")
        test = getattr(n, "test", None) if isinstance(n, (ast.If, ast.IfExp, ast.While)) else None
        if isinstance(test, ast.Compare) and len({type(o) for o in test.ops}) > 1:
            bad.append(f"line {n.lineno}: a mixed chained comparison as a condition")
        if isinstance(n, (ast.For, ast.comprehension)) and isinstance(n.iter, ast.IfExp):
            bad.append(f"line {n.iter.lineno}: a loop over a conditional expression")
        sides = (n.left, n.right) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult) else ()
        text_side = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
        cond = (ast.Compare, ast.BoolOp, ast.Call, ast.Name, ast.Attribute, ast.UnaryOp)
        if text_side and any(isinstance(s, cond) for s in sides):
            bad.append(f"line {n.lineno}: text times a condition")
    assert not bad, f"{name}.py:\n" + "\n".join(bad)


# ==== Args ==================================================================================
@pytest.mark.parametrize("name", FILES)
def test_api_defined(name):
    mod = module(name)
    for attr in ("Args", "train_step", "features", "encoder", "main"):
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


@pytest.mark.parametrize("name", FILES)
def test_method_fields_cite(name):
    """Every field the file's Args declares cites its source or says DEVIATION."""
    Args = module(name).Args
    own = list(Args.__dict__.get("__annotations__", {}))
    assert own, f"{name}.py: Args declares no field"
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Args)}
    uncited = [
        f"{n}: {helps[n]!r}"
        for n in own
        if not re.search(r"\[[^\]]+\]", helps[n]) and "DEVIATION" not in helps[n]
    ]
    assert not uncited, f"{name}.py: help without [citation] or DEVIATION:\n" + "\n".join(uncited)


def _spellings(v) -> set:
    """How a value may be written in a help text."""
    if isinstance(v, (bool, tuple)):
        return {""}  # the word CIFAR is enough
    out = {str(v)}
    if isinstance(v, float):
        out |= {f"{v:g}", f"{v:.0e}".replace("e-0", "e-"), f"{v:.1e}".replace("e-0", "e-")}
    return out


@pytest.mark.parametrize("name", FILES)
def test_defaults_read_are_the_defaults_run(name):
    """A field default is the paper's (ImageNet) value; every field the CIFAR preset (the default
    --preset) changes names the CIFAR value in its help text."""
    Args = module(name).Args
    fields = {f.name: f for f in dataclasses.fields(Args)}
    bad = []
    for k, v in Args.recipe(preset="cifar").items():
        if v == fields[k].default:
            continue
        h = fields[k].metadata.get("help", "")
        if "CIFAR" not in h or not any(s in h for s in _spellings(v)):
            bad.append(f"--{k}: CIFAR preset {v!r}, help {h!r}")
    assert not bad, f"{name}.py: the CIFAR value is not named:\n" + "\n".join(bad)


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


def test_import_has_no_side_effects(tmp_path):
    """Every file imported in turn in one fresh interpreter (a process per file costs seconds of
    imports each): nothing printed, no file written, torch.distributed not initialised, though
    torchrun-style env vars are set, so an import-time setup_ddp() would initialise."""
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
        "import importlib, sys, torch.distributed as d\n"
        f"for name in {FILES!r}:\n"
        "    importlib.import_module(name)\n"
        "    if d.is_available() and d.is_initialized():\n"
        "        sys.exit(f'importing {name} initialised torch.distributed')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == b"" and r.stderr == b"", (r.stdout + r.stderr).decode()[-2000:]
    assert list(tmp_path.iterdir()) == [], "importing the files created files"


def test_the_package_ships_every_method_file():
    """pyproject's flat-layout module list (pip install .[bench]) names every top-level file."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted([*FILES, "common"])
