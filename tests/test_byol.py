import importlib
import json
import math

import pytest
import torch
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import byol
import common as C

SMALL = ["--hidden-dim", "64", "--pred-hidden-dim", "32"]  # fast heads for the runs below


def naive_byol(p, z_m):
    """BYOL Eq. 2 with loops: mean over i of ||p_i/|p_i| - z_i/|z_i|||^2."""
    total = 0.0
    for pi, zi in zip(p.tolist(), z_m.tolist()):
        npi, nzi = math.sqrt(sum(a * a for a in pi)), math.sqrt(sum(b * b for b in zi))
        total += sum((a / npi - b / nzi) ** 2 for a, b in zip(pi, zi))
    return total / len(p)


# ==== loss ==================================================================================
@pytest.mark.parametrize("b,d", [(7, 5), (8, 16), (1, 3)])
def test_byol_loss_matches_naive_reference(b, d):
    torch.manual_seed(b)
    p, z_m = torch.randn(b, d) * 3, torch.randn(b, d) + 0.5
    got = byol.byol_loss(p, z_m)
    assert got.item() == pytest.approx(naive_byol(p.double(), z_m.double()), rel=1e-5)


def test_byol_loss_extremes_and_half_precision():
    z = torch.randn(6, 8)
    assert byol.byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=4e-6)  # 1e-6 of range 4
    assert byol.byol_loss(-2 * z, z).item() == pytest.approx(4.0, rel=1e-6)  # opposite
    same = torch.ones(16, 32)  # identical rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = byol.byol_loss(same.bfloat16(), same.bfloat16())
        assert torch.isfinite(out) and out.dtype == torch.float32
        assert byol.byol_loss(z.half(), (z * 1e-4).half()).item() == pytest.approx(0.0, abs=1e-3)


def test_byol_loss_gradient_only_into_the_prediction():
    p, z_m = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol.byol_loss(p, z_m).backward()
    assert p.grad.abs().sum() > 0 and z_m.grad is None  # stop-gradient on the target side


# ==== model =================================================================================
def tiny_model(tmp_path, *extra):
    args = tiny_args(byol, tmp_path, *extra)
    C.setup_ddp(args)
    torch.manual_seed(0)
    return byol.BYOL(args), args


def test_heads_per_official_mlp(tmp_path):
    model, _ = tiny_model(tmp_path)
    for head, (i, h, o) in [
        (model.projector, (256, 4096, 256)),
        (model.predictor, (256, 4096, 256)),
    ]:
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert (head[0].in_features, head[0].out_features, head[3].out_features) == (i, h, o)
        assert head[0].bias is not None and head[3].bias is None  # [ref: networks.MLP]
        assert head[1].affine and torch.equal(head[0].bias, torch.zeros(h))
    assert not hasattr(model, "momentum_predictor")  # the target has no predictor
    target = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert target and not any(p.requires_grad for p in target)
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(online, target))  # starts as a copy
    bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)  # no zero-init


def test_presets(tmp_path):
    cifar, imnet = C.parse_args(byol.Args, []), C.parse_args(byol.Args, ["--preset", "imagenet"])
    # CIFAR: solo-learn byol.yaml (+ its optimizer: LARS eta 0.02, clip_lr; warm-up from 3e-5)
    got = (cifar.arch, cifar.batch_size, cifar.lr, cifar.wd, cifar.m, cifar.epochs, cifar.blur)
    assert got == ("resnet18", 256, 1.0, 1e-5, 0.99, 1000, False)
    assert (cifar.solo, cifar.eta, cifar.warmup_start, cifar.warmup_epochs) == (
        True,
        0.02,
        3e-5,
        10,
    )
    assert (cifar.hidden_dim, cifar.dim, cifar.pred_hidden_dim, cifar.crop_min) == (
        4096,
        256,
        4096,
        0.08,
    )
    assert (imnet.arch, imnet.batch_size, imnet.epochs, imnet.lr) == ("resnet50", 4096, 1000, 0.2)
    assert (imnet.wd, imnet.m, imnet.warmup_epochs, imnet.blur) == (1.5e-6, 0.996, 10, True)
    assert (imnet.solo, imnet.eta, imnet.warmup_start) == (False, 1e-3, 0.0)
    lin = (imnet.linear_epochs, imnet.linear_lr, imnet.linear_wd, imnet.linear_batch_size)
    assert lin == (80, 0.2, 0.0, 1024) and imnet.linear_nesterov and not imnet.linear_milestones
    # configs/eval.py: cosine per step (warmup 0), the last epoch, hk.Linear init (not zero)
    for a in (cifar, imnet):
        assert not (a.linear_epoch_lr or a.linear_best or a.linear_zero_init)


def test_views_have_their_own_bn_statistics(tmp_path):
    """Each view is a separate forward (per-view BN batch): z1 does not depend on x2; the
    loss sums the two directions."""
    model, _ = tiny_model(tmp_path, *SMALL)
    x1, x2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    loss, z_a = model(x1, x2)
    _, z_b = model(x1, x2 * 0.1 + 0.9)
    torch.testing.assert_close(z_a[0], z_b[0])
    # the loss is the SUM of both directions, each pairing a prediction with the other view
    z1, z2 = (model.projector(model.backbone(x)) for x in (x1, x2))
    z_m1, z_m2 = (model.momentum_projector(model.momentum_backbone(x)) for x in (x1, x2))
    ref = byol.byol_loss(model.predictor(z1), z_m2) + byol.byol_loss(model.predictor(z2), z_m1)
    torch.testing.assert_close(loss, ref)


