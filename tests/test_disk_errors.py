"""A write the disk or the folder refuses (full disk, quota, read-only, no permission), at start
or mid-run, and a folder whose every image is broken end the run with one line: what could not
be written, why, what is intact and the way on; exit status non-zero, no traceback."""

import builtins
import errno
import os

import pytest
import torch
from helpers import TINY, one_thread, python, tiny_args  # noqa: F401 (one_thread: an autouse fixture)

import common as C
import simclr

# 2 steps an epoch: checkpoints at steps 2, 4 (and backbone.pth at the end)
FLAGS = ["--subset", 32, "--batch-size", 16, "--epochs", 2]
FULL, RO = os.strerror(errno.ENOSPC), os.strerror(errno.EROFS)


def fails_in_one_line(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        simclr.main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").split("\n") if x.strip()]
    assert e.value.code not in (0, None) and lines[-1] == str(e.value), lines[-3:]
    assert "Traceback" not in err and lines[-1].count("error: ") == 1
    return lines[-1]


def test_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    calls = []
    real = torch.save

    def save(obj, f, *a, **kw):  # the second checkpoint (step 4) meets a full disk
        calls.append(f)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, FULL)
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    line = fails_in_one_line(tiny_args(simclr, tmp_path, *FLAGS), capsys)
    ckpt = tmp_path / "ckpt.pth"
    kept = f"{ckpt} (step 2) is intact: free space and rerun to resume"
    assert line == f"error: cannot write {ckpt}.tmp: {FULL}; {kept}"
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.setattr(torch, "save", real)
    simclr.main(tiny_args(simclr, tmp_path, *FLAGS))  # rerun: resumes, finishes
    assert torch.load(ckpt, weights_only=False)["step"] == 4
    assert not (tmp_path / "ckpt.pth.tmp").exists()  # the partial file is gone


def test_a_folder_made_read_only_mid_run(tmp_path, monkeypatch, capsys):
    """After the first checkpoint (step 2) the next metrics record meets a read-only folder."""
    real, saved = builtins.open, []

    def opener(path, mode="r", *a, **kw):
        if str(path).endswith("ckpt.pth.tmp"):
            saved.append(path)
        if saved and str(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(errno.EROFS, RO, str(path))
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(C, "open", opener, raising=False)
    line = fails_in_one_line(tiny_args(simclr, tmp_path, *FLAGS), capsys)
    kept = f"{tmp_path / 'ckpt.pth'} (step 2) is intact: make it writable and rerun to resume"
    assert line == f"error: cannot write {tmp_path / 'metrics.jsonl'}: {RO}; {kept}"


def test_full_disk_at_start(tmp_path, monkeypatch, capsys):
    """A rerun rewrites metrics.jsonl (trim_metrics) before its first step: nothing saved yet."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    real = builtins.open

    def opener(path, mode="r", *a, **kw):
        if str(path).endswith(".tmp") and "w" in mode:
            raise OSError(errno.ENOSPC, FULL, str(path))
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(C, "open", opener, raising=False)
    line = fails_in_one_line(tiny_args(simclr, tmp_path, *FLAGS), capsys)
    what = f"cannot write {tmp_path / 'metrics.jsonl.tmp'}: {FULL}"
    assert line == f"error: {what}; no checkpoint was saved: free space and rerun"


def test_other_os_errors_keep_their_traceback(tmp_path, monkeypatch):
    def save(obj, f, *a, **kw):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError):  # not a refused write: a bug or a failing disk, shown in full
        simclr.main(tiny_args(simclr, tmp_path, *FLAGS))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_folder_of_broken_images(tmp_path, workers):
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / "train" / c / f"{i}.jpg").write_bytes(b"not an image")
    flags = ["--dataset", "folder", "--data-dir", tmp_path / "data", "--batch-size", 2]
    tiny = [str(workers) if i and TINY[i - 1] == "--workers" else x for i, x in enumerate(TINY)]
    r = python("simclr.py", *tiny, *flags, "--out-dir", tmp_path / "out", timeout=120)
    lines = [x for x in r.stderr.replace("\r", "\n").split("\n") if x.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    train = tmp_path / "data" / "train"
    assert lines[-1].startswith(f"error: no file under {train} can be decoded as an image; ")
