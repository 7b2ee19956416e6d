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
from helpers import built_by_main
from torch import nn

import byol

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


def run_project(model, opt, args, xs):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return [byol.train_step(model, ([x1, x2], None, None), opt, scaler, k, args)["loss"].item()
            for k, (x1, x2) in enumerate(xs)]  # fmt: skip


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
    large lr (so that LARS moves the weights visibly), a large wd and a low tau (so that the
    decay and the EMA show): loss, every online and target parameter, the LARS momentum of
    every online parameter and every BN buffer agree with the official step."""
    flags = ["--preset", "imagenet", "--subset", 16, "--batch-size", B, "--epochs", 4]
    flags += ["--warmup-epochs", 1, "--lr", LR, "--m", 0.5, "--wd", WD]
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    assert (args.wd, args.eta, args.solo, args.warmup_start) == (WD, 1e-3, False, 0.0)
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
        lr = official_learning_schedule(k, B, args.lr, T, w)
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        official_lars(params, grads, mu, excluded, lr, args.wd, 1e-3)  # eta: configs/byol.py
        # then the target: x + (1 - tau) * (online_new - x), tau of the same global_step
        tau = official_target_ema(k, args.m, T)
        assert args.sched["m"][k] == pytest.approx(tau, rel=1e-12), k
        with torch.no_grad():
            for tn, on in TARGET.items():
                for t, o in zip(ref[tn].parameters(), ref[on].parameters()):
                    t.copy_(t + (1 - tau) * (o - t))
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
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
    preset = (args.lr, args.wd, args.m, args.epochs, args.warmup_epochs)
    assert preset == (0.2, 1.5e-6, 0.996, 1000, 10)  # configs/byol.py at 1000 epochs
    T, w = 1000 * 64 // B, 10 * 64 // B
    assert len(args.sched["lr"]) == args.total_steps == T
    for k in range(T):
        lr, tau = official_learning_schedule(k, B, 0.2, T, w), official_target_ema(k, 0.996, T)
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        assert args.sched["m"][k] == pytest.approx(tau, rel=1e-12), k
    g = opt.param_groups[0]
    lars = (g["trust_coefficient"], g["momentum"], g["clip_lr"], g["solo"])
    assert lars == (1e-3, 0.9, False, False)  # optimizer_config: eta 1e-3, momentum 0.9


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
    preset = (args.lr, args.eta, args.solo, args.warmup_start)
    assert preset == (1.0, 0.02, True, 3e-5)  # byol.yaml, base.py (here wd WD, warm-up 2 epochs)
    fresh_target(model, args)
    ref, xs = reference_nets(model), inputs(6)
    params, buf = online_params(ref), {}
    T, w = 4 * 16 // B, 2 * 16 // B
    lrs = solo_lr_schedule(len(xs), args.lr * B / 256, 3e-5, w, T)
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
        solo_lars(params, grads, buf, lrs[k], WD, 0.02)
        tau = solo_tau(k, args.m, T)  # on_train_batch_end: after the optimizer step
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
