"""Small shared helpers for the tests (not collected: no test_ prefix)."""

import contextlib
import dataclasses
import os
import subprocess
import tempfile
from typing import NamedTuple

import forks
import pytest
import torch

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--arch", "smallcnn", "--img-size", "16", "--workers", "0"]
TINY += ["--knn-every", "0", "--linear-epochs", "0", "--log-every", "1", "--device", "cpu"]
# every variant with CPU-sized flags (small heads, queues and banks): name -> (module, flags)
VARIANTS = {
    "simclr_v1": ("simclr", []),
    "simclr_v2": ("simclr", ["--version", "v2"]),
    "moco_v1": ("moco", ["--version", "v1", "--queue-size", "32"]),
    "moco_v2": ("moco", ["--version", "v2", "--queue-size", "32"]),
    "moco_v3": ("moco", ["--version", "v3"]),
    "instdisc": ("instdisc", ["--nce-k", "8"]),
    "invaspread": ("invaspread", []),
    "cmc": ("cmc", ["--nce-k", "8"]),
    "cpc": ("cpc", ["--context-dim", "16", "--context-blocks", "2"]),
    "swav": (
        "swav",
        ["--hidden-dim", "64", "--n-prototypes", "32", "--dim", "16", "--n-local", "2"]
        + ["--queue-length", "32", "--epoch-queue-starts", "0"],
    ),
    "byol": ("byol", ["--hidden-dim", "64", "--pred-hidden-dim", "32"]),
    "simsiam": ("simsiam", ["--dim", "64", "--pred-dim", "16", "--proj-hidden", "64"]),
    "barlow_twins": ("barlow_twins", ["--projector", "64-64-32"]),
    "dino": (
        "dino",
        ["--hidden-dim", "32", "--bottleneck-dim", "16", "--out-dim", "64", "--n-local", "2"],
    ),
}


@contextlib.contextmanager
def float64():
    """Float64 for a real network's steps: fp32 rounding through BatchNorm at a batch of 4-8 and
    LARS at a large lr depends on the CPU's kernels (AVX2 gives 2-5x the noise of AVX-512 on the
    same steps, up to 5e-5 of a tensor's magnitude); in float64 both sides agree to ~1e-12, so the
    1e-5 tolerances hold on any CPU and torch version."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)  # autouse where a test module imports it
def one_thread():
    """Small ops: one intra-op thread is much faster on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(module, out_dir, *extra):
    """Args for a seconds-long CPU run: synthetic 16px images, the small CNN, no evaluation."""
    return C.parse_args(module.Args, [*TINY, "--out-dir", str(out_dir), *map(str, extra)])


def built_by_main(module, monkeypatch, tmp_path, *flags):
    """module.main(tiny args + flags) as it runs, stopped where it calls fit: the real model,
    optimizer (with its parameter groups), data and args (with args.sched), which the official-loop
    parity tests step beside their restatement of the official code."""
    got = {}
    monkeypatch.setattr(
        module, "fit", lambda model, opt, data, args: got.update(m=model, o=opt, d=data)
    )
    module.main(args := tiny_args(module, tmp_path, *flags))
    return got["m"], got["o"], args, got["d"]


_forks = []  # the fork server (forks.py), started by the first python()


def python(*args, timeout=240, cwd=ROOT):
    """`python ARGS` as a fork of an interpreter that has imported torch and every file."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if not _forks or _forks[0].proc.poll() is not None:
        _forks[:] = [forks.Client(env)]
    with tempfile.TemporaryDirectory() as d:
        out, err = os.path.join(d, "out"), os.path.join(d, "err")
        rc = _forks[0].run([*map(str, args)], str(cwd), env, out, err, timeout)
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess(args, rc, o.read(), e.read())


def torchrun(nproc, *args, **kw):
    return python(
        "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args, **kw
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_same_tree(a, b, path="ckpt"):
    """Nested dicts/lists of tensors and values are equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_resume_exact(module, tmp_path, *flags) -> dict:
    """4 steps straight == 2 steps (--max-steps 2: stop mid-epoch, checkpoint) + resume + 2 steps:
    model (with buffers), optimizer, scaler and every rank's RNG. Returns the 4-step checkpoint."""
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2, *flags]  # an epoch is 4 steps
    for out, steps in (("a", 4), ("b", 2), ("b", 4)):
        module.main(tiny_args(module, tmp_path / out, *flags, "--max-steps", steps))
    a, b = (torch.load(tmp_path / o / "ckpt.pth", weights_only=False) for o in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)
    return a


# ---- official values, pinned: each tests/test_official_<method>.py holds an OFFICIAL table ----
class Ref(NamedTuple):
    """An official value and where it is written: [paper §/Tab; ref: repository file]."""

    value: object
    cite: str


