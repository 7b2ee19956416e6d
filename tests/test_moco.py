import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_args

import common as C
import moco


def naive_info_nce(q, k, negatives, tau):
    """MoCo Eq. 1 with loops: -log exp(q.k+/t) / (exp(q.k+/t) + sum_neg exp(q.k-/t)), mean."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ n) / tau) for n in negatives[i])
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_info_nce_with_queue_matches_naive(tau):
    torch.manual_seed(0)
    q, k, queue = unit(5, 8), unit(5, 8), unit(12, 8)
    got = moco.info_nce_loss(q.float(), k.float(), queue.float(), tau)
    assert got.item() == pytest.approx(naive_info_nce(q, k, [queue] * 5, tau), rel=1e-4)


def test_info_nce_without_queue_uses_the_other_keys_as_negatives():
    torch.manual_seed(1)
    q, k = unit(6, 8), unit(6, 8)
    negatives = [torch.cat([k[:i], k[i + 1 :]]) for i in range(6)]
    got = moco.info_nce_loss(q.float(), k.float(), None, 0.2)
    assert got.item() == pytest.approx(naive_info_nce(q, k, negatives, 0.2), rel=1e-4)


def test_info_nce_finite_under_half_precision_autocast():
    q = F.normalize(torch.ones(8, 16), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(moco.info_nce_loss(q, q, q.clone(), 0.07))
        assert moco.info_nce_loss(q.half(), q.half(), None, 0.07).dtype == torch.float32


def tiny_model(tmp_path, version, *extra, bn_splits=1):
    queue = ["--queue-size", "32", "--batch-size", "8"] if version != "v3" else []  # 8 images
    args = tiny_args(moco, tmp_path, "--version", version, *queue, *extra)
    C.setup_ddp(args)
    args.img_size = 16
    torch.manual_seed(0)
    return moco.MoCo(args, bn_splits), args


def test_heads_per_version(tmp_path):
    v1, _ = tiny_model(tmp_path, "v1")
    v2, _ = tiny_model(tmp_path, "v2")
    v3, _ = tiny_model(tmp_path, "v3")
    assert isinstance(v1.projector, torch.nn.Linear) and v1.projector.bias is not None
    assert [type(m).__name__ for m in v2.projector] == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is None for m in v3.projector if isinstance(m, torch.nn.Linear))
    assert not v3.projector[-1].affine  # last BN without affine [ref: _build_mlp]
    assert isinstance(v3.predictor[-1], torch.nn.Linear)  # ResNet predictor: no last BN
    assert v3.queue is None and v2.queue.shape == (32, 128)
    assert torch.allclose(v2.queue.norm(dim=1), torch.ones(32))
    for m in (v1, v2, v3):
        assert not any(p.requires_grad for p in m.momentum_backbone.parameters())


def test_momentum_update_extremes(tmp_path):
    model, _ = tiny_model(tmp_path, "v2")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_backbone.parameters()]
    buffers = [b.clone() for b in model.momentum_backbone.buffers()]
    moco.momentum_update(model, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_backbone.parameters()))
    moco.momentum_update(model, 0.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.backbone.parameters(), model.momentum_backbone.parameters())
    )
    # BN running stats of the key encoder are its own: the EMA does not touch buffers
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.momentum_backbone.buffers()))


def test_enqueue_is_a_ring_buffer(tmp_path):
    model, _ = tiny_model(tmp_path, "v2")  # K = 32
    keys = [F.normalize(torch.randn(8, 128), dim=1) for _ in range(5)]  # K / B + 1 batches
    for k in keys:
        moco.enqueue(model, k)
    assert model.queue_ptr.item() == 8  # wrapped around once
    assert torch.equal(model.queue[:8], keys[4])  # the oldest rows were overwritten
    assert torch.equal(model.queue[8:16], keys[1]) and torch.equal(model.queue[24:], keys[3])


def test_split_batchnorm_is_per_chunk_bn():
    torch.manual_seed(0)
    bn, x = moco.SplitBatchNorm(3, num_splits=2), torch.randn(8, 3, 4, 4) * 2 + 1
    ref = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.chunk(2)])
    assert torch.allclose(bn(x), ref, atol=1e-5)
    assert not torch.allclose(bn(x), F.batch_norm(x, None, None, training=True), atol=1e-3)
    means = torch.stack([c.mean((0, 2, 3)) for c in x.chunk(2)]).mean(0)
    bn2 = moco.SplitBatchNorm(3, num_splits=2)
    bn2(x)
    assert torch.allclose(bn2.running_mean, 0.1 * means, atol=1e-5)


def test_shuffled_keys_unshuffle_is_exact_and_shuffles(tmp_path):
    x = torch.randn(8, 5)
    seen = []

    def encoder(inp):  # records the order it sees; per-sample so output order is checkable
        seen.append(inp.clone())
        return inp * 2

    torch.manual_seed(3)
    out = moco.shuffled_keys(encoder, x)
    assert torch.equal(out, x * 2)  # unshuffle(shuffle(x)) == x
    assert not torch.equal(seen[0], x)  # the encoder saw a permuted batch
    assert sorted(seen[0][:, 0].tolist()) == sorted(x[:, 0].tolist())


def test_shuffle_bn_emulation_mixes_bn_groups(tmp_path):
    """With split BN, keys depend on which samples share a BN group: the permutation must
    change the result vs. an unshuffled split-BN key encoder (otherwise it is a no-op)."""
    model, _ = tiny_model(tmp_path, "v2", bn_splits=2)
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(0)
    shuffled = moco.shuffled_keys(model.key, x)
    assert not torch.allclose(shuffled, model.key(x), atol=1e-4)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_train_step_state_updates(tmp_path, version):
    model, args = tiny_model(tmp_path, version, bn_splits=2 if version != "v3" else 1)
    m = 0.9
    args.sched = {"lr": [0.1] * 4, "m": [m] * 4}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(8, 3, 16, 16)
    batch = ([x, x.flip(3)], torch.zeros(8), torch.arange(8))
    online = [p.clone() for p in model.backbone.parameters()]
    target = [p.clone() for p in model.momentum_backbone.parameters()]
    ptrs = {n: b.data_ptr() for n, b in model.named_buffers()}
    queue = model.queue.clone() if model.queue is not None else None
    stats = moco.train_step(model, batch, opt, scaler, 0, args)
    assert torch.isfinite(stats["loss"]) and stats["m"] == m and stats["tau"] == args.tau
    # EMA before the forward: target <- m * target + (1 - m) * online (pre-step online)
    for t0, o0, t1 in zip(target, online, model.momentum_backbone.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * o0, atol=1e-6)
    assert all(p.grad is None for p in model.momentum_backbone.parameters())
    assert {n: b.data_ptr() for n, b in model.named_buffers()} == ptrs  # updated in place
    if queue is not None:
        assert model.queue_ptr.item() == 8
        assert torch.equal(model.queue[8:], queue[8:]) and not torch.equal(
            model.queue[:8], queue[:8]
        )
        assert torch.allclose(model.queue[:8].norm(dim=1), torch.ones(8))


def test_momentum_schedule_cosine_to_one():
    ms = C.cosine_schedule(0.99, 1.0, 100)
    assert ms[0] == pytest.approx(0.99) and ms[-1] == pytest.approx(1.0, abs=1e-5)
    t = 37  # m = 1 - (1 - m0)(1 + cos(pi t / T)) / 2 [MoCo v3]
    assert ms[t] == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi * t / 100)) / 2)


def test_v3_vit_layout_and_step(tmp_path):
    """MoCo v3 with a ViT: frozen random patch projection and sin-cos positions, 3-layer
    projector, predictor ending in BN, AdamW recipe; one step trains everything else."""
    flags = ["--arch", "vit_tiny", "--preset", "imagenet", "--patch-size", "4"]
    model, args = tiny_model(tmp_path, "v3", *flags, "--hidden-dim", "64")
    assert args.optimizer == "adamw" and args.tau == 0.2 and args.warmup_epochs == 40
    vit = model.backbone
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    assert not vit.pos_embed.requires_grad and vit.patch_embed.kernel_size == (4, 4)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.projector) == 3
    assert isinstance(model.predictor[-1], torch.nn.BatchNorm1d)
    args.sched = {"lr": [1e-3], "m": [0.99]}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-3)
    before = [p.clone() for p in params]
    x = torch.rand(4, 3, 16, 16)
    moco.train_step(
        model,
        ([x, x.flip(3)], None, None),
        opt,
        torch.amp.GradScaler("cpu", enabled=False),
        0,
        args,
    )
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    frozen_ema = model.momentum_backbone.patch_embed.weight  # EMA of a constant: itself
    torch.testing.assert_close(vit.patch_embed.weight, frozen_ema, atol=0, rtol=1e-6)


def official_sincos(dim, h, w, temperature=10000.0):
    """Restated from moco-v3 vits.py build_2d_sincos_position_embedding -> [1, 1 + h*w, dim]."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w * 1.0), torch.arange(h * 1.0), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    pe = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe])[None]