def test_momentum_update_extremes(tmp_path):
    model, _ = tiny_model(tmp_path, *SMALL)
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(1.0)
        for b in model.backbone.buffers():
            b.add_(1)  # online running stats differ from the target's
    target = lambda: [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    before = [p.clone() for p in target()]
    buffers = [b.clone() for b in model.momentum_backbone.buffers()]
    byol.momentum_update(model, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target()))
    byol.momentum_update(model, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online, target()))
    # parameters only: the target's BN running stats are its own, never averaged
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.momentum_backbone.buffers()))


def test_train_step_updates_target_after_the_optimizer_step(tmp_path):
    model, args = tiny_model(tmp_path, *SMALL)
    m = 0.9
    args.sched = {"lr": [0.1], "m": [m]}
    opt = C.LARS(C.param_groups([model], 1e-4), lr=0.1, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(8, 3, 16, 16)
    online = lambda: [*model.backbone.parameters(), *model.projector.parameters()]
    target = lambda: [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    with torch.no_grad():  # make target != online so the EMA is visible
        for p in target():
            p.add_(0.05 * torch.randn_like(p))
    t0, o0 = [p.clone() for p in target()], [p.clone() for p in online()]
    running = model.momentum_backbone[1].running_mean.clone()
    stats = byol.train_step(model, ([x, x.flip(3)], None, None), opt, scaler, 0, args)
    assert set(stats) == {"loss", "lr", "wd", "m", "grad_norm", "z"} and stats["m"] == m
    assert torch.isfinite(stats["loss"]) and 0 <= stats["loss"] <= 8
    assert not any(torch.equal(a, b) for a, b in zip(o0, online()))  # the online net stepped
    for t_before, o_after, t_after in zip(t0, online(), target()):  # EMA with the NEW online
        want = m * t_before + (1 - m) * o_after
        torch.testing.assert_close(t_after, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert all(p.grad is None for p in target())  # no gradient reaches the target
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert not torch.equal(model.momentum_backbone[1].running_mean, running)  # its own forward
    assert byol.features(model, x).shape == (8, model.feat_dim)


def test_tau_schedule_cosine_from_base_to_one(tmp_path):
    args = tiny_args(byol, tmp_path, *SMALL, "--subset", 32, "--batch-size", 16, "--epochs", 3)
    byol.main(args)
    ms, T = args.sched["m"], args.total_steps
    assert len(ms) == T == 6 and ms[0] == pytest.approx(args.m) and args.m == 0.99
    for k in range(T):  # tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 [BYOL §3.2]
        assert ms[k] == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / T) + 1) / 2)
    long = C.cosine_schedule(0.996, 1.0, 1000)
    assert long[0] == pytest.approx(0.996) and long[-1] == pytest.approx(1.0, abs=1e-7)
    assert all(a < b for a, b in zip(long, long[1:]))


# ==== distributed, resume, end to end =======================================================
def byol_step(name, flags):
    """One train_step (LARS) on this process's half of a fixed, non-symmetric global batch;
    returns loss, DDP-averaged gradients and the target parameters after the EMA."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.sched = {"lr": [0.1], "m": [0.9]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.BYOL(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (
        torch.rand(GLOBAL_B, 3, 16, 16, generator=g),
        torch.rand(GLOBAL_B, 3, 16, 16, generator=g),
    )
    x2[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    mine = slice(args.rank * args.batch_size_per_gpu, (args.rank + 1) * args.batch_size_per_gpu)
    opt = C.LARS(C.param_groups([model], 1e-4), lr=0.1, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: p.clone() for n, p in model.named_parameters() if n.startswith("momentum")}
    return {"loss": stats["loss"], "grads": grads, "state": state}


def test_two_processes_equal_one(tmp_path):
    ranks = spawn(byol_step, 2, tmp_path, "byol", SMALL)
    ref = single(byol_step, "byol", SMALL)
    assert_parity(ranks, ref)
    assert not any(n.startswith("momentum") for n in ref["grads"])
    for r in ranks:  # the same target network on every rank, equal to one process's
        for n, p in ref["state"].items():
            torch.testing.assert_close(r["state"][n], p, atol=1e-5, rtol=1e-4, msg=n)


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    a = assert_resume_exact(byol, tmp_path, *SMALL)
    assert any(k.startswith("momentum_backbone.") and "running_mean" in k for k in a["model"])


def test_python_end_to_end_with_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, *SMALL]  # the last value of a flag wins
    r = python(
        "byol.py", *flags, "--subset", 64, "--batch-size", 32, "--epochs", 1, "--out-dir", tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records)
    train = [x for x in records if "loss" in x]
    assert train and {"loss", "lr", "wd", "m", "grad_norm", "z_std"} <= train[0].keys()
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = [*TINY, "--knn-every", 1, *SMALL]  # the last value of a flag wins
    r = torchrun(
        2,
        "byol.py",
        *flags,
        "--subset",
        64,
        "--batch-size",
        16,
        "--epochs",
        1,
        "--out-dir",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 4
    assert '"knn_top1"' in (tmp_path / "metrics.jsonl").read_text()


def test_bad_ema_coefficient_one_line_error():
    r = python("byol.py", *TINY, "--m", "1.5")
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and "--m 1.5" in errors[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr


def test_length_presets_yield_to_the_flags_given():
    """--epochs 300 on ImageNet takes configs/byol.py's 300-epoch lr / wd / m, each unless given."""
    args = C.parse_args(byol.Args, ["--preset", "imagenet", "--epochs", "300", "--lr", "0.2"])
    assert (args.lr, args.wd, args.m) == (0.2, 1e-6, 0.99)
    args = C.parse_args(byol.Args, ["--preset", "cifar", "--epochs", "300"])
    assert (args.lr, args.wd, args.m) == (1.0, 1e-5, 0.99)
