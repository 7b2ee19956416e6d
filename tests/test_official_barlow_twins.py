"""Barlow Twins against the official training steps, restated here from the official code:
- ImageNet preset: facebookresearch/barlowtwins main.py (BarlowTwins.forward, LARS.step with
  weight_decay_filter / lars_adaptation_filter, the two param groups, adjust_learning_rate);
- CIFAR preset: vturrisi/solo-learn (scripts/pretrain/cifar/barlow.yaml, solo/losses/barlow.py,
  solo/utils/lars.py, solo/utils/lr_scheduler.py, solo/methods/base.py, solo/args/pretrain.py).
The project's real train_step, optimizer and schedule (bt.build_optimizer, as main() builds
them) and the reference run side by side from the same initial weights on the same inputs."""

import copy
import math

import pytest
import torch
from helpers import TINY
from torch import nn

import barlow_twins as bt
import common as C

PROJ = ["--projector", "64-64-32"]
B = 16  # global batch of the tiny runs


def project_run(preset, *flags, steps_per_epoch=1, epochs=20):
    """The project's model, optimizer and schedule for a preset at batch B (one process)."""
    argv = [*TINY, "--out-dir", "unused", "--preset", preset, "--batch-size", B, "--epochs", epochs]
    args = C.parse_args(bt.Args, [*map(str, argv), *PROJ, *map(str, flags)])
    C.setup_ddp(args)
    args.steps_per_epoch, args.total_steps = steps_per_epoch, steps_per_epoch * epochs
    torch.manual_seed(0)
    model = C.convert_sync_bn(bt.BarlowTwins(args))
    return model, bt.build_optimizer(model, args), args


def inputs(step):
    g = torch.Generator().manual_seed(100 + step)
    x1 = torch.rand(B, 3, 16, 16, generator=g)
    return x1, (x1.flip(3) + 0.3 * torch.rand(B, 3, 16, 16, generator=g)) * 0.8  # related twins


def off_diagonal_mask(d):
    return ~torch.eye(d, dtype=torch.bool)


# ---- official main.py, restated ---------------------------------------------------------------
class OfficialBarlowTwins(nn.Module):
    """main.py BarlowTwins: the same backbone and projector (copied weights), then
    self.bn = BatchNorm1d(D, affine=False) on each view's z, c = bn(z1).T @ bn(z2) / batch_size,
    all_reduce(c) (the identity in one process; no backward in W processes), loss = on_diag +
    lambd * off_diag."""

    def __init__(self, project_model, batch_size, lambd, world_size=1):
        super().__init__()
        self.backbone = copy.deepcopy(project_model.backbone)
        self.projector = copy.deepcopy(project_model.projector)
        d = self.projector[-1].out_features
        self.bn = nn.BatchNorm1d(d, affine=False)
        self.batch_size, self.lambd, self.w = batch_size, lambd, world_size

    def forward(self, y1, y2):
        # main.py BarlowTwins.forward: one pass per view
        z1, z2 = self.projector(self.backbone(y1)), self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2) / self.batch_size
        on_diag = (c.diagonal() - 1).pow(2).sum()
        off_diag = c[off_diagonal_mask(len(c))].pow(2).sum()
        # the DDP gradient of an official W-GPU run is 1/W of dL/dtheta (the value is L): the
        # 2-process test in tests/test_barlow_twins.py measures it with --plain-all-reduce
        loss = on_diag + self.lambd * off_diag
        return loss.detach() + (loss - loss.detach()) / self.w


def official_param_groups(model):
    # main.py main_worker: param_biases = params with ndim == 1, param_weights = the rest
    ws = [p for p in model.parameters() if p.ndim != 1]
    bs = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": ws}, {"params": bs}]


def official_adjust_learning_rate(step, steps_per_epoch, epochs, batch_size, lr_w, lr_b):
    # main.py adjust_learning_rate: warm-up over 10 epochs (a literal), then cosine to 1/1000
    max_steps, warmup_steps = epochs * steps_per_epoch, 10 * steps_per_epoch
    base_lr = batch_size / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step, max_steps = step - warmup_steps, max_steps - warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        lr = base_lr * q + base_lr * 0.001 * (1 - q)
    return lr * lr_w, lr * lr_b


