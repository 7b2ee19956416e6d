"""Barlow Twins against the official training steps, restated here from the official code:
- ImageNet preset: facebookresearch/barlowtwins main.py (BarlowTwins.__init__/forward, LARS.step
  with its bias/BN filters, the two param groups, adjust_learning_rate, SyncBatchNorm + DDP);
- CIFAR preset: vturrisi/solo-learn (scripts/pretrain/cifar/barlow.yaml, solo/losses/barlow.py,
  solo/utils/lars.py, solo/utils/lr_scheduler.py, solo/methods/base.py, solo/args/pretrain.py).
The project's model, optimizer and schedule come from bt.main (helpers.built_by_main, stopped
where it calls fit); the official side is written here with plain torch layers and loaded with
the project's initial weights by state_dict (strict), then both step on the same inputs."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torchvision
from helpers import Dev, Ref, built_by_main, close_rel, official, tiny_args
from test_ddp import spawn
from torch import nn

import barlow_twins as bt

# ---- the official values, each from its source ---------------------------------------------
BT, MAIN, EVAL = "[BT §2 Implementation details", "ref: barlowtwins main.py", "ref: evaluate.py"
SEMI = "ref: barlowtwins README semi-supervised command (--train-perc 1)"
PLAIN = (
    "main.py sums C with a plain torch.distributed.all_reduce (no backward): on W processes each "
    "back-propagates its own share and DDP averages, 1/W of dL/dtheta; here C crosses processes "
    "with gradient (W processes = 1 process on the global batch). Under LARS the official 1/W "
    "equals wd x W and lr_biases / W: at W = 16 (the README's 16 GPUs) biases/BN move 16x as far "
    "and the weights' update differs by a few 1e-4 relative (test_official_w_gpu_run_...); "
    "identical in one process. --plain-all-reduce reproduces it"
)
IMAGENET = {
    "arch": Ref("resnet50", f"{BT}; {MAIN} torchvision.models.resnet50, fc = Identity]"),
    "epochs": Ref(1000, f"{BT}; {MAIN} --epochs default 1000]"),
    "batch_size": Ref(2048, f"{BT}; {MAIN} --batch-size default 2048, global]"),
    "lr": Ref(0.2, f"{BT}; {MAIN} --learning-rate-weights 0.2, x batch/256]"),
    "lr_biases": Ref(0.0048, f"{BT}; {MAIN} --learning-rate-biases 0.0048, x batch/256]"),
    "wd": Ref(1e-6, f"{MAIN} --weight-decay default 1e-6 (BT §2 writes 1.5e-6)]"),
    "warmup_epochs": Ref(10, f"{BT}; {MAIN} adjust_learning_rate warmup_steps 10 * len(loader)]"),
    "lambd": Ref(0.0051, f"{MAIN} --lambd default 0.0051 (BT §2: 5e-3)]"),
    "projector": Ref("8192-8192-8192", f"{BT}; {MAIN} --projector default]"),
    "blur": Ref(True, f"{BT}; {MAIN} Transform GaussianBlur(p=1.0) / GaussianBlur(p=0.1)]"),
    "eta": Ref(0.001, f"{MAIN} LARS(eta=0.001)]"),
    "scale_loss": Ref(1.0, f"{MAIN}: loss not scaled (--scale-loss gone since commit 046eec3)]"),
    "solo": Ref(False, f"{MAIN} LARS.step and adjust_learning_rate, not solo-learn's]"),
    "plain_all_reduce": Dev(False, True, PLAIN),
    "zero_init_residual": Ref(True, f"{MAIN} resnet50(zero_init_residual=True)]"),
    "stem_padding": Ref(1, f"unused at 224 px: torchvision's 7x7 stem [{MAIN} resnet50]"),
    "linear_epochs": Ref(100, f"[{EVAL} --epochs default 100]"),
    "linear_lr": Ref(0.3, f"[{EVAL} --lr-classifier 0.3, README linear command; batch 256]"),
    "linear_wd": Ref(1e-6, f"[{EVAL} --weight-decay default 1e-6]"),
    "linear_batch_size": Ref(256, f"[{EVAL} --batch-size default 256, global]"),
    "linear_nesterov": Ref(False, f"[{EVAL} optim.SGD(momentum=0.9)]"),
    "linear_milestones": Ref((), f"[{EVAL} CosineAnnealingLR(optimizer, args.epochs)]"),
    "linear_decay": Ref(0.1, f"unused without milestones [{EVAL}: cosine]"),
    "linear_epoch_lr": Ref(True, f"[{EVAL} scheduler.step() once per epoch]"),
    "linear_best": Ref(True, f"[{EVAL} best_acc.top1 = max(best_acc.top1, top1.avg)]"),
    "linear_zero_init": Ref(False, f"[{EVAL} fc.weight normal_(0, 0.01), fc.bias zero_()]"),
    "ft_optimizer": Ref("sgd", f"[{EVAL} optim.SGD(param_groups, momentum=0.9)]"),
    "ft_lr_scaling": Ref("linear", f"[{EVAL}: lrs as given at batch 256, = x batch/256 there]"),
    "ft_epoch_lr": Ref(True, f"[{EVAL} CosineAnnealingLR stepped once per epoch]"),
    "ft_sync_bn": Ref(False, f"[{EVAL}: DDP of plain BatchNorm, no convert_sync_batchnorm]"),
    "ft_head_init": Ref("normal", f"[{EVAL} fc.weight normal_(0, 0.01), fc.bias zero_()]"),
    "ft_best": Ref(True, f"[{EVAL} best_acc (max over epochs)]"),
    "ft_epochs": Ref((20, 20), f"[{SEMI} --epochs 20; the same flags at --train-percent 10]"),
    "ft_batch_size": Ref(256, f"[{EVAL} --batch-size default 256; {SEMI}]"),
    "ft_lr": Ref((0.005, 0.005), f"[{SEMI} --lr-backbone 0.005; the same at 10%]"),
    "ft_head_lr": Ref((0.5, 0.5), f"[{SEMI} --lr-classifier 0.5; the same at 10%]"),
    "ft_milestones": Ref((), f"[{EVAL} CosineAnnealingLR: cosine, no steps]"),
    "ft_decay": Ref(0.1, f"unused without milestones [{EVAL}: cosine]"),
}
SOLO = "ref: solo-learn scripts/pretrain/cifar/barlow.yaml"  # no CIFAR recipe in barlowtwins
BASE = "ref: solo-learn solo/methods/base.py"
CIFAR = {
    **IMAGENET,
    "arch": Ref("resnet18", f"[{SOLO} backbone.name resnet18]"),
    "epochs": Ref(1000, f"[{SOLO} max_epochs 1000]"),
    "batch_size": Ref(256, f"[{SOLO} optimizer.batch_size 256 on devices [0]]"),
    "lr": Ref(0.3, f"[{SOLO} optimizer.lr 0.3, x batch/256 (solo/args/pretrain.py)]"),
    "lr_biases": Ref(0.3, f"[{SOLO}: one lr for every parameter group]"),
    "wd": Ref(1e-4, f"[{SOLO} optimizer.weight_decay 1e-4; exclude_bias_n_norm]"),
    "warmup_epochs": Ref(10, f"[{BASE} scheduler warmup_epochs default 10; warmup_cosine]"),
    "lambd": Ref(0.0051, "[ref: solo-learn solo/methods/barlow_twins.py lamb default 0.0051]"),
    "projector": Ref("2048-2048-2048", f"[{SOLO} proj_hidden_dim 2048, proj_output_dim 2048]"),
    "blur": Ref(False, "[ref: solo-learn scripts/pretrain/cifar/augmentations/asymmetric.yaml]"),
    "eta": Ref(0.02, f"[{SOLO} optimizer.kwargs.eta 0.02]"),
    "scale_loss": Ref(0.1, f"[{SOLO} method_kwargs.scale_loss 0.1]"),
    "solo": Ref(True, f"[{SOLO} lars clip_lr True, exclude_bias_n_norm; warmup_cosine]"),
    "plain_all_reduce": Dev(False, True, "solo/losses/barlow.py also sums C plainly; " + PLAIN),
    "zero_init_residual": Ref(False, f"[{BASE}: torchvision resnet18 defaults]"),
    "stem_padding": Ref(2, f"[{BASE}: CIFAR stem nn.Conv2d(3, 64, 3, 1, 2), no max-pool]"),
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}
IN, CF = OFFICIAL[("--preset", "imagenet")], OFFICIAL[("--preset", "cifar")]

# ---- the tiny runs: the real main() at CPU size ------------------------------------------------
N, B, E = 32, 16, 20  # training images, global batch, epochs: 2 steps an epoch, 40 steps
PROJ = "64-64-32"
SCALER = torch.amp.GradScaler("cpu", enabled=False)  # fp32: a no-op


def built(tmp_path, monkeypatch, preset, *flags):
    """bt.main's model, optimizer (LARS groups) and args (args.sched) for the tiny run."""
    flags = ("--preset", preset, "--subset", N, "--batch-size", B, "--epochs", E, *flags)
    model, opt, args, _ = built_by_main(bt, monkeypatch, tmp_path, "--projector", PROJ, *flags)
    assert args.steps_per_epoch == N // B and args.total_steps == E * N // B
    return model, opt, args


