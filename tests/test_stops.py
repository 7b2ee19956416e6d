"""Runs that stop early keep what they trained: a diverging run never replaces its last good
checkpoint with a non-finite one, and SIGTERM (a cluster's preemption, sent to every process)
ends the run with a checkpoint at the step every rank agreed on, from which it resumes exactly."""

import importlib
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, TINY, VARIANTS, assert_same_tree, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from test_resume import assert_same_records, records

import common as C
import simclr

# 4 steps an epoch, logged only at the end of the run: the first check of the second epoch is
# its checkpoint at step 8
DIVERGE = ["--subset", 64, "--batch-size", 16, "--epochs", 3, "--log-every", 100]
KEPT = "the last good checkpoint (step 4) is kept; go on at a lower lr (or --amp off): python "


def load(path) -> dict:
    return torch.load(path, weights_only=False)


def all_finite(tree) -> bool:
    if torch.is_tensor(tree):
        return not tree.is_floating_point() or bool(tree.isfinite().all())
    items = tree.values() if isinstance(tree, dict) else tree
    return all(all_finite(x) for x in items) if isinstance(tree, (dict, list, tuple)) else True


@pytest.mark.parametrize("name", ["simclr_v1", "moco_v2", "swav"])
def test_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path, name):
    """An epoch at the preset's lr (checkpoint at step 4), then --lr 1e12: the weights overflow
    within the second epoch. Its checkpoint is refused in one line that names the step and the
    way out, ckpt.pth is still the step-4 file to the bit, and resuming at a sane lr trains on."""
    module, flags = importlib.import_module(VARIANTS[name][0]), VARIANTS[name][1]
    run = lambda *extra: module.main(tiny_args(module, tmp_path, *flags, *DIVERGE, *extra))
    run("--max-steps", 4)
    good = load(tmp_path / "ckpt.pth")
    with pytest.raises(SystemExit) as e:
        run("--lr", 1e12)
    assert e.value.code == 2
    whats = ("non-finite loss", "non-finite or exploded weights or state")
    assert any(str(e.value).startswith(f"error: {w} by step 8; {KEPT}") for w in whats)
    assert_same_tree(load(tmp_path / "ckpt.pth"), good)
    go_on(module, e.value, f"--resume {tmp_path / 'ckpt.pth'}", 12)


def go_on(module, error, resume: str, steps: int):
    """Run the command the error line ends with: it names --resume as given and trains on to
    the last step, with finite weights."""
    cmd = shlex.split(str(error).split(": ")[-1])
    assert cmd[:2] == ["python", f"{module.__name__}.py"] and resume in shlex.join(cmd)
    args = C.parse_args(module.Args, cmd[2:])
    module.main(args)
    ckpt = load(os.path.join(args.out_dir, "ckpt.pth"))
    assert ckpt["step"] == steps and all_finite(ckpt)


@pytest.mark.parametrize("name", ["simclr_v1", "moco_v2", "swav"])
def test_the_command_printed_by_a_diverged_run_trains_to_the_end(tmp_path, name):
    """--lr 1e6 from the start: the weights explode (SimCLR's LARS: x 1000 a step, the loss stays
    finite) or the loss does. No checkpoint of exploded weights is kept, and the command the
    error line prints (a lower lr, --resume: the checkpoint kept, or none) trains to the end."""
    module, flags = importlib.import_module(VARIANTS[name][0]), VARIANTS[name][1]
    flags = [*flags, "--subset", 64, "--batch-size", 16, "--epochs", 2]
    with pytest.raises(SystemExit) as e:
        module.main(tiny_args(module, tmp_path, *flags, "--lr", 1e6))
    assert e.value.code == 2
    kept = "no checkpoint was saved" not in str(e.value)
    if kept:
        assert all_finite(load(tmp_path / "ckpt.pth"))
    go_on(module, e.value, f"--resume {tmp_path / 'ckpt.pth'}" if kept else "--resume none", 8)


