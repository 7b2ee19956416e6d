"""End to end: main() in-process and as `python X.py` / `torchrun`, resume, bad input."""

import json

import pytest
import torch
import torchvision
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_skeleton import METHODS

import common as C
import moco
import simclr


@pytest.mark.parametrize(
    "module,flags", [(simclr, []), (moco, ["--queue-size", "32"]), (moco, ["--version", "v3"])]
)
def test_two_steps_resume_two_steps_equals_four(tmp_path, module, flags):
    a = assert_resume_exact(module, tmp_path, *flags)
    if module is moco and "queue" in a["model"]:  # the queue changed and was saved
        fresh = moco.MoCo(tiny_args(moco, tmp_path, "--batch-size", 16, *flags), 1).queue
        assert not torch.equal(a["model"]["queue"], fresh)


def test_python_simclr_end_to_end_exports_torchvision_backbone(tmp_path):
    out = tmp_path / "run"
    r = python(
        "simclr.py",
        *TINY[:2],
        "--arch",
        "resnet18",
        "--img-size",
        "16",
        "--workers",
        "0",
        "--subset",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--knn-every",
        "1",
        "--linear-epochs",
        "1",
        "--linear-cached",
        "--out-dir",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any('"knn_top1"' in x for x in lines) and any('"linear_top1"' in x for x in lines)
    assert any('"z_std"' in x for x in lines)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem
    res = net.load_state_dict(torch.load(out / "backbone.pth", weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys
    assert (out / "config.json").exists()


def test_torchrun_two_processes_moco_end_to_end(tmp_path):
    r = torchrun(
        2,
        "moco.py",
        *TINY,
        "--subset",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--queue-size",
        "32",
        "--knn-every",
        "1",
        "--out-dir",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["ranks"]) == 2 and ckpt["step"] == 4


@pytest.mark.parametrize(
    "cmd,needle",
    [
        (["simclr.py", "--dataset", "cifar10-npz", "--data-dir", "/nonexistent"], "--data-dir"),
        (["simclr.py", "--dataset", "folder", "--data-dir", "/nonexistent"], "--data-dir"),
        (["moco.py", *TINY, "--batch-size", "48", "--queue-size", "100"], "--queue-size"),
        (["simclr.py", *TINY, "--subset", "8", "--batch-size", "16"], "--batch-size"),
    ],
)
def test_bad_input_one_line_error(cmd, needle):
    r = python(*cmd)
    assert r.returncode != 0
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and needle in errors[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr


def test_unknown_arch_is_rejected():
    r = python("moco.py", "--arch", "resnet1000")
    assert r.returncode == 2 and "invalid choice: 'resnet1000'" in r.stderr
    with pytest.raises(ValueError, match="unknown arch resnet1000"):
        C.build_backbone("resnet1000")


def test_batch_not_divisible_by_world_size():
    r = torchrun(2, "simclr.py", *TINY, "--batch-size", "9")
    assert r.returncode != 0
    assert any("--batch-size 9" in e and "world size 2" in e for e in error_lines(r.stderr))


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "ckpt.pth").write_bytes(b"not a checkpoint")
    r = python("simclr.py", *TINY, "--subset", "32", "--batch-size", "16", "--out-dir", tmp_path)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "--resume none" in errors[0]


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(simclr, "nt_xent_loss", lambda z1, z2, tau: z1.sum() * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss"):
        simclr.main(tiny_args(simclr, tmp_path, "--subset", 32, "--batch-size", 16))


def test_loop_reshuffles_every_epoch(tmp_path, monkeypatch):
    epochs = []
    orig = C.ResumableSampler.set_epoch
    monkeypatch.setattr(
        C.ResumableSampler,
        "set_epoch",
        lambda self, e, skip=0: (epochs.append(e), orig(self, e, skip)),
    )
    simclr.main(tiny_args(simclr, tmp_path, "--subset", 32, "--batch-size", 16, "--epochs", 3))
    assert epochs == [0, 1, 2]


def test_linear_probe_leaves_the_model_bit_identical_and_learns(tmp_path):
    args = tiny_args(
        simclr,
        tmp_path,
        "--subset",
        200,
        "--batch-size",
        50,
        "--linear-epochs",
        30,
        "--linear-batch-size",
        50,
        "--linear-lr",
        5.0,
    )
    C.setup_ddp(args)
    data = C.build_data(args, C.eval_transform(16), None)
    torch.manual_seed(0)
    model = simclr.SimCLR(args).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = simclr.linear_probe(lambda x: simclr.features(model, x), model.feat_dim, data, args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert res["linear_top1"] > 30 and res["linear_top5"] >= res["linear_top1"]


def test_epochs_0_evaluates_the_random_init_encoder(tmp_path):
    flags = ["--subset", 64, "--batch-size", 16, "--epochs", 0, "--knn-every", 1]
    moco.main(tiny_args(moco, tmp_path, *flags, "--linear-epochs", 1, "--linear-cached"))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["step"] == 0  # no training step, one evaluation
    assert {"knn_top1", "linear_top1", "linear_top5"} <= records[0].keys()
    assert (tmp_path / "backbone.pth").exists()


@pytest.mark.parametrize("name", METHODS)
def test_default_image_size_is_resolved_before_augmentations(tmp_path, name):
    """No --img-size: the dataset's default size (32 for CIFAR-like data) must reach the crops."""
    module = pytest.importorskip(name)
    flags = ["--dataset", "synthetic", "--arch", "smallcnn", "--workers", "0", "--device", "cpu"]
    flags += ["--knn-every", "0", "--linear-epochs", "0", "--subset", "64", "--batch-size", "16"]
    flags += ["--max-steps", "1", "--out-dir", str(tmp_path)]
    flags += ["--queue-size", "32"] if name == "moco" else []
    args = C.parse_args(module.Args, flags)
    module.main(args)
    assert args.img_size == 32 and (tmp_path / "ckpt.pth").exists()