def inputs(step, b=B, size=16):
    g = torch.Generator().manual_seed(100 + step)
    x1 = torch.rand(b, 3, size, size, generator=g)
    return x1, (x1.flip(3) + 0.3 * torch.rand(b, 3, size, size, generator=g)) * 0.8  # twins


# ---- official main.py, restated ----------------------------------------------------------------
def small_cnn(c=32):
    """The tiny runs' encoder (--arch smallcnn), in plain layers: 4 conv-BN-ReLU (3x3, strides
    1, 2, 2, 2) and a global average pool. Its weights come from the project by state_dict."""
    layers, chans = [], [3, c, 2 * c, 4 * c, 8 * c]
    for i in range(4):
        conv = nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1, bias=False)
        layers += [conv, nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def off_diagonal(x):
    # main.py off_diagonal: the flattened off-diagonal entries of a square matrix
    n = len(x)
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class OfficialBarlowTwins(nn.Module):
    """[ref: main.py BarlowTwins] backbone (fc = Identity), projector: (Linear(bias=False) ->
    BatchNorm1d -> ReLU) per width but the last, then Linear(bias=False); self.bn =
    BatchNorm1d(D, affine=False) on each view's z; c = bn(z1).T @ bn(z2) / batch_size (the
    GLOBAL batch); torch.distributed.all_reduce(c) (plain: no backward); loss = sum (c_ii - 1)^2 +
    lambd sum_{i != j} c_ij^2."""

    def __init__(self, backbone, feat_dim, widths, batch_size, lambd):
        super().__init__()
        self.backbone = backbone
        sizes = [feat_dim, *map(int, widths.split("-"))]
        layers = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1])]
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)
        self.batch_size, self.lambd = batch_size, lambd

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2) / self.batch_size
        if dist.is_initialized():
            dist.all_reduce(c)  # in place, invisible to autograd
        on_diag = (c.diagonal() - 1).pow(2).sum()
        return on_diag + self.lambd * off_diagonal(c).pow(2).sum()


