"""Tests of common.py: optimisation, schedules, kNN, BN, gathers, checkpoints, backbones,
augmentations, data pipeline and CLI. Everything is tiny and CPU-only (one process)."""

import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T

import common as C
import moco
import simclr

NPZ = os.environ.get(  # the real CIFAR-10 copy next to the checkout, when there is one
    "CLEANSSL_CIFAR_NPZ",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10_jpeg.npz"),
)


def _exit_message(excinfo) -> str:
    code = excinfo.value.code
    assert code == 2, f"exit status {code!r}, not 2 (C.fail)"
    return str(excinfo.value)


def _assert_one_line_error(excinfo, *needles):
    msg = _exit_message(excinfo)
    assert msg.startswith("error:"), msg
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# ==== LARS and parameter groups =============================================================
def test_lars_1d_param_is_plain_sgd_momentum():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(7))
    q = nn.Parameter(p.detach().clone())
    lars = C.LARS([p], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    sgd = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=0)
    for _ in range(3):
        g = torch.randn(7)
        p.grad, q.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(p.detach(), p.detach() * 0)  # it moved


def test_lars_2d_param_matches_reference_formula():
    torch.manual_seed(0)
    lr, wd, mu, eta = 1.0, 0.1, 0.9, 0.02  # large enough that each term moves the result
    p = nn.Parameter(torch.randn(4, 3))
    opt = C.LARS([p], lr=lr, weight_decay=wd, momentum=mu, trust_coefficient=eta)
    w, buf = p.detach().clone().double(), torch.zeros(4, 3, dtype=torch.float64)
    for _ in range(2):
        g = torch.randn(4, 3)
        p.grad = g.clone()
        before = p.detach().clone().double()
        opt.step()
        d = g.double() + wd * w
        trust = eta * w.norm() / d.norm()
        buf = mu * buf + trust * d
        w = w - lr * buf
        torch.testing.assert_close(p.detach().double() - before, -lr * buf, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)


def test_lars_zero_param_uses_trust_one_and_skips_missing_grads():
    p = nn.Parameter(torch.zeros(2, 2))
    r = nn.Parameter(torch.ones(3))
    opt = C.LARS([p, r], lr=1.0, weight_decay=0.0, momentum=0.0)
    p.grad = torch.full((2, 2), 0.5)
    opt.step()  # |w| = 0: no adaptation (trust 1); r has no grad: untouched
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -0.5))
    assert torch.equal(r.detach(), torch.ones(3))


def _solo_lars_reference(params, grads, lr, wd, mu, eta, clip, bufs):
    """solo-learn's LARS step, restated per parameter [ref: solo-learn solo/utils/lars.py
    LARS.step, exclude_bias_n_norm=True]: for ndim > 1 and |w|, |g| > 0: trust = eta |w| /
    (|g| + wd |w| + 1e-8); with clip_lr, trust = min(trust / lr, 1); d = (g + wd w) * trust;
    1-D params: d = g. Then torch-SGD momentum: buf = d at first, then mu buf + d; w -= lr buf."""
    out = []
    for i, (w, g) in enumerate(zip(params, grads)):
        d = g
        if w.ndim > 1 and w.norm() > 0 and g.norm() > 0:
            trust = eta * w.norm() / (g.norm() + w.norm() * wd + 1e-8)
            if clip:
                trust = min(trust / lr, torch.tensor(1.0, dtype=w.dtype))
            d = (g + wd * w) * trust
        bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
        out.append(w - lr * bufs[i])
    return out


@pytest.mark.parametrize("clip,lr", [(False, 0.5), (True, 0.5), (True, 0.01), (True, 0.0)])
def test_lars_solo_variant_matches_solo_learn(clip, lr):
    """clip_lr caps the trust at 1/lr: with a small lr the step is plain SGD's (trust > lr),
    with a large one the LARS step; lr 0 (the first warm-up step) moves nothing."""
    torch.manual_seed(0)
    wd, mu, eta = 1e-3, 0.9, 0.02
    shapes = [(5, 4), (3, 2, 2, 2), (4,), (2, 3)]
    ps = [nn.Parameter(torch.randn(s) * (0 if i == 3 else 1)) for i, s in enumerate(shapes)]
    groups = C.param_groups([nn.ParameterList(ps)], wd)  # as main() builds them
    opt = C.LARS(groups, lr, wd, mu, eta, clip_lr=clip, solo=True)
    ref, bufs = [p.detach().double().clone() for p in ps], [None] * len(ps)
    for step in range(3):
        gs = [torch.randn(s) * 10 ** (step - 1) for s in shapes]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        ref = _solo_lars_reference(ref, [g.double() for g in gs], lr, wd, mu, eta, clip, bufs)
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)
    if lr == 0.0:
        assert all(torch.equal(p.detach().double(), r) for p, r in zip(ps, ref))