@pytest.mark.parametrize("what", ["bn_running_var", "optimizer_state"])
def test_non_finite_state_is_not_saved_though_the_loss_is_finite(tmp_path, monkeypatch, what):
    """State the loss does not read: a BN running variance (training reads batch statistics)
    or the optimizer's momentum, overflowed after the last step of the second epoch. The loss
    stays finite, and the checkpoint at step 8 is refused all the same."""
    step_fn = simclr.train_step

    def poisoned(model, batch, optimizer, scaler, step, args):
        stats = step_fn(model, batch, optimizer, scaler, step, args)
        if step == 7:
            net, state = C.unwrap(model), next(iter(optimizer.state.values()))
            bad = net.projector[1].running_var if what == "bn_running_var" else state["mu"]
            bad.view(-1)[0] = float("inf")
        return stats

    monkeypatch.setattr(simclr, "train_step", poisoned)
    simclr.main(tiny_args(simclr, tmp_path, *DIVERGE, "--max-steps", 4))
    good = load(tmp_path / "ckpt.pth")
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path, *DIVERGE))
    what = "non-finite or exploded weights or state"
    assert str(e.value).startswith(f"error: {what} by step 8; {KEPT}")
    assert_same_tree(load(tmp_path / "ckpt.pth"), good)
    assert all(r["loss"] == r["loss"] for r in records(tmp_path) if "loss" in r)  # finite


def test_sigterm_stops_at_the_next_log_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM arrives while step 1 trains; with --log-every 3 the ranks agree at step 3: the run
    saves a checkpoint there (mid-epoch) and exits with status 143. Resumed, it ends as a
    straight run: every tensor, every rank's RNG and metrics.jsonl. While training, the handler
    is the run's own; once main() ends, the one before it (here the test's) is back."""
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2, "--log-every", 3]
    run = lambda out, *extra: simclr.main(tiny_args(simclr, tmp_path / out, *flags, *extra))
    step_fn, handlers, reached = simclr.train_step, [], []

    def step_and_signal(model, batch, optimizer, scaler, step, args):
        handlers.append(signal.getsignal(signal.SIGTERM))
        if step == 0 and args.out_dir.endswith("b"):
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(model, batch, optimizer, scaler, step, args)

    ours = lambda signum, frame: reached.append(signum)
    before = signal.signal(signal.SIGTERM, ours)
    try:
        simclr.train_step = step_and_signal
        run("a", "--max-steps", 5)
        with pytest.raises(SystemExit) as e:
            run("b")
        assert signal.getsignal(signal.SIGTERM) is ours and not reached
        assert load(tmp_path / "b" / "ckpt.pth")["step"] == 3
        run("b", "--max-steps", 5)
    finally:
        simclr.train_step = step_fn
        signal.signal(signal.SIGTERM, before)
    line = "stopped by SIGTERM at step 3; checkpoint saved, run the same command to resume"
    assert e.value.code == 143 and str(e.value) == line
    assert handlers and all(h is not ours for h in handlers)
    a, b = load(tmp_path / "a" / "ckpt.pth"), load(tmp_path / "b" / "ckpt.pth")
    assert a["step"] == b["step"] == 5
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)
    assert_same_records(records(tmp_path / "a"), records(tmp_path / "b"))


def start(cmd, out):
    """A run in its own process group; returns once its first step is in metrics.jsonl."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        [sys.executable, *map(str, cmd)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0, metrics = time.time(), out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if p.poll() is not None or time.time() - t0 > 120:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run did not start: {p.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return p


def finish(p, timeout=120) -> str:
    try:
        return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        for pid in children(p.pid).values():  # torchrun's workers: sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL)
        raise