def official_from(model, backbone=None, batch_size=B, lambd=None, widths=PROJ):
    """The official model with the project's initial weights: backbone and projector loaded by
    state_dict, strict (a width, a bias or an affine BN too many fails)."""
    ref = OfficialBarlowTwins(backbone or small_cnn(), model.feat_dim, widths, batch_size, lambd)
    ref.backbone.load_state_dict(model.backbone.state_dict())
    ref.projector.load_state_dict(model.projector.state_dict())
    return ref


def official_param_groups(model):
    # main.py main_worker: param_biases = params with ndim == 1, param_weights = the rest
    ws = [p for p in model.parameters() if p.ndim != 1]
    bs = [p for p in model.parameters() if p.ndim == 1]
    return [ws, bs]


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
def official_lars_step(groups, lrs, state, wd, eta, momentum=0.9):
    # main.py LARS.step, weight_decay_filter = lars_adaptation_filter = True: 1-D params get
    # neither decay nor adaptation; dp = g + wd p; q = eta |p| / |dp| where both are > 0, else 1
    for params, lr in zip(groups, lrs):
        for p in params:
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


def assert_same_state(model, ref, p0, mu, ref_mu, drtol=1e-4, skip=()):
    """Every parameter and buffer (1e-5 of each tensor's magnitude); every parameter's update
    since the start and every LARS momentum buffer (drtol of its magnitude, plus 4 fp32 ulps of
    the parameter: LARS moves a weight by ~lr x eta of its norm, a few hundred ulps)."""
    ref_sd = {**ref.state_dict()}
    for name, v in model.state_dict().items():
        if name not in skip:
            close_rel(v.float(), ref_sd[name].float(), name)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r, ulp = ref_params[name], 2.0**-23 * p0[name].abs().max().item()
        d, d_ref = p.detach() - p0[name], r.detach() - p0[name]
        atol = drtol * d_ref.abs().max().item() + 4 * ulp
        torch.testing.assert_close(d, d_ref, rtol=drtol, atol=atol, msg=f"update of {name}")
        close_rel(mu[p], ref_mu[r], f"momentum of {name}", drtol)


