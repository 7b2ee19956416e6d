"""Official-loop parity for byol.py.

The BYOL training step is restated here in plain PyTorch from the official JAX code,
google-deepmind/deepmind-research byol/ (byol_experiment.py, utils/optimizers.py,
utils/schedules.py, utils/helpers.py), and run beside the project's real `train_step` (with the
optimizer and `args.sched` exactly as `byol.main` builds them) for a few CPU steps from the same
weights on the same inputs. The CIFAR preset claims solo-learn's recipe: a second test restates
solo-learn's step (solo/utils/lars.py, solo/utils/lr_scheduler.py, solo/utils/momentum.py,
solo/methods/byol.py + base.py). Nothing below calls the project's loss, optimizer, schedule or
EMA; only the initial modules (deep copies) and the inputs are shared.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import FT_SIMCLR_V2, Dev, Ref, built_by_main, close_rel, official, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from torch import nn

import byol

# ---- the official values of every preset -----------------------------------------------------
CFG = "ref: byol configs/byol.py"  # get_config(num_epochs, batch_size)
EVAL = "ref: byol configs/eval.py"
SOLO = "ref: solo-learn scripts/pretrain/cifar/byol.yaml"
BASE = "ref: solo-learn solo/methods/base.py defaults"
SIMCLR_FT = "SimCLR's [SimCLR App. B.5]: BYOL's code has no semi-supervised recipe"
IMAGENET = {
    **FT_SIMCLR_V2,  # ft_epochs, ft_batch_size, ft_milestones, ft_decay, ft_epoch_lr, ft_best
    "arch": Ref("resnet50", f"[BYOL §3.2; {CFG} encoder_class='ResNet50']"),
    "zero_init_residual": Ref(
        False,
        "[ref: byol README 'Note on batch normalization': the "
        "paper's results use Haiku's gamma = 1]",
    ),
    "stem_padding": Ref(
        1,
        "unused at 224 px (7x7 stem); <= 64 px: SimCLR's CIFAR stem "
        "[ref: simclr resnet.py cifar_stem]",
    ),
    "epochs": Ref(1000, f"[BYOL §3.2; ref: byol main_loop.py --pretrain_epochs=1000; {CFG}]"),
    "batch_size": Ref(4096, "[BYOL §3.2; ref: byol main_loop.py --batch_size=4096]"),
    "lr": Ref(0.2, f"[BYOL §3.2: 0.2 x B/256; {CFG} _LR_PRESETS[1000]]"),
    "wd": Ref(1.5e-6, f"[BYOL §3.2; {CFG} _WD_PRESETS[1000]]"),
    "warmup_epochs": Ref(10, f"[BYOL §3.2; {CFG} warmup_steps=10 * N // B]"),
    "warmup_start": Ref(0.0, "[ref: byol utils/schedules.py learning_schedule: step / w * lr]"),
    "eta": Ref(1e-3, f"[BYOL §3.2; {CFG} optimizer_config eta=1e-3]"),
    "solo": Ref(False, "[ref: byol utils/optimizers.py lars]"),
    "m": Ref(0.996, f"[BYOL §3.2; {CFG} _EMA_PRESETS[1000]]"),
    "dim": Ref(256, f"[BYOL §3.2; {CFG} projector_output_size=256]"),
    "hidden_dim": Ref(4096, f"[BYOL §3.2; {CFG} projector_hidden_size=4096]"),
    "pred_hidden_dim": Ref(4096, f"[BYOL §3.2; {CFG} predictor_hidden_size=4096]"),
    "crop_min": Ref(0.08, "[BYOL Tab. 6; ref: byol utils/augmentations.py area_range (0.08, 1)]"),
    "blur": Ref(True, "[BYOL Tab. 6: p 1.0 / 0.1; ref: byol utils/augmentations.py]"),
    "linear_epochs": Ref(80, f"[BYOL App. C.1; {EVAL} max_steps=80 * N // B]"),
    "linear_lr": Ref(0.2, f"[{EVAL} base_learning_rate=0.2, x B/256]"),
    "linear_wd": Ref(0.0, f"[BYOL App. C.1; {EVAL}: no weight decay]"),
    "linear_batch_size": Ref(1024, "[BYOL App. C.1: batch 1024]"),
    "linear_nesterov": Ref(True, f"[{EVAL} optimizer_config nesterov=True]"),
    "linear_milestones": Ref((), f"[{EVAL} warmup_steps=0; schedules.py: cosine]"),
    "linear_decay": Ref(0.1, "unused without milestones (cosine)"),
    "linear_epoch_lr": Ref(False, "[ref: eval_experiment._update_func: the lr of the step]"),
    "linear_best": Ref(False, "[ref: byol README: the last checkpoint is evaluated]"),
    "linear_zero_init": Ref(False, "[ref: eval_experiment._classif_fn: hk.Linear's init]"),
    "ft_optimizer": Ref(
        "nesterov", "[ref: eval_experiment.py freeze_backbone=False: the same Nesterov SGD]"
    ),
    "ft_lr_scaling": Ref("linear", "[ref: byol utils/schedules.py: lr x B/256]"),
    "ft_lr": Ref((0.05, 0.05), f"{SIMCLR_FT}"),
    "ft_head_lr": Ref((0.05, 0.05), f"{SIMCLR_FT}"),
    "ft_batch_size": Ref(1024, "linear eval's batch [BYOL App. C.1]"),
    "ft_sync_bn": Ref(False, "[ref: eval_experiment.py: BN statistics per device]"),
    "ft_head_init": Ref("haiku", "[ref: eval_experiment._classif_fn: hk.Linear]"),
}
CIFAR = {
    **IMAGENET,
    "arch": Ref("resnet18", f"[{SOLO} backbone name resnet18]"),
    "stem_padding": Ref(2, "[ref: solo-learn solo/methods/base.py: conv1 3x3, stride 1, pad 2]"),
    "batch_size": Ref(256, f"[{SOLO} optimizer batch_size 256]"),
    "lr": Ref(1.0, f"[{SOLO} optimizer lr 1.0, x B/256]"),
    "wd": Ref(1e-5, f"[{SOLO} optimizer weight_decay 1e-5]"),
    "m": Ref(0.99, f"[{SOLO} momentum base_tau 0.99]"),
    "eta": Ref(0.02, f"[{SOLO} optimizer kwargs eta 0.02]"),
    "solo": Ref(True, f"[{SOLO} optimizer lars, clip_lr, exclude_bias_n_norm]"),
    "warmup_start": Ref(3e-5, f"[{BASE} warmup_start_lr 3e-5]"),
    "blur": Ref(False, "[ref: solo-learn scripts/pretrain/cifar/asymmetric.yaml: no blur]"),
    "epochs": Ref(1000, f"[{SOLO} max_epochs 1000]"),
    "warmup_epochs": Ref(10, f"[{BASE} warmup_epochs 10]"),
    "linear_epochs": Ref(100, "no official CIFAR protocol: the other CIFAR presets' 100 epochs"),
    "linear_batch_size": Ref(512, "no official CIFAR protocol: the other CIFAR presets' 512"),
    "ft_batch_size": Dev(
        256,
        1024,
        "every CIFAR preset fine-tunes at batch 256: larger batches "
        "exceed CIFAR-10's 1% labelled set (common.FT_CIFAR_BATCH)",
    ),
}


def length(epochs, lr, wd, m):
    """configs/byol.py at 40, 100, 300 epochs: its own lr, wd and tau_base."""
    at = f"{CFG} _LR_PRESETS, _WD_PRESETS, _EMA_PRESETS[{epochs}]"
    return {
        **IMAGENET,
        "epochs": Ref(epochs, f"[{CFG} num_epochs in (40, 100, 300, 1000)]"),
        "lr": Ref(lr, f"[{at}]"),
        "wd": Ref(wd, f"[{at}]"),
        "m": Ref(m, f"[{at}]"),
    }


OFFICIAL = {
    ("--preset", "imagenet"): IMAGENET,
    ("--preset", "cifar"): CIFAR,
    ("--preset", "imagenet", "--epochs", "40"): length(40, 0.45, 1e-6, 0.97),
    ("--preset", "imagenet", "--epochs", "100"): length(100, 0.45, 1e-6, 0.99),
    ("--preset", "imagenet", "--epochs", "300"): length(300, 0.3, 1e-6, 0.99),
}

SMALL = ["--hidden-dim", "64", "--pred-hidden-dim", "32", "--dim", "16"]
B = 8  # global batch of the parity runs
LR, STEPS = 32.0, 4  # lr per 256 of the parity run (x B/256 = 1): LARS moves weights ~0.1%/step
# biases right before a BatchNorm: their gradient is 0 in exact arithmetic (BN removes any
# constant), float noise (~1e-7) in practice, so both sides are bounded instead of compared
WD = 1e-2  # a weight decay large enough that decaying a wrong parameter shows
PRE_BN_BIAS = ("projector.0.bias", "predictor.0.bias")
ONLINE = ("backbone", "projector", "predictor")
TARGET = {"momentum_backbone": "backbone", "momentum_projector": "projector"}


def built(tmp_path, monkeypatch, *flags):
    """model, optimizer and args (with args.sched) exactly as byol.main builds them."""
    return built_by_main(byol, monkeypatch, tmp_path, *SMALL, *flags)[:3]


def close(a, b, msg=""):
    """1e-5 relative, with an absolute floor of 2e-5 of the tensor's largest magnitude: fp32
    gradients of this network carry ~3e-6 (of the largest entry) of noise against a float64
    run, for the project and for the restatement alike; 4 steps grow it to ~5e-6."""
    if msg.removeprefix("mu ").removeprefix("momentum_").endswith(PRE_BN_BIAS):
        assert a.abs().max() < 1e-6 and b.abs().max() < 1e-6, msg  # noise only, see above
        return
    b = torch.as_tensor(b, dtype=a.dtype)
    atol = 2e-5 * max(b.abs().max().item(), 1e-30) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=msg)


def fresh_target(model, args):
    """Official: the target is initialised from another rng than the online network
    [ref: byol_experiment._make_initial_state: rng_online, rng_target = split(rng)]. The project
    copies the online net (a documented DEVIATION); for a visible EMA both sides start here from
    a target that differs from the online network."""
    torch.manual_seed(123)
    other = byol.BYOL(args)
    model.momentum_backbone.load_state_dict(other.backbone.state_dict())
    model.momentum_projector.load_state_dict(other.projector.state_dict())


def inputs(steps):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(B, 3, 16, 16, generator=g), torch.rand(B, 3, 16, 16, generator=g))
            for _ in range(steps)]  # fmt: skip


def reference_nets(model):
    """Deep copies of the same initialised modules (online + target)."""
    return {n: copy.deepcopy(getattr(model, n)) for n in (*ONLINE, *TARGET)}


def online_params(ref):
    return [(f"{n}.{k}", p) for n in ONLINE for k, p in ref[n].named_parameters()]


def run_project(model, opt, args, xs, wds=None):
    """The project's steps; wds: the weight decay of each step (the decayed parameter group)."""
    scaler, losses = torch.amp.GradScaler("cpu", enabled=False), []
    for k, (x1, x2) in enumerate(xs):
        if wds is not None:
            opt.param_groups[0]["weight_decay"] = wds[k]  # C.param_groups: [decay, no decay]
        stats = byol.train_step(model, ([x1, x2], None, None), opt, scaler, k, args)
        losses.append(stats["loss"].item())
    return losses


