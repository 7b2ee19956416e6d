"""Official-loop parity for simclr.py (v1 and v2): the official pretraining step, restated here
in plain PyTorch from google-research/simclr (TF1 code: objective.py, model_util.py,
lars_optimizer.py, resnet.py, model.py; the first release for v1, later commits for v2), runs
beside the project's real train_step, optimizer and args.sched (as main() builds them) from the
same initial weights on the same inputs. Losses, every parameter, every BN buffer and the
momentum buffers agree to float precision; the one documented deviation (BN running variance:
torch's unbiased batch variance vs keras' biased one) is measured and bounded."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import built_by_main
from torch import nn

import simclr

LARGE_NUM = 1e9  # [ref: objective.py LARGE_NUM]


def build(tmp_path, monkeypatch, *flags):
    """main() up to fit: the project's model, LARS and args.sched; fit is captured, not run."""
    model, opt, args, data = built_by_main(
        simclr, monkeypatch, tmp_path, "--preset", "imagenet", *flags
    )
    return model, opt, data, args


# ---- official schedule [ref: model_util.py learning_rate_schedule, get_train_steps] ---------
def official_lr(step: int, base: float, bsz: int, n: int, warmup_epochs, epochs, scaling):
    warmup = int(round(warmup_epochs * n // bsz))
    scaled = base * bsz / 256.0 if scaling == "linear" else base * math.sqrt(bsz)
    total = n * epochs // bsz + 1
    if step < warmup:
        return step / warmup * scaled
    # tf.train.cosine_decay(scaled, step - warmup, total - warmup), alpha 0
    t = min(step - warmup, total - warmup)
    return scaled * 0.5 * (1 + math.cos(math.pi * t / (total - warmup)))


# ---- official BN [ref: resnet.py batch_norm_relu: FLAGS.global_bn -> BatchNormalization(fused=
# False, momentum=batch_norm_decay 0.9, epsilon=1e-5); keras BN: batch moments with the biased
# variance, moving = decay * moving + (1 - decay) * batch] ------------------------------------
class OfficialBN(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, center: bool = True):
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())  # gamma
        if center:  # beta only where center=True [ref: linear_layer, batch_norm_relu]
            self.bias = nn.Parameter(bn.bias.detach().clone())
        self.center, self.decay, self.eps, self.n = center, 0.9, 1e-5, 0
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())  # official: biased
        self.register_buffer("running_var_bessel", bn.running_var.clone())  # for the deviation

    def forward(self, x):
        dims, shape = [0] + list(range(2, x.ndim)), [1, -1] + [1] * (x.ndim - 2)
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.n = x.numel() // x.shape[1]
        with torch.no_grad():
            self.running_mean.mul_(self.decay).add_((1 - self.decay) * mean)
            self.running_var.mul_(self.decay).add_((1 - self.decay) * var)
            self.running_var_bessel.mul_(self.decay).add_(
                (1 - self.decay) * var * self.n / (self.n - 1)
            )
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape)
        return y + self.bias.view(shape) if self.center else y


def official_model(model: nn.Module) -> nn.Module:
    """A deep copy of the project's initial model (same weights) with every BN replaced by the
    official one; the projection head's last BN has no beta (center=False)."""
    ref = copy.deepcopy(model)

    def swap(mod):
        for name, c in mod.named_children():
            if isinstance(c, nn.modules.batchnorm._BatchNorm):
                setattr(mod, name, OfficialBN(c))
            else:
                swap(c)

    swap(ref)
    last = max(i for i, m in enumerate(ref.projector) if isinstance(m, OfficialBN))
    ref.projector[last] = OfficialBN(model.projector[last], center=False)
    return ref


def official_head(ref, h: torch.Tensor, layers: int) -> torch.Tensor:
    """[ref: model_util.py projection_head, proj_head_mode='nonlinear' (v1 first release:
    nl_0 then num_nlh_layers=1 more; v2: num_proj_layers=3): each layer linear_layer(use_bn=
    True): dense without bias (use_bias and not use_bn), BN with center=use_bias; middle
    layers: width of the input, BN with beta, ReLU; last: proj_out_dim, BN without beta."""
    lins = [m for m in ref.projector if isinstance(m, nn.Linear)]
    bns = [m for m in ref.projector if isinstance(m, OfficialBN)]
    assert len(lins) == len(bns) == layers
    for j in range(layers):
        h = bns[j](h @ lins[j].weight.T)
        h = F.relu(h) if j != layers - 1 else h
    return h


def official_loss(hidden: torch.Tensor, tau: float) -> torch.Tensor:
    """[ref: objective.py add_contrastive_loss, hidden_norm=True, one replica]"""
    hidden = F.normalize(hidden, dim=-1)  # tf.math.l2_normalize
    h1, h2 = hidden.chunk(2)
    B = len(h1)
    labels = torch.arange(B)  # one_hot(range(B), 2B): the positive is logits_ab's diagonal
    masks = torch.eye(B)
    logits_aa = h1 @ h1.T / tau - masks * LARGE_NUM
    logits_bb = h2 @ h2.T / tau - masks * LARGE_NUM
    logits_ab, logits_ba = h1 @ h2.T / tau, h2 @ h1.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


