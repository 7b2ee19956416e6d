import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_resume_exact, error_lines, python, tiny_args, torchrun
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import common as C
import instdisc


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def naive_nce(f, bank, idx, noise, tau, z):
    """NCECriterion with loops, float64: P = exp(v.f/tau)/Z, Pn = 1/N, eps 1e-7; z None: Z =
    N * mean of exp over all B x (1 + K) scores (NCEAverage's first-batch estimate)."""
    n, k = len(bank), noise.shape[1]
    rows = [[int(idx[i])] + [int(j) for j in noise[i]] for i in range(len(f))]
    e = [[math.exp(float(bank[r] @ f[i]) / tau) for r in rows[i]] for i in range(len(f))]
    if z is None:
        z = n * sum(map(sum, e)) / (len(f) * (k + 1))
    total = 0.0
    for ei in e:
        p = [x / z for x in ei]
        total += math.log(p[0] / (p[0] + k / n + 1e-7))
        total += sum(math.log((k / n) / (q + k / n + 1e-7)) for q in p[1:])
    return -total / len(f)


def naive_softmax(f, bank, idx, tau):
    total = 0.0
    for i in range(len(f)):
        logits = [float(v @ f[i]) / tau for v in bank]
        total += -logits[int(idx[i])] + math.log(sum(math.exp(x) for x in logits))
    return total / len(f)


# ==== loss ==================================================================================
@pytest.mark.parametrize(
    "b,n,d,k,tau", [(4, 20, 8, 5, 0.07), (7, 33, 16, 12, 0.1), (1, 9, 3, 1, 0.5)]
)
@pytest.mark.parametrize("given_z", [True, False])
def test_nce_loss_matches_naive_reference_with_the_same_noise(b, n, d, k, tau, given_z):
    torch.manual_seed(b + n)
    f, bank, idx = unit(b, d), unit(n, d), torch.randperm(n)[:b]
    z = 3.7 * n if given_z else None
    noise = torch.randint(n, (b, k))
    got = instdisc.nce_loss(f.float(), bank.float(), idx, tau, noise, z)
    assert got.item() == pytest.approx(naive_nce(f, bank, idx, noise, tau, z), rel=1e-5)


@pytest.mark.parametrize("b,n,tau", [(5, 12, 0.1), (8, 40, 0.07)])
def test_exact_softmax_k0_matches_naive_reference(b, n, tau):
    torch.manual_seed(n)
    f, bank, idx = unit(b, 8), unit(n, 8), torch.randperm(n)[:b]
    got = instdisc.nce_loss(f.float(), bank.float(), idx, tau, None, None)
    assert got.item() == pytest.approx(naive_softmax(f, bank, idx, tau), rel=1e-5)


def test_estimated_z_is_the_official_first_batch_estimate():
    torch.manual_seed(0)
    f, bank, idx = unit(6, 8).float(), unit(30, 8).float(), torch.arange(6)
    noise = torch.randint(30, (6, 4))
    rows = torch.cat([idx[:, None], noise], 1)
    ref = 30 * torch.exp((bank[rows] * f[:, None]).sum(-1) / 0.07).mean().item()
    z = instdisc.estimate_z(f, bank, idx, noise, 0.07)
    assert z == pytest.approx(ref, rel=1e-5)
    a = instdisc.nce_loss(f, bank, idx, 0.07, noise, None)  # z None: the same estimate inside
    assert a.item() == pytest.approx(
        instdisc.nce_loss(f, bank, idx, 0.07, noise, z).item(), rel=1e-6
    )


def test_first_batch_z_and_loss_share_one_noise_draw(tmp_path):
    """NCEAverage draws the noise once and sets Z from the same scores as the first loss."""
    model, args = tiny_model(tmp_path, 40, "--nce-k", "6")
    model.eval()  # the same features twice
    x, idx = torch.rand(4, 3, 16, 16), torch.arange(4)
    torch.manual_seed(5)
    loss, f = model(x, idx)
    torch.manual_seed(5)
    noise = torch.randint(40, (4, 6))
    assert model.z.item() == pytest.approx(
        instdisc.estimate_z(f.detach(), model.bank, idx, noise, args.tau), rel=1e-9
    )
    ref = instdisc.nce_loss(f.detach(), model.bank, idx, args.tau, noise, None)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_nce_loss_finite_under_half_precision_and_extreme_logits():
    f = F.normalize(torch.ones(8, 16), dim=1)
    for k, z in [(0, None), (6, 1e-30), (6, 1e30), (6, None)]:
        noise = torch.randint(8, (8, k)) if k else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = instdisc.nce_loss(f.half(), f.clone(), torch.arange(8), 0.01, noise, z)
        assert torch.isfinite(out) and out.dtype == torch.float32