def test_lars_classic_momentum_keeps_each_steps_lr():
    """[ref: simclr lars_optimizer.py, classic_momentum=True]: d = g + wd w (decayed params),
    trust = eta |w| / |d|; v <- mu v + lr_t trust d; w -= v. Under a warm-up the past steps keep
    their smaller lr (the default form would rescale them to today's)."""
    torch.manual_seed(0)
    wd, mu, eta, lrs = 0.1, 0.9, 0.02, [0.0, 0.5, 1.0, 1.5]
    ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    opt = C.LARS(C.param_groups([nn.ParameterList(ps)], wd), 0.0, wd, mu, eta, classic=True)
    ref, v = [p.detach().double().clone() for p in ps], [0.0, 0.0]
    for lr in lrs:
        gs = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        C.set_lr(opt, lr)
        opt.step()
        for i, (w, g) in enumerate(zip(ref, gs)):
            d, trust = g.double(), 1.0
            if w.ndim > 1:
                d = d + wd * w
                trust = eta * w.norm() / d.norm()
            v[i] = mu * v[i] + lr * trust * d
            ref[i] = w - v[i]
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)


def test_param_groups_split_by_ndim():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(2, 2, bias=False), nn.LayerNorm(2))
    b[1].weight.requires_grad_(False)
    frozen = b[1].weight
    extra = nn.Module()
    extra.pos = nn.Parameter(torch.zeros(1, 3, 5))
    groups = C.param_groups([a, b, extra], wd=0.05)
    wd_group = [g for g in groups if g["weight_decay"] == 0.05]
    no_wd = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(wd_group) == 1 and len(no_wd) == 1 and len(groups) == 2
    assert all(p.ndim >= 2 for p in wd_group[0]["params"])
    assert all(p.ndim <= 1 for p in no_wd[0]["params"])
    got = [id(p) for g in groups for p in g["params"]]
    want = [id(p) for m in (a, b, extra) for p in m.parameters() if p.requires_grad]
    assert len(got) == len(set(got)), "a parameter appears twice"
    assert set(got) == set(want)
    assert id(frozen) not in got
    assert id(extra.pos) in [id(p) for p in wd_group[0]["params"]]


# ==== schedules =============================================================================
def test_cosine_schedule_with_warmup():
    """The official schedules: lr = base * step / warmup_steps during the warm-up (0 at step 0),
    then base * 0.5 * (1 + cos(pi * (step - w) / (total - w))) [moco-v3 main_moco.py
    adjust_learning_rate; simclr model_util.learning_rate_schedule; barlowtwins main.py]."""
    base, final, total, warm = 2.0, 0.01, 100, 10
    s = C.cosine_schedule(base, final, total, warm, warmup_start=0.0)
    assert len(s) == total
    for i in range(total):
        c = (i - warm) / (total - warm)
        want = (
            base * i / warm
            if i < warm
            else final + (base - final) * 0.5 * (1 + math.cos(math.pi * c))
        )
        assert math.isclose(s[i], want, rel_tol=1e-12, abs_tol=1e-15), i
    assert s[0] == 0.0 and s[warm] == base  # the first cosine step is the peak
    tail = s[warm:]
    assert all(b <= a + 1e-12 for a, b in zip(tail, tail[1:]))
    assert min(s[warm:]) >= final


