"""What a first run meets: --help with the values of the recipe selected, a bar that moves from
the first step and during feature extraction, a linear probe that trains when its training set
is smaller than one batch, the evaluation's settings checked before training, the encoder kept
when the final evaluation fails, and the end-of-run summary."""

import json
import os
import re

import pytest
import torch
from helpers import TINY, error_lines, one_thread, python, tiny_args, torchrun  # noqa: F401

import common as C
import moco
import simclr
import swav


# ==== --help: the resolved value of every flag ==============================================
def help_defaults(module, argv, capsys) -> dict:
    """`--help` with argv -> {flag: the text of its "(default: ...)"}, from the options list."""
    with pytest.raises(SystemExit) as e:
        C.parse_args(module.Args, argv)
    assert e.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = re.split(r"\n(?=  -)", text)  # an option's entry starts at a 2-space indent
    out = {}
    for entry in entries:
        entry = " ".join(entry.split())
        if entry.startswith("--"):
            found = re.findall(r"\(default: ([^)]*)\)", entry)
            out[entry.split()[0].rstrip(",")] = found[-1] if found else None
    return out


def typed(v) -> str:  # a value as one types it (a tuple: its elements, empty: none)
    return (" ".join(map(str, v)) or "none") if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize(
    "module,sel",
    [
        (simclr, ["--preset", "cifar"]),
        (simclr, ["--preset", "imagenet"]),
        (simclr, ["--preset", "imagenet", "--version", "v2"]),
        (moco, ["--version", "v3"]),
        (moco, ["--version", "v3", "--arch", "vit_small", "--preset", "imagenet"]),
    ],
)
def test_help_shows_the_resolved_value_of_every_flag(module, sel, capsys):
    """Each flag's "(default: ...)" is what the run takes without that flag, for sel."""
    shown = help_defaults(module, [*sel, "--help"], capsys)
    args = C.parse_args(module.Args, sel)
    for f in C.dataclasses.fields(args):
        if not f.metadata.get("derived"):
            flag = "--" + f.name.replace("_", "-")
            if flag in sel:  # a selection flag given: its default is the value without it
                i = sel.index(flag)
                default = getattr(C.parse_args(module.Args, sel[:i] + sel[i + 2 :]), f.name)
            else:
                default = getattr(args, f.name)
            if default != "":  # --out-dir, --device: their help says what "" means
                assert shown.get(flag) == typed(default), flag


def test_help_defaults_follow_preset_and_version(capsys):
    cifar = help_defaults(simclr, ["--preset", "cifar", "--help"], capsys)
    imagenet = help_defaults(simclr, ["-h", "--preset", "imagenet"], capsys)  # -h first, too
    assert (cifar["--epochs"], imagenet["--epochs"]) == ("1000", "100")
    assert (cifar["--arch"], imagenet["--arch"]) == ("resnet18", "resnet50")
    v1 = help_defaults(simclr, ["--preset", "imagenet", "--help"], capsys)
    v2 = help_defaults(simclr, ["--preset", "imagenet", "--version", "v2", "--help"], capsys)
    assert (v1["--proj-layers"], v2["--proj-layers"]) == ("2", "3")
    assert (v1["--epochs"], v2["--epochs"]) == ("100", "800")
    m2, m3 = (help_defaults(moco, [*v, "--help"], capsys) for v in ([], ["--version", "v3"]))
    assert (m2["--optimizer"], m3["--optimizer"]) == ("sgd", "lars")


# ==== linear probe on fewer images than one batch ===========================================
@pytest.fixture
def sgd_steps(monkeypatch):
    """The lr of every SGD step (the linear probe's optimizer; the methods train with others)."""
    lrs, step = [], torch.optim.SGD.step

    def counted(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    return lrs


def test_linear_probe_on_fewer_cached_features_than_one_batch_trains(tmp_path, sgd_steps, capsys):
    """200 cached features, batch 256: one batch of all 200 a step, lr x 200/256, a warning."""
    flags = ["--batch-size", 64, "--epochs", 0, "--knn-subset", 200, "--linear-cached"]
    flags += ["--linear-batch-size", 256, "--linear-epochs", 20, "--linear-lr", 5.0]
    simclr.main(tiny_args(simclr, tmp_path, *flags))
    res = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(sgd_steps) == 20 and sgd_steps[0] == pytest.approx(5.0 * 200 / 256)
    assert res["linear_top1"] > 50  # 10 separable classes: chance is 10%
    warning = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert len(warning) == 1 and "256" in warning[0] and "200" in warning[0]


def test_linear_probe_on_fewer_augmented_images_than_one_batch_trains(tmp_path, sgd_steps):
    """64 images through the augmented loader (drop_last), batch 256: a batch of 64 a step."""
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 0, "--linear-batch-size", 256]
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--linear-epochs", 3, "--linear-lr", 1.0))
    assert len(sgd_steps) == 3 and sgd_steps[0] == pytest.approx(1.0 * 64 / 256)