@torch.no_grad()
def official_lars_step(groups, lrs, state, wd, eta=0.001, momentum=0.9):
    # main.py LARS.step with weight_decay_filter=True, lars_adaptation_filter=True: 1-D params
    # get neither decay nor adaptation; q = eta |w| / |dp| where both norms are > 0, else 1
    for g, lr in zip(groups, lrs):
        for p in g["params"]:
            if p.grad is None:
                continue
            dp = p.grad
            if p.ndim != 1:
                dp = dp + wd * p
                pn, un = p.norm(), dp.norm()
                dp = dp * (eta * pn / un if pn > 0 and un > 0 else 1.0)
            mu = state.setdefault(p, torch.zeros_like(p))
            mu.mul_(momentum).add_(dp)
            p.sub_(lr * mu)


def assert_close_rel(got, ref, name, rtol=1e-5, atol=0.0):
    """Equal to rtol of the tensor's magnitude (max |ref|): holds on any CPU and thread count."""
    if ref.is_floating_point() and ref.numel():
        atol += rtol * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=name)


def assert_same_state(model, ref, p0, mu, ref_mu, rtol=1e-5, drtol=1e-4):
    """Every parameter and buffer; every LARS momentum buffer (to drtol); every parameter's
    update since the start: to drtol of the update's magnitude plus the fp32 resolution of the
    parameter (LARS moves a weight by ~lr x eta of its norm, a few hundred ulps)."""
    ref_sd, ref_params = ref.state_dict(), dict(ref.named_parameters())
    for name, v in model.state_dict().items():
        assert_close_rel(v, ref_sd[name], name, rtol)
    for name, p in model.named_parameters():
        r, ulp = ref_params[name], 2.0**-23 * p0[name].abs().max().item()
        d, d_ref = p.detach() - p0[name], r.detach() - p0[name]
        assert_close_rel(d, d_ref, f"update of {name}", drtol, atol=4 * ulp)
        assert_close_rel(mu[p], ref_mu[r], f"momentum of {name}", drtol)


def run_official(preset_flags, steps, world=1, project_flags=(), exact=True):
    """The project's train_step (ImageNet preset) and main.py's step from the same weights."""
    model, opt, args = project_run("imagenet", *preset_flags, *project_flags)
    ref = OfficialBarlowTwins(model, B, args.lambd, world)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, ref_mu = official_param_groups(ref), {}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    wd, lr_w, lr_b = 1e-6, 0.2, 0.0048  # main.py defaults
    for step in steps:
        x1, x2 = inputs(step)
        stats = bt.train_step(model, ([x1, x2], None, None), opt, scaler, step, args)
        # main.py main_worker loop: adjust_learning_rate, zero_grad, forward, backward, step
        lrs = official_adjust_learning_rate(step, 1, args.epochs, B, lr_w, lr_b)
        for p in ref.parameters():
            p.grad = None
        loss = ref(x1, x2)
        loss.backward()
        official_lars_step(groups, lrs, ref_mu, wd)
        if exact:  # the same objective (the official 1/W only scales its gradient)
            assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        if not project_flags:
            assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs, rel=1e-12)
    return model, ref, p0, {p: opt.state[p]["mu"] for p in model.parameters()}, ref_mu


def test_imagenet_schedule_is_main_py_at_real_settings():
    """adjust_learning_rate at the released run's settings (1000 epochs, batch 2048, 625 steps an
    epoch): warm-up from 0 at step 0 to base at step 6250, cosine to base/1000."""
    model, opt, args = project_run(
        "imagenet", "--batch-size", 2048, steps_per_epoch=625, epochs=1000
    )
    assert (args.lr, args.lr_biases, args.wd, args.eta) == (0.2, 0.0048, 1e-6, 0.001)
    for step in [0, 1, 2, 3, 4, 6249, 6250, 6251, 300_000, 624_999]:
        f = args.sched["lr"][step]
        want = official_adjust_learning_rate(step, 625, 1000, 2048, 0.2, 0.0048)
        assert (f * args.lr, f * args.lr_biases) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert len(args.sched["lr"]) == 625_000
    groups = opt.param_groups  # weights | biases and BN, as main.py's
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (1e-6, 0.0)
    assert all(g["trust_coefficient"] == 0.001 and not g["solo"] for g in groups)
    ref = official_param_groups(model)
    for g, r in zip(groups, ref):
        assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]