# ==== the official step (google-deepmind/deepmind-research byol/) =============================
def official_regression_loss(x, y):
    # helpers.regression_loss + helpers.l2_normalize (epsilon 1e-12 on the squared norm):
    # per example sum((x/|x| - y/|y|)^2) over the feature axis
    nx = x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=1e-12))
    ny = y * torch.rsqrt(torch.clamp((y * y).sum(-1, keepdim=True), min=1e-12))
    return ((nx - ny) ** 2).sum(-1)


def official_forward_loss(ref, x1, x2):
    # byol_experiment._forward.apply_once_fn: each view through the encoder, projector and
    # predictor on its own (is_training=True: batch statistics), view1 then view2; loss_fn runs
    # the online network, then the target network (its predictor output is never used, so the
    # target predictor is left out here), on both views
    online, online_in = {}, ((1, x1), (2, x2))
    for v, x in online_in:
        z = ref["projector"](ref["backbone"](x))
        online[v] = ref["predictor"](z)
    with torch.no_grad():
        target = {v: ref["momentum_projector"](ref["momentum_backbone"](x)) for v, x in online_in}
    # loss_fn: regression_loss(pred_view1, sg(proj_view2)) + regression_loss(pred_view2,
    # sg(proj_view1)), then jnp.mean over the batch (the classifier loss on sg(embedding) does
    # not reach the representation and is left out)
    loss = official_regression_loss(online[1], target[2])
    loss = loss + official_regression_loss(online[2], target[1])
    return loss.mean()