class OfficialLARS:
    """[ref: lars_optimizer.py LARSOptimizer.apply_gradients, as model_util.get_optimizer builds
    it: momentum 0.9, use_nesterov=False, classic_momentum=True, eeta=0.001,
    exclude_from_weight_decay=['batch_normalization', 'bias'] (+ 'head_supervised' later),
    exclude_from_layer_adaptation=None -> the same list]. Weight decay enters only here: in
    pretraining add_weight_decay(adjust_per_optimizer=True) adds no loss term for LARS."""

    def __init__(self, ref: nn.Module, wd: float, momentum: float = 0.9, eeta: float = 1e-3):
        bn = {id(p) for m in ref.modules() if isinstance(m, OfficialBN) for p in m.parameters()}
        self.params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
        self.excluded = {n for n, p in self.params if id(p) in bn or "bias" in n}
        self.v = {n: torch.zeros_like(p) for n, p in self.params}  # the "Momentum" slots
        self.wd, self.m, self.eeta = wd, momentum, eeta

    @torch.no_grad()
    def step(self, lr: float):
        for n, p in self.params:
            grad = p.grad.clone()
            if self.wd and n not in self.excluded:  # _use_weight_decay
                grad += self.wd * p
            trust = 1.0
            if n not in self.excluded:  # _do_layer_adaptation
                w_norm, g_norm = p.norm(), grad.norm()
                if w_norm > 0 and g_norm > 0:
                    trust = self.eeta * w_norm / g_norm
            self.v[n] = self.m * self.v[n] + lr * trust * grad  # lr inside the buffer
            p -= self.v[n]


def close(got, want, what, rtol=1e-5):
    """Relative agreement: rtol, and an atol of 1e-5 x the reference's magnitude (gradients of
    the two BN implementations differ in the last float bits)."""
    atol = 1e-5 * max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# lr after scaling 0.3 at batch 16 (v1: --lr 4.8 x 16/256; v2: --lr 0.075 x sqrt(16), the
# README's v2 value): LARS leaves BN parameters unadapted (step lr * g) and their gradients are
# O(1) at batch 16, so the preset's 4.8 / 6.4 would make 5 steps chaotic. A 1-epoch warm-up (4
# steps): the 5 steps cover lr 0, the warm-up and the first cosine step. v2 with wd 0.05: the
# preset's 1e-4 (or v1's 1e-6) changes g + wd w by < 1e-5 here, below the tolerance.
CASES = {"v1": ["--lr", "4.8"], "v2": ["--lr", "0.075", "--wd", "0.05"]}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_train_step_equals_the_official_step(tmp_path, monkeypatch, version):
    flags = ["--version", version, "--batch-size", 16, "--subset", 64, "--epochs", 10]
    flags += ["--warmup-epochs", 1, *CASES[version]]
    torch.manual_seed(0)
    model, opt, data, args = build(tmp_path, monkeypatch, *flags)
    assert (args.proj_layers, args.wd) == ((2, 1e-6) if version == "v1" else (3, 0.05))
    ref = official_model(model)
    lars = OfficialLARS(ref, args.wd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    n, B = len(data.train), args.batch_size
    for step in range(5):
        x1, x2 = torch.rand(2, B, 3, 16, 16, generator=g)
        lr = official_lr(step, args.lr, B, n, args.warmup_epochs, args.epochs, args.lr_scaling)
        assert args.sched["lr"][step] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        # official forward [ref: model.py model_fn: views concatenated on the batch axis, base
        # network, projection head, add_contrastive_loss; the BN updates run as UPDATE_OPS]
        h = ref.backbone(torch.cat([x1, x2]))
        loss = official_loss(official_head(ref, h, args.proj_layers), args.tau)
        for _, p in lars.params:
            p.grad = None
        loss.backward()
        lars.step(lr)
        stats = simclr.train_step(model, ([x1, x2], None, None), opt, scaler, step, args)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
    refp = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if name in refp:
            close(p.detach(), refp[name].detach(), name)
            mu = opt.state[p]["mu"]  # classic momentum: the buffer is the official v
            close(mu, lars.v[name], f"momentum of {name}")
        else:  # the last BN's beta: absent in the official head, frozen at 0 here
            assert name.startswith("projector") and not p.requires_grad and not p.any()
    refb, worst = dict(ref.named_buffers()), 0.0
    bns = {n: m for n, m in ref.named_modules() if isinstance(m, OfficialBN)}
    for name, b in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert b.item() == 5
        elif name.endswith("running_var"):  # DEVIATION: unbiased batch variance (torch)
            close(b, refb[name + "_bessel"], name)
            off, nn_ = refb[name], bns[name.rsplit(".", 1)[0]].n
            rel = ((b - off).abs() / off).max().item()
            assert rel <= 1 / (nn_ - 1), (name, rel, nn_)  # each update x n/(n-1)
            worst = max(worst, rel * (nn_ - 1))
        else:
            close(b, refb[name], name)
    assert 0 < worst <= 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_schedule_at_the_preset_is_the_official_one(tmp_path, monkeypatch, version):
    """The whole lr schedule at the preset's epochs / warm-up (v1 100 / 10, v2 800 / 40) with a
    dataset size not divisible by the batch: the official step counts (warm-up n w // B steps,
    cosine to step n E // B + 1), lr 0 at step 0."""
    flags = ["--version", version, "--batch-size", 16, "--subset", 500]
    _, opt, data, args = build(tmp_path, monkeypatch, *flags)
    v1 = version == "v1"
    assert (args.epochs, args.warmup_epochs) == ((100, 10) if v1 else (800, 40))
    assert (args.wd, args.tau, args.proj_layers) == ((1e-6, 0.1, 2) if v1 else (1e-4, 0.1, 3))
    n, B = len(data.train), args.batch_size
    want = [
        official_lr(t, args.lr, B, n, args.warmup_epochs, args.epochs, args.lr_scaling)
        for t in range(args.total_steps)
    ]
    got = torch.tensor(args.sched["lr"], dtype=torch.float64)
    assert len(got) == args.total_steps and got[0] == 0.0
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["trust_coefficient"] == 1e-3
