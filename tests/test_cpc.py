import importlib
import json
import math

import pytest
import torch
from einops import rearrange
from helpers import TINY, assert_resume_exact, error_lines, one_thread, python, tiny_args, torchrun  # noqa: F401 (autouse fixture)
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import common as C
import cpc

SMALL = ["--context-dim", "16", "--context-blocks", "2"]  # a small context network
NO_AUG = ["--no-color-drop", "--no-patch-flip", "--no-patch-crop"]


def naive_cpc(preds, targets):
    """InfoNCE with loops in float64: mean over m of -log(exp(p_m.t_m) / sum_n exp(p_m.t_n))."""
    total = 0.0
    for m, p in enumerate(preds.tolist()):
        scores = [sum(a * b for a, b in zip(p, t)) for t in targets.tolist()]
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_z - scores[m]
    return total / len(preds)


# ==== loss ==================================================================================
@pytest.mark.parametrize("m,n,e", [(5, 5, 3), (4, 9, 6), (1, 7, 2), (6, 20, 8)])
def test_cpc_loss_matches_naive_reference(m, n, e):
    torch.manual_seed(m * n)
    preds, targets = torch.randn(m, e) * 2, torch.randn(n, e)
    got = cpc.cpc_loss(preds, targets)
    assert got.item() == pytest.approx(naive_cpc(preds.double(), targets.double()), rel=1e-5)