def test_cosine_schedule_linspace_warmup_is_numpys():
    """linspace=True: the warm-up is np.linspace(start, base, w), base AT step w - 1 [ref: dino
    utils.cosine_scheduler, swav main_swav.py]; the cosine part is the same as without."""
    np = pytest.importorskip("numpy")
    base, final, total, warm, start = 4.8, 0.0048, 60, 10, 0.3
    s = C.cosine_schedule(base, final, total, warm, start, linspace=True)
    plain = C.cosine_schedule(base, final, total, warm, start)
    np.testing.assert_allclose(s[:warm], np.linspace(start, base, warm), rtol=1e-12)
    assert s[warm - 1] == pytest.approx(base, rel=1e-15) and s[warm:] == plain[warm:]
    assert C.cosine_schedule(1.0, 0.0, 5, 1, 0.25, linspace=True)[0] == 0.25  # w = 1: the start


def test_step_schedule_milestones_factors_and_warmup():
    spe = 3  # steps per epoch; 5 epochs
    got = C.step_schedule(1.0, 15, spe, (2, 4))
    want = [1.0] * 6 + [0.1] * 6 + [0.01] * 3  # x0.1 from epoch 2, x0.01 from epoch 4
    assert got == pytest.approx(want)
    got = C.step_schedule(2.0, 15, spe, (1, 3), (0.5, 0.05), warmup_steps=4)
    want = [2.0 * (s + 1) / 4 for s in range(3)] + [1.0] * 6 + [0.1] * 6  # absolute factors
    assert got == pytest.approx(want)
    assert C.step_schedule(0.3, 0, spe, (1,)) == [0.3]  # --epochs 0: one value, as cosine


def test_cosine_schedule_without_warmup_and_warmup_start():
    s = C.cosine_schedule(1.0, 0.0, 50)
    assert len(s) == 50 and math.isclose(s[0], 1.0)
    assert all(b <= a for a, b in zip(s, s[1:]))
    assert s[-1] < 0.01
    w = C.cosine_schedule(1.0, 0.0, 20, warmup_steps=4, warmup_start=0.2)
    assert len(w) == 20
    assert w[0] == 0.2 and math.isclose(w[2], 0.2 + 0.8 * 2 / 4) and w[4] == 1.0


def test_set_lr_respects_fixed_lr():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": 0.5}], lr=1.0)
    C.set_lr(opt, 0.1)
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[1]["lr"] == 0.5


# ==== kNN and collapse monitor ==============================================================
def test_knn_predict_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 6
    bank_y = torch.arange(3).repeat_interleave(40)
    bank = centers[bank_y] + torch.randn(120, 16, generator=g)
    test_y = torch.arange(3).repeat_interleave(20)
    test = centers[test_y] + torch.randn(60, 16, generator=g)
    scores = C.knn_predict(test, bank, bank_y, 3, k=15, t=0.1)
    assert scores.shape == (60, 3)
    acc = (scores.argmax(1) == test_y).float().mean().item()
    assert acc >= 0.95, acc


def _naive_knn(feats, bank, bank_y, num_classes, k, t):
    out = []
    for f in feats.tolist():
        sims = []
        for j, b in enumerate(bank.tolist()):
            dot = sum(x * y for x, y in zip(f, b))
            nf, nb = math.sqrt(sum(x * x for x in f)), math.sqrt(sum(y * y for y in b))
            sims.append((dot / (nf * nb), j))
        sims.sort(reverse=True)
        score = [0.0] * num_classes
        for s, j in sims[:k]:
            score[int(bank_y[j])] += math.exp(s / t)
        out.append(score)
    return torch.tensor(out, dtype=torch.float64)