def run_official(model, opt, args, steps, wd, world=1, exact=True):
    """The project's train_step and main.py's step (lrs, wd and eta: the table's or the test's
    literals, never args) from the same weights; world > 1: the official W-GPU gradient, 1/W of
    dL/dtheta (DDP's mean of W plain-all_reduce shares), at the same loss."""
    ref = official_from(model, lambd=official(IN, "lambd"))
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, ref_mu = official_param_groups(ref), {}
    lr_w, lr_b, eta = official(IN, "lr"), official(IN, "lr_biases"), official(IN, "eta")
    for step in steps:
        x1, x2 = inputs(step)
        stats = bt.train_step(model, ([x1, x2], None, None), opt, SCALER, step, args)
        # main.py main_worker loop: adjust_learning_rate, zero_grad, forward, backward, step
        lrs = official_adjust_learning_rate(step, N // B, E, B, lr_w, lr_b)
        for p in ref.parameters():
            p.grad = None
        loss = ref(x1, x2)
        (loss / world).backward()
        official_lars_step(groups, lrs, ref_mu, wd, eta)
        if exact:  # the same objective (the official 1/W only scales its gradient)
            assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        if exact and world == 1:
            assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs, rel=1e-12)
    return model, ref, p0, {p: opt.state[p]["mu"] for p in model.parameters()}, ref_mu