def official_excluded(ref):
    # optimizers.exclude_bias_and_norm: path[-1] == "b" (a bias) or "norm" in path[-2] (a
    # batchnorm module's scale/offset): by name and module type, not by ndim
    out = set()
    for n in ONLINE:
        for mod_name, mod in ref[n].named_modules():
            is_norm = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for k, _ in mod.named_parameters(recurse=False):
                if k == "bias" or is_norm:
                    out.add(f"{n}.{mod_name}.{k}" if mod_name else f"{n}.{k}")
    return out


def official_learning_schedule(step, batch_size, base_lr, total_steps, warmup_steps):
    # schedules.learning_schedule: scaled_lr = base * bs / 256; step / warmup * scaled_lr while
    # step < warmup, then _cosine_decay(step - warmup, total - warmup, scaled_lr)
    scaled = base_lr * batch_size / 256.0
    if step < warmup_steps:
        return step / warmup_steps * scaled
    s, n = min(step - warmup_steps, total_steps - warmup_steps), total_steps - warmup_steps
    return scaled * 0.5 * (1 + math.cos(math.pi * s / n))


def official_target_ema(step, base_ema, max_steps):
    # schedules.target_ema: 1 - (1 - base) * _cosine_decay(step, max_steps, 1)
    return 1.0 - (1.0 - base_ema) * 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max_steps))