def test_knn_predict_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    bank, bank_y = torch.randn(11, 5, generator=g), torch.randint(0, 3, (11,), generator=g)
    feats = torch.randn(4, 5, generator=g) * 3  # not normalised: knn_predict must normalise
    got = C.knn_predict(feats, bank * 2.5, bank_y, 3, k=4, t=0.5)
    want = _naive_knn(feats, bank, bank_y, 3, k=4, t=0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # k larger than the bank: every bank item votes
    got = C.knn_predict(feats, bank, bank_y, 3, k=50, t=0.5)
    want = _naive_knn(feats, bank, bank_y, 3, 11, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_collapse_std():
    torch.manual_seed(0)
    d = 128
    healthy = C.embedding_stats(torch.randn(4096, d))["z_std"].item()
    assert abs(healthy - 1 / math.sqrt(d)) < 0.1 / math.sqrt(d)
    collapsed = C.embedding_stats(torch.randn(1, d).expand(64, d) * 3)["z_std"].item()
    assert collapsed < 1e-4


# ==== BatchNorm and gathers in one process ==================================================
@pytest.mark.parametrize(
    "ref_cls, shape",
    [(nn.BatchNorm1d, (16, 6)), (nn.BatchNorm1d, (8, 6, 5)), (nn.BatchNorm2d, (4, 6, 5, 3))],
)
def test_global_batchnorm_equals_batchnorm_in_one_process(ref_cls, shape):
    torch.manual_seed(0)
    ref, gbn = ref_cls(6, momentum=0.2), C.GlobalBatchNorm(6, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    gbn.load_state_dict(ref.state_dict())
    x = torch.randn(*shape) * 3 + 1
    for _ in range(2):
        torch.testing.assert_close(gbn(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(gbn, name), getattr(ref, name))
    assert not torch.equal(gbn.running_mean, torch.zeros(6))  # the stats did update
    gbn.eval(), ref.eval()
    torch.testing.assert_close(gbn(x), ref(x))


def test_convert_sync_bn_is_noop_in_one_process():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    out = C.convert_sync_bn(m)
    assert out is m
    assert type(m[1]) is nn.BatchNorm2d and type(m[2][0]) is nn.BatchNorm1d


def test_gathers_are_identity_in_one_process():
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    y = C.gather_no_grad(x)  # same values, cut from the graph (as across processes)
    assert torch.equal(y, x) and not y.requires_grad
    for fn in (C.gather_with_grad, C.all_reduce_with_grad):
        y = fn(x * 2)
        torch.testing.assert_close(y, x.detach() * 2)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, torch.full_like(x, 2.0))


# ==== checkpoints and RNG ===================================================================
def test_save_checkpoint_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    state = {"w": torch.arange(6.0).view(2, 3), "step": 7, "name": "x"}
    C.save_checkpoint(path, state)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    back = C.load_checkpoint(path)
    assert back["step"] == 7 and back["name"] == "x" and torch.equal(back["w"], state["w"])
    C.save_checkpoint(path, {**state, "step": 8})  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]
    assert C.load_checkpoint(path)["step"] == 8

    def broken_save(obj, f, *a, **k):  # a crash half-way through writing
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", broken_save)
    with pytest.raises(OSError):
        C.save_checkpoint(path, {**state, "step": 9})
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 8  # the old checkpoint survived


class _PerRank(nn.Module):
    per_rank = ("queue",)

    def __init__(self, world: int = 1):  # the queue's rows are split over the processes
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("queue", torch.zeros(6 // world, 2))
        self.register_buffer("shared", torch.zeros(2))


def test_per_rank_buffers_round_trip_and_reset_on_another_world_size(tmp_path):
    """Each rank gets its own per-rank buffer back; another world size, whose buffer has another
    shape (SwAV's queue: queue_length / world size rows), restarts it from zeros in its own
    shape, both ways, and loads everything else."""
    path, args = str(tmp_path / "ckpt.pth"), simclr.Args()
    model = _PerRank()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.queue.copy_(torch.arange(12.0).view(6, 2)), model.shared.fill_(5.0)
    C.save_state(path, model, opt, scaler, 3, args)
    ckpt = C.load_checkpoint(path)
    assert torch.equal(ckpt["ranks"][0]["buffers"]["queue"], model.queue)
    assert "shared" not in ckpt["ranks"][0]["buffers"]
    fresh = _PerRank()
    assert C.load_state(path, fresh, opt, scaler, args) == 3
    assert torch.equal(fresh.queue, model.queue) and torch.equal(fresh.shared, model.shared)
    two = simclr.Args(world_size=2, rank=1, is_main=False)
    C.load_state(path, fresh := _PerRank(2), opt, scaler, two)  # 1 process -> 2
    assert torch.equal(fresh.queue, torch.zeros(3, 2)) and torch.equal(fresh.shared, model.shared)
    # a checkpoint written by 2 ranks: rank 1 gets its own queue, another world size zeros
    mine, other = torch.full((3, 2), 6.0), torch.full((3, 2), 7.0)
    ckpt["model"]["queue"], ckpt["args"]["world_size"] = mine, 2
    ckpt["ranks"] = [{**ckpt["ranks"][0], "buffers": {"queue": q}} for q in (mine, other)]
    C.save_checkpoint(path, ckpt)
    C.load_state(path, fresh := _PerRank(2), opt, scaler, two)
    assert torch.equal(fresh.queue, other) and torch.equal(fresh.shared, model.shared)
    C.load_state(path, fresh := _PerRank(), opt, scaler, args)  # 2 processes -> 1
    assert torch.equal(fresh.queue, torch.zeros(6, 2)) and torch.equal(fresh.shared, model.shared)


def test_load_checkpoint_corrupt_file_fails_in_one_line(tmp_path):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(random.Random(0).randbytes(512))
    with pytest.raises(SystemExit) as e:
        C.load_checkpoint(str(path))
    _assert_one_line_error(e, "--resume")


def test_ema():
    online = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    fresh = lambda: [torch.tensor([5.0, -2.0]), torch.tensor([[1.0]])]
    t = fresh()
    C.ema_(t, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, online))
    t = fresh()
    C.ema_(t, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, fresh()))
    t = fresh()
    C.ema_(t, online, 0.5)
    want = [(a + b) / 2 for a, b in zip(fresh(), online)]
    assert all(torch.allclose(a, b) for a, b in zip(t, want))
    assert torch.equal(online[0], torch.tensor([1.0, 2.0]))  # online untouched


# ==== backbones =============================================================================
def test_resnet18_cifar_stem():
    torch.manual_seed(0)
    net, dim = C.build_backbone("resnet18", 32)
    assert dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    seen = {}

    def hook(module, inputs, out):
        seen["shape"] = tuple(out.shape)

    net.layer4.register_forward_hook(hook)
    net.eval()
    with torch.no_grad():
        h = net(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 512)
    assert seen["shape"] == (2, 512, 4, 4)
    solo, _ = C.build_backbone("resnet18", 32, stem_padding=2)  # solo-learn's CIFAR stem
    assert solo.conv1.padding == (2, 2) and solo.conv1(torch.zeros(1, 3, 32, 32)).shape[-1] == 34


def test_resnet50_imagenet_is_torchvision_format():
    net, dim = C.build_backbone("resnet50", 224)
    assert dim == 2048
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, nn.MaxPool2d)
    tv_keys = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(net.state_dict()) == tv_keys
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(net.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_smallcnn_shape():
    net, dim = C.build_backbone("smallcnn", 16)
    assert dim == 256
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, 256)


def test_vit_tiny_shapes_and_options():
    torch.manual_seed(0)
    vit, dim = C.build_backbone("vit_tiny", 32)
    assert dim == 192
    vit.eval()
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 192)
        out16 = vit(torch.randn(2, 3, 16, 16))  # 4x4 grid: position embedding interpolated
    assert out16.shape == (2, 192) and torch.isfinite(out16).all()
    assert all(p.requires_grad for p in vit.patch_embed.parameters())
    assert vit.pos_embed.requires_grad

    frozen, _ = C.build_backbone("vit_tiny", 32, freeze_patch_embed=True, pos_embed="sincos")
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    assert not frozen.pos_embed.requires_grad
    assert frozen.blocks[0].qkv.weight.requires_grad
    grid = C.sincos_pos_embed(192, 8, 8)
    torch.testing.assert_close(frozen.pos_embed[0, 1:], grid)


