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
from types import SimpleNamespace

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
    built_by_main(simclr, monkeypatch, tmp_path)  # up to fit: nothing saved yet (config.json:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.lock"]  # at resume)


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


# ==== resuming with other settings =========================================================
BASE = ["--subset", 64, "--batch-size", 16, "--epochs", 2]  # 4 steps an epoch
ANEW = "or --resume none / another --out-dir to start anew"


def test_a_resume_that_changes_the_schedule_or_the_samples_is_refused(tmp_path):
    """Each of these changes which images a step trains on or where the step sits in the
    schedules (the lr's warm-up and cosine span --epochs): refused in one line naming the flag,
    both values and the ways out, before anything is loaded; ckpt.pth and config.json stay."""
    simclr.main(tiny_args(simclr, tmp_path, *BASE, "--max-steps", 1))
    ckpt, config = (tmp_path / "ckpt.pth").read_bytes(), (tmp_path / "config.json").read_text()
    changes = [("--batch-size", 32, 16), ("--epochs", 3, 2), ("--warmup-epochs", 1, 10)]
    changes += [("--seed", 1, 0), ("--subset", 96, 64)]
    for flag, now, was in changes:
        with pytest.raises(SystemExit) as e:
            simclr.main(tiny_args(simclr, tmp_path, *BASE, flag, now))
        why = f"{flag} {now} differs from the checkpoint's {was}; pass {flag} {was} to resume"
        assert str(e.value) == f"error: {why}, {ANEW}"
        assert (tmp_path / "ckpt.pth").read_bytes() == ckpt
        assert (tmp_path / "config.json").read_text() == config


def test_a_resume_on_data_that_grew_is_refused(tmp_path):
    """The same flags on a folder that gained images: more steps per epoch, so the checkpoint's
    step is another place in the epoch and the schedule: refused."""
    from PIL import Image

    data, out = tmp_path / "data", tmp_path / "out"
    for i in range(24):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(data / f"c{i % 2}" / f"{i}.png")
    flags = ["--dataset", "folder", "--data-dir", data, "--batch-size", 8, "--epochs", 2]
    simclr.main(tiny_args(simclr, out, *flags, "--max-steps", 1))
    for i in range(24, 32):
        Image.new("RGB", (16, 16), (i * 5, 0, 0)).save(data / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, out, *flags))
    why = "the training data gives 4 steps per epoch, the checkpoint's 3 (images added or removed?)"
    assert str(e.value) == f"error: {why}; restore them to resume, {ANEW}"


def test_a_resume_may_change_other_settings_and_lists_them_in_a_note(tmp_path, capsys):
    """--lr and --amp (the ways out of a divergence) and settings of logging and evaluation
    may change: the run resumes, one note lists the changes that touch training (not --log-every
    or --max-steps), and config.json is the resumed run's."""
    simclr.main(tiny_args(simclr, tmp_path, *BASE, "--max-steps", 1))
    capsys.readouterr()
    simclr.main(tiny_args(simclr, tmp_path, *BASE, "--max-steps", 2, "--lr", 0.5, "--log-every", 2))
    assert "note: resuming step 1 with --lr 0.5 (was 1.0)" in capsys.readouterr().err.splitlines()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.5
    assert torch.load(tmp_path / "ckpt.pth", weights_only=False)["step"] == 2


def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path):
    """config.json is written once the checkpoint is loaded: a corrupt checkpoint stops the run
    with the previous run's config.json in place."""
    (tmp_path / "ckpt.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "config.json").write_text("the previous run's")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        simclr.main(tiny_args(simclr, tmp_path, *BASE))
    assert (tmp_path / "config.json").read_text() == "the previous run's"


def test_a_checkpoint_of_another_model_is_named_in_one_line(tmp_path):
    """Another --arch: the first missing and unexpected tensors; another --proj-dim: the first
    tensors of other shapes, both shapes given. One line, with the ways out."""
    simclr.main(tiny_args(simclr, tmp_path, *BASE, "--max-steps", 1))
    head = f"error: checkpoint {tmp_path / 'ckpt.pth'} does not fit this model: "
    tail = "; pass --resume none or another --out-dir"
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path, *BASE, "--arch", "resnet18"))
    missing = "missing backbone.conv1.weight, backbone.bn1.weight, backbone.bn1.bias ..."
    unexpected = "unexpected backbone.0.weight, backbone.1.weight, backbone.1.bias ..."
    shape = "shape of projector.0.weight: checkpoint [256, 256], model [512, 512]"
    assert str(e.value).startswith(f"{head}{missing}; {unexpected}; {shape}; shape of ")
    assert str(e.value).endswith(f" ...{tail}") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path, *BASE, "--proj-dim", 64))
    shapes = [("projector.3.weight", [128, 256], [64, 256])]
    shapes += [(f"projector.4.{k}", [128], [64]) for k in ("weight", "bias", "running_mean")]
    shapes = "; ".join(f"shape of {k}: checkpoint {a}, model {b}" for k, a, b in shapes[:3])
    assert str(e.value) == f"{head}{shapes} ...{tail}"


def test_a_checkpoint_of_another_method_or_version_is_named_first(tmp_path):
    """Another method file's checkpoint (in --out-dir, or given to --resume), or another
    --version's: said first, in one line, before any setting or tensor is compared."""
    simclr.main(tiny_args(simclr, tmp_path / "a", *BASE, "--max-steps", 1))
    path, way = tmp_path / "a" / "ckpt.pth", "pass --resume none or another --out-dir"
    for out, flags in (("a", []), ("b", ["--resume", path])):
        with pytest.raises(SystemExit) as e:
            moco.main(tiny_args(moco, tmp_path / out, *BASE, "--queue-size", 32, *flags))
        assert str(e.value) == f"error: {path} is a simclr.py checkpoint, not moco.py's; {way}"
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path / "a", *BASE, "--version", "v2"))
    why = "--version v2 differs from the checkpoint's v1; pass --version v1 to resume"
    assert str(e.value) == f"error: {why}, {ANEW}"


class Keys(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, key):  # ResumableSampler's (index, epoch) -> the index
        return key[0]


def test_every_world_size_trains_the_same_images_at_each_step():
    """make_loader's shards, as fit uses them (set_epoch(epoch, steps done x per-rank batch)):
    global batch k (every rank's k-th batch together) holds the same images for 1, 2 or 4
    processes, from the start of an epoch and after a resume 2 steps into it. So a checkpoint
    may be resumed by another number of processes with the same global batch (--batch-size),
    anywhere: no image is trained twice or skipped."""

    def global_batches(world: int, skip: int) -> list[list[int]]:
        ranks = []
        for rank in range(world):
            args = SimpleNamespace(world_size=world, rank=rank, seed=3, workers=0, device="cpu")
            loader = C.make_loader(Keys(), args, 8 // world)
            loader.sampler.set_epoch(5, skip * loader.batch_size)
            ranks.append([b.tolist() for b in loader])
        return [sorted(sum(batches, [])) for batches in zip(*ranks)]

    one = global_batches(1, 0)
    assert len(one) == 50 // 8 and sorted(sum(one, [])) != list(range(48))  # shuffled, 6 steps
    for world in (1, 2, 4):
        assert global_batches(world, 0) == one
        assert global_batches(world, 2) == one[2:]