@pytest.mark.parametrize("k", [0, 5])
def test_gradient_reaches_the_features_not_the_bank(k):
    f = unit(4, 8).float().requires_grad_()
    bank = unit(10, 8).float().requires_grad_()
    noise = torch.randint(10, (4, k)) if k else None
    instdisc.nce_loss(f, bank, torch.arange(4), 0.1, noise, 10.0 if k else None).backward()
    assert f.grad.abs().sum() > 0 and bank.grad is None


# ==== model and state =======================================================================
def tiny_model(tmp_path, n, *extra):
    args = tiny_args(instdisc, tmp_path, *extra)
    C.setup_ddp(args)
    args.img_size = 16
    torch.manual_seed(0)
    return instdisc.InstDisc(args, n), args


def test_model_layout_bank_and_z(tmp_path):
    model, args = tiny_model(tmp_path, 50)
    assert isinstance(model.projector, torch.nn.Linear) and model.projector.out_features == 128
    assert model.bank.shape == (50, 128) and model.z.item() == -1.0
    s = 1 / math.sqrt(128 / 3)  # NCEAverage.py: uniform in +-stdv, not normalised (norm ~ 1)
    assert model.bank.abs().max() <= s and model.bank.abs().max() > 0.9 * s
    assert abs(model.bank.norm(dim=1).mean().item() - 1) < 0.05
    assert len(model.bank.unique(dim=0)) == 50  # random rows, not a constant
    assert {"bank", "z"} <= model.state_dict().keys()  # persistent: checkpointed
    loss, f = model(torch.rand(4, 3, 16, 16), torch.arange(4))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))  # l2-normalised 128-d features
    assert instdisc.features(model, torch.rand(2, 3, 16, 16)).shape == (2, model.feat_dim)