@torch.no_grad()
def official_lars(params, grads, mu, excluded, lr, wd, eta, momentum=0.9):
    # optimizers.lars = chain(add_weight_decay(filter), scale_by_lars(filter), scale(-lr))
    # with both filters exclude_bias_and_norm [ref: byol_experiment._optimizer]
    for (name, p), g in zip(params, grads):
        u = g if name in excluded else g + wd * p  # add_weight_decay
        if name not in excluded:  # scale_by_lars.lars_adaptation
            pn, un = torch.linalg.norm(p), torch.linalg.norm(u)
            u = u * (eta * pn / un if pn > 0 and un > 0 else 1.0)
        mu[name] = momentum * mu[name] + u  # mu = momentum * mu + adapted
        p.add_(-lr * mu[name])  # optax.scale(-lr), apply_updates


def bn_recorder(ref):
    """Haiku's BatchNorm state [ref: dm-haiku batch_norm.py + moving_averages.py]: per call in
    training, mean and var = E[x^2] - E[x]^2 (biased) go into ExponentialMovingAverage(0.9,
    zero_debias=True): hidden = 0.9 hidden + 0.1 v; average = hidden / (1 - 0.9^counter)."""
    rec = {}

    def hook(name):
        def fn(mod, inp):
            x = inp[0].detach()
            dims = [0, *range(2, x.ndim)]
            mean, var = x.mean(dims), (x * x).mean(dims) - x.mean(dims) ** 2
            r = rec.setdefault(name, {"k": 0, "m": 0 * mean, "v": 0 * var})
            r["n"] = x.numel() // x.shape[1]
            r["k"], r["m"], r["v"] = r["k"] + 1, 0.9 * r["m"] + 0.1 * mean, 0.9 * r["v"] + 0.1 * var

        return fn

    for n, net in ref.items():
        for mod_name, mod in net.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.register_forward_pre_hook(hook(f"{n}.{mod_name}"))
    return rec


