"""Every command-line value is checked in common.parse_args, before anything is built or loaded:
each numeric Args field against its range (field metadata "range", every element of a tuple),
--out-dir, then the method's limits over several fields (Args.check). A bad value ends the run
with one line "error: --flag value: why; what to pass" and exit status 2."""

import dataclasses
import importlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from helpers import error_lines, python
from PIL import Image
from test_skeleton import FILES

import common as C

MODULES = {name: importlib.import_module(name) for name in FILES}
LINE = re.compile(r"error: (--[a-z0-9-]+) ([^:]*): [^;]+; pass .+")  # the one-line form


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def unranged(cls) -> list[str]:
    """Numeric flags (int, float, tuple) with neither a range nor choices."""
    numeric = lambda d: isinstance(d, (int, float, tuple)) and not isinstance(d, bool)
    return [
        f.name
        for f in dataclasses.fields(cls)
        if not f.metadata.get("derived") and numeric(f.default)
        if not f.metadata.get("range") and not f.metadata.get("choices")
    ]


def ranged_fields():
    for name, module in MODULES.items():
        for f in dataclasses.fields(module.Args):
            if f.metadata.get("range"):
                yield pytest.param(name, f, id=f"{name}-{f.name}")


def bounds(spec: str):
    a, lo, hi, b = C.RANGE.fullmatch(spec).groups()
    return float(lo), a == "[", float(hi), b == "]"


def nearest(integer: bool):  # x one step towards d (+1 / -1): an integer, or the next float
    return (lambda x, d: x + d) if integer else (lambda x, d: math.nextafter(x, d * math.inf))


def just_outside(spec: str, integer: bool) -> list:
    """The nearest values outside the range, on each finite side; NaN and inf for floats."""
    (lo, lo_in, hi, hi_in), near = bounds(spec), nearest(integer)
    out = [near(lo, -1) if lo_in else lo] + (
        [] if math.isinf(hi) else [near(hi, 1) if hi_in else hi]
    )
    return [int(x) for x in out] if integer else [*out, math.nan, math.inf]


def just_inside(spec: str, integer: bool) -> list:
    """The range's edges, or the nearest values inside an open end."""
    (lo, lo_in, hi, hi_in), near = bounds(spec), nearest(integer)
    out = [lo if lo_in else near(lo, 1)] + (
        [] if math.isinf(hi) else [hi if hi_in else near(hi, -1)]
    )
    return [int(x) for x in out] if integer else out