# ==== settings checked before training; the encoder exported before the final evaluation ====
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--linear-batch-size", 9], "--linear-batch-size 9"),  # not divisible by 2 processes
        (["--linear-cached", "--knn-subset", 1], "--knn-subset 1"),  # 1 image, 2 processes
    ],
)
def test_linear_probe_settings_fail_before_training(tmp_path, flags, needle):
    r = torchrun(
        2,
        "simclr.py",
        *TINY,
        *["--subset", 64, "--batch-size", 16, "--epochs", 1, "--linear-epochs", 1],
        *flags,
        "--out-dir",
        tmp_path / "run",
    )
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and any(needle in e for e in errors), r.stderr[-2000:]
    assert not (tmp_path / "run" / "ckpt.pth").exists()  # refused before the first step


def test_encoder_is_exported_before_the_final_evaluation(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("linear probe failed")

    monkeypatch.setattr(simclr, "linear_probe", broken)
    flags = ["--subset", 32, "--batch-size", 16, "--epochs", 1, "--linear-epochs", 1]
    args = tiny_args(simclr, tmp_path, *flags)
    with pytest.raises(RuntimeError, match="linear probe failed"):
        simclr.main(args)
    saved = torch.load(tmp_path / "backbone.pth")
    trained = torch.load(tmp_path / "ckpt.pth", weights_only=False)["model"]
    assert saved.keys() and all(torch.equal(v, trained[f"backbone.{k}"]) for k, v in saved.items())


# ==== progress and the end-of-run summary ===================================================
def test_bar_moves_with_every_step(tmp_path, monkeypatch):
    """No log step before the end (--log-every 100): the bar still counts every step."""
    loggers, seen, init, step = [], [], C.Logger.__init__, simclr.train_step
    monkeypatch.setattr(C.Logger, "__init__", lambda s, *a: (loggers.append(s), init(s, *a))[1])
    monkeypatch.setattr(
        simclr, "train_step", lambda *a: (seen.append(loggers[-1].bar.n), step(*a))[1]
    )
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2, "--log-every", 100]
    simclr.main(tiny_args(simclr, tmp_path, *flags))
    assert seen == list(range(1, 9))  # the step in progress, from the first


def test_end_of_run_summary_and_progress(tmp_path, capsys):
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 2, "--knn-every", 1]
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--linear-epochs", 2, "--linear-cached"))
    out, err = capsys.readouterr()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    summary = out[out.index(str(tmp_path)) :]  # the block that names the folder, at the end
    files = set(re.findall(r"\b[\w.]+\.(?:pth|jsonl)\b", summary))
    assert files == {"metrics.jsonl", "backbone.pth", "ckpt.pth"}
    assert all((tmp_path / f).is_file() for f in files)
    figures = {
        k: float(re.search(rf"{name} ([\d.]+)", summary).group(1))
        for k, name in [("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1")]
        + [("linear_top5", "top-5")]
    }
    assert figures == {k: round(last[k], 2) for k in figures}
    assert "8/8" in err  # the bar reaches the step count
    assert "features of 64 images" in err  # the kNN bank's extraction bar (64 training images)


def test_an_error_during_training_is_the_last_line_on_its_own(tmp_path):
    """The progress bar is closed before the one-line error: the line is not glued to the bar's
    line, and no bar is redrawn after it when the interpreter exits."""
    flags = [*TINY, "--subset", 64, "--batch-size", 16, "--epochs", 3, "--lr", 1e6]
    flags += ["--warmup-epochs", 0]
    r = python("simclr.py", *flags, "--log-every", 2, "--out-dir", tmp_path, timeout=120)
    lines = [s for s in r.stderr.split("\n") if s.strip()]
    assert r.returncode == 2 and lines[-1].startswith("error: non-finite"), lines[-3:]


CRASH = """import sys
import common as C, simclr
step, n = simclr.train_step, []
def crash(*a):
    if len(n) == 2:
        raise RuntimeError("illegal memory access")
    n.append(1)
    return step(*a)
simclr.train_step = crash
simclr.main(C.parse_args(simclr.Args, sys.argv[1:]))
"""


def test_a_crash_is_the_last_line_on_its_own(tmp_path):
    """Any exception out of main (not only fail()'s error line) closes the bars first: the
    traceback's last line stays last, no bar is redrawn under it when the interpreter exits."""
    flags = [*TINY, "--subset", 64, "--batch-size", 16, "--epochs", 2, "--log-every", 100]
    r = python("-c", CRASH, *flags, "--out-dir", tmp_path, timeout=120)
    lines = [s for s in r.stderr.replace("\r", "\n").split("\n") if s.strip()]
    assert r.returncode == 1 and lines[-1] == "RuntimeError: illegal memory access", lines[-3:]