def test_python_run_killed_by_sigterm_resumes_bit_exact(tmp_path):
    """`python simclr.py` with 2 DataLoader workers: SIGTERM to every process (as a scheduler
    sends it) after the first logged step (16 steps an epoch). The workers outlive it, the run
    stops within the epoch with a checkpoint at step k and status 143; resumed for 2 more steps
    (no workers: the views do not depend on them) it equals a straight run of k + 2 steps."""
    flags = [*TINY, "--subset", 256, "--batch-size", 16, "--epochs", 50]
    p = start(["simclr.py", *flags, "--workers", 2, "--out-dir", tmp_path / "b"], tmp_path / "b")
    os.killpg(p.pid, signal.SIGTERM)
    err = finish(p)
    k = load(tmp_path / "b" / "ckpt.pth")["step"]
    assert p.returncode == 143 and 0 < k < 16, err[-2000:]
    line = f"stopped by SIGTERM at step {k}; checkpoint saved, run the same command to resume"
    assert line in err.splitlines() and "Traceback" not in err
    for out in "ab":
        simclr.main(tiny_args(simclr, tmp_path / out, *flags[len(TINY) :], "--max-steps", k + 2))
    a, b = load(tmp_path / "a" / "ckpt.pth"), load(tmp_path / "b" / "ckpt.pth")
    assert a["step"] == b["step"] == k + 2
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)


def children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun started."""
    ranks = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except (OSError, ValueError):
            continue
        if ppid == pid and b"RANK" in env:
            ranks[int(env[b"RANK"])] = int(p)
    return ranks


def test_torchrun_sigterm_to_one_rank_stops_both_at_a_log_step(tmp_path):
    """2 processes, SIGTERM to rank 1 only: rank 0 learns of it at the next log step (every 3
    steps), both save one checkpoint there with both ranks' states, and both exit."""
    flags = [*TINY, "--subset", 256, "--batch-size", 16, "--epochs", 50, "--log-every", 3]
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "simclr.py"]
    p = start([*cmd, *flags, "--out-dir", tmp_path], tmp_path)
    os.kill(children(p.pid)[1], signal.SIGTERM)
    err = finish(p)
    ckpt = load(tmp_path / "ckpt.pth")
    k = ckpt["step"]
    line = f"stopped by SIGTERM at step {k}; checkpoint saved, run the same command to resume"
    assert line in err.splitlines() and k % 3 == 0 and len(ckpt["ranks"]) == 2, err[-3000:]
    assert p.returncode != 0 and "exitcode  : 143" in err, err[-3000:]


def test_a_timed_checkpoint_survives_a_hard_kill_and_resumes_exactly(tmp_path, monkeypatch):
    """--ckpt-minutes (a tiny fraction: due at every log step) checkpoints mid-epoch (4 steps an
    epoch, a log step every 2): a run killed inside step 4, which saves nothing on the way out,
    resumes from step 2 and ends as a straight run, as does one that is not killed."""
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2, "--log-every", 2]
    run = lambda out, *extra: simclr.main(tiny_args(simclr, tmp_path / out, *flags, *extra))
    run("a", "--max-steps", 6, "--ckpt-minutes", 0)
    run("c", "--max-steps", 6, "--ckpt-minutes", 1e-9)
    real = simclr.train_step

    def killed(model, batch, optimizer, scaler, step, args):
        if step == 3:
            raise KeyboardInterrupt  # as a SIGKILL: no checkpoint on the way out
        return real(model, batch, optimizer, scaler, step, args)

    monkeypatch.setattr(simclr, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run("b", "--ckpt-minutes", 1e-9)
    assert load(tmp_path / "b" / "ckpt.pth")["step"] == 2
    monkeypatch.setattr(simclr, "train_step", real)
    run("b", "--max-steps", 6, "--ckpt-minutes", 1e-9)
    a = load(tmp_path / "a" / "ckpt.pth")
    for out in "bc":
        b = load(tmp_path / out / "ckpt.pth")
        assert a["step"] == b["step"] == 6
        for key in ("model", "optimizer", "scaler", "ranks"):
            assert_same_tree(a[key], b[key], key)
        assert_same_records(records(tmp_path / "a"), records(tmp_path / out))