def test_unknown_arch_fails_in_one_line(capsys):
    """The building block raises (Part 1 has no CLI); the command line refuses it in one line."""
    with pytest.raises(ValueError, match="resnet9000"):
        C.build_backbone("resnet9000", 32)
    with pytest.raises(SystemExit) as e:
        C.parse_args(simclr.Args, ["--arch", "resnet9000"])
    assert e.value.code == 2 and "--arch: invalid choice: 'resnet9000'" in capsys.readouterr().err


def test_sincos_pos_embed():
    e = C.sincos_pos_embed(16, 3, 4)
    assert e.shape == (12, 16)
    assert e.abs().max() <= 1.0
    d = torch.cdist(e, e) + torch.eye(12) * 1e3
    assert d.min() > 1e-3, "two grid positions share an embedding"
    grid = e.view(3, 4, 16)  # moco-v3 vits.py's order: the row's half first, the column's second
    assert torch.equal(grid[:, :1, :8].expand(3, 4, 8), grid[:, :, :8])  # row half: row only
    assert torch.equal(grid[:1, :, 8:].expand(3, 4, 8), grid[:, :, 8:])  # column half


# ==== augmentations =========================================================================
@pytest.fixture(scope="module")
def pil_image():
    return C.synthetic_images(1, 24, 0)[0][0]