class Dev(NamedTuple):
    """A value the project chose on purpose instead of the official one: why, and the measured
    size of the difference (listed in the README's deviations too)."""

    value: object
    official: object
    why: str


# RunArgs flags that are not a recipe value: where the data is, how to run, how often to log
RUN_FLAGS = {
    *("preset", "dataset", "data_dir", "img_size", "subset", "workers", "pipeline", "out_dir"),
    *("resume", "seed", "amp", "compile", "device", "log_every", "max_steps", "knn_every"),
    *("knn_k", "knn_t", "knn_subset", "linear_cached", "finetune_fraction", "finetune_list"),
    "ckpt_minutes",
    "eval_dir",
    "init",
}
SV2 = "SimCLR v2's protocol (none in the official code) [SimCLRv2 §4; ref: simclr README"
# the fine-tuning protocol C.RunArgs holds: SimCLR v2's, for the methods with none of their own
FT_SIMCLR_V2 = {
    "ft_epochs": Ref((60, 30), f"{SV2} '--train_epochs=60' (1%); SimCLR App. B.5: 30 (10%)]"),
    "ft_batch_size": Ref(1024, f"{SV2} '--train_batch_size=1024']"),
    "ft_lr": Ref((0.005, 0.005), f"{SV2} '--learning_rate=0.005 --learning_rate_scaling=sqrt']"),
    "ft_head_lr": Ref((0.005, 0.005), f"{SV2}: one lr for every variable]"),
    "ft_lr_scaling": Ref("sqrt", f"{SV2} '--learning_rate_scaling=sqrt']"),
    "ft_optimizer": Ref("lars", f"{SV2} '--optimizer=lars'; lars_optimizer.py]"),
    "ft_milestones": Ref((), f"{SV2} '--warmup_epochs=0'; model_util.py: cosine]"),
    "ft_decay": Ref(0.1, "unused without --ft-milestones (cosine) [model_util.py]"),
    "ft_epoch_lr": Ref(False, f"{SV2}; the schedule reads the global step]"),
    "ft_sync_bn": Ref(True, f"{SV2} '--global_bn=True']"),
    "ft_head_init": Ref("zero", f"{SV2} '--zero_init_logits_layer=True']"),
    "ft_best": Ref(False, f"{SV2} '--mode=train_then_eval': the latest checkpoint's top-1]"),
}


def official(entry: dict, field: str):
    """The official value of a table entry (a Dev's official, not the project's, value)."""
    v = entry[field]
    return v.official if isinstance(v, Dev) else v.value


def method_fields(module) -> set:
    """Every field of module.Args that is a recipe value: all flags but RUN_FLAGS."""
    fields = dataclasses.fields(module.Args)
    return {f.name for f in fields if not f.metadata.get("derived") and f.name not in RUN_FLAGS}


def assert_official(module, table: dict):
    """Every (preset, version) the method has is in `table` ({flags: {field: Ref | Dev}}), every
    entry names every recipe field, and the values the project resolves for those flags are the
    table's (a Dev's project value, which must differ from its official one and say why)."""
    fields = {f.name: f for f in dataclasses.fields(module.Args)}
    for preset in C.PRESETS:
        for version in fields["version"].metadata["choices"] if "version" in fields else [None]:
            want = {"--preset", preset} | ({"--version", version} if version else set())
            assert any(want <= set(flags) for flags in table), f"no table entry for {want}"
    bad = []
    for flags, entry in table.items():
        args = C.parse_args(module.Args, list(flags))
        missing, extra = method_fields(module) - entry.keys(), entry.keys() - fields.keys()
        assert not missing and not extra, f"{flags}: fields missing {missing}, unknown {extra}"
        for name, v in entry.items():
            assert isinstance(v, (Ref, Dev)), f"{flags} {name}: a Ref or a Dev, not {v!r}"
            assert (v.cite if isinstance(v, Ref) else v.why).strip(), f"{flags} {name}: no source"
            if isinstance(v, Dev):
                assert v.value != v.official, f"{flags} {name}: a Dev equal to the official value"
            got = getattr(args, name)
            if got != v.value or type(got) is not type(v.value):
                bad.append(f"{' '.join(flags)}: {name} = {got!r}, table {v!r}")
    assert not bad, "\n".join(bad)


def close_rel(a, b, msg="", rtol=1e-5):
    """a == b to rtol of b's magnitude (max |b|): float noise on a tiny tensor stays small against
    that tensor's own scale, while a real difference (a missing term) does not."""
    b = torch.as_tensor(b, dtype=a.dtype)
    if not (b.numel() and b.is_floating_point()):
        return torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)
    atol = rtol * max(b.abs().max().item(), 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")