# ---- ImageNet preset (main.py) -----------------------------------------------------------------
def test_imagenet_schedule_is_main_py_at_real_settings(tmp_path, monkeypatch):
    """adjust_learning_rate at the released run's settings (1000 epochs, batch 2048) through
    main's own build_optimizer: warm-up from 0 at step 0 to base at 10 epochs, cosine to
    base/1000. The DEVIATION in the epoch's length: main.py's DataLoader keeps the partial last
    batch (no drop_last; DistributedSampler pads to a multiple of W), so an ImageNet epoch is 626
    steps on 16 GPUs (625 x 2048 + a last step of 73 images per GPU, its C still divided by 2048);
    the project drops it: 625 steps, 1,167 of 1,281,167 images (0.09%) unseen per epoch, and the
    schedule's epoch (warm-up 6,250 steps, not 6,260) 0.16% shorter."""
    model, _, args = built(tmp_path, monkeypatch, "imagenet")
    sampler = torch.utils.data.DistributedSampler(range(1_281_167), num_replicas=16, rank=0)
    official_spe = len(torch.utils.data.DataLoader(range(1_281_167), 2048 // 16, sampler=sampler))
    assert (official_spe, 1_281_167 // 2048) == (626, 625)  # main.py's len(loader) vs drop_last
    args.batch_size, args.steps_per_epoch, args.total_steps = 2048, 625, 625_000
    opt = bt.build_optimizer(model, args)
    batch, epochs = official(IN, "batch_size"), official(IN, "epochs")
    lr_w, lr_b = official(IN, "lr"), official(IN, "lr_biases")
    for step in [0, 1, 2, 3, 4, 6249, 6250, 6251, 300_000, 624_999]:
        f = args.sched["lr"][step]
        want = official_adjust_learning_rate(step, 625, epochs, batch, lr_w, lr_b)
        assert (f * args.lr, f * args.lr_biases) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert len(args.sched["lr"]) == 625_000
    groups = opt.param_groups  # weights | biases and BN, as main.py's
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (official(IN, "wd"), 0.0)
    assert all(g["trust_coefficient"] == official(IN, "eta") and not g["solo"] for g in groups)
    for g, r in zip(groups, official_param_groups(model)):
        assert [id(p) for p in g["params"]] == [id(p) for p in r]


@pytest.mark.parametrize("wd", [None, 10.0])
def test_imagenet_preset_matches_main_py_step(tmp_path, monkeypatch, wd):
    """5 steps (warm-up steps 0, 1, 10 and cosine steps 20, 30 of a 40-step run whose warm-up is
    main.py's 10 epochs): losses, lrs, every parameter and its update, every BN buffer, every LARS
    momentum buffer agree to float precision. At the preset's wd (1e-6, too small to see) and at
    wd 10: every weight is scale-invariant (BN or the loss's standardisation follows it), so g is
    orthogonal to w and the decay enters LARS's |g + wd w| only at second order; at 10 dropping
    the decay, or leaving it out of the trust ratio's norm, fails."""
    flags = () if wd is None else ("--wd", wd)
    model, opt, args = built(tmp_path, monkeypatch, "imagenet", *flags)
    wd = official(IN, "wd") if wd is None else wd
    assert_same_state(*run_official(model, opt, args, [0, 1, 10, 20, 30], wd))


def test_official_w_gpu_run_equals_scaled_wd_and_bias_lr(tmp_path, monkeypatch):
    """The multi-process DEVIATION: an official W-GPU run back-propagates 1/W of the gradient.
    Under LARS that is exactly this project with --wd W x 1e-6 and --lr-biases 0.0048 / W (the
    help texts say so); with the defaults instead, biases/BN move W x as far and the weights'
    update differs by the share of the decay (measured here for W = 16, the README's 16 GPUs)."""
    w, wd = 16, official(IN, "wd")
    flags = ("--wd", wd * w, "--lr-biases", official(IN, "lr_biases") / w)
    model, opt, args = built(tmp_path / "a", monkeypatch, "imagenet", *flags)
    model, ref, p0, mu, ref_mu = run_official(model, opt, args, [20, 21, 22], wd, world=w)
    # the official momentum buffer of a 1-D param sums g / W, the project's g: W x as large
    assert_same_state(
        model, ref, p0, {p: m / w if p.ndim == 1 else m for p, m in mu.items()}, ref_mu
    )
    model, opt, args = built(tmp_path / "b", monkeypatch, "imagenet")  # the defaults
    model, ref, p0, _, _ = run_official(model, opt, args, [20], wd, world=w, exact=False)
    ref_params, worst = dict(ref.named_parameters()), 0.0
    for name, p in model.named_parameters():
        d, d_ref = p.detach() - p0[name], ref_params[name].detach() - p0[name]
        if p.ndim == 1:  # plain momentum SGD: W x the official step (to fp32 ulps of p)
            atol = 1e-4 * w * d_ref.abs().max().item() + 4 * w * 2.0**-23 * p0[name].abs().max()
            torch.testing.assert_close(d, w * d_ref, rtol=1e-4, atol=atol.item(), msg=name)
        else:  # the trust ratio normalises |g|: only the decay's share changes
            worst = max(worst, ((d - d_ref).norm() / d_ref.norm()).item())
    assert 1e-6 < worst < 1e-2, worst  # measured: a few 1e-4 (wd 1e-6 vs 16e-6 against |g|)


def test_real_resnet50_step_matches_main_py(tmp_path, monkeypatch):
    """The ImageNet preset's real network: torchvision's resnet50(zero_init_residual=True), fc =
    Identity, at 72 px (its 7x7 stem; the project swaps in the CIFAR stem at <= 64 px), projector
    restated from main.py (widths by --projector), weights loaded by state_dict; a cosine step at
    batch 4 and wd 10 (visible): loss, every parameter, buffer and LARS momentum agree."""
    flags = ("--arch", "resnet50", "--img-size", 72, "--wd", 10.0, "--projector", "128-128-64")
    flags += ("--subset", 8, "--batch-size", 4, "--epochs", 12)  # 2 steps an epoch
    model, opt, args, _ = built_by_main(bt, monkeypatch, tmp_path, "--preset", "imagenet", *flags)
    backbone = torchvision.models.resnet50(zero_init_residual=official(IN, "zero_init_residual"))
    backbone.fc = nn.Identity()
    ref = official_from(model, backbone, 4, official(IN, "lambd"), "128-128-64")
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, ref_mu = official_param_groups(ref), {}
    x1, x2 = inputs(21, 4, 72)
    stats = bt.train_step(model, ([x1, x2], None, None), opt, SCALER, 21, args)
    lrs = official_adjust_learning_rate(21, 2, 12, 4, official(IN, "lr"), official(IN, "lr_biases"))
    loss = ref(x1, x2)
    loss.backward()
    official_lars_step(groups, lrs, ref_mu, 10.0, official(IN, "eta"))
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    mu = {p: opt.state[p]["mu"] for p in model.parameters()}
    assert_same_state(model, ref, p0, mu, ref_mu)


# ---- CIFAR preset: solo-learn, restated -------------------------------------------------------
def solo_projector(feat_dim, hidden, out):
    # solo/methods/barlow_twins.py: Linear (with bias) -> BN -> ReLU, twice, then Linear (bias)
    return nn.Sequential(
        *(nn.Linear(feat_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU()),
        *(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU()),
        nn.Linear(hidden, out),
    )


def solo_barlow_loss(z1, z2, lamb, scale_loss):
    # solo/losses/barlow.py barlow_loss_func: a fresh BatchNorm1d(D, affine=False) (train mode)
    # per view, corr = z1^T z2 / N, (corr - I)^2 with off-diagonal entries x lamb, x scale_loss
    n, d = z1.shape
    bn = nn.BatchNorm1d(d, affine=False)
    corr = bn(z1).T @ bn(z2) / n
    weight = torch.where(torch.eye(d, dtype=torch.bool), 1.0, lamb)
    return scale_loss * ((corr - torch.eye(d)).pow(2) * weight).sum()


@torch.no_grad()
def solo_lars_step(params, lr, state, stats, wd, eta, momentum=0.9, eps=1e-8):
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


def test_cifar_schedule_is_solo_learn_at_real_settings(tmp_path, monkeypatch):
    """barlow.yaml: batch 256 on 1 device (lr 0.3 x 256/256), 1000 epochs of 50000 // 256 = 195
    steps (solo-learn drops the last batch), 10 warm-up epochs from 3e-5: every weights' and
    biases' lr of the first steps, the warm-up's end and the cosine agree with the scheduler's
    chainable values; main's build_optimizer at those settings."""
    model, _, args = built(tmp_path, monkeypatch, "cifar")
    args.batch_size, args.steps_per_epoch, args.total_steps = 256, 195, 195_000
    opt = bt.build_optimizer(model, args)
    solo = solo_warmup_cosine(official(CF, "lr"), 1950, 195_000, 194_999)
    for step in [0, 1, 2, 3, 4, 1948, 1949, 1950, 1951, 97_500, 190_000, 194_999]:
        f = args.sched["lr"][step]
        assert f * args.lr == pytest.approx(solo[step], rel=1e-9), step
        assert f * args.lr_biases == pytest.approx(solo[step], rel=1e-9), step
    eta = official(CF, "eta")
    assert all(
        (g["trust_coefficient"], g["clip_lr"], g["solo"]) == (eta, True, True)
        for g in opt.param_groups
    )


def test_cifar_preset_matches_solo_learn_step(tmp_path, monkeypatch):
    """5 steps (warm-up steps 0, 1, 19 and cosine steps 20, 30 of a 40-step run with solo-learn's
    10 warm-up epochs) of bt.main's CIFAR preset: the project's train_step (unscaled loss
    logged, loss x 0.1 back-propagated, solo LARS) equals solo-learn's step, whose projector
    Linears have biases: followed by BN (or the loss's standardisation) they get no gradient
    and, 1-D, no decay: they never move. The trust ratio is clipped for some weights and not for
    others, so both branches of clip_lr run; wd 1e-4 is visible at this size."""
    model, opt, args = built(tmp_path, monkeypatch, "cifar")
    ref = nn.Module()  # solo's backbone + projector, the project's weights, solo's own biases
    ref.backbone, ref.projector = small_cnn(), solo_projector(256, 64, 32)
    ref.backbone.load_state_dict(model.backbone.state_dict())
    missing = ref.projector.load_state_dict(model.projector.state_dict(), strict=False)
    assert missing.missing_keys == ["0.bias", "3.bias", "6.bias"] and not missing.unexpected_keys
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = [ref.projector[i].bias.detach().clone() for i in (0, 3)]
    ref_mu, trust = {}, []
    lrs = solo_warmup_cosine(official(CF, "lr") * B / 256, 20, 40, 39)  # x B/256 (pretrain.py)
    wd, eta, lamb, scale = (official(CF, k) for k in ("wd", "eta", "lambd", "scale_loss"))
    for step in [0, 1, 19, 20, 30]:
        x1, x2 = inputs(step)
        stats = bt.train_step(model, ([x1, x2], None, None), opt, SCALER, step, args)
        # solo/methods/barlow_twins.py training_step: one forward per view, barlow_loss_func
        for p in ref.parameters():
            p.grad = None
        z1, z2 = ref.projector(ref.backbone(x1)), ref.projector(ref.backbone(x2))
        loss = solo_barlow_loss(z1, z2, lamb, scale)
        loss.backward()
        solo_lars_step(list(ref.parameters()), lrs[step], ref_mu, trust, wd, eta)
        assert stats["loss"].item() == pytest.approx(loss.item() / scale, rel=1e-5)
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[step], rel=1e-9)
    mu = {p: opt.state[p]["mu"] for p in model.parameters()}
    skip = ["projector.1.running_mean", "projector.4.running_mean"]  # solo's: + the bias's share
    assert_same_state(model, ref, p0, mu, ref_mu, skip=skip)
    for i, b in zip((0, 3), biases):  # unmoved; BN's running mean: 10 updates of momentum 0.1
        close_rel(ref.projector[i].bias.detach(), b, f"solo's bias {i}")
        got = model.projector[i + 1].running_mean + (1 - 0.9**10) * b
        close_rel(got, ref.projector[i + 1].running_mean, f"running mean {i + 1}")
    assert min(trust) < 1 < max(trust), (min(trust), max(trust))


# ---- 2 processes: main.py's SyncBatchNorm + plain all_reduce + DDP, restated --------------------
class OfficialSyncBN(nn.Module):
    """nn.SyncBatchNorm in training mode, as main.py's convert_sync_batchnorm makes every BN
    (torch's needs CUDA): mean and biased variance over the global batch, the statistics' sums
    crossing processes with gradient (torch.distributed.nn all_reduce: its backward sums)."""

    def __init__(self, bn):
        super().__init__()
        self.eps, self.weight, self.bias = bn.eps, bn.weight, bn.bias

    def forward(self, x):
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        mean = dist_nn.all_reduce(x.sum(dims)) / n
        var = dist_nn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y if self.weight is None else y * self.weight.view(shape) + self.bias.view(shape)


def sync_bn(module):
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, OfficialSyncBN(child))
        else:
            sync_bn(child)
    return module


def _two_process_step(out_dir):
    """On each of 2 processes: bt.main's model (default, then --plain-all-reduce) and its DDP
    train_step on this rank's half of a global batch of 8; beside it main.py's step restated:
    SyncBN, plain all_reduce(c), backward, DDP's mean of the gradients."""
    got, res = {}, {}
    bt.fit = lambda model, opt, data, args: got.update(m=model, o=opt, a=args)
    x1, x2 = inputs(20, 8)
    x2[:4] *= 0.5  # the ranks see differently distributed data
    flags = ["--preset", "imagenet", "--subset", 16, "--batch-size", 8, "--projector", PROJ]
    for name, extra in [("default", []), ("plain", ["--plain-all-reduce"])]:
        bt.main(tiny_args(bt, out_dir / name, *flags, "--epochs", E, *extra))
        model, opt, args = got["m"], got["o"], got["a"]
        init = {k: v.clone() for k, v in model.state_dict().items()}
        ref = sync_bn(official_from(model, batch_size=8, lambd=official(IN, "lambd")))
        mine = slice(args.rank * 4, args.rank * 4 + 4)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        stats = bt.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, SCALER, 20, args)
        loss = ref(x1[mine], x2[mine])
        loss.backward()
        for p in ref.parameters():  # DDP: the mean of the processes' gradients
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        res[name] = {
            "loss": stats["loss"].detach(),
            "ref_loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "ref_grads": {n: p.grad.clone() for n, p in ref.named_parameters()},
        }
    return {**res, "init": init, "x": (x1, x2)}


def test_two_processes_official_plain_all_reduce_and_the_corrected_gradient(tmp_path):
    """2 gloo processes, half of a global batch of 8 each, main.py's step restated (SyncBN
    everywhere, c / 8 summed by a plain all_reduce, DDP's mean) beside bt.main's DDP train_step:
    --plain-all-reduce gives main.py's loss and every gradient; the default gives the same loss
    and the gradients of one process on the whole batch (main.py with W = 1), which are W = 2 x
    main.py's 2-process gradients: the size of the DEVIATION."""
    ranks = spawn(_two_process_step, 2, tmp_path, tmp_path)
    x1, x2 = ranks[0]["x"]
    model = bt.BarlowTwins(tiny_args(bt, tmp_path, "--projector", PROJ))
    model.load_state_dict(ranks[0]["init"])
    one = official_from(model, batch_size=8, lambd=official(IN, "lambd"))  # main.py, 1 process
    one_loss = one(x1, x2)
    one_loss.backward()
    one_grads = {n: p.grad for n, p in one.named_parameters()}
    for r in ranks:
        for name in ("plain", "default"):
            close_rel(r[name]["loss"], one_loss.detach(), f"{name} loss")
            close_rel(r[name]["ref_loss"], one_loss.detach(), "main.py's 2-process loss")
        for n, g in one_grads.items():
            close_rel(r["plain"]["grads"][n], r["plain"]["ref_grads"][n], f"plain: grad of {n}")
            close_rel(r["default"]["grads"][n], g, f"default: grad of {n}")
            close_rel(r["default"]["ref_grads"][n], g / 2, f"main.py's 2-process grad of {n}")