def test_v3_vit_official_init(tmp_path):
    """moco-v3 vits.py: xavier-uniform Linear (qkv with the fans of each of q, k, v), zero biases,
    patch projection U(+-sqrt(6 / (3 p^2 + D))) with zero bias, cls N(0, 1e-6), sin-cos positions
    in vits.py's channel order; ViT-S with 12 heads; the momentum encoder is a copy."""
    flags = ["--arch", "vit_small", "--preset", "imagenet", "--patch-size", "4"]
    model, args = tiny_model(tmp_path, "v3", *flags, "--hidden-dim", "64")
    vit, D, p = model.backbone, model.feat_dim, 4
    assert D == 384 and len(vit.blocks) == 12 and all(b.heads == 12 for b in vit.blocks)

    def uniform(w, bound):  # inside the bound, and the std of U(-a, a) = a / sqrt(3) (to 5%)
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    for name, m in vit.named_modules():
        if isinstance(m, torch.nn.Linear):
            fan_out = m.out_features // 3 if name.endswith("qkv") else m.out_features
            uniform(m.weight, math.sqrt(6 / (fan_out + m.in_features)))
            assert m.bias is not None and not m.bias.any()
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6 and (m.weight == 1).all() and not m.bias.any()
    uniform(vit.patch_embed.weight, math.sqrt(6 / (3 * p * p + D)))
    assert not vit.patch_embed.bias.any() and not vit.patch_embed.bias.requires_grad
    assert vit.cls_token.std().item() == pytest.approx(1e-6, rel=0.3)
    ref = official_sincos(D, 4, 4)
    torch.testing.assert_close(vit.pos_embed.data, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(vit.state_dict().values(), model.momentum_backbone.state_dict().values()):
        assert torch.equal(a, b)


def resolved(*flags):
    return C.parse_args(moco.Args, [str(f) for f in flags])


def test_recipes_take_every_field_from_their_source():
    """v3 ViT at CIFAR: moco-v3 CONFIG.md's AdamW recipe (not the colab's SGD wd); v3 R18 at
    CIFAR: solo-learn mocov3.yaml with its LARS (eta 0.02, lr clipping) and warm-up; linear
    probes as the two main_lincls.py: v1/v2 x0.1 at 60/80, v3 cosine, per epoch, best epoch."""
    vit = resolved("--version", "v3", "--preset", "cifar", "--arch", "vit_small")
    got = (vit.optimizer, vit.lr, vit.wd, vit.warmup_epochs, vit.tau, vit.epochs, vit.batch_size)
    assert got == ("adamw", 1.5e-4, 0.1, 40, 0.2, 300, 1024) and vit.patch_size == 4
    assert not vit.lars_solo and vit.m_cos and vit.crop_min == 0.08
    r18 = resolved("--version", "v3", "--preset", "cifar")
    got = (r18.arch, r18.optimizer, r18.lr, r18.wd, r18.batch_size, r18.epochs, r18.tau)
    assert got == ("resnet18", "lars", 0.3, 1e-6, 256, 1000, 0.2) and r18.lars_solo
    assert (r18.warmup_epochs, r18.m, r18.crop_min, r18.blur) == (10, 0.99, 0.08, False)
    r50 = resolved("--version", "v3", "--preset", "imagenet")
    assert (r50.lr, r50.wd, r50.epochs, r50.crop_min, r50.lars_solo) == (0.6, 1e-6, 100, 0.2, False)
    for v in ("v1", "v2"):
        a = resolved("--version", v, "--preset", "imagenet")
        assert (a.linear_milestones, a.linear_decay, a.linear_lr, a.linear_epochs) == (
            (60, 80),
            0.1,
            30.0,
            100,
        )
        assert a.linear_epoch_lr and a.linear_best and not a.linear_zero_init
    for arch, lr in (("resnet50", 0.1), ("vit_small", 3.0)):
        a = resolved("--version", "v3", "--preset", "imagenet", "--arch", arch)
        got = (a.linear_milestones, a.linear_lr, a.linear_epochs, a.linear_batch_size, a.linear_wd)
        assert got == ((), lr, 90, 1024, 0.0)
        assert a.linear_epoch_lr and a.linear_best and not a.linear_zero_init


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_v3_resnet_stem_and_residual_init_follow_the_preset(tmp_path, preset):
    """v3 at CIFAR builds solo-learn's ResNet-18 (3x3 stem padded by 2: 34 x 34 maps at 32 px; no
    zero-init of the residual BNs); moco-v3 zero-initialises each block's last BN gamma."""
    args = C.parse_args(moco.Args, ["--version", "v3", "--preset", preset, "--arch", "resnet18"])
    args.img_size = 32
    torch.manual_seed(0)
    net = moco.MoCo(args, 1).backbone
    assert net.conv1.padding == ((2, 2) if preset == "cifar" else (1, 1))
    gammas = torch.cat([b.bn2.weight for layer in (net.layer1, net.layer4) for b in layer])
    assert (gammas == 0).all() == (preset == "imagenet")