def test_update_bank_matches_naive_loop(tmp_path):
    model, _ = tiny_model(tmp_path, 12)
    old = model.bank.clone()
    f, idx = unit(4, 128).float(), torch.tensor([7, 0, 11, 3])
    instdisc.update_bank(model, f, idx, 0.5)
    for r in range(12):
        if r in idx.tolist():
            i = idx.tolist().index(r)
            v = 0.5 * old[r].double() + 0.5 * f[i].double()
            torch.testing.assert_close(model.bank[r].double(), v / v.norm(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(model.bank[r], old[r])  # untouched rows stay bit-identical
    instdisc.update_bank(model, f, idx, 1.0)  # momentum 1: unchanged
    instdisc.update_bank(model, f, idx, 0.0)  # momentum 0: the new features
    torch.testing.assert_close(model.bank[idx], f)


def test_train_step_positive_is_the_stored_row_then_updated(tmp_path):
    model, args = tiny_model(tmp_path, 16, "--nce-k", "0")
    args.sched = {"lr": [0.1]}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, idx = torch.rand(4, 3, 16, 16), torch.tensor([2, 9, 5, 14])
    model.eval()  # same features in both forwards below
    with torch.no_grad():
        f = F.normalize(model.projector(model.backbone(x)), dim=1)
        expect = instdisc.nce_loss(f, model.bank.clone(), idx, args.tau, None, None)
        rows = F.normalize(0.5 * model.bank[idx] + 0.5 * f, dim=1)
    stats = instdisc.train_step(model, ([x], None, idx), opt, scaler, 0, args)
    assert stats["loss"].item() == pytest.approx(expect.item(), rel=1e-5)  # the old rows
    torch.testing.assert_close(model.bank[idx], rows)  # written after the loss
    assert {"loss", "lr", "wd", "tau", "grad_norm", "z"} <= stats.keys()


def test_z_estimated_once_then_fixed_and_read_back_after_a_load(tmp_path):
    model, args = tiny_model(tmp_path, 40, "--nce-k", "6")
    x, idx = torch.rand(4, 3, 16, 16), torch.arange(4)
    model(x, idx)
    z = model.z.item()
    assert z > 0 and model.z_host == z
    model(x * 0.5, idx + 4)
    assert model.z.item() == z  # fixed after the first batch
    state = {**model.state_dict(), "z": torch.tensor(123.0)}
    model.load_state_dict(state)
    assert model.z_host is None  # the cached copy follows the loaded buffer
    model(x, idx)
    assert model.z.item() == model.z_host == 123.0


def test_presets():
    cifar, imnet = (
        C.parse_args(instdisc.Args, []),
        C.parse_args(instdisc.Args, ["--preset", "imagenet"]),
    )
    assert (cifar.arch, cifar.batch_size, cifar.lr, cifar.wd) == ("resnet18", 128, 0.03, 5e-4)
    assert (cifar.tau, cifar.nce_k, cifar.aug, cifar.epochs) == (0.1, 0, "cifar", 200)
    assert (imnet.arch, imnet.batch_size, imnet.lr, imnet.wd) == ("resnet50", 256, 0.03, 1e-4)
    assert (imnet.tau, imnet.nce_k, imnet.bank_m, imnet.dim) == (0.07, 4096, 0.5, 128)
    assert imnet.lr_milestones == cifar.lr_milestones == (120, 160) and imnet.aug == "imagenet"
    assert (imnet.crop_min, imnet.warmup_epochs, imnet.epochs) == (0.2, 0, 200)
    for a in (cifar, imnet):  # moco main_lincls.py: x0.1 at 60/80 per epoch, best_acc1, N(0, .01)
        assert (a.linear_milestones, a.linear_decay, a.linear_epoch_lr) == ((60, 80), 0.1, True)
        assert (a.linear_best, a.linear_zero_init, a.linear_lr, a.linear_wd) == (True, False, 30, 0)


def test_step_schedule_and_cifar_augmentation(tmp_path, monkeypatch):
    seen, build = [], C.build_data
    spy = lambda args, views, mean_std: seen.append(views) or build(args, views, mean_std)
    monkeypatch.setattr(C, "build_data", spy)
    flags = ["--subset", 32, "--batch-size", 16, "--epochs", 3, "--max-steps", 1]
    args = tiny_args(instdisc, tmp_path, *flags, "--lr-milestones", 1, 2)
    instdisc.main(args)
    assert args.sched["lr"] == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    (view,) = seen[0]  # one view; cifar.py: jitter before gray, no flip
    ops = [type(t).__name__ for t in view.transforms]
    assert ops == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "ToTensor", "Normalize"]
    jitter = view.transforms[1]  # always applied, (0.4, 0.4, 0.4, 0.4)
    assert jitter.p == 1.0 and type(jitter.transforms[0]).__name__ == "ColorJitter"
    assert jitter.transforms[0].hue == (-0.4, 0.4) and C.BatchAugment(view).o.flip_p == 0.0


# ==== distributed, resume, end to end =======================================================
def instdisc_step(name, flags):
    """One train_step with the exact softmax (k = 0: no random noise) on this process's half of a
    fixed global batch; global BN so that only the method differs; loss, grads, bank."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.img_size, args.sched = 16, {"lr": [0.1]}
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.InstDisc(args, 20))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(GLOBAL_B, 3, 16, 16, generator=g)
    x[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    idx = torch.randperm(20, generator=g)[:GLOBAL_B]
    mine = slice(args.rank * args.batch_size_per_gpu, (args.rank + 1) * args.batch_size_per_gpu)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, ([x[mine]], None, idx[mine]), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads, "state": {"bank": model.bank.clone()}}


def test_two_processes_equal_one_and_banks_identical(tmp_path):
    flags = ["--nce-k", "0"]
    ranks = spawn(instdisc_step, 2, tmp_path, "instdisc", flags)
    ref = single(instdisc_step, "instdisc", flags)
    assert_parity(ranks, ref)
    assert torch.equal(ranks[0]["state"]["bank"], ranks[1]["state"]["bank"])
    torch.testing.assert_close(ranks[0]["state"]["bank"], ref["state"]["bank"], atol=1e-6, rtol=0)


def test_two_steps_resume_two_steps_equals_four_with_bank_and_z(tmp_path):
    a = assert_resume_exact(instdisc, tmp_path, "--nce-k", 8)
    assert a["model"]["z"].item() > 0 and a["model"]["bank"].shape == (64, 128)


def test_python_end_to_end_with_knn_and_bank_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--nce-k", 16, "--subset", 64, "--batch-size", 32]
    r = python("instdisc.py", *flags, "--epochs", 1, "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in x for x in records)
    assert 0 <= records[-1]["bank_knn_top1"] <= 100 and records[-1]["k"] == 200
    assert 0 <= records[-1]["embed_knn_top1"] <= 100 and records[-1]["t"] == 0.1
    train = [x for x in records if "loss" in x]
    assert train and {"loss", "lr", "nce_z", "grad_norm", "z_std"} <= train[0].keys()
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end(tmp_path):
    flags = [*TINY, "--knn-every", 1, "--subset", 64, "--batch-size", 16, "--nce-k", 8]
    r = torchrun(2, "instdisc.py", *flags, "--epochs", 1, "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 4 and ckpt["model"]["z"] > 0
    assert '"bank_knn_top1"' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "flags,needle",
    [(["--nce-k", "100", "--subset", "64"], "--nce-k 100"), (["--tau", "0"], "--tau 0")],
)
def test_bad_input_one_line_error(flags, needle):
    r = python("instdisc.py", *TINY, "--batch-size", "16", *flags)
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1 and needle in errors[0], r.stderr[-1000:]
    assert "Traceback" not in r.stderr