# ==== work that cannot be done, said at start; the summary names what ran ===================
def image_folder(root, splits=("train", "val"), classes=2, n=16):
    """n 16 px images a split, round-robin in class folders c0, c1, ..."""
    from PIL import Image

    for split in splits:
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (i * 15, 0, 0)).save(d / f"{i}.png")
    return ["--dataset", "folder", "--data-dir", root, "--batch-size", 8, "--epochs", 1]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fine_tuning_without_a_test_split_is_refused_before_training(tmp_path, version):
    """No val/: fine-tuning (and SimCLR v2's distillation of it) has nothing to be measured on:
    one line naming the way out, exit 2, before the first step."""
    flags = image_folder(tmp_path / "data", ["train"]) + ["--finetune-fraction", 0.5]
    flags += ["--version", version] + (["--distill-epochs", 1] if version == "v2" else [])
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path / "out", *flags))
    what = "--finetune-fraction 0.5" + (" and --distill-epochs 1" if version == "v2" else "")
    drop = "--finetune-fraction" + (" and --distill-epochs" if version == "v2" else "")
    why = f"no test split ({tmp_path / 'data' / 'val'} not found)"
    assert (
        e.value.code == 2
        and str(e.value) == f"error: {what}: {why}; add a val/ folder or drop {drop}"
    )
    assert not (tmp_path / "out" / "ckpt.pth").exists()


def test_monitors_without_a_test_split_are_noted_at_start(tmp_path, capsys):
    flags = image_folder(tmp_path / "data", ["train"]) + ["--knn-every", 1, "--linear-epochs", 1]
    simclr.main(tiny_args(simclr, tmp_path / "out", *flags))
    out, err = capsys.readouterr()
    notes = [x for x in err.splitlines() if x.startswith("note: ")]
    val = tmp_path / "data" / "val"
    assert notes == [f"note: no test split ({val} not found): no kNN monitor or linear probe"]
    assert out.splitlines()[-1] == "  final (no test split): not evaluated"


def test_labels_of_one_class_are_warned_of(tmp_path, capsys):
    flags = image_folder(tmp_path / "data", classes=1) + ["--knn-every", 1]
    simclr.main(tiny_args(simclr, tmp_path / "out", *flags))
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    why = "all labelled images are of one class (c0): every accuracy is 100%, meaningless"
    assert warnings == [f"warning: {why}; give each class its own folder"]


def test_the_summary_names_the_fine_tuning_result(tmp_path, capsys):
    flags = ["--subset", 60, "--batch-size", 16, "--epochs", 0, "--finetune-fraction", 0.5]
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--ft-epochs", 1, 1, "--ft-batch-size", 10))
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    top1 = f"{last['finetune_top1']:.2f}%"
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == f"  final (step 0): 50%-label fine-tuning top-1 {top1}"
    )


@pytest.mark.parametrize("module", [simclr, swav])  # SwAV's queue length is checked after it
def test_a_batch_larger_than_the_data_names_the_data_size(tmp_path, module):
    with pytest.raises(SystemExit) as e:
        module.main(tiny_args(module, tmp_path, "--subset", 16, "--batch-size", 32))
    assert (
        str(e.value)
        == "error: --batch-size 32 is larger than the 16 training images; pass 16 or less"
    )


# ==== a note printed while a bar runs stands on its own line ===============================
def test_notes_during_a_bar_start_their_own_line(tmp_path, capsys):
    """The second run finds the first's fine-tuning checkpoint of other flags: its note comes
    while the run's bar is open, and starts a line of its own (not glued to the bar)."""
    flags = ["--subset", 60, "--batch-size", 16, "--epochs", 0, "--finetune-fraction", 0.5]
    flags += ["--ft-epochs", 1, 1, "--ft-batch-size", 10]
    simclr.main(tiny_args(simclr, tmp_path, *flags))
    capsys.readouterr()
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--ft-lr", 0.01, 0.01))
    err = capsys.readouterr().err
    starts = [m.start() for m in re.finditer(r"(note|warning): ", err)]
    # column 0: after a newline, or after the carriage return with which tqdm clears its bar
    assert starts and all(i == 0 or err[i - 1] in "\r\n" for i in starts), repr(err[-600:])


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    """Offline, `python simclr.py` cannot fetch CIFAR-10: the one-line error, and the ./data it
    made for the download is gone again; a folder that was there before stays."""

    def offline(root, *a, **kw):  # as torchvision's: the folder first, then the network
        os.makedirs(root, exist_ok=True)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(C.torchvision.datasets, "CIFAR10", offline)
    for there in (False, True):
        data = tmp_path / f"data{there}"
        if there:
            data.mkdir()
        args = C.parse_args(simclr.Args, ["--data-dir", str(data), "--out-dir", str(tmp_path)])
        with pytest.raises(SystemExit) as e:
            simclr.main(args)
        assert e.value.code == 2 and "not downloadable" in str(e.value)
        assert data.exists() == there
