"""Barlow Twins: the loss vs a naive loop over Eq. 1-2, known values, the official projector, the
two LARS lr groups, 2-process parity (and the official plain all_reduce's 1/W gradient), resume
and end-to-end runs."""

import json
import math

import pytest
import torch
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import barlow_twins as bt
import common as C

PROJ = ["--projector", "64-64-32"]  # small widths: the layout of 8192-8192-8192, CPU-sized


def naive_loss(z1, z2, lambd):
    """Eq. 1-2 with Python loops: standardise each dim over the batch (biased variance, eps
    1e-5), C_ij = sum_b a_bi b_bj / N, L = sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2."""

    def standardized_columns(z):
        cols = []
        for i in range(len(z[0])):
            col = [row[i] for row in z]
            mean = sum(col) / len(col)
            var = sum((v - mean) ** 2 for v in col) / len(col)
            cols.append([(v - mean) / math.sqrt(var + 1e-5) for v in col])
        return cols  # [D][N]

    a, b, n = standardized_columns(z1.tolist()), standardized_columns(z2.tolist()), len(z1)
    loss = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return loss


@pytest.mark.parametrize("b,d,lambd", [(7, 5, 0.0051), (8, 3, 0.5), (2, 4, 1.0), (16, 12, 0.005)])
def test_loss_matches_naive_reference(b, d, lambd):
    torch.manual_seed(b * d)
    z1 = torch.randn(b, d, dtype=torch.float64) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(b, d, dtype=torch.float64)  # correlated twins
    got = bt.barlow_twins_loss(z1.float(), z2.float(), lambd)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_loss(z1, z2, lambd), rel=1e-5)


def test_loss_known_values():
    """Perfectly correlated, decorrelated dims -> 0 (whatever each dim's scale and shift);
    anti-correlated -> 4 per dim; D copies of one dim -> lambd * D (D - 1)."""
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    z = h[:, 1:] * torch.tensor([3.0, 1.5, 7.0]) + torch.tensor([5.0, -2.0, 0.0])  # [4, 3]
    assert bt.barlow_twins_loss(z, z, 0.0051).item() < 1e-8
    assert bt.barlow_twins_loss(z, 2 * z + 1, 0.0051).item() < 1e-8  # per-view affine
    assert bt.barlow_twins_loss(z, -z, 0.0051).item() == pytest.approx(12.0, rel=1e-4)
    copies = z[:, :1].repeat(1, 3)
    assert bt.barlow_twins_loss(copies, copies, 0.5).item() == pytest.approx(3.0, rel=1e-4)