@pytest.mark.parametrize(
    "make",
    [
        lambda ms: C.simclr_augment(16, ms),
        lambda ms: C.simclr_augment(16, ms, s=0.5, blur=False),
        lambda ms: C.moco_augment(16, ms, "v1"),
        lambda ms: C.moco_augment(16, ms, "v2"),
    ],
    ids=["simclr", "simclr_cifar", "moco_v1", "moco_v2"],
)
def test_single_view_augmentations(make, pil_image):
    torch.manual_seed(0), random.seed(0)
    x = make(None)(pil_image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    ms = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    torch.manual_seed(0), random.seed(0)
    xn = make(ms)(pil_image)  # same random draws, then Normalize
    mean, std = torch.tensor(ms[0])[:, None, None], torch.tensor(ms[1])[:, None, None]
    torch.testing.assert_close(xn, (x - mean) / std)


def test_byol_and_multicrop_augment(pil_image):
    torch.manual_seed(0), random.seed(0)
    views = C.byol_augment(16, None)(pil_image)
    assert len(views) == 2
    assert all(v.shape == (3, 16, 16) and v.min() >= 0 and v.max() <= 1 for v in views)
    g = C.augmentation(16, None, scale=(0.14, 1.0))
    loc = C.augmentation(8, None, scale=(0.05, 0.14))
    views = C.multicrop_augment(g, loc, n_global=2, n_local=3)(pil_image)
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3


def test_synthetic_images_deterministic():
    a, b, c = (C.synthetic_images(25, 8, s) for s in (0, 0, 1))
    assert (
        len(a) == 25 and a.tensors[0].shape == (25, 8, 8, 3) and a.tensors[0].dtype == torch.uint8
    )
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert a.tensors[1].tolist() == [i % 10 for i in range(25)]
    img, y = a[13]
    assert img.size == (8, 8) and y == 3


def test_indexed():
    base = C.synthetic_images(12, 8, 0)
    ds = C.Indexed(base, T.ToTensor())
    assert len(ds) == 12
    x, y, i = ds[5]
    assert i == 5 and y == base[5][1]
    torch.testing.assert_close(x, base.tensors[0][5].permute(2, 0, 1).float() / 255)
    assert len(C.Indexed(base, T.ToTensor(), n=4)) == 4


# ==== sampler and loader ====================================================================
def test_resumable_sampler():
    ds = list(range(20))
    s = C.ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    keys = list(s)  # (index, epoch): the epoch seeds each sample's augmentation
    full = [i for i, _ in keys]
    assert sorted(full) == ds and full != ds and {e for _, e in keys} == {0}
    s.skip = 7
    assert list(s) == keys[7:]
    assert list(s) == keys  # skip lasts one iteration
    s.set_epoch(1)
    other = list(s)
    assert sorted(i for i, _ in other) == ds and [i for i, _ in other] != full
    assert {e for _, e in other} == {1}
    shards = [
        [i for i, _ in C.ResumableSampler(ds, 2, r, shuffle=True, seed=0, drop_last=True)]
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 10
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(ds)


def epoch_of(loader, epoch, skip_batches=0):
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)
    return loader


def _run_loader(args, ds, epochs=(0, 1)):
    torch.manual_seed(0), random.seed(0)
    loader = C.make_loader(ds, args, batch_size=4)
    return [[(x.clone(), y.clone(), i.clone()) for x, y, i in epoch_of(loader, e)] for e in epochs]


def test_make_loader_reproducible_with_workers_0():
    args = SimpleNamespace(world_size=1, rank=0, seed=3, workers=0, device="cpu")
    tf = T.Compose([T.RandomResizedCrop(8, scale=(0.2, 1.0)), T.ToTensor()])
    ds = C.Indexed(C.synthetic_images(18, 8, 0), tf, seed=3)
    run1, run2 = _run_loader(args, ds), _run_loader(args, ds)
    for e1, e2 in zip(run1, run2):
        assert len(e1) == len(e2) == 4  # 18 // 4, drop_last
        for (x1, y1, i1), (x2, y2, i2) in zip(e1, e2):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    order = [torch.cat([i for _, _, i in epoch]).tolist() for epoch in run1]
    assert order[0] != order[1] and sorted(order[0]) != order[0]
    assert len(set(order[0])) == 16
    # the augmentation is random: the same image in two epochs gets different crops
    first = {int(i): v for xs, _, ii in run1[0] for i, v in zip(ii, xs)}
    second = {int(i): v for xs, _, ii in run1[1] for i, v in zip(ii, xs)}
    common_idx = set(first) & set(second)
    assert any(not torch.equal(first[i], second[i]) for i in common_idx)


def test_loader_epoch_skip_batches_resumes_the_same_order():
    args = SimpleNamespace(world_size=1, rank=0, seed=5, workers=0, device="cpu")
    ds = C.Indexed(C.synthetic_images(16, 8, 0), T.ToTensor())
    loader = C.make_loader(ds, args, batch_size=4)
    full = [i.tolist() for _, _, i in epoch_of(loader, 2)]
    resumed = [i.tolist() for _, _, i in epoch_of(loader, 2, skip_batches=3)]
    assert resumed == full[3:]
    again = [i.tolist() for _, _, i in epoch_of(loader, 2)]
    assert again == full


def test_mid_epoch_resume_reproduces_augmentations_with_workers():
    """Indexed seeds each sample's augmentation from (seed, epoch, index): skipping batches
    must not change the crops of the batches that follow, whatever the worker count."""
    args = SimpleNamespace(world_size=1, rank=0, seed=3, workers=2, device="cpu")
    tf = T.Compose([T.RandomResizedCrop(8, scale=(0.2, 1.0)), T.ToTensor()])
    ds = C.Indexed(C.synthetic_images(8, 8, 0), tf, seed=3)
    loader = C.make_loader(ds, args, batch_size=2)
    full = [(x, i) for x, _, i in epoch_of(loader, 0)]
    again = [(x, i) for x, _, i in epoch_of(loader, 0)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))  # reseeded per epoch
    resumed = [(x, i) for x, _, i in epoch_of(loader, 0, skip_batches=1)]
    assert [i.tolist() for _, i in resumed] == [i.tolist() for _, i in full[1:]]
    same = [torch.equal(a[0], b[0]) for a, b in zip(full[1:], resumed)]
    assert all(same), f"augmentations after a mid-epoch resume differ (batch equal: {same})"
    args.workers = 0
    single = [x for x, _, _ in epoch_of(C.make_loader(ds, args, batch_size=2), 0)]
    assert all(torch.equal(a[0], b) for a, b in zip(full, single))  # worker count irrelevant


