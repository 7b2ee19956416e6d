import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_args

import common as C
import simclr


def naive_nt_xent(z1, z2, tau):
    """SimCLR Eq. 1 with loops: views 2k, 2k+1 are the pair; the mean of l(i, j) over the N
    anchors of each view, summed over the two views (the official scale: loss_a + loss_b)."""
    z = [F.normalize(v, dim=0) for pair in zip(z1, z2) for v in pair]
    total = 0.0
    for i in range(len(z)):
        j = i + 1 if i % 2 == 0 else i - 1
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(len(z)) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (len(z) // 2)


@pytest.mark.parametrize("b,d,tau", [(7, 5, 0.5), (8, 16, 0.1), (2, 3, 1.0)])
def test_nt_xent_matches_naive_reference(b, d, tau):
    torch.manual_seed(b)
    z1, z2 = torch.randn(b, d) * 3, torch.randn(b, d)
    got = simclr.nt_xent_loss(z1, z2, tau)
    assert got.item() == pytest.approx(naive_nt_xent(z1.double(), z2.double(), tau), rel=1e-5)


def test_nt_xent_is_symmetric_and_finite_under_autocast():
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    ref = simclr.nt_xent_loss(z1, z2, 0.1)
    assert simclr.nt_xent_loss(z2, z1, 0.1).item() == pytest.approx(ref.item(), rel=1e-5)
    same = torch.ones(16, 32)  # identical embeddings: the edge case for -inf masking
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(simclr.nt_xent_loss(same, same, 0.05))
        got = simclr.nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=0.01)
    half = simclr.nt_xent_loss(z1.half(), z2.half().requires_grad_(), 0.1)
    assert half.item() == pytest.approx(ref.item(), rel=2e-3)


def test_nt_xent_gradient_flows_into_both_views():
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simclr.nt_xent_loss(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("layers", [2, 3])
def test_projection_head_layout(layers):
    head = simclr.projection_head(64, 16, layers)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    bns = [m for m in head if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == layers and len(bns) == layers  # BN after every layer
    assert all(m.bias is None for m in linears)
    assert linears[-1].out_features == 16 and linears[0].out_features == 64
    assert not bns[-1].bias.requires_grad and bns[-1].weight.requires_grad  # gamma, no beta


def test_version_and_temperature_reach_the_model(tmp_path):
    a1 = tiny_args(simclr, tmp_path, "--version", "v1")
    a2 = tiny_args(simclr, tmp_path, "--version", "v2", "--tau", "0.3")
    a1.img_size = a2.img_size = 16
    m1, m2 = simclr.SimCLR(a1), simclr.SimCLR(a2)
    n = lambda m: sum(isinstance(x, torch.nn.Linear) for x in m.projector)  # noqa: E731
    assert (n(m1), n(m2)) == (2, 3)
    assert m2.tau == 0.3 and a1.tau == 0.5  # the CIFAR preset's temperature
    x1, x2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    torch.manual_seed(0)
    loss_a = m2(x1, x2)[0]
    m2.tau = 1.0
    assert m2(x1, x2)[0].item() != pytest.approx(loss_a.item())


def test_train_step_decreases_loss_and_reports(tmp_path):
    args = tiny_args(simclr, tmp_path)
    C.setup_ddp(args)
    args.img_size = 16
    torch.manual_seed(0)
    model = simclr.SimCLR(args)
    args.sched = {"lr": [0.05] * 30}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(16, 3, 16, 16)
    batch = ([x, x.flip(3)], torch.zeros(16), torch.arange(16))
    losses = [simclr.train_step(model, batch, opt, scaler, s, args) for s in range(30)]
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert set(losses[0]) >= {"loss", "lr", "grad_norm", "z"}
    assert simclr.features(model, x).shape == (16, model.feat_dim)


def test_presets_follow_the_official_recipes(tmp_path):
    """v2: 800 epochs, warm-up 5% = 40, lr 0.1 x sqrt(B), wd 1e-4, 3-layer head [SimCLRv2 §3.1;
    simclr issue #77]; CIFAR (README): warm-up 10; linear eval (README): zero-init head, cosine
    per step, last epoch."""
    v1, v2 = simclr.Args(), simclr.Args(**simclr.Args.recipe("v2", "imagenet"))
    keys = ("epochs", "warmup_epochs", "wd", "lr", "lr_scaling")
    assert [getattr(v1, k) for k in keys] == [100, 10, 1e-6, 0.3, "linear"]
    assert [getattr(v2, k) for k in keys] == [800, 40, 1e-4, 0.1, "sqrt"]
    assert v2.proj_layers == 3 and v1.proj_layers == 2 and v1.momentum == 0.9
    c2 = simclr.Args(**simclr.Args.recipe("v2", "cifar"))
    assert (c2.warmup_epochs, c2.wd, c2.epochs, c2.lr_scaling) == (10, 1e-4, 1000, "linear")
    for a in (v1, v2, c2):
        assert a.linear_zero_init and not a.linear_epoch_lr and not a.linear_best
        assert a.linear_milestones == () and a.linear_nesterov