def test_official_step_parity(tmp_path, monkeypatch):
    """4 steps (2 of warm-up from lr 0, then cosine) of the ImageNet preset's optimizer at a
    large lr (so that LARS moves the weights visibly) and a low tau (so that the EMA shows): two
    at the preset's weight decay, two at a large one (WD: leaving the decay out, or out of the
    trust ratio's norm, shows): loss, every online and target parameter, the LARS momentum of
    every online parameter and every BN buffer agree with the official step."""
    flags = ["--preset", "imagenet", "--subset", 16, "--batch-size", B, "--epochs", 4]
    flags += ["--warmup-epochs", 1, "--lr", LR, "--m", 0.5]
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    wds = [official(IMAGENET, "wd")] * 2 + [WD] * 2
    eta = official(IMAGENET, "eta")  # warmup_start 0: learning_schedule starts at 0
    fresh_target(model, args)
    ref, xs = reference_nets(model), inputs(STEPS)
    rec = bn_recorder(ref)
    params, excluded = online_params(ref), official_excluded(ref)
    mu = {n: torch.zeros_like(p) for n, p in params}
    # configs/byol.py: max_steps = epochs * N // bs, warmup_steps = 10 * N // bs (here 1 epoch)
    N, T, w = 16, 4 * 16 // B, 1 * 16 // B
    ref_losses = []
    for k, (x1, x2) in enumerate(xs):  # byol_experiment._update_fn, global_step = k from 0
        loss = official_forward_loss(ref, x1, x2)
        grads = torch.autograd.grad(loss, [p for _, p in params])
        lr = official_learning_schedule(k, B, LR, T, w)
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        official_lars(params, grads, mu, excluded, lr, wds[k], eta)
        # then the target: x + (1 - tau) * (online_new - x), tau of the same global_step
        tau = official_target_ema(k, 0.5, T)
        assert args.sched["m"][k] == pytest.approx(tau, rel=1e-12), k
        with torch.no_grad():
            for tn, on in TARGET.items():
                for t, o in zip(ref[tn].parameters(), ref[on].parameters()):
                    t.copy_(t + (1 - tau) * (o - t))
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs, wds)
    assert N == 16 and losses == pytest.approx(ref_losses, rel=1e-5)
    for n, net in ref.items():  # every parameter, online and target
        for k, p in net.named_parameters():
            close(model.get_parameter(f"{n}.{k}"), p, f"{n}.{k}")
    for n, p in model.named_parameters():  # the LARS momentum of every online parameter
        if p.requires_grad:
            close(opt.state[p]["mu"], mu[n], f"mu {n}")
    # every BN buffer: the reference's torch BN saw the same forwards (2 per step, train mode)
    for n, net in ref.items():
        for k, b in net.named_buffers():
            close(model.get_buffer(f"{n}.{k}").double(), b.double(), f"{n}.{k}")
    # DEVIATION (eval-time statistics only): torch's running stats vs Haiku's zero-debiased EMA
    # of the biased variance [ref: dm-haiku batch_norm.py, moving_averages.py]: after k updates
    # (2 per step) running_mean = (1 - 0.9^k) hk_mean and running_var = 0.9^k + (1 - 0.9^k)
    # n/(n-1) hk_var (n = values per channel): the gap 0.9^k is 0.43 here and < 1e-4 after 44
    # steps; n/(n-1) - 1 is 1/(B H W - 1) per conv BN (< 1e-5 at ImageNet scale)
    for name, r in rec.items():
        c, n = 1 - 0.9 ** r["k"], r["n"]
        hk_m, hk_v = r["m"] / c, r["v"] / c  # ExponentialMovingAverage.average
        close(model.get_buffer(f"{name}.running_mean"), c * hk_m, f"{name} mean")
        close(model.get_buffer(f"{name}.running_var"), 0.9 ** r["k"] + c * n / (n - 1) * hk_v)
        assert r["k"] == 2 * STEPS, name


