import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import common as C
import simsiam


def naive_simsiam(p1, p2, z1, z2):
    """SimSiam Eq. 1-4 with loops: D(p, z) = -p/|p| . z/|z|; L = D(p1, z2)/2 + D(p2, z1)/2 per
    image, averaged over the images."""

    def d(p, z):
        dot = sum(float(a) * float(b) for a, b in zip(p, z))
        norm = lambda v: math.sqrt(sum(float(a) ** 2 for a in v))  # noqa: E731
        return -dot / (norm(p) * norm(z))

    return sum(d(p1[i], z2[i]) / 2 + d(p2[i], z1[i]) / 2 for i in range(len(p1))) / len(p1)


@pytest.mark.parametrize("b,d", [(7, 5), (8, 16), (1, 3), (3, 64)])
def test_loss_matches_naive_reference(b, d):
    torch.manual_seed(b * d)
    p1, p2, z1, z2 = (torch.randn(b, d) * s for s in (3.0, 0.5, 1.0, 2.0))
    got = simsiam.simsiam_loss(p1, p2, z1, z2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_simsiam(p1, p2, z1, z2), rel=1e-5, abs=1e-6)
    # symmetric in the two views: swapping (p1, z1) <-> (p2, z2) changes nothing
    assert simsiam.simsiam_loss(p2, p1, z2, z1).item() == pytest.approx(got.item(), abs=1e-6)


def test_loss_is_minus_one_when_p_matches_z():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    assert simsiam.simsiam_loss(z1, z1, z1, z1).item() == pytest.approx(-1.0, abs=1e-6)
    # scale-free: p parallel to the OTHER view's z is the minimum
    assert simsiam.simsiam_loss(3 * z2, 0.5 * z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)
    assert simsiam.simsiam_loss(-z2, -z1, z1, z2).item() == pytest.approx(1.0, abs=1e-6)


def test_stop_gradient_inside_the_loss():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 6, requires_grad=True) for _ in range(4))
    simsiam.simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # sg(z): nothing flows into the targets
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    # z that feeds the predictor gets exactly the gradient through p, not through the target
    w = torch.randn(6, 6)
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    simsiam.simsiam_loss(z1 @ w, z2 @ w, z1, z2).backward()
    r1, r2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    c1, c2 = z1.detach(), z2.detach()  # constants
    ref = -(F.cosine_similarity(r1 @ w, c2).mean() + F.cosine_similarity(r2 @ w, c1).mean()) / 2
    ref.backward()
    torch.testing.assert_close(z1.grad, r1.grad), torch.testing.assert_close(z2.grad, r2.grad)
    # without the stop-gradient the gradient would differ (the check above can fail)
    s1, s2 = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    no_sg = -(F.cosine_similarity(s1 @ w, s2).mean() + F.cosine_similarity(s2 @ w, s1).mean()) / 2
    no_sg.backward()
    assert not torch.allclose(s1.grad, z1.grad, atol=1e-4)