def test_imagenet_preset_matches_main_py_step():
    """5 steps (warm-up steps 0, 1, 5 and cosine steps 10, 15 of a 20-step run whose warm-up is
    main.py's 10 epochs): losses, every parameter and its update, every BN buffer, every LARS
    momentum buffer agree to float precision."""
    assert_same_state(*run_official([], [0, 1, 5, 10, 15]))


def test_official_w_gpu_run_equals_scaled_wd_and_bias_lr():
    """The multi-process DEVIATION: an official W-GPU run back-propagates 1/W of the gradient.
    Under LARS that is exactly this project with --wd W x 1e-6 and --lr-biases 0.0048 / W (the
    help texts say so); with the defaults instead, biases/BN move W x as far and the weights'
    update differs by the share of the decay (measured here for W = 16, the official README's
    16 GPUs)."""
    w = 16
    scaled = ["--wd", 1e-6 * w, "--lr-biases", 0.0048 / w]
    model, ref, p0, mu, ref_mu = run_official([], [10, 11, 12], world=w, project_flags=scaled)
    # the official momentum buffer of a 1-D param sums g / W, the project's g: W x as large
    assert_same_state(
        model, ref, p0, {p: m / w if p.ndim == 1 else m for p, m in mu.items()}, ref_mu
    )
    model, ref, p0, mu, ref_mu = run_official([], [10], world=w, exact=False)  # the defaults
    ref_params, worst = dict(ref.named_parameters()), 0.0
    for name, p in model.named_parameters():
        ulp = 2.0**-23 * p0[name].abs().max().item()
        d, d_ref = p.detach() - p0[name], ref_params[name].detach() - p0[name]
        if p.ndim == 1:  # plain momentum SGD: W x the official step
            assert_close_rel(d, w * d_ref, f"update of {name}", 1e-4, atol=4 * w * ulp)
        else:  # the trust ratio normalises |g|: only the decay's share changes
            worst = max(worst, ((d - d_ref).norm() / d_ref.norm()).item())
    assert 1e-6 < worst < 1e-2, worst  # measured: a few 1e-4 (wd 1e-6 vs 16e-6 against |g|)


# ---- solo-learn, restated ---------------------------------------------------------------------
def solo_barlow_loss(z1, z2, lamb, scale_loss):
    # solo/losses/barlow.py barlow_loss_func: a fresh BatchNorm1d(D, affine=False) (train mode)
    # per view, corr = z1^T z2 / N, (corr - I)^2 with off-diagonal entries x lamb, x scale_loss
    n, d = z1.shape
    bn = nn.BatchNorm1d(d, affine=False)
    corr = bn(z1).T @ bn(z2) / n
    weight = torch.where(off_diagonal_mask(d), lamb, 1.0)
    return scale_loss * ((corr - torch.eye(d)).pow(2) * weight).sum()


@torch.no_grad()
def solo_lars_step(params, lr, state, stats, wd=1e-4, eta=0.02, momentum=0.9, eps=1e-8):
    # solo/utils/lars.py LARS.step with clip_lr=True, exclude_bias_n_norm=True (barlow.yaml);
    # momentum 0.9 from solo/args/pretrain.py; one group, the same lr and wd for every param
    for p in params:
        if p.grad is None:
            continue
        d_p, p_norm, g_norm = p.grad, p.norm(), p.grad.norm()
        if p.ndim != 1 and p_norm != 0 and g_norm != 0:
            lars_lr = eta * p_norm / (g_norm + p_norm * wd + eps)
            stats.append((lars_lr / lr).item())
            lars_lr = min(lars_lr / lr, 1)  # clip_lr
            d_p = (d_p + wd * p) * lars_lr
        if p not in state:  # torch SGD's buffer: the first step's d_p
            state[p] = d_p.clone()
        else:
            state[p].mul_(momentum).add_(d_p)
        p.sub_(lr * state[p])