def test_official_schedules_at_the_imagenet_preset(tmp_path, monkeypatch):
    """The ImageNet preset's lr (0.2 x B/256, 10 warm-up epochs, cosine) and tau (0.996 -> 1)
    per step against schedules.learning_schedule / target_ema, over a whole 1000-epoch run."""
    flags = ["--preset", "imagenet", "--subset", 64, "--batch-size", B]
    _, opt, args = built(tmp_path, monkeypatch, *flags)
    E, lr0, m = official(IMAGENET, "epochs"), official(IMAGENET, "lr"), official(IMAGENET, "m")
    T, w = E * 64 // B, official(IMAGENET, "warmup_epochs") * 64 // B
    assert len(args.sched["lr"]) == args.total_steps == T
    for k in range(T):
        lr, tau = official_learning_schedule(k, B, lr0, T, w), official_target_ema(k, m, T)
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        assert args.sched["m"][k] == pytest.approx(tau, rel=1e-12), k
    assert opt.param_groups[0]["weight_decay"] == official(IMAGENET, "wd")
    g = opt.param_groups[0]
    lars = (g["trust_coefficient"], g["momentum"], g["clip_lr"], g["solo"])
    assert lars == (official(IMAGENET, "eta"), 0.9, False, False)  # configs: momentum 0.9


# ==== solo-learn's step (the CIFAR preset) ===================================================
def solo_lr_schedule(steps, base, start, warmup, total):
    # solo/utils/lr_scheduler.py LinearWarmupCosineAnnealingLR.get_lr (chainable form, stepped
    # per batch: interval "step"), eta_min 0; the (last_epoch - 1 - max) % (2 (max - w)) == 0
    # branch is never hit for w < last_epoch <= max
    out = [start]
    for e in range(1, steps):
        if e < warmup:
            out.append(out[-1] + (base - start) / (warmup - 1))
        elif e == warmup:
            out.append(base)
        else:
            c = lambda i: 1 + math.cos(math.pi * (i - warmup) / (total - warmup))
            out.append(c(e) / c(e - 1) * out[-1])
    return out


def solo_tau(step, base, total, final=1.0):
    # solo/utils/momentum.py MomentumUpdater: cur_tau = base at the first batch, then after each
    # batch's update update_tau(cur_step=global_step (= batches done), max_steps)
    if step == 0:
        return base
    return final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2


@torch.no_grad()
def solo_lars(params, grads, buf, lr, wd, eta, momentum=0.9, eps=1e-8):
    # solo/utils/lars.py LARS.step with clip_lr=True, exclude_bias_n_norm=True, one group with
    # weight_decay 1e-5 for every online parameter (exclude_bias_n_norm_wd False)
    for (name, p), g in zip(params, grads):
        d = g
        p_norm, g_norm = torch.norm(p), torch.norm(g)
        if p.ndim != 1 and p_norm != 0 and g_norm != 0:
            lars_lr = eta * p_norm / (g_norm + p_norm * wd + eps)
            lars_lr = min(lars_lr / lr, 1)  # clip_lr
            d = (d + wd * p) * lars_lr
        buf[name] = d.clone() if name not in buf else buf[name] * momentum + d
        p.add_(buf[name], alpha=-lr)


