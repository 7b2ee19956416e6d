"""Small shared helpers for the tests (not collected: no test_ prefix)."""

import os
import signal
import subprocess
import sys

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


def run(cmd, timeout=240, cwd=ROOT):
    """Run a command (own process group: a hung torchrun is killed with all its workers)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def python(*args, **kw):
    return run([sys.executable, *map(str, args)], **kw)


def torchrun(nproc, *args, **kw):
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            *map(str, args),
        ],
        **kw,
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
