"""metrics.jsonl is the record of one run: strict JSON, one record of each (kind, step) whatever
the stops, kills and reruns; evaluations missing after a kill are made on resume, those made
already (with the same flags) are not made again, and fine-tuning records name their flags."""

import json

import pytest
import torch
from helpers import one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from test_resume import assert_same_records

import common as C
import simclr

# an epoch of 2 steps, the kNN monitor after each
MONITOR = ["--subset", 32, "--batch-size", 16, "--epochs", 2, "--knn-every", 1, "--knn-subset", 32]


def strict(out) -> list[dict]:
    """Every line parsed as strict JSON (a bare NaN or Infinity raises)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def assert_once(records: list[dict]):
    keys = [(C.record_kind(r), r.get("step")) for r in records]
    assert len(keys) == len(set(keys)), keys


def test_non_finite_stats_are_written_as_null_with_their_names(tmp_path, monkeypatch):
    """A statistic that is not a number (e.g. the collapse monitor's std over a batch of one
    image): the record says null and names it."""
    real = simclr.train_step

    def nan_std(*a):
        return {**real(*a), "z": (torch.ones(1, 4),)}  # a batch of one: no std

    monkeypatch.setattr(simclr, "train_step", nan_std)
    simclr.main(tiny_args(simclr, tmp_path, "--subset", 32, "--batch-size", 16, "--epochs", 1))
    logged = [r for r in strict(tmp_path) if "loss" in r]
    assert logged and all(r["z_std"] is None and r["nonfinite"] == ["z_std"] for r in logged)


def test_a_kill_before_the_epoch_end_evaluation_is_made_good_on_resume(tmp_path, monkeypatch):
    """Killed between the checkpoint at step 2 (an epoch end) and its kNN: the rerun evaluates
    there first, and metrics.jsonl equals a straight run's."""
    simclr.main(tiny_args(simclr, tmp_path / "a", *MONITOR))
    real = simclr.evaluate

    def killed(model, data, args, logger, step, final):
        if step == 2:
            raise KeyboardInterrupt
        return real(model, data, args, logger, step, final)

    monkeypatch.setattr(simclr, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        simclr.main(tiny_args(simclr, tmp_path / "b", *MONITOR))
    monkeypatch.setattr(simclr, "evaluate", real)
    simclr.main(tiny_args(simclr, tmp_path / "b", *MONITOR))
    assert_same_records(strict(tmp_path / "a"), strict(tmp_path / "b"))


def test_stops_kills_and_reruns_keep_one_record_of_each_step(tmp_path, monkeypatch):
    """--max-steps stops (each evaluated as an end), a kill inside a step, the end with the
    linear probe, then reruns of the finished run: strict JSON, each (kind, step) once, the
    straight run's records and the stops' evaluations; a rerun writes nothing, evaluates
    nothing."""
    flags = [*MONITOR, "--linear-epochs", 1, "--linear-cached", "--log-every", 1]
    run = lambda out, *extra: simclr.main(tiny_args(simclr, tmp_path / out, *flags, *extra))
    run("a")
    run("b", "--max-steps", 1)
    run("b", "--max-steps", 3)
    real = simclr.train_step

    def killed(model, batch, optimizer, scaler, step, args):
        if step == 3:
            raise KeyboardInterrupt
        return real(model, batch, optimizer, scaler, step, args)

    monkeypatch.setattr(simclr, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    monkeypatch.setattr(simclr, "train_step", real)
    run("b")
    text = (tmp_path / "b" / "metrics.jsonl").read_text()
    b = strict(tmp_path / "b")
    assert_once(b)
    ends = [r for r in b if C.record_kind(r) == "eval" and r["step"] in (1, 3)]  # --max-steps
    assert len(ends) == 2 and all("flags" in r for r in ends)
    assert_same_records(strict(tmp_path / "a"), [r for r in b if r not in ends])
    monkeypatch.setattr(simclr, "linear_probe", lambda *a: pytest.fail("evaluated again"))
    run("b")
    run("b")
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == text


def test_a_rerun_with_other_fine_tuning_flags_replaces_the_fine_tuning_record(tmp_path, capsys):
    """Fine-tuning records carry their flags; a rerun of the finished run with another --ft-lr
    fine-tunes again (only that), replaces the record in place and says so in a note."""
    flags = ["--subset", 60, "--batch-size", 16, "--finetune-fraction", 0.5, "--epochs", 1]
    flags += ["--ft-epochs", 1, 1, "--ft-batch-size", 10, "--resume", "auto"]
    simclr.main(tiny_args(simclr, tmp_path, *flags))
    first = strict(tmp_path)
    assert first[-1]["flags"]["ft_lr"] == [0.05, 0.05]
    capsys.readouterr()
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--ft-lr", 0.1, 0.1))
    err = capsys.readouterr().err
    records = strict(tmp_path)
    assert_once(records)
    assert len(records) == len(first) and records[:-1] == first[:-1]
    assert records[-1]["flags"]["ft_lr"] == [0.1, 0.1]
    notes = [x for x in err.splitlines() if x.startswith("note: ") and "fine-tuning" in x]
    assert len(notes) == 1 and "--ft-lr 0.1 0.1 (was 0.05 0.05)" in notes[0], err