def parse_fails(module, argv, capsys) -> str:
    """parse_args(argv) exits 2 with one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        C.parse_args(module.Args, argv)
    msg, err = str(e.value), capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, msg)
    assert err == msg + "\n" and "\n" not in msg, err
    assert LINE.fullmatch(msg), f"not 'error: --flag value: why; what to pass': {msg!r}"
    return msg


# ==== every numeric field has a range ======================================================
@pytest.mark.parametrize("name", FILES)
def test_every_numeric_field_has_a_range(name):
    assert unranged(MODULES[name].Args) == [], f"{name}.py: give these fields a range"


def test_a_field_without_a_range_is_flagged():
    @dataclass
    class Args:
        n: int = field(default=1, metadata={"help": "a count"})
        scale: tuple = field(default=(0.2, 1.0), metadata={"help": "a crop scale"})
        k: int = field(default=1, metadata={"help": "", "choices": (1, 2)})
        on: bool = field(default=True, metadata={"help": ""})
        tau: float = field(default=0.1, metadata={"help": "", "range": "(0, inf)"})
        rank: int = field(default=0, metadata={"derived": True})

    assert unranged(Args) == ["n", "scale"]


# ==== each field: just outside its range fails, its edges pass ==============================
def bad_argv(f: dataclasses.Field, x) -> tuple[list, str]:
    """Flags giving field f the value x (a tuple: x after a good element), and how it shows."""
    tok, spec = str(x), f.metadata["range"]
    if isinstance(f.default, tuple) and re.fullmatch(r"-?\d+(\.\d+)?|nan|inf", tok):
        good = str(f.default[0] if f.default else just_inside(spec, C.value_type(f) is int)[0])
        return [flag(f.name), good, tok], f"{good} {tok}"
    return [f"{flag(f.name)}={tok}"], tok  # "=": else argparse takes "-5e-324" for a flag


@pytest.mark.parametrize("name,f", list(ranged_fields()))
def test_value_out_of_range_exits_2_in_one_line(name, f, capsys):
    for x in just_outside(f.metadata["range"], C.value_type(f) is int):
        argv, shown = bad_argv(f, x)
        msg = parse_fails(MODULES[name], argv, capsys)
        assert LINE.fullmatch(msg).groups() == (flag(f.name), shown), (argv, msg)


@pytest.mark.parametrize("name,f", list(ranged_fields()))
def test_range_edges_pass(name, f):
    module, spec = MODULES[name], f.metadata["range"]
    args = C.parse_args(module.Args, [])
    defaults = {g.name: g.default for g in dataclasses.fields(args)}
    for x in just_inside(spec, C.value_type(f) is int):
        value = (x, x) if isinstance(f.default, tuple) else x
        C.check_ranges(dataclasses.replace(args, **{f.name: value}), defaults)


@pytest.mark.parametrize("name", FILES)
def test_a_documented_zero_is_allowed(name):
    """Where the help gives 0 a meaning (off, all, auto: "(0: all)"), 0 passes."""
    zero = [
        f
        for f in dataclasses.fields(MODULES[name].Args)
        if re.search(r"(^|\(|[;,] )0: ", f.metadata.get("help", "")) and f.metadata.get("range")
    ]
    assert len(zero) >= 5, [f.name for f in zero]  # img_size, subset, max_steps, knn_* at least
    for f in zero:
        assert C.in_range(0, f.metadata["range"]), f"{name}.py: --{f.name} 0 is documented"


# ==== the uncommon bounds are where the code stops working ===================================
def spec_of(name: str, field_name: str) -> tuple:
    return bounds(MODULES[name].Args.__dataclass_fields__[field_name].metadata["range"])


def test_seed_bound_is_the_last_that_seeds_the_augmentation():
    hi = spec_of("simclr", "seed")[2]  # (seed, epoch, index) -> one 64-bit torch seed
    ds = lambda seed: C.Indexed(C.synthetic_images(2, 8, 0), lambda img: torch.rand(1), seed=seed)
    assert ds(int(hi))[(1, 10_000)][2] == 1  # epoch 10000
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        ds(int(2 * hi))[(1, 0)]


def test_colour_strength_bound_is_colorjitters_hue():
    hi, img = spec_of("simclr", "color_s")[2], Image.new("RGB", (8, 8))
    assert C.simclr_augment(8, None, s=hi)(img).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="hue"):
        C.simclr_augment(8, None, s=hi * 1.01)(img)


def test_cmc_width_bound_keeps_a_channel_in_every_layer():
    lo, x = spec_of("cmc", "width")[0], torch.rand(2, 1, 8, 8)
    assert MODULES["cmc"].view_encoder("smallcnn", 8, 1, lo)[0](x).shape[0] == 2
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore")  # torch: zero-element init is a no-op
        MODULES["cmc"].view_encoder("smallcnn", 8, 1, lo * 0.99)[0](x)


# ==== the shipped recipes pass =============================================================
def recipes():
    for name, module in MODULES.items():
        version = {f.name: f for f in dataclasses.fields(module.Args)}.get("version")
        for preset in ("cifar", "imagenet"):
            data = ["--dataset", "imagenet" if preset == "imagenet" else "cifar10"]
            for v in version.metadata["choices"] if version else [None]:
                argv = ["--preset", preset, *data, *(["--version", v] if v else [])]
                yield pytest.param(name, argv, id=f"{name}-{preset}-{v}")
    for preset in ("cifar", "imagenet"):  # MoCo v3's ViT recipe
        data = ["--dataset", "imagenet" if preset == "imagenet" else "cifar10"]
        argv = ["--preset", preset, *data, "--version", "v3", "--arch", "vit_small"]
        yield pytest.param("moco", argv, id=f"moco-{preset}-v3-vit_small")


@pytest.mark.parametrize("name,argv", list(recipes()))
def test_recipe_defaults_pass(name, argv):
    args = C.parse_args(MODULES[name].Args, argv)
    assert args.batch_size >= 1 and args.preset == argv[1]


# ==== limits over several fields (Args.check) ===============================================
VIT = ["--arch", "vit_tiny"]
LIMITS = [  # method, bad flags, a needle of the error, the nearest good flags
    ("simclr", ["--batch-size", "1"], "no negatives", ["--batch-size", "2"]),
    ("invaspread", ["--batch-size", "1"], "no negatives", ["--batch-size", "2"]),
    (
        "invaspread",
        ["--lr-factors", "0.1"],
        "--lr-milestones",
        ["--lr-factors", "0.1", "0.05", "0.01"],
    ),
    ("byol", ["--batch-size", "1"], "BatchNorm", ["--batch-size", "2"]),
    ("simsiam", ["--batch-size", "1"], "BatchNorm", ["--batch-size", "2"]),
    ("barlow_twins", ["--batch-size", "1"], "one sample", ["--batch-size", "2"]),
    ("barlow_twins", ["--projector", "64-x"], "widths", ["--projector", "64-8"]),
    ("moco", ["--version", "v3", "--batch-size", "1"], "BatchNorm", ["--batch-size", "2"]),
    ("moco", ["--queue-size", "100", "--batch-size", "48"], "e.g. 96", ["--queue-size", "96"]),
    ("moco", [*VIT, "--img-size", "8", "--patch-size", "9"], "9 px patch", ["--patch-size", "8"]),
    ("swav", ["--global-scale", "0.5", "0.4"], "lo > hi", ["--global-scale", "0.4", "0.5"]),
    ("swav", ["--local-scale", "0.1"], "two numbers", ["--local-scale", "0.1", "0.1"]),
    ("swav", [*VIT, "--local-size", "3"], "4 px patch", ["--local-size", "4"]),
    ("swav", [*VIT, "--img-size", "3", "--n-local", "0"], "4 px patch", ["--img-size", "4"]),
    ("swav", ["--local-size", "7"], "pass --local-size >= 8", ["--local-size", "8"]),
    ("dino", ["--local-size", "7"], "pass --local-size >= 8", ["--local-size", "8"]),
    ("cpc", ["--patch-size", "1"], "pass --patch-size >= 2", ["--patch-size", "2"]),
    ("dino", ["--global-scale", "0.4"], "two numbers", ["--global-scale", "0.4", "1"]),
    ("dino", ["--local-scale", "0.5", "0.1"], "lo > hi", ["--local-scale", "0.1", "0.5"]),
    ("dino", [*VIT, "--local-size", "3", "--patch-size", "4"], "4 px patch", ["--local-size", "4"]),
    (
        "dino",
        [*VIT, "--img-size", "5", "--patch-size", "6", "--n-local", "0"],
        "6 px",
        ["--img-size", "6"],
    ),
    ("simclr", ["--ft-epochs", "60"], "not two numbers", ["--ft-epochs", "60", "30"]),
    ("simclr", ["--ft-proj-layers", "2"], "1 hidden layers", ["--ft-proj-layers", "1"]),
    ("simclr", ["--distill-epochs", "1"], "fine-tuned", ["--finetune-fraction", "0.1"]),
    ("swav", ["--finetune-list", "/nonexistent"], "no such file", ["--finetune-list", ""]),
    (
        "byol",
        ["--dataset", "imagenet", "--finetune-fraction", "0.01"],
        "imagenet_subsets/1percent.txt",
        ["--finetune-fraction", "0"],
    ),
    ("cpc", ["--max-step", "7"], "7x7 patch grid", ["--max-step", "6"]),
    ("cpc", ["--min-step", "4"], "--max-step 3", ["--min-step", "3"]),
    ("cpc", ["--betas", "0.9"], "two numbers", ["--betas", "0.9", "0.9"]),
    (
        "cpc",
        [*VIT, "--patch-size", "3", "--min-step", "1", "--max-step", "1"],
        "4 px patch",
        ["--patch-size", "4"],
    ),
]


@pytest.mark.parametrize("name,bad,needle,good", LIMITS, ids=[f"{c[0]}-{c[2]}" for c in LIMITS])
def test_method_limit_exits_2_in_one_line(name, bad, needle, good, capsys):
    assert needle in parse_fails(MODULES[name], bad, capsys)
    C.parse_args(MODULES[name].Args, bad + good)  # the later flag wins: now within the limits


# the smallest --batch-size and --img-size of each method, per backbone (CNN: ResNet, smallcnn)
LEAST_BATCH = {  # (CNN, ViT)
    "simclr": (2, 2),  # in-batch negatives
    "invaspread": (2, 2),
    "byol": (2, 2),  # BatchNorm in the heads, std over the batch
    "simsiam": (2, 2),
    "barlow_twins": (2, 2),
    "swav": (2, 2),  # Sinkhorn's equipartition over one sample: a uniform code
    "moco": (2, 1),  # the preset's v2: queue negatives; the CNN's (split) BatchNorm
    "instdisc": (2, 1),  # bank negatives; the CNN's BatchNorm
    "cmc": (2, 1),
    "dino": (2, 1),  # the centre is an EMA over steps; the CNN's BatchNorm
    "cpc": (1, 1),  # GroupNorm, negatives from the image's other patches
}
NETS = ["smallcnn", "resnet18", "vit_tiny"]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", FILES)
def test_smallest_batch_size(name, net, capsys):
    least = LEAST_BATCH[name][net == "vit_tiny"]
    if least > 1:
        argv = ["--arch", net, "--batch-size", str(least - 1)]
        msg = parse_fails(MODULES[name], argv, capsys)
        assert msg.startswith(f"error: --batch-size {least - 1}: ") and f"; pass >= {least}" in msg
    C.parse_args(MODULES[name].Args, ["--arch", net, "--batch-size", str(least)])


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("name", FILES)
def test_smallest_img_size(name, net, capsys):
    """A CNN halves the image 3 times (8 px: a 1x1 map); a ViT needs one patch (4 px at <= 64);
    CPC's ViT one patch per grid cell: 16 px (cells of 16 / 4 = 4 px)."""
    least = {"vit_tiny": 16 if name == "cpc" else 4}.get(net, 8)
    msg = parse_fails(MODULES[name], ["--arch", net, "--img-size", str(least - 1)], capsys)
    flag = "--patch-size" if name == "cpc" and net == "vit_tiny" else "--img-size"
    assert msg.startswith(f"error: {flag} ") and f"; pass {flag} >= " in msg, msg
    if flag == "--img-size":
        assert f"--img-size {least - 1}: " in msg and f"; pass --img-size >= {least}" in msg
    C.parse_args(MODULES[name].Args, ["--arch", net, "--img-size", str(least)])