# ==== CLI ===================================================================================
def test_parse_args_simclr_presets_and_flags():
    a = C.parse_args(simclr.Args, [])
    assert a.preset == "cifar" and a.arch == "resnet18" and a.tau == 0.5
    assert a.batch_size == 512 and a.blur is False
    assert C.parse_args(simclr.Args, ["--tau", "0.3"]).tau == 0.3
    assert C.parse_args(simclr.Args, ["--arch", "smallcnn"]).arch == "smallcnn"
    im = C.parse_args(simclr.Args, ["--preset", "imagenet"])
    d = simclr.Args()
    assert (im.arch, im.tau, im.batch_size) == ("resnet50", 0.1, 4096)
    assert (im.lr, im.epochs, im.wd, im.blur) == (d.lr, d.epochs, d.wd, d.blur)
    assert C.parse_args(simclr.Args, ["--version", "v2"]).proj_layers == 3
    assert C.parse_args(simclr.Args, ["--version", "v2", "--proj-layers", "4"]).proj_layers == 4
    b = C.parse_args(simclr.Args, ["--compile", "--no-blur", "--linear-milestones", "60", "80"])
    assert b.compile is True and b.blur is False
    assert b.linear_milestones == (60, 80)
    assert C.parse_args(simclr.Args, ["--preset", "imagenet", "--no-blur"]).blur is False
    assert C.parse_args(simclr.Args, ["--preset", "imagenet", "--blur"]).blur is True