def test_loss_finite_under_bf16_autocast():
    same, zeros = torch.ones(8, 16), torch.zeros(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = simsiam.simsiam_loss(same, same, same, same)
        assert out.dtype == torch.float32 and out.item() == pytest.approx(-1.0, abs=1e-6)
        assert torch.isfinite(simsiam.simsiam_loss(zeros, zeros, zeros, zeros))
        b = same.bfloat16() * 1e4
        assert simsiam.simsiam_loss(b, b, b, b).item() == pytest.approx(-1.0, abs=1e-3)
    torch.manual_seed(0)
    x = torch.randn(4, 4, 32)
    ref = simsiam.simsiam_loss(*x)
    assert simsiam.simsiam_loss(*x.half()).item() == pytest.approx(ref.item(), abs=1e-2)


def tiny_model(tmp_path, *extra):
    args = tiny_args(simsiam, tmp_path, *extra)
    C.setup_ddp(args)
    args.img_size = 16
    torch.manual_seed(0)
    return simsiam.SimSiam(args), args


def kinds(seq):
    return [type(m).__name__ for m in seq]


@pytest.mark.parametrize("preset,layers", [("imagenet", 3), ("cifar", 2)])
def test_heads_follow_builder_py(tmp_path, preset, layers):
    model, args = tiny_model(tmp_path, "--preset", preset)
    assert args.proj_layers == layers
    proj, pred, f = model.projector, model.predictor, model.feat_dim
    hidden = ["Linear", "BatchNorm1d", "ReLU"] * (layers - 1)
    assert kinds(proj) == [*hidden, "Linear", "BatchNorm1d"]
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    dims = [(m.in_features, m.out_features) for m in linears]
    assert dims == [(f, 2048)] + [(2048, 2048)] * (layers - 1)
    assert all(m.bias is None for m in linears)  # no bias before any BN (official: frozen)
    assert not proj[-1].affine and all(m.affine for m in proj[:-1] if hasattr(m, "affine"))
    assert kinds(pred) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # no BN on p
    assert (pred[0].in_features, pred[0].out_features, pred[0].bias) == (2048, 512, None)
    assert (pred[3].in_features, pred[3].out_features) == (512, 2048) and pred[3].bias is not None
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen, no target net
    assert simsiam.features(model, torch.rand(4, 3, 16, 16)).shape == (4, f)


def test_presets_and_zero_init_residual(tmp_path):
    imagenet = simsiam.Args()
    recipe = (imagenet.epochs, imagenet.batch_size, imagenet.lr, imagenet.wd)
    assert recipe == (100, 512, 0.05, 1e-4)
    assert imagenet.fix_pred_lr and imagenet.blur and imagenet.warmup_epochs == 0
    # main_lincls.py: cosine set once per epoch, best_acc1, N(0, 0.01) classifier, wd 0
    assert imagenet.linear_epoch_lr and imagenet.linear_best and not imagenet.linear_zero_init
    assert (imagenet.linear_epochs, imagenet.linear_wd, imagenet.linear_milestones) == (90, 0, ())
    cifar = C.parse_args(simsiam.Args, [])  # `python simsiam.py` = the CIFAR preset [App. D]
    assert (cifar.arch, cifar.epochs, cifar.lr, cifar.wd) == ("resnet18", 800, 0.03, 5e-4)
    assert cifar.batch_size == 512 and cifar.proj_layers == 2 and not cifar.blur
    args = C.parse_args(simsiam.Args, ["--img-size", "16", "--device", "cpu"])
    C.setup_ddp(args)
    model = simsiam.SimSiam(args)  # the CIFAR ResNet-18: last BN gamma of every block is 0
    assert all((b.bn2.weight == 0).all() for b in model.backbone.modules() if hasattr(b, "bn2"))


@pytest.mark.parametrize("fix", [True, False])
def test_predictor_lr_stays_fixed(tmp_path, fix):
    model, args = tiny_model(tmp_path, *([] if fix else ["--no-fix-pred-lr"]))
    opt = simsiam.build_optimizer(model, 0.2, args)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each param once
    assert [id(p) for p in opt.param_groups[1]["params"]] == [
        id(p) for p in model.predictor.parameters()
    ]
    assert all(g["weight_decay"] == args.wd and g["momentum"] == 0.9 for g in opt.param_groups)
    C.set_lr(opt, 0.01)
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[1]["lr"] == (0.2 if fix else 0.01)


def test_train_step_updates_every_param_and_follows_the_schedule(tmp_path):
    model, args = tiny_model(tmp_path)
    args.sched = {"lr": [0.2, 0.05]}
    opt = simsiam.build_optimizer(model, 0.2, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(8, 3, 16, 16)
    params = {n: p.clone() for n, p in model.named_parameters()}
    stats_before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    stats = simsiam.train_step(model, ([x, x.flip(3)], None, None), opt, scaler, 1, args)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.2]  # step 1 of the schedule
    assert stats["lr"] == 0.05 and stats["lr_pred"] == 0.2 and stats["wd"] == args.wd
    assert {"loss", "grad_norm", "z"} <= stats.keys() and torch.is_tensor(stats["loss"])
    assert -1 <= stats["loss"].item() <= 1 and stats["grad_norm"] > 0
    z_std = C.embedding_stats(*stats["z"])["z_std"].item()
    assert z_std == pytest.approx(1 / math.sqrt(args.dim), rel=0.3)  # healthy
    for n, p in model.named_parameters():
        assert not torch.equal(p, params[n]), f"{n} did not move"
    for n, b in stats_before.items():
        assert not torch.equal(b, model.get_buffer(n)), f"{n} not updated"


def simsiam_step(name, flags):
    """One train_step of `name` on this process's slice of a fixed, non-symmetric global batch
    (modelled on test_ddp.one_step): loss and the DDP-averaged gradients."""
    module = importlib.import_module(name)
    argv = [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    args = C.parse_args(module.Args, argv)
    C.setup_ddp(args)
    args.img_size, args.sched = 16, {"lr": [0.1]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.SimSiam(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.rand(GLOBAL_B, 3, 16, 16, generator=g) for _ in range(2))
    x2[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    b = args.batch_size_per_gpu
    mine = slice(args.rank * b, (args.rank + 1) * b)
    opt = module.build_optimizer(model, 0.1, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads}


def test_two_processes_equal_one(tmp_path):
    flags = ["--dim", "64", "--pred-dim", "16", "--proj-hidden", "64"]
    ranks = spawn(simsiam_step, 2, tmp_path, "simsiam", flags)
    ref = single(simsiam_step, "simsiam", flags)
    assert {n.split(".")[0] for n in ref["grads"]} == {"backbone", "projector", "predictor"}
    assert_parity(ranks, ref)


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    a = assert_resume_exact(simsiam, tmp_path)
    assert a["optimizer"]["param_groups"][1]["fixed_lr"] == pytest.approx(0.03 * 16 / 256)


def test_python_end_to_end_per_epoch_cosine_and_fixed_predictor_lr(tmp_path):
    flags = ["--subset", "64", "--batch-size", "16", "--epochs", "2", "--knn-every", "1"]
    flags += ["--linear-epochs", "1", "--linear-cached", "--out-dir", tmp_path]
    r = python("simsiam.py", *TINY, *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records) and "linear_top1" in records[-1]
    train = [x for x in records if "loss" in x]
    base = 0.03 * 16 / 256
    assert [x["lr"] for x in train] == pytest.approx([base] * 4 + [base / 2] * 4)  # per epoch
    assert all(x["lr_pred"] == pytest.approx(base) for x in train)
    assert all(0 < x["z_std"] < 1 and -1 <= x["loss"] <= 1 for x in train)
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = ["--subset", "64", "--batch-size", "16", "--epochs", "1", "--knn-every", "1"]
    r = torchrun(2, "simsiam.py", *TINY, *flags, "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 4
    assert any('"knn_top1"' in x for x in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_bad_input_one_line_error(tmp_path):
    r = python("simsiam.py", *TINY, "--batch-size", "1", "--out-dir", tmp_path)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "--batch-size" in errors[0], r.stderr[-800:]
    assert "Traceback" not in r.stderr
    with pytest.raises(SystemExit, match="--proj-layers 0"):
        simsiam.main(tiny_args(simsiam, tmp_path, "--proj-layers", 0))


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(simsiam.Args, ["--help"])  # argparse %-formats help texts
    assert e.value.code == 0 and "--fix-pred-lr" in capsys.readouterr().out