def test_cpc_loss_extremes_half_precision_and_gradients():
    t = torch.eye(6, 8)  # orthonormal targets
    assert cpc.cpc_loss(50 * t[:4], t).item() == pytest.approx(0.0, abs=1e-6)  # sure positives
    assert cpc.cpc_loss(torch.zeros(4, 8), t).item() == pytest.approx(math.log(6), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpc.cpc_loss((300 * t[:4]).bfloat16(), t.bfloat16())  # logits far beyond exp's range
        assert torch.isfinite(out) and out.dtype == torch.float32
    p, t = torch.randn(3, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    cpc.cpc_loss(p, t).backward()  # no stop-gradient: the targets train the encoder too
    assert p.grad.abs().sum() > 0 and (t.grad.abs().sum(1) > 0).all()


# ==== model =================================================================================
def tiny_model(tmp_path, *extra):
    args = tiny_args(cpc, tmp_path, *SMALL, *extra)
    C.setup_ddp(args)
    args.patch_size = 4  # what main derives: img_size 16 // 4
    torch.manual_seed(0)
    return cpc.CPC(args), args


def naive_objective(model, h, turns):
    """CPC v2 App. A pseudocode, with loops in float64: per direction (the grid rotated) and
    step k, prediction (b, i, j) scored against all B*G*G targets, label b*G*G + (i+k)*G + j."""
    t_all = model.target(h)
    total = 0.0
    for d, turn in enumerate(turns):
        hd, td = torch.rot90(h, turn, dims=(2, 3)), torch.rot90(t_all, turn, dims=(2, 3))
        c = model.context[d](hd)
        B, _, G, _ = hd.shape
        targets = rearrange(td, "b e h w -> (b h w) e").double()  # the pseudocode's order
        for k, predictor in zip(model.steps, model.predictors[d]):
            preds = (predictor(c) * model.emb_scale).double()
            losses = []
            for b in range(B):
                for i in range(G - k):
                    for j in range(G):
                        logits = targets @ preds[b, :, i, j]
                        label = b * G * G + (i + k) * G + j
                        losses.append(torch.logsumexp(logits, 0) - logits[label])
            total += torch.stack(losses).mean().item()
    return total


# CPC v2 §4.1 as quarter turns of the grid (torch.rot90 over (H, W)): top-down (v1), bottom-up
# ('BU', 180 degrees), then the horizontal pair ('HP'): right-to-left (1), left-to-right (3)
PAPER_TURNS = (0, 2, 1, 3)


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_objective_matches_the_pseudocode(tmp_path, directions):
    flags = ["--directions", directions, "--min-step", 1, "--max-step", 2]
    model, _ = tiny_model(tmp_path, *flags)
    h = torch.randn(2, model.feat_dim, 4, 4)
    with torch.no_grad():
        got = model.objective(h).item()
        ref = naive_objective(model, h, PAPER_TURNS[:directions])
    assert got == pytest.approx(ref, rel=1e-5)
    assert len(model.context) == len(model.predictors) == directions  # own network per direction
    assert [len(p) for p in model.predictors] == [2] * directions  # one predictor per step


def test_context_cannot_see_the_rows_it_predicts():
    """The context at row i has zero gradient w.r.t. rows > i and a non-zero one w.r.t. each row
    i - blocks .. i (one row more per residual block)."""
    torch.manual_seed(0)
    net, blocks = cpc.PixelCNN(8, 16, 3), 3
    for i in range(7):
        h = torch.randn(2, 8, 7, 7, requires_grad=True)
        net(h)[:, :, i].sum().backward()
        per_row = h.grad.abs().sum((0, 1, 3))  # [7]
        assert torch.all(per_row[i + 1 :] == 0), (i, per_row)
        assert torch.all(per_row[max(0, i - blocks) : i + 1] > 0), (i, per_row)


def test_predictions_pair_context_row_i_with_target_row_i_plus_k(tmp_path, monkeypatch):
    model, _ = tiny_model(tmp_path, "--directions", 1, "--min-step", 1, "--max-step", 2)
    assert all(p.kernel_size == (1, 1) for p in model.predictors[0])  # row i uses c row i only
    seen = []
    monkeypatch.setattr(cpc, "cpc_loss", lambda p, t: seen.append((p, t)) or p.sum() * 0)
    h = torch.randn(2, model.feat_dim, 6, 6)
    with torch.no_grad():
        model.objective(h)
        c, t = model.context[0](h), model.target(h)
        flat = lambda v: rearrange(v, "b e h w -> (b h w) e")
        for (p, targets), k, predictor in zip(seen, model.steps, model.predictors[0]):
            assert p.shape == (2 * (6 - k) * 6, 64) and targets.shape == (2 * 36, 64)
            torch.testing.assert_close(p, flat(predictor(c)[:, :, : 6 - k]) * 0.1)
            torch.testing.assert_close(targets[: len(p)], flat(t[:, :, k:]))  # the positives
            # every patch of the batch is there exactly once: the rest are the negatives
            key = lambda v: sorted(map(tuple, v.tolist()))
            assert key(targets) == key(flat(t))


def test_pixels_below_a_patch_row_do_not_change_its_context(tmp_path):
    model, _ = tiny_model(tmp_path, "--directions", 1)
    model.eval()
    x = torch.rand(2, 3, 16, 16)
    x2 = x.clone()
    x2[:, :, 8:] = torch.rand(2, 3, 8, 16)  # 4 px patches, stride 2: rows >= 3 see pixel 8
    with torch.no_grad():
        c, c2 = (model.context[0](model.encode(v)) for v in (x, x2))
    # rows 0-2: the same up to float rounding (a conv may tile rows together); row 3 moves
    atol = 1e-6 * c.abs().max().item()
    torch.testing.assert_close(c[:, :, :3], c2[:, :, :3], atol=atol, rtol=1e-6)
    assert (c[:, :, 3] - c2[:, :, 3]).abs().max() > 1e3 * atol


def test_patch_grid_matches_naive_loop():
    x = torch.randn(2, 3, 16, 16)
    got = cpc.patchify(x, 4, 2)
    assert got.shape == (2 * 7 * 7, 3, 4, 4)
    n = 0
    for b in range(2):
        for i in range(7):
            for j in range(7):
                assert torch.equal(got[n], x[b, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4])
                n += 1
    grid = got.view(2, 7, 7, 3, 4, 4)  # 50% overlap with the right and the lower neighbour
    assert torch.equal(grid[:, :, 0, :, :, 2:], grid[:, :, 1, :, :, :2])
    assert torch.equal(grid[:, 0, :, :, 2:, :], grid[:, 1, :, :, :2, :])
    for size in (32, 256):  # 8 px / stride 4 [pl_bolts CIFAR]; 64 / 32 [CPC v1 §3.2]
        p = size // 4
        assert cpc.patchify(torch.zeros(1, 1, size, size), p, p // 2).shape == (49, 1, p, p)


def test_patch_augment_per_patch():
    torch.manual_seed(0)
    x = torch.rand(200, 3, 32, 32) + 0.5  # strictly positive: zeros mark dropped pixels
    assert torch.equal(cpc.patch_augment(x, False, False, False), x)
    drop = cpc.patch_augment(x, False, False, True)
    kept = (drop != 0).flatten(2).all(2)  # [200, 3]
    assert torch.equal(kept.sum(1), torch.ones(200, dtype=torch.long))  # one channel each
    assert torch.equal(drop[kept], x[kept]) and kept.any(0).all()  # each channel kept somewhere
    flip = cpc.patch_augment(x, True, False, False)
    same, flipped = (flip == x).flatten(1).all(1), (flip == x.flip(3)).flatten(1).all(1)
    assert torch.all(same ^ flipped) and 50 < flipped.sum() < 150
    crop = cpc.patch_augment(x, False, True, False)  # 30 x 30 window of 32, zeros around it
    inside = (crop != 0).all(1)  # [200, 32, 32]
    assert torch.equal(inside.sum((1, 2)), torch.full((200,), 900))
    assert torch.equal(crop[:, 0][inside], x[:, 0][inside])
    assert torch.equal(cpc.patch_augment(x[:, :, :8, :8], False, True, False), x[:, :, :8, :8])


def test_encoder_without_batchnorm_and_features(tmp_path):
    model, _ = tiny_model(tmp_path)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert not norms and any(isinstance(m, torch.nn.GroupNorm) for m in model.backbone.modules())
    x = torch.rand(3, 3, 16, 16)
    model.eval()  # no per-patch augmentation at evaluation
    f = cpc.features(model, x)
    assert f.shape == (3, model.feat_dim) and torch.equal(f, cpc.features(model, x))
    h = model.backbone(cpc.patchify(x, 4, 2)).view(3, 49, -1)  # patches one by one
    torch.testing.assert_close(f, h.mean(1))
    model.train()
    assert not torch.equal(model.encode(x).mean((2, 3)), f)  # augmented patches in training
    r18 = cpc.CPC(tiny_args(cpc, tmp_path, *SMALL, "--arch", "resnet18", "--patch-size", 4))
    assert not [m for m in r18.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_presets():
    cifar, imnet = C.parse_args(cpc.Args, []), C.parse_args(cpc.Args, ["--preset", "imagenet"])
    assert (cifar.arch, cifar.batch_size, cifar.lr, cifar.epochs, cifar.aug) == (
        "resnet18",
        64,
        4e-5,
        1000,
        "jitter",
    )
    assert (imnet.arch, imnet.batch_size, imnet.lr, imnet.wd, imnet.aug) == (
        "resnet50",
        512,
        4e-5,
        1e-5,
        "crop",
    )
    assert (imnet.betas, imnet.adam_eps) == ((0.8, 0.999), 1e-7)  # pl_bolts configure_optimizers
    # the SimCLR linear protocol: cosine per step, last epoch, zero-initialised head
    assert imnet.linear_zero_init and not imnet.linear_best and not imnet.linear_epoch_lr
    head = (imnet.context_dim, imnet.context_blocks, imnet.target_dim, imnet.emb_scale)
    assert head == (256, 5, 64, 0.1) and (imnet.min_step, imnet.max_step) == (3, 3)
    assert imnet.directions == 4 and imnet.color_drop and imnet.patch_size == 0


# ==== distributed, resume, end to end =======================================================
def cpc_step(name, flags):
    """One train_step on this process's slice of a fixed, non-symmetric global batch (per-patch
    augmentation off: the same patches either way); loss and DDP-averaged gradients."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.patch_size, args.sched = 4, {"lr": [0.1]}
    torch.manual_seed(0)
    model = module.CPC(args)
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    x = torch.rand(GLOBAL_B, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    mine = slice(args.rank * args.batch_size_per_gpu, (args.rank + 1) * args.batch_size_per_gpu)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads}


def test_two_processes_equal_one(tmp_path):
    """Negatives: every patch of the GLOBAL batch, gathered with gradient (a per-process loss
    would see fewer negatives and differ)."""
    flags = [*SMALL, *NO_AUG, "--directions", "2", "--min-step", "2", "--max-step", "3"]
    ranks = spawn(cpc_step, 2, tmp_path, "cpc", flags)
    ref = single(cpc_step, "cpc", flags)
    assert_parity(ranks, ref)
    assert ref["loss"].item() == pytest.approx(2 * 2 * math.log(GLOBAL_B * 49), rel=0.05)


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    assert_resume_exact(cpc, tmp_path, *SMALL)  # per-patch augmentation on: its RNG resumes too


def test_python_end_to_end_with_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, *SMALL]  # the last value of a flag wins
    r = python(
        "cpc.py", *flags, "--subset", 64, "--batch-size", 32, "--epochs", 1, "--out-dir", tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records)
    train = [x for x in records if "loss" in x]
    assert train and {"loss", "lr", "wd", "grad_norm", "z_std"} <= train[0].keys()
    # near chance at init: 4 directions x ln(32 images x 49 patches)
    assert train[0]["loss"] == pytest.approx(4 * math.log(32 * 49), rel=0.05)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["patch_size"] == 4 and cfg["img_size"] == 16  # derived: 16 px -> 7x7 grid of 4 px
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = [*TINY, "--knn-every", 1, *SMALL]  # the last value of a flag wins
    r = torchrun(
        2,
        "cpc.py",
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


def test_grid_too_small_one_line_error(tmp_path):
    r = python("cpc.py", *TINY, "--patch-size", "12")  # 16 px images: a 1x1 grid
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-1000:]
    assert "--patch-size 12" in errors[0] and "1x1" in errors[0] and "Traceback" not in r.stderr
    with pytest.raises(SystemExit, match="7x7 patch grid, too small .* rows 3..7 ahead"):
        cpc.main(tiny_args(cpc, tmp_path, "--max-step", 7))  # row 0 + 7 is off a 7-row grid