# ==== --out-dir ===========================================================================
def test_out_dir_that_is_a_file_or_below_one(tmp_path, capsys):
    (f := tmp_path / "file").write_text("")
    for out in (f, f / "run"):
        msg = parse_fails(MODULES["simclr"], ["--out-dir", str(out)], capsys)
        assert f"{f} is a file" in msg
    new = tmp_path / "a" / "b"
    assert C.parse_args(MODULES["simclr"].Args, ["--out-dir", str(new)]).out_dir == str(new)
    assert not (tmp_path / "a").exists()  # checked, not created: prepare_run makes it


def test_out_dir_in_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        if os.access(ro, os.W_OK):  # root (geteuid 0) with its usual capabilities
            pytest.skip(f"euid {os.geteuid()} writes into a 0o500 folder anyway")
        for out in (ro, ro / "run"):
            msg = parse_fails(MODULES["simclr"], ["--out-dir", str(out)], capsys)
            assert f"cannot write in {ro}" in msg
    finally:
        ro.chmod(0o700)


def test_prepare_run_out_dir_error_is_one_line(tmp_path, capsys):
    (f := tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:  # main(args) not from parse_args: prepare_run says it
        C.prepare_run(MODULES["simclr"].Args(out_dir=str(f / "run")))
    assert e.value.code == 2 and str(e.value).startswith(f"error: --out-dir {f / 'run'}: ")
    assert capsys.readouterr().err.count("\n") == 1


# ==== end to end: the real command line ===================================================
NO_DATA = ["--dataset", "cifar10-npz", "--data-dir", "/nonexistent"]  # loading it would fail


@pytest.mark.parametrize(
    "cmd,line",
    [
        (["simclr.py", "--batch-size", "0"], "error: --batch-size 0: not >= 1; pass an integer"),
        (["swav.py", "--tau", "0"], "error: --tau 0.0: not > 0; pass a number > 0 (default 0.1)"),
        (["moco.py", "--out-dir", "moco.py"], "error: --out-dir moco.py: "),
    ],
)
def test_command_line_exits_2_with_one_line_before_loading_data(cmd, line):
    r = python(*cmd, *NO_DATA)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert error_lines(r.stderr)[0].startswith(line), r.stderr