def test_solo_learn_step_parity_at_the_cifar_preset(tmp_path, monkeypatch):
    """The CIFAR preset (solo-learn byol.yaml: LARS eta 0.02 + clip_lr + exclude_bias_n_norm,
    wd 1e-5, warmup_cosine from 3e-5, tau 0.99 -> 1 per step) against solo-learn's step."""
    flags = ["--subset", 16, "--batch-size", B, "--epochs", 4, "--warmup-epochs", 2, "--m", 0.5]
    model, opt, args = built(tmp_path, monkeypatch, *flags, "--wd", WD)
    lr0, eta, start = (official(CIFAR, k) for k in ("lr", "eta", "warmup_start"))
    fresh_target(model, args)
    ref, xs = reference_nets(model), inputs(6)
    params, buf = online_params(ref), {}
    T, w = 4 * 16 // B, 2 * 16 // B
    lrs = solo_lr_schedule(len(xs), lr0 * B / 256, start, w, T)
    ref_losses = []
    for k, (x1, x2) in enumerate(xs):
        # solo/methods/byol.py training_step: sum over v1, v2 != v1 of byol_loss_func(P[v2],
        # Z_momentum[v1]) = 2 - 2 cos(p, z).mean() (solo/losses/byol.py, simplified)
        p = [ref["predictor"](ref["projector"](ref["backbone"](x))) for x in (x1, x2)]
        with torch.no_grad():
            z = [ref["momentum_projector"](ref["momentum_backbone"](x)) for x in (x1, x2)]
        loss = sum(2 - 2 * F.cosine_similarity(p[1 - v], z[v], dim=-1).mean() for v in (0, 1))
        grads = torch.autograd.grad(loss, [q for _, q in params])
        assert args.sched["lr"][k] == pytest.approx(lrs[k], rel=1e-9), k
        solo_lars(params, grads, buf, lrs[k], WD, eta)
        tau = solo_tau(k, 0.5, T)  # on_train_batch_end: after the optimizer step
        assert args.sched["m"][k] == pytest.approx(tau, rel=1e-12), k
        with torch.no_grad():
            for tn, on in TARGET.items():
                for t, o in zip(ref[tn].parameters(), ref[on].parameters()):
                    t.copy_(tau * t + (1 - tau) * o)
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for n, net in ref.items():
        for k, q in net.named_parameters():
            close(model.get_parameter(f"{n}.{k}"), q, f"{n}.{k}")
        for k, b in net.named_buffers():
            close(model.get_buffer(f"{n}.{k}").double(), b.double(), f"{n}.{k}")
    for n, q in model.named_parameters():
        if q.requires_grad:
            close(opt.state[q]["mu"], buf[n], f"momentum {n}")


