"""Resume with the kNN monitor on, metrics.jsonl after a resume, the run folder at start (stale
temp files, one run per --out-dir)."""

import fcntl
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, TINY, assert_same_tree, built_by_main, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import VARIANTS

import common as C
import moco
import simclr

# an epoch of 2 steps; the monitor after every epoch: the straight run evaluates right after the
# checkpoint at step 2 that the stopped run resumes from
MONITOR = ["--subset", 32, "--batch-size", 16, "--epochs", 2, "--knn-every", 1, "--knn-subset", 32]


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(a: list[dict], b: list[dict]):
    """The same steps in the same order (InstDisc's and InvaSpread's end-of-run paper kNN has no
    step), equal values but for the timing."""
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert {k: v for k, v in x.items() if k != "img_s"} == {
            k: v for k, v in y.items() if k != "img_s"
        }


def run(module, out, *flags):
    module.main(tiny_args(module, out, *MONITOR, *flags))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_is_exact_with_the_knn_monitor(tmp_path, name):
    """4 steps straight (kNN at steps 0, 2, 4) == 2 steps + resume + 2 steps: every tensor of the
    checkpoint, every rank's RNG and metrics.jsonl record by record. Evaluation draws from its
    own streams, so the training streams (e.g. MoCo's key permutation, InstDisc's noise) are
    those a run without the monitor would see."""
    module, flags = importlib.import_module(VARIANTS[name][0]), VARIANTS[name][1]
    for out, steps in (("a", 4), ("b", 2), ("b", 4)):
        run(module, tmp_path / out, *flags, "--max-steps", steps)
    a, b = (torch.load(tmp_path / o / "ckpt.pth", weights_only=False) for o in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)
    ra = records(tmp_path / "a")
    assert [r["step"] for r in ra if "knn_top1" in r] == [0, 2, 4]  # after the checkpoint at 2
    assert_same_records(ra, records(tmp_path / "b"))


def test_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 2 has logged steps 3 and 4 (and a line cut
    short): the resumed run trains them again and metrics.jsonl has every record once, as the
    straight run's. A fresh start (--resume none) starts the file anew."""
    flags, a, b = VARIANTS["moco_v2"][1], tmp_path / "a", tmp_path / "b"
    run(moco, a, *flags, "--max-steps", 4)
    run(moco, b, *flags, "--max-steps", 2)
    shutil.copy(b / "ckpt.pth", tmp_path / "step2.pth")
    run(moco, b, *flags, "--max-steps", 4)
    shutil.copy(tmp_path / "step2.pth", b / "ckpt.pth")  # killed before the checkpoint at 4
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    run(moco, b, *flags, "--max-steps", 4)
    assert_same_records(records(a), records(b))
    run(moco, b, *flags, "--max-steps", 2, "--resume", "none")
    assert_same_records(records(a)[:4], records(b))  # kNN at 0, steps 1 and 2, kNN at 2


def test_stale_temp_files_are_removed_at_start(tmp_path, monkeypatch):
    """Saves cut short by a kill leave <name>.tmp (C.save_checkpoint): gone when a run starts."""
    (tmp_path / "ckpt.pth.tmp").write_bytes(b"cut short")
    (tmp_path / "metrics.jsonl.tmp").write_text("cut short")
    (tmp_path / "notes.txt").write_text("not ours")
    built_by_main(simclr, monkeypatch, tmp_path)  # up to fit: nothing saved yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt", "run.lock"]


def test_a_second_run_on_the_out_dir_refuses_and_a_killed_one_leaves_no_lock(tmp_path, monkeypatch):
    """A real run holds the folder: another run stops at start with one line, before writing
    anything there; once the first is killed (SIGKILL: no clean-up of its own), runs start."""
    flags = ["--subset", 32, "--batch-size", 16, "--epochs", 100_000, "--out-dir", tmp_path]
    cmd = [sys.executable, "simclr.py", *TINY, *map(str, flags)]
    env, out = {**os.environ, "OMP_NUM_THREADS": "1"}, subprocess.DEVNULL
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        lock, t0 = tmp_path / "run.lock", time.time()
        while not (tmp_path / "ckpt.pth").exists():  # an epoch done: config.json written
            assert first.poll() is None and time.time() - t0 < 120, "the first run did not start"
            time.sleep(0.05)
        assert lock.read_text() == str(first.pid)
        config = (tmp_path / "config.json").read_text()
        with pytest.raises(SystemExit) as e:
            simclr.main(tiny_args(simclr, tmp_path, "--subset", 32, "--batch-size", 16))
        msg = str(e.value)
        assert msg.startswith("error: ") and "\n" not in msg, msg
        assert f"another run (pid {first.pid})" in msg and "pass another --out-dir" in msg, msg
        assert (tmp_path / "config.json").read_text() == config  # untouched by the refused run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    built_by_main(simclr, monkeypatch, tmp_path, "--resume", "none")  # starts: no stale lock


def test_the_lock_ends_with_main_also_when_main_fails(tmp_path, monkeypatch):
    """In one process main() may run on a folder again: the lock is dropped when it returns and
    when it fails (SystemExit), so another process can take the folder."""
    monkeypatch.setattr(simclr, "fit", lambda *a: C.fail("stopped in fit"))
    with pytest.raises(SystemExit, match="stopped in fit"):
        simclr.main(tiny_args(simclr, tmp_path))
    with open(tmp_path / "run.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no BlockingIOError


def test_eval_rng_restores_the_training_streams_and_is_seeded(tmp_path):
    """Inside: torch and Python draws fixed by --seed, whatever the outer state; after: the outer
    streams continue as if the block had not run."""
    args = tiny_args(simclr, tmp_path, "--seed", 3)
    draw = lambda: (torch.rand(3), random.random())
    inside = []
    for outer in (0, 1):
        torch.manual_seed(outer), random.seed(outer)
        expected = draw()
        torch.manual_seed(outer), random.seed(outer)
        with C.eval_rng(args):
            inside.append(draw())
        after = draw()
        assert torch.equal(after[0], expected[0]) and after[1] == expected[1]
    assert torch.equal(inside[0][0], inside[1][0]) and inside[0][1] == inside[1][1]
    torch.manual_seed(3), random.seed(3)
    seeded = draw()
    assert torch.equal(inside[0][0], seeded[0]) and inside[0][1] == seeded[1]
