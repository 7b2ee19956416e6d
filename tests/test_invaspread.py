import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import common as C
import invaspread


def unit(*shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def official_criterion(f1, f2, tau):
    """BatchCriterion (negM = 1) transcribed in float64 with explicit exps, as the official code:
    x = cat(f1, f2); pos = exp(x.reordered.detach / T); all = exp(x @ x.T.detach / T) * (1 - I);
    lnPon = sum log(1 - all/div) - log(1 - pos/div); loss = -(sum log(pos/div) + sum lnPon)/2B."""
    x = torch.cat([f1, f2])
    n = len(x)
    reordered = torch.cat([x[n // 2 :], x[: n // 2]])
    pos = ((x * reordered.detach()).sum(1) / tau).exp()
    all_prob = (x @ x.t().detach() / tau).exp() * (1 - torch.eye(n, dtype=x.dtype))
    div = all_prob.sum(1)
    p_pos = pos / div
    ln_pon = (1 - all_prob / div[:, None]).log().sum(1) - (1 - p_pos).log()
    return -(p_pos.log().sum() + ln_pon.sum()) / n


def naive_loops(f1, f2, tau):
    """The same objective with python loops over rows i and columns j (values only)."""
    x = torch.cat([f1, f2]).tolist()
    n, total = len(x), 0.0
    for i in range(n):
        p = (i + n // 2) % n
        e = [
            0.0 if j == i else math.exp(sum(a * b for a, b in zip(x[i], x[j])) / tau)
            for j in range(n)
        ]
        div = sum(e)
        total += math.log(e[p] / div)
        total += sum(math.log(1 - e[j] / div) for j in range(n) if j not in (i, p))
    return -total / n


# ==== loss ==================================================================================
@pytest.mark.parametrize("b,d,tau", [(3, 5, 0.1), (8, 16, 0.05), (2, 4, 0.5)])
def test_loss_matches_the_official_criterion_and_naive_loops(b, d, tau):
    torch.manual_seed(b)
    f1, f2 = unit(b, d), unit(b, d)
    got = invaspread.invaspread_loss(f1.float(), f2.float(), tau)
    ref = official_criterion(f1, f2, tau).item()
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert ref == pytest.approx(naive_loops(f1, f2, tau), rel=1e-9)


def test_gradients_match_the_official_detaching():
    """Gradient only through the row side: equal to the official expression's autograd."""
    torch.manual_seed(4)
    a1, a2 = unit(5, 8).requires_grad_(), unit(5, 8).requires_grad_()
    official_criterion(a1, a2, 0.1).backward()
    b1, b2 = a1.detach().float().requires_grad_(), a2.detach().float().requires_grad_()
    invaspread.invaspread_loss(b1, b2, 0.1).backward()
    torch.testing.assert_close(b1.grad.double(), a1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b2.grad.double(), a2.grad, atol=1e-5, rtol=1e-4)
    # a symmetric (SimCLR-like) gradient would differ: the detaching matters
    c1, c2 = a1.detach().clone().requires_grad_(), a2.detach().clone().requires_grad_()
    x = torch.cat([c1, c2])
    logits = (x @ x.T / 0.1).masked_fill(torch.eye(10, dtype=torch.bool), float("-inf"))
    F.cross_entropy(logits, torch.arange(10).roll(5)).backward()
    assert not torch.allclose(c1.grad, a1.grad, atol=1e-3)


def test_spreading_term_is_part_of_the_loss():
    torch.manual_seed(2)
    f1, f2 = unit(6, 8).float(), unit(6, 8).float()
    x = torch.cat([f1, f2])
    logits = (x @ x.T / 0.1).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
    ce = F.cross_entropy(logits, torch.arange(12).roll(6))  # the softmax term alone
    assert invaspread.invaspread_loss(f1, f2, 0.1).item() > ce.item() + 1e-3


def test_loss_finite_under_half_precision_and_extreme_logits():
    same = F.normalize(torch.ones(8, 16), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = invaspread.invaspread_loss(same.bfloat16(), same.bfloat16(), 0.1)
    assert torch.isfinite(out) and out.dtype == torch.float32
    torch.manual_seed(0)
    f = unit(8, 16, dtype=torch.float32)
    for tau in (0.01, 0.001):  # exp(1/tau) overflows a naive fp32 implementation
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(invaspread.invaspread_loss(f.half(), f.half() * 0.99, tau))


# ==== model =================================================================================
def test_model_head_and_presets(tmp_path):
    args = tiny_args(invaspread, tmp_path)
    C.setup_ddp(args)
    args.img_size = 16
    model = invaspread.InvaSpread(args)
    assert isinstance(model.projector, torch.nn.Linear) and model.projector.out_features == 128
    loss, z = model(torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16))
    torch.testing.assert_close(z[0].norm(dim=1), torch.ones(4))
    assert torch.isfinite(loss) and invaspread.features(model, torch.ones(2, 3, 16, 16)).ndim == 2
    cifar = C.parse_args(invaspread.Args, [])
    imnet = C.parse_args(invaspread.Args, ["--preset", "imagenet"])
    for a in (cifar, imnet):  # the official CIFAR recipe for both presets
        assert (a.arch, a.batch_size, a.lr, a.wd, a.tau, a.dim) == (
            "resnet18",
            128,
            0.03,
            5e-4,
            0.1,
            128,
        )
        assert (a.epochs, a.lr_milestones, a.lr_factors) == (
            301,
            (120, 160, 200),
            (0.1, 0.05, 0.01),
        )
        assert (a.crop_min, a.warmup_epochs) == (0.2, 0)
        # no probe in the official repo: moco main_lincls.py (x0.1 at 60/80 per epoch, best_acc1)
        assert (a.linear_milestones, a.linear_decay, a.linear_epoch_lr) == ((60, 80), 0.1, True)
        assert (a.linear_best, a.linear_zero_init, a.linear_lr, a.linear_wd) == (True, False, 30, 0)


def test_lr_schedule_follows_the_official_factors(tmp_path):
    flags = ["--subset", 32, "--batch-size", 16, "--epochs", 4, "--max-steps", 1]
    args = tiny_args(invaspread, tmp_path, *flags, "--lr-milestones", 1, 2, 3)
    invaspread.main(args)
    expect = [0.03] * 2 + [0.003] * 2 + [0.0015] * 2 + [0.0003] * 2
    assert args.sched["lr"] == pytest.approx(expect)


# ==== distributed, resume, end to end =======================================================
def invaspread_step(name, flags):
    """One train_step on this process's half of a fixed, non-symmetric global batch; global BN
    so that the method is the only difference; loss and DDP-averaged gradients."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.img_size, args.sched = 16, {"lr": [0.1]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.InvaSpread(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.rand(GLOBAL_B, 3, 16, 16, generator=g) for _ in range(2))
    x2[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    mine = slice(args.rank * args.batch_size_per_gpu, (args.rank + 1) * args.batch_size_per_gpu)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads}


def test_two_processes_equal_one(tmp_path):
    ranks = spawn(invaspread_step, 2, tmp_path, "invaspread", [])
    assert_parity(ranks, single(invaspread_step, "invaspread", []))


def test_two_steps_resume_two_steps_equals_four(tmp_path):
    assert_resume_exact(invaspread, tmp_path)


def test_python_end_to_end_with_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--subset", 64, "--batch-size", 32, "--epochs", 1]
    r = python("invaspread.py", *flags, "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records)
    assert 0 <= records[-1]["embed_knn_top1"] <= 100  # the paper's kNN on the 128-d embedding
    assert (records[-1]["k"], records[-1]["t"]) == (200, 0.1)
    train = [x for x in records if "loss" in x]
    assert train and {"loss", "lr", "tau", "grad_norm", "z_std"} <= train[0].keys()
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--subset", 64, "--batch-size", 16, "--epochs", 1]
    r = torchrun(2, "invaspread.py", *flags, "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 4
    assert '"knn_top1"' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "flags,needle", [(["--tau", "-0.1"], "--tau -0.1"), (["--lr-factors", "0.1"], "--lr-factors")]
)
def test_bad_input_one_line_error(flags, needle):
    r = python("invaspread.py", *TINY, *flags)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and needle in errors[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr
