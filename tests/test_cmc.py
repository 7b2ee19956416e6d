import copy
import importlib
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import cmc
import common as C


# ==== Lab conversion ========================================================================
def naive_lab(r, g, b):
    """One pixel, float64, the formulas of skimage.color.rgb2lab written out (sRGB, D65, 2 deg)."""
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in (r, g, b)]
    rows = [(0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169)]
    rows += [(0.019334, 0.119193, 0.950227)]
    xyz = [sum(m * c for m, c in zip(row, lin)) for row in rows]
    t = [v / w for v, w in zip(xyz, (0.95047, 1.0, 1.08883))]
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in t]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def test_rgb_to_lab_matches_naive_per_pixel_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 4, 5), generator=g).float() / 255  # uint8 crops, as ToTensor
    x[0, :, 0, 0] = torch.tensor([0.04045, 0.0404, 0.0405])  # both sides of the gamma knee
    x[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0])
    x[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])
    got = cmc.rgb_to_lab(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    for b, i, j in itertools.product(range(2), range(4), range(5)):
        ref = naive_lab(*x[b, :, i, j].double().tolist())
        assert got[b, :, i, j].tolist() == pytest.approx(ref, abs=2e-3)
    white = got[0, :, 0, 2]
    assert white[0].item() == pytest.approx(100.0, abs=1e-3) and white[1:].abs().max() < 0.01


def test_lab_round_trip_and_the_official_normalisation_constants():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 3, 6, 6), generator=g).double() / 255
    torch.testing.assert_close(cmc.lab_to_rgb(cmc.rgb_to_lab(x).double()), x, atol=1e-4, rtol=0)
    # the official mean/std are the centre and half-range of a, b over the sRGB cube: its 8
    # corners must reproduce them (-86.183 .. 98.233, -107.857 .. 94.478) [train_CMC.py]
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3))).view(8, 3, 1, 1)
    lab = cmc.rgb_to_lab(corners).flatten(1)
    assert lab[:, 1].min().item() == pytest.approx(-86.183, abs=2e-3)
    assert lab[:, 1].max().item() == pytest.approx(98.233, abs=2e-3)
    assert lab[:, 2].min().item() == pytest.approx(-107.857, abs=2e-3)
    assert lab[:, 2].max().item() == pytest.approx(94.478, abs=2e-3)
    l, ab = cmc.lab_views(corners)  # normalised into [-1, 1], L of black / white at -1 / +1
    assert l.shape == (8, 1, 1, 1) and ab.shape == (8, 2, 1, 1)
    assert l.min().item() == pytest.approx(-1.0) and l.max().item() == pytest.approx(1.0, abs=1e-5)
    assert ab.abs().max().item() == pytest.approx(1.0, abs=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # converted in fp32 under autocast too
        assert cmc.rgb_to_lab(corners.bfloat16()).dtype == torch.float32


# ==== loss ==================================================================================
def naive_direction(f, bank, cands, tau):
    """mean over anchors of -log softmax(f_i . bank[c] / tau) at the first candidate c."""
    total = 0.0
    for fi, row in zip(f.tolist(), cands):
        s = [sum(a * b for a, b in zip(fi, bank[c].tolist())) / tau for c in row]
        mx = max(s)
        total += -(s[0] - mx - math.log(sum(math.exp(v - mx) for v in s)))
    return total / len(f)


def loss_of(f_l, f_ab, bank_l, bank_ab, idx, tau, k, z=None):
    s_l, s_ab = cmc.cmc_scores(f_l, f_ab, bank_l, bank_ab, idx, tau, k)
    return cmc.cmc_loss(s_l, s_ab, idx, k, len(bank_l), z)


def random_inputs(b, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    f_l, f_ab = (F.normalize(torch.randn(b, d, generator=g), dim=1) for _ in range(2))
    bank_l, bank_ab = (F.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(2))
    idx = torch.randperm(n, generator=g)[:b]
    return f_l, f_ab, bank_l, bank_ab, idx


@pytest.mark.parametrize("b,d,n,tau", [(5, 4, 9, 0.07), (8, 16, 20, 0.1), (1, 3, 4, 0.5)])
def test_exact_softmax_matches_naive_reference(b, d, n, tau):
    f_l, f_ab, bank_l, bank_ab, idx = random_inputs(b, d, n, b)
    got = loss_of(f_l, f_ab, bank_l, bank_ab, idx, tau, 0)
    # candidates: the positive (the OTHER view's row idx_i), then every other row of that bank
    cands = [[i] + [j for j in range(n) if j != i] for i in idx.tolist()]
    ref = naive_direction(f_l.double(), bank_ab.double(), cands, tau)  # L anchors, ab bank
    ref += naive_direction(f_ab.double(), bank_l.double(), cands, tau)  # ab anchors, L bank
    assert got.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("b,k,n", [(6, 5, 30), (4, 40, 10)])
def test_sampled_softmax_matches_naive_reference_with_the_same_noise(b, k, n):
    f_l, f_ab, bank_l, bank_ab, idx = random_inputs(b, 8, n, k)
    torch.manual_seed(123)
    got = loss_of(f_l, f_ab, bank_l, bank_ab, idx, 0.07, k)
    torch.manual_seed(123)  # the documented draw: uniform, with replacement, (B, k)
    noise = torch.randint(n, (b, k))
    cands = [[i] + row for i, row in zip(idx.tolist(), noise.tolist())]
    ref = naive_direction(f_l.double(), bank_ab.double(), cands, 0.07)
    ref += naive_direction(f_ab.double(), bank_l.double(), cands, 0.07)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def naive_nce(f, bank, cands, tau, z, n):
    """NCECriterion on NCEAverage's out, float64 loops: P = exp(s)/Z, Pn = 1/n, m = k noise rows:
    -(sum_i log P_i0/(P_i0 + m Pn + 1e-7) + sum_ij log m Pn/(P_ij + m Pn + 1e-7)) / B."""
    total, m = 0.0, len(cands[0]) - 1
    for fi, row in zip(f.tolist(), cands):
        p = [math.exp(sum(a * b for a, b in zip(fi, bank[c].tolist())) / tau) / z for c in row]
        total += math.log(p[0] / (p[0] + m / n + 1e-7))
        total += sum(math.log((m / n) / (q + m / n + 1e-7)) for q in p[1:])
    return -total / len(f)


@pytest.mark.parametrize("b,k,n,tau", [(6, 5, 30, 0.07), (4, 40, 10, 0.1), (3, 2, 1000, 0.07)])
def test_nce_and_its_normalisers_match_naive_reference_with_the_same_noise(b, k, n, tau):
    f_l, f_ab, bank_l, bank_ab, idx = random_inputs(b, 8, n, k)
    torch.manual_seed(7)
    s_l, s_ab = cmc.cmc_scores(f_l, f_ab, bank_l, bank_ab, idx, tau, k)
    z = cmc.estimate_z(s_l, s_ab, n)
    assert z.dtype == torch.float64 and z.shape == (2,)
    got = cmc.cmc_loss(s_l, s_ab, idx, k, n, tuple(z.tolist()))
    torch.manual_seed(7)
    cands = [[i] + row for i, row in zip(idx.tolist(), torch.randint(n, (b, k)).tolist())]
    # Z = n * mean exp(s) over the B x (1 + k) scores of this (first) batch [NCEAverage]
    z_ref = []
    for f, bank in ((f_l, bank_ab), (f_ab, bank_l)):  # out_l: L anchors on the ab bank
        e = [
            math.exp(sum(x * y for x, y in zip(fi, bank[c].tolist())) / tau)
            for fi, row in zip(f.double().tolist(), cands)
            for c in row
        ]
        z_ref.append(n * sum(e) / len(e))
    assert z.tolist() == pytest.approx(z_ref, rel=1e-5)
    ref = naive_nce(f_l.double(), bank_ab.double(), cands, tau, z_ref[0], n)
    ref += naive_nce(f_ab.double(), bank_l.double(), cands, tau, z_ref[1], n)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_model_sets_z_on_the_first_batch_only_and_after_resume(tmp_path):
    args = tiny_args(cmc, tmp_path, "--nce-k", 8)
    C.setup_ddp(args)
    torch.manual_seed(0)
    model = cmc.CMC(args, 20)
    assert model.nce and torch.equal(model.nce_z, torch.full((2,), -1.0, dtype=torch.float64))
    x, idx = torch.rand(4, 3, 16, 16), torch.tensor([9, 2, 5, 0])
    model(x, idx)
    z = model.nce_z.clone()
    assert (z > 0).all() and model.z_host == tuple(z.tolist())
    model.bank_l.mul_(0.5)  # other scores: Z stays what the first batch set
    model(torch.rand(4, 3, 16, 16), idx)
    assert torch.equal(model.nce_z, z)
    fresh = cmc.CMC(args, 20)
    fresh.load_state_dict(model.state_dict())
    fresh(x, idx)
    assert torch.equal(fresh.nce_z, z) and fresh.z_host == tuple(z.tolist())
    soft = cmc.CMC(tiny_args(cmc, tmp_path, "--nce-k", 8, "--softmax"), 20)
    soft(x, idx)
    assert not soft.nce and torch.equal(soft.nce_z, torch.full((2,), -1.0, dtype=torch.float64))


def test_both_directions_each_against_the_other_views_bank():
    f_l, f_ab, bank_l, bank_ab, idx = random_inputs(6, 8, 12, 3)
    f_l.requires_grad_(), f_ab.requires_grad_()
    bank_l.requires_grad_(), bank_ab.requires_grad_()
    loss_of(f_l, f_ab, bank_l, bank_ab, idx, 0.1, 0).backward()
    assert f_l.grad.abs().sum() > 0 and f_ab.grad.abs().sum() > 0  # both directions present
    assert bank_l.grad is None and bank_ab.grad is None  # the banks get no gradient
    g_l, g_ab = f_l.grad.clone(), f_ab.grad.clone()
    # the L anchors see only the ab bank, the ab anchors only the L bank
    f_l.grad = f_ab.grad = None
    other_l = F.normalize(torch.randn_like(bank_l), dim=1)
    loss_of(f_l, f_ab, other_l, bank_ab, idx, 0.1, 0).backward()
    assert torch.equal(f_l.grad, g_l) and not torch.allclose(f_ab.grad, g_ab)
    # swapping the roles of the views gives the same loss
    a = loss_of(f_l, f_ab, bank_l, bank_ab, idx, 0.1, 0)
    b = loss_of(f_ab, f_l, bank_ab, bank_l, idx, 0.1, 0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_loss_extremes_and_half_precision():
    n, d = 16, 32
    bank = F.normalize(torch.randn(n, d), dim=1)
    idx = torch.arange(4)
    # anchors equal to their positives with tiny tau: the loss goes to 0
    low = loss_of(bank[idx], bank[idx], bank, bank, idx, 0.01, 0)
    assert low.item() < 1e-3 and low.item() == pytest.approx(0.0, abs=1e-3)
    same = torch.ones(n, d) / math.sqrt(d)  # every logit 1/tau = 100: loss 2 log N
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = loss_of(same[:4].to(dtype), same[:4].to(dtype), same, same, idx, 0.01, 0)
            assert torch.isfinite(out) and out.dtype == torch.float32
            assert out.item() == pytest.approx(2 * math.log(n), rel=1e-2)
            out = loss_of(same[:4].to(dtype), same[:4].to(dtype), same, same, idx, 0.01, 5)
            assert out.item() == pytest.approx(2 * math.log(6), rel=1e-2)
            # NCE at tau 0.01: exp(100) overflows fp32, the log-space loss does not; all scores
            # equal: P = 1/N for every row, the loss is the closed form below
            s = cmc.cmc_scores(same[:4].to(dtype), same[:4].to(dtype), same, same, idx, 0.01, 5)
            z = cmc.estimate_z(*s, n)
            assert z.tolist() == pytest.approx([n * s[0].double().exp().mean().item()] * 2)
            out = cmc.cmc_loss(*s, idx, 5, n, tuple(z.tolist()))
            pn, m = 1 / n, 5 / n
            ref = -2 * (math.log(pn / (pn + m + 1e-7)) + 5 * math.log(m / (pn + m + 1e-7)))
            assert torch.isfinite(out) and out.item() == pytest.approx(ref, rel=1e-2)


# ==== bank ==================================================================================
@pytest.mark.parametrize("m", [0.5, 0.9])
def test_update_bank_rows_with_indices(m):
    g = torch.Generator().manual_seed(4)
    bank, z = torch.randn(10, 6, generator=g), F.normalize(torch.randn(3, 6, generator=g), dim=1)
    idx, old, ptr = torch.tensor([7, 0, 4]), bank.clone(), bank.data_ptr()
    cmc.update_bank((bank,), (z,), idx, m)
    for r in range(10):
        if r in idx.tolist():
            zi = z[idx.tolist().index(r)].tolist()
            row = [m * a + (1 - m) * b for a, b in zip(old[r].tolist(), zi)]
            norm = math.sqrt(sum(v * v for v in row))
            assert bank[r].tolist() == pytest.approx([v / norm for v in row], abs=1e-6)
        else:
            assert torch.equal(bank[r], old[r])
    assert bank.data_ptr() == ptr  # in place


# ==== model =================================================================================
def test_encoders_are_the_official_half_width_resnets(tmp_path):
    """resnet50v1: two ResNet-50 with every stage at half width and the 64-channel stem, 1024-d
    each after the pool; 12M parameters with the fc heads [ref: README '2xResNet50half | 12']."""
    args = C.parse_args(cmc.Args, ["--preset", "imagenet", "--out-dir", str(tmp_path)])
    args.img_size = 224
    model = cmc.CMC(args, 10)
    enc_l, enc_ab = model.backbone["l"], model.backbone["ab"]
    assert enc_l.conv1.in_channels == 1 and enc_ab.conv1.in_channels == 2
    assert enc_l.conv1.out_channels == 64 and enc_l.conv1.kernel_size == (7, 7)
    assert enc_l.layer1[0].conv1.out_channels == 32 and enc_l.layer4[-1].conv3.out_channels == 1024
    assert model.feat_dim == 2048 and model.projector["l"].in_features == 1024
    n = sum(p.numel() for p in model.parameters())
    assert 11.9e6 < n < 12.2e6, n
    x = torch.rand(2, 3, 64, 64)
    assert cmc.features(model.eval(), x).shape == (2, 2048)
    sd = model.state_dict()  # the banks are persistent buffers, uniform init of ~unit norm rows
    stdv = 1 / math.sqrt(128 / 3)
    for name in ("bank_l", "bank_ab"):
        assert sd[name].shape == (10, 128) and sd[name].abs().max() <= stdv
    assert not torch.equal(sd["bank_l"], sd["bank_ab"])


def test_small_encoders_and_features_concatenate_both_views(tmp_path):
    args = tiny_args(cmc, tmp_path)
    model = cmc.CMC(args, 20).eval()
    assert model.feat_dim == 256  # smallcnn at width 0.5: 128 per view
    x = torch.rand(3, 3, 16, 16)
    l, ab = cmc.lab_views(x)
    ref = torch.cat([model.backbone["l"](l), model.backbone["ab"](ab)], dim=1)
    torch.testing.assert_close(cmc.features(model, x), ref)
    r18 = C.parse_args(cmc.Args, ["--out-dir", str(tmp_path)])  # cifar preset: resnet18 v1
    r18.img_size = 32
    m18 = cmc.CMC(r18, 4)
    assert m18.feat_dim == 512 and m18.backbone["ab"].conv1.kernel_size == (3, 3)


def test_presets(tmp_path):
    cifar, imnet = C.parse_args(cmc.Args, []), C.parse_args(cmc.Args, ["--preset", "imagenet"])
    got = (cifar.arch, cifar.width, cifar.batch_size, cifar.lr, cifar.wd, cifar.epochs)
    assert got == ("resnet18", 0.5, 128, 0.03, 5e-4, 200)
    assert (cifar.lr_milestones, cifar.tau, cifar.nce_k, cifar.crop_min) == (
        (120, 160),
        0.1,
        0,
        0.2,
    )
    got = (imnet.arch, imnet.width, imnet.batch_size, imnet.lr, imnet.wd, imnet.epochs)
    assert got == ("resnet50", 0.5, 128, 0.03, 1e-4, 240)
    assert (imnet.lr_milestones, imnet.warmup_epochs) == ((120, 160, 200), 0)
    assert (imnet.tau, imnet.nce_k, imnet.bank_m, imnet.dim, imnet.crop_min) == (
        0.07,
        4096,
        0.5,
        128,
        0.08,
    )
    assert not imnet.softmax and not cifar.softmax  # NCE, as the README commands and weights
    lin = (imnet.linear_epochs, imnet.linear_lr, imnet.linear_wd, imnet.linear_batch_size)
    assert lin == (60, 30.0, 0.0, 256) and not imnet.linear_nesterov
    # LinearProbing.py: x0.2 at 30/40/50 set per epoch, the best epoch kept, N(0, 0.01) head
    assert (imnet.linear_milestones, imnet.linear_decay) == ((30, 40, 50), 0.2)
    assert imnet.linear_epoch_lr and imnet.linear_best and not imnet.linear_zero_init


def test_train_step_writes_the_rows_of_this_batch_after_the_loss(tmp_path):
    args = tiny_args(cmc, tmp_path)
    C.setup_ddp(args)
    args.sched = {"lr": [0.1]}
    torch.manual_seed(0)
    model = cmc.CMC(args, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, idx = torch.rand(4, 3, 16, 16), torch.tensor([9, 2, 5, 0])
    before = copy.deepcopy(model)
    loss_ref, z_l, z_ab = before(x, idx)  # embeddings from the pre-step weights
    banks = {n: getattr(model, n).clone() for n in ("bank_l", "bank_ab")}
    stats = cmc.train_step(model, ([x], None, idx), opt, scaler, 0, args)
    assert set(stats) == {"loss", "lr", "wd", "tau", "grad_norm", "z"}
    assert stats["loss"].item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for name, z in (("bank_l", z_l), ("bank_ab", z_ab)):  # each view writes its own bank
        new, old = getattr(model, name), banks[name]
        torch.testing.assert_close(new[idx], F.normalize(0.5 * old[idx] + 0.5 * z.detach()))
        rest = torch.ones(12, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(new[rest], old[rest])
    assert not torch.equal(before.projector["l"].weight, model.projector["l"].weight)


def test_lr_schedule_steps_at_the_milestones(tmp_path):
    flags = ["--subset", 32, "--batch-size", 16, "--epochs", 3, "--lr-milestones", 1, 2]
    args = tiny_args(cmc, tmp_path, *flags, "--max-steps", 1)
    cmc.main(args)
    assert args.sched["lr"] == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    warm = tiny_args(cmc, tmp_path / "w", *flags, "--warmup-epochs", 1, "--max-steps", 1)
    cmc.main(warm)
    assert warm.sched["lr"][:3] == pytest.approx([0.015, 0.03, 0.003])


# ==== distributed, resume, end to end =======================================================
def cmc_step(name, flags):
    """One train_step on this process's half of a fixed global batch with fixed indices;
    returns loss, DDP-averaged gradients and both banks. BN is made global here so that 2
    processes can equal 1 (CMC itself keeps per-process BN, as the official DataParallel)."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.sched = {"lr": [0.1]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.CMC(args, 20))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x, idx = (
        torch.rand(GLOBAL_B, 3, 16, 16, generator=g),
        torch.randperm(20, generator=g)[:GLOBAL_B],
    )
    x[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    mine = slice(args.rank * args.batch_size_per_gpu, (args.rank + 1) * args.batch_size_per_gpu)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x[mine]], None, idx[mine]), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: b.clone() for n, b in model.named_buffers() if n.startswith("bank")}
    return {"loss": stats["loss"], "grads": grads, "state": state, "idx": idx}


def test_two_processes_equal_one(tmp_path):
    ranks = spawn(cmc_step, 2, tmp_path, "cmc", ["--nce-k", "0"])
    ref = single(cmc_step, "cmc", ["--nce-k", "0"])
    assert_parity(ranks, ref)
    assert any(n.startswith("backbone.ab.") for n in ref["grads"])
    torch.manual_seed(0)
    init = cmc.CMC(tiny_args(cmc, tmp_path), 20).state_dict()  # the banks before the step
    rest = torch.ones(20, dtype=torch.bool)
    rest[ref["idx"]] = False
    for name in ("bank_l", "bank_ab"):  # identical on both ranks, equal to one process's
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name])
        for r in ranks:
            torch.testing.assert_close(r["state"][name], ref["state"][name], atol=1e-5, rtol=0)
        new = ranks[0]["state"][name]  # the rows of BOTH ranks' images moved, no other row
        assert (new[ref["idx"]] - init[name][ref["idx"]]).abs().amax(1).min() > 1e-3
        assert torch.equal(new[rest], init[name][rest])


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    a = assert_resume_exact(cmc, tmp_path, "--nce-k", 8)  # noise draws from the saved RNG
    assert a["model"]["bank_l"].shape == a["model"]["bank_ab"].shape == (64, 128)


def test_python_end_to_end_with_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--nce-k", 16]  # the last value of a flag wins
    r = python(
        "cmc.py", *flags, "--subset", 64, "--batch-size", 32, "--epochs", 1, "--out-dir", tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records)
    train = [x for x in records if "loss" in x]
    assert train and {"loss", "lr", "wd", "tau", "grad_norm", "z_std"} <= train[0].keys()
    keys = torch.load(tmp_path / "backbone.pth").keys()  # both encoders
    assert any(k.startswith("l.") for k in keys) and any(k.startswith("ab.") for k in keys)


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--nce-k", 8]  # the last value of a flag wins
    r = torchrun(
        2,
        "cmc.py",
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


@pytest.mark.parametrize("flag,value", [("--nce-k", "100000"), ("--bank-m", "1.5")])
def test_bad_input_one_line_error(flag, value):
    r = python("cmc.py", *TINY, flag, value)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and f"{flag} {value}" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