# ==== the real network: ResNet-18 with the CIFAR stem, the official MLPs =====================
def official_resnet18_cifar() -> nn.Module:
    """torchvision's resnet18 with SimCLR's CIFAR stem [ref: simclr resnet.py cifar_stem: a 3x3
    stride-1 conv ('SAME': pad 1), no max-pool], the stem the ImageNet preset takes at <= 64 px
    (BYOL's code has none: its ResNet-50 is for 224 px)."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net


class OfficialMLP(nn.Module):
    """[ref: byol utils/networks.py MLP]: hk.Linear(hidden_size, with_bias=True) -> hk.BatchNorm
    (bn_config: decay 0.9, eps 1e-5, scale and offset) -> relu -> hk.Linear(output_size,
    with_bias=False)."""

    def __init__(self, d: int, hidden: int, out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d, hidden)
        self.batchnorm = nn.BatchNorm1d(hidden, eps=1e-5, momentum=0.1)
        self.linear_2 = nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.linear_2(F.relu(self.batchnorm(self.linear_1(x))))


MLP_KEYS = {"0": "linear_1", "1": "batchnorm", "3": "linear_2"}  # the project's -> OfficialMLP's


def official_name(name: str) -> str:
    net, _, rest = name.partition(".")
    if net.endswith(("projector", "predictor")):
        i, _, k = rest.partition(".")
        rest = f"{MLP_KEYS[i]}.{k}"
    return f"{net}.{rest}"


def assert_haiku_init(lin: nn.Linear):
    """hk.Linear's default init: TruncatedNormal(1 / sqrt(fan_in)) cut at 2 std (std 0.88 of
    it), zero bias [ref: dm-haiku basic.py Linear]."""
    s = lin.in_features**-0.5
    assert lin.weight.abs().max() <= 2 * s and abs(lin.weight.std() / s - 0.8796) < 0.02
    assert lin.bias is None or not lin.bias.any()


def test_real_resnet18_official_mlps_step(tmp_path, monkeypatch, float64):
    """The ImageNet preset on the real network (ResNet-18 with the CIFAR stem at 16 px, batch 8,
    the official 4096-wide MLPs): the official network built here, loaded by state_dict (strict),
    two official steps (one at the preset's weight decay, one at WD) against train_step: loss,
    every online and target parameter, the LARS momentum and every BN buffer."""
    flags = ["--preset", "imagenet", "--arch", "resnet18", "--img-size", 16, "--subset", 16]
    flags += ["--batch-size", B, "--epochs", 4, "--warmup-epochs", 0, "--lr", 4.0, "--m", 0.5]
    torch.manual_seed(0)
    model, opt, args, _ = built_by_main(byol, monkeypatch, tmp_path, *flags)
    for head in (model.projector, model.predictor):
        assert_haiku_init(head[0])
        assert_haiku_init(head[3])
    fresh_target(model, args)
    hid, dim, pred = (official(IMAGENET, k) for k in ("hidden_dim", "dim", "pred_hidden_dim"))
    ref = {"backbone": official_resnet18_cifar(), "projector": OfficialMLP(512, hid, dim)}
    ref.update(predictor=OfficialMLP(dim, pred, dim), momentum_projector=OfficialMLP(512, hid, dim))
    ref["momentum_backbone"] = official_resnet18_cifar()
    for n, net in ref.items():
        state = getattr(model, n).state_dict()
        state = {official_name(f"{n}.{k}").partition(".")[2]: v for k, v in state.items()}
        net.load_state_dict(state, strict=True)  # a wrong width or an extra bias fails here
    params, excluded = online_params(ref), official_excluded(ref)
    mu = {n: torch.zeros_like(p) for n, p in params}
    wds, eta, xs = [official(IMAGENET, "wd"), WD], official(IMAGENET, "eta"), []
    g = torch.Generator().manual_seed(5)
    ref_losses, T = [], 4 * 16 // B
    for k in range(2):
        x1, x2 = torch.rand(2, B, 3, 16, 16, generator=g)
        xs.append((x1, x2))
        loss = official_forward_loss(ref, x1, x2)
        grads = torch.autograd.grad(loss, [p for _, p in params])
        lr = official_learning_schedule(k, B, 4.0, T, 0)  # BN parameters (unadapted) move ~5%
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12), k
        official_lars(params, grads, mu, excluded, lr, wds[k], eta)
        tau = official_target_ema(k, 0.5, T)
        with torch.no_grad():
            for tn, on in TARGET.items():
                for t, o in zip(ref[tn].parameters(), ref[on].parameters()):
                    t.copy_(t + (1 - tau) * (o - t))
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs, wds)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, p in model.named_parameters():
        net, _, rest = official_name(name).partition(".")
        close(p, ref[net].get_parameter(rest), name)
        if p.requires_grad:
            close(opt.state[p]["mu"], mu[official_name(name)], f"mu {name}")
    for name, b in model.named_buffers():
        net, _, rest = official_name(name).partition(".")
        close(b.double(), ref[net].get_buffer(rest).double(), name)