@pytest.mark.parametrize("flag", [["--rank", "1"], ["--world-size", "2"], ["--total-steps", "3"]])
def test_parse_args_rejects_derived_fields(flag, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(simclr.Args, flag)
    assert e.value.code == 2  # argparse: unrecognised argument
    assert "unrecognized arguments" in capsys.readouterr().err


def test_parse_args_moco():
    v2 = C.parse_args(moco.Args, [])
    assert v2.version == "v2" and v2.queue_size == 4096 and v2.tau == 0.2
    v3 = C.parse_args(moco.Args, ["--version", "v3"])
    assert v3.queue_size == 0 and v3.tau == 0.2 and v3.arch == "resnet18"
    vit = C.parse_args(
        moco.Args, ["--version", "v3", "--arch", "vit_small", "--preset", "imagenet"]
    )
    assert vit.optimizer == "adamw" and vit.arch == "vit_small"
    assert C.parse_args(moco.Args, ["--lr-milestones", "5", "7"]).lr_milestones == (5, 7)


def test_moco_v3_vit_cifar_recipe_is_consistent():
    """The cifar preset must not pair AdamW (chosen for ViT) with the LARS lr of the R50 recipe."""
    a = C.parse_args(moco.Args, ["--version", "v3", "--arch", "vit_small"])
    assert a.optimizer == "adamw"
    assert a.lr * a.batch_size / 256 < 0.01, (
        f"AdamW at lr {a.lr} per 256 (x{a.batch_size}/256), wd {a.wd}: the LARS recipe leaked in"
    )


# ==== build_data ============================================================================
def _simclr_args(monkeypatch, *argv):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    args = C.parse_args(simclr.Args, ["--device", "cpu", "--workers", "0", *argv])
    C.setup_ddp(args)
    return args


def _two_views(args):
    return C.MultiView([C.simclr_augment(args.img_size, None, 0.5, False)] * 2)


def test_build_data_synthetic(monkeypatch):
    args = _simclr_args(
        monkeypatch,
        *("--dataset", "synthetic", "--subset", "64", "--batch-size", "16", "--img-size", "16"),
    )
    assert args.world_size == 1 and args.rank == 0 and args.batch_size_per_gpu == 16
    assert args.amp == "off"
    data = C.build_data(args, _two_views(args), None)
    assert args.steps_per_epoch == 4 and args.total_steps == 4 * args.epochs
    assert len(data.train) == 64 and data.num_classes == 10
    views, y, idx = data.train[5]
    assert isinstance(views, list) and len(views) == 2
    assert all(v.shape == (3, 16, 16) for v in views)
    assert y == 5 and idx == 5
    x, y, idx = data.test[3]
    assert x.shape == (3, 16, 16) and x.min() >= 0 and x.max() <= 1 and idx == 3


def test_build_data_missing_npz_dir(monkeypatch, tmp_path):
    missing = str(tmp_path / "nowhere")
    args = _simclr_args(monkeypatch, "--dataset", "cifar10-npz", "--data-dir", missing)
    with pytest.raises(SystemExit) as e:
        C.build_data(args, _two_views(args), None)
    _assert_one_line_error(e, "--data-dir")


def test_build_data_batch_larger_than_dataset(monkeypatch):
    args = _simclr_args(
        monkeypatch, "--dataset", "synthetic", "--subset", "8", "--batch-size", "16"
    )
    with pytest.raises(SystemExit) as e:
        C.build_data(args, _two_views(args), None)
    _assert_one_line_error(e, "--batch-size")


@pytest.mark.skipif(not os.path.isfile(NPZ), reason=f"{NPZ} not present (shared CIFAR-10 npz)")
def test_npz_images_cifar10_test_split():
    ds = C.npz_images(NPZ, "test")
    assert ds.tensors[0].shape == (10000, 32, 32, 3) and ds.tensors[0].dtype == torch.uint8
    assert sorted(set(ds.tensors[1].tolist())) == list(range(10))
    assert torch.bincount(ds.tensors[1], minlength=10).tolist() == [1000] * 10
    assert ds.tensors[0][:100].float().std() > 20  # real pictures, not a constant fill
    img, y = ds[0]
    assert img.size == (32, 32) and y == int(ds.tensors[1][0])