def solo_warmup_cosine(base_lr, warmup, total, upto, start=3e-5, eta_min=0.0):
    # solo/utils/lr_scheduler.py LinearWarmupCosineAnnealingLR.get_lr (the chainable form the
    # scheduler runs, stepped every optimiser step: interval "step"); warmup_start_lr 3e-5 and
    # min_lr 0 are solo/methods/base.py's defaults, barlow.yaml sets neither
    lrs = [start]
    for e in range(1, upto + 1):
        prev = lrs[-1]
        if e < warmup:
            lrs.append(prev + (base_lr - start) / (warmup - 1))
        elif e == warmup:
            lrs.append(base_lr)
        elif (e - 1 - total) % (2 * (total - warmup)) == 0:
            lrs.append(prev + (base_lr - eta_min) * (1 - math.cos(math.pi / (total - warmup))) / 2)
        else:
            k = total - warmup
            ratio = (1 + math.cos(math.pi * (e - warmup) / k)) / (
                1 + math.cos(math.pi * (e - warmup - 1) / k)
            )
            lrs.append(ratio * (prev - eta_min) + eta_min)
    return lrs


def test_cifar_schedule_is_solo_learn_at_real_settings():
    """barlow.yaml: batch 256 on 1 device (lr 0.3 x 256/256), 1000 epochs of 50000 // 256 = 195
    steps, 10 warm-up epochs from 3e-5: every weights' and biases' lr of the first steps, the
    warm-up's end and the cosine agree with the scheduler's chainable values."""
    _, opt, args = project_run("cifar", "--batch-size", 256, steps_per_epoch=195, epochs=1000)
    solo = solo_warmup_cosine(0.3, 1950, 195_000, 194_999)
    for step in [0, 1, 2, 3, 4, 1948, 1949, 1950, 1951, 97_500, 190_000, 194_999]:
        f = args.sched["lr"][step]
        assert f * args.lr == pytest.approx(solo[step], rel=1e-9), step
        assert f * args.lr_biases == pytest.approx(solo[step], rel=1e-9), step
    assert all(
        (g["trust_coefficient"], g["clip_lr"], g["solo"]) == (0.02, True, True)
        for g in opt.param_groups
    )


def test_cifar_preset_matches_solo_learn_step():
    """5 steps (warm-up steps 0, 1, 9 and cosine steps 10, 15 of a 20-step run with solo-learn's
    10 warm-up epochs): the project's train_step (unscaled loss logged, loss x 0.1 back-
    propagated, solo LARS) equals solo-learn's step; the trust ratio was clipped for some
    weights and not for others, so both branches of clip_lr are exercised."""
    model, opt, args = project_run("cifar")
    ref = copy.deepcopy(model)  # solo's backbone + projector (same init), BN in train mode
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_mu, trust = {}, []
    lrs = solo_warmup_cosine(0.3 * B / 256, 10, 20, 19)  # solo/args/pretrain.py: lr x B/256
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in [0, 1, 9, 10, 15]:
        x1, x2 = inputs(step)
        stats = bt.train_step(model, ([x1, x2], None, None), opt, scaler, step, args)
        # solo/methods/barlow_twins.py training_step: one forward per view, barlow_loss_func
        for p in ref.parameters():
            p.grad = None
        z1, z2 = ref.projector(ref.backbone(x1)), ref.projector(ref.backbone(x2))
        loss = solo_barlow_loss(z1, z2, 0.0051, 0.1)
        loss.backward()
        solo_lars_step(list(ref.parameters()), lrs[step], ref_mu, trust)
        assert stats["loss"].item() == pytest.approx(loss.item() / 0.1, rel=1e-5)
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[step], rel=1e-9)
    mu = {p: opt.state[p]["mu"] for p in model.parameters()}
    assert_same_state(model, ref, p0, mu, ref_mu)
    assert min(trust) < 1 < max(trust), (min(trust), max(trust))