def test_loss_gradient_symmetric_and_shift_free():
    """No stop-gradient: both twins get gradients and swapping them leaves L unchanged; the
    standardisation removes each dim's mean, so the gradient sums to 0 over the batch."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    loss = bt.barlow_twins_loss(z1, z2, 0.0051)
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    assert bt.barlow_twins_loss(z2, z1, 0.0051).item() == pytest.approx(loss.item(), rel=1e-6)
    for g in (z1.grad, z2.grad):  # zero up to fp32 rounding of the entries' magnitude
        torch.testing.assert_close(g.sum(0), torch.zeros(5), atol=1e-5 * g.abs().max(), rtol=0)


def test_loss_finite_in_fp32_under_half_precision():
    same = torch.ones(8, 16, requires_grad=True)  # identical rows: zero variance
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bt.barlow_twins_loss(same, same, 0.0051)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(16.0)  # C = 0
    loss.backward()
    assert torch.isfinite(same.grad).all()
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 16), torch.randn(32, 16)
    ref = bt.barlow_twins_loss(z1, z2, 0.0051).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bt.barlow_twins_loss(z1.bfloat16(), z2.bfloat16(), 0.0051)
    assert got.item() == pytest.approx(ref, rel=0.02)
    big = bt.barlow_twins_loss((z1 * 1e4).half(), (z2 * 1e4).half(), 0.0051)  # z^2 > fp16 max
    assert big.item() == pytest.approx(ref, rel=0.02)


def test_projector_layout_is_the_official_one():
    with torch.device("meta"):  # no memory: two 8192 x 8192 layers
        head = bt.projection_head(2048, bt.Args().projector)
    names = [type(m).__name__ for m in head]
    assert names == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 8192)] + [(8192, 8192)] * 2
    assert all(m.bias is None for m in linears)
    assert all(m.affine for m in head if isinstance(m, torch.nn.BatchNorm1d))
    one = bt.projection_head(16, "32")
    assert len(one) == 1 and one[0].out_features == 32 and one[0].bias is None


def test_defaults_and_cifar_preset():
    a = bt.Args()  # the ImageNet recipe: main.py's defaults (wd 1e-6, eta 1e-3, no loss scale)
    assert (a.lambd, a.lr, a.lr_biases, a.wd, a.eta, a.scale_loss) == (
        0.0051,
        0.2,
        0.0048,
        1e-6,
        0.001,
        1.0,
    )
    assert not a.solo and not a.plain_all_reduce and a.zero_init_residual
    assert (a.projector, a.batch_size, a.epochs, a.warmup_epochs) == (
        "8192-8192-8192",
        2048,
        1000,
        10,
    )
    assert (a.linear_lr, a.linear_wd, a.linear_epochs, a.linear_batch_size) == (0.3, 1e-6, 100, 256)
    assert not a.linear_nesterov and a.linear_milestones == () and not a.linear_zero_init
    assert a.linear_epoch_lr and a.linear_best  # CosineAnnealingLR per epoch, best_acc
    c = C.parse_args(bt.Args, [])
    assert (c.arch, c.projector, c.batch_size, c.epochs) == (
        "resnet18",
        "2048-2048-2048",
        256,
        1000,
    )
    assert (c.lr, c.lr_biases, c.wd, c.lambd, c.blur) == (0.3, 0.3, 1e-4, 0.0051, False)
    assert (c.eta, c.scale_loss, c.solo, c.zero_init_residual) == (0.02, 0.1, True, False)


def tiny_model(tmp_path, *extra):
    args = tiny_args(bt, tmp_path, *PROJ, *extra)
    C.setup_ddp(args)
    args.img_size = 16
    torch.manual_seed(0)
    return bt.BarlowTwins(args), args


def test_zero_init_residual_and_one_pass_per_view(tmp_path):
    model, _ = tiny_model(tmp_path, "--arch", "resnet18", "--zero-init-residual")
    assert torch.count_nonzero(model.backbone.layer1[0].bn2.weight) == 0  # [ref: main.py]
    solo, _ = tiny_model(tmp_path, "--arch", "resnet18")  # CIFAR preset: torchvision's init
    assert torch.count_nonzero(solo.backbone.layer1[0].bn2.weight) > 0
    x1, x2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    _, z1, z2 = model(x1, x2)
    torch.testing.assert_close(z1, model.projector(model.backbone(x1)))  # BN over x1 alone
    joint = model.projector(model.backbone(torch.cat([x1, x2])))[:4]
    assert not torch.allclose(z1, joint, atol=1e-4)


def test_train_step_sets_both_lars_lrs_and_updates_everything(tmp_path):
    model, args = tiny_model(tmp_path)
    groups = C.param_groups([model], args.wd)
    groups[0]["lr_scale"], groups[1]["lr_scale"] = 0.2, 0.0048
    opt = C.LARS(groups, lr=0.0, weight_decay=args.wd)
    args.sched = {"lr": [2.0]}  # the per-step factor (batch/256 x warm-up/cosine)
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.rand(8, 3, 16, 16)
    batch = ([x, x.flip(3)], None, None)
    stats = bt.train_step(model, batch, opt, torch.amp.GradScaler("cpu", enabled=False), 0, args)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.0096])
    assert stats["lr"] == pytest.approx(0.4) and stats["wd"] == args.wd
    assert {"loss", "lr", "wd", "grad_norm", "z", "on_diag"} <= stats.keys()
    assert all(isinstance(x, torch.Tensor) for x in (stats["loss"], stats["on_diag"], *stats["z"]))
    assert -1 <= stats["on_diag"] <= 1
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
        if p.ndim == 1:  # biases/BN: plain momentum SGD, no wd, no LARS adaptation
            torch.testing.assert_close(p, before[n] - 0.0096 * p.grad, msg=n)


def _run(plain: bool):
    """One train_step on this process's slice of a fixed global batch; plain: C summed as the
    official code does (--plain-all-reduce), BN sums keep their gradient as SyncBN's."""
    flags = [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *PROJ]
    args = C.parse_args(bt.Args, [*flags, *(["--plain-all-reduce"] if plain else [])])
    C.setup_ddp(args)
    args.img_size, args.sched = 16, {"lr": [0.1]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(bt.BarlowTwins(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(GLOBAL_B, 3, 16, 16, generator=g)
    x2 = torch.rand(GLOBAL_B, 3, 16, 16, generator=g)
    x2[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    b = args.batch_size_per_gpu
    mine = slice(args.rank * b, (args.rank + 1) * b)
    groups = C.param_groups([model], 0.0)
    groups[0]["lr_scale"], groups[1]["lr_scale"] = 0.2, 0.0048
    opt = torch.optim.SGD(groups, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = bt.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads, "on_diag": stats["on_diag"]}


def _both():
    return {"with_grad": _run(False), "plain": _run(True)}


def test_two_processes_equal_one_and_plain_all_reduce_gives_half(tmp_path):
    """THE test: with C crossing processes with gradient, 2 processes (DDP, SyncBN, half of a
    non-symmetric global batch each) give the loss and every gradient of 1 process on the whole
    batch. The official plain all_reduce (--plain-all-reduce) gives the same loss but half the
    gradients (1/W): the size of the DEVIATION (its LARS equivalent: test_official_barlow_twins).
    L sums D^2 terms, so gradients are O(10): they are compared in units of the largest one
    (atol 1e-5 of it; the fp32 noise of the 2-process sums is ~5e-6 of it)."""
    ranks = spawn(_both, 2, tmp_path)
    ref = single(_run, False)
    s = max(g.abs().max() for g in ref["grads"].values())

    def unit(r, k=1.0):  # gradients in units of the largest reference gradient
        return {"loss": r["loss"], "grads": {n: g * k / s for n, g in r["grads"].items()}}

    assert_parity([unit(r["with_grad"]) for r in ranks], unit(ref))
    assert_parity([unit(r["plain"]) for r in ranks], unit(ref, 0.5))
    for r in ranks:
        on_diag = r["with_grad"]["on_diag"].item()  # a mean correlation, |.| <= 1
        assert on_diag == pytest.approx(ref["on_diag"].item(), rel=1e-5, abs=1e-6)


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    a = assert_resume_exact(bt, tmp_path, "--warmup-epochs", 1, *PROJ)
    # CIFAR preset: solo-learn's LARS (eta 0.02, clip_lr) with one lr 0.3 for both groups,
    # weights (ndim > 1) with wd 1e-4, biases/BN without
    weights, biases = a["optimizer"]["param_groups"]
    assert (weights["lr_scale"], weights["weight_decay"]) == (0.3, 1e-4)
    assert (biases["lr_scale"], biases["weight_decay"]) == (0.3, 0.0)
    for g in (weights, biases):
        assert (g["trust_coefficient"], g["clip_lr"], g["solo"]) == (0.02, True, True)
    # solo-learn's warm-up reaches the base lr at step W-1 = 3 (an epoch is 4 steps)
    assert weights["lr"] == pytest.approx(0.3 * 16 / 256, rel=1e-12)
    assert biases["lr"] == pytest.approx(weights["lr"], rel=1e-12)
    dims = [v.ndim for k, v in a["model"].items() if "running" not in k and "num_batches" not in k]
    assert len(weights["params"]) == sum(d > 1 for d in dims) > 0
    assert len(biases["params"]) == sum(d == 1 for d in dims) > 0


def _e2e_flags(out):
    return [*TINY, "--subset", 64, "--batch-size", 16, "--epochs", 1, *PROJ, "--out-dir", out]


def test_python_end_to_end(tmp_path):
    flags = [*_e2e_flags(tmp_path), "--knn-every", 1, "--linear-epochs", 1, "--linear-cached"]
    r = python("barlow_twins.py", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records) and "linear_top1" in records[-1]
    assert {"loss", "lr", "on_diag", "z_std", "grad_norm"} <= records[1].keys()
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    r = torchrun(2, "barlow_twins.py", *_e2e_flags(tmp_path), "--knn-every", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"knn_top1"' in (tmp_path / "metrics.jsonl").read_text()
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 4


def test_bad_projector_one_line_error():
    r = python("barlow_twins.py", *TINY, "--projector", "8192-x")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "--projector 8192-x" in errors[0], r.stderr[-1000:]
