"""Official-loop parity for simclr.py (v1 and v2): the official pretraining step, restated here
in plain PyTorch from google-research/simclr (TF1 code: objective.py, model_util.py,
lars_optimizer.py, resnet.py, model.py; the first release for v1, later commits for v2), runs
beside the project's real train_step, optimizer and args.sched (as main() builds them) from the
same initial weights on the same inputs. Losses, every parameter, every BN buffer and the
momentum buffers agree to float precision; the one documented deviation (BN running variance:
torch's unbiased batch variance vs keras' biased one) is measured and bounded. The official
values of every preset are pinned in OFFICIAL, and the parity steps read theirs from it."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from helpers import FT_SIMCLR_V2, TINY, Dev, Ref, built_by_main, close_rel, official, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import spawn
from torch import nn

import common as C
import simclr

# ---- the official values of every preset -----------------------------------------------------
R1 = "ref: simclr README ImageNet command, first release"  # the SimCLR v1 code (be133b3..85e8552)
RC = "ref: simclr README CIFAR-10 command"
LIN = "ref: simclr README linear eval (ImageNet) command"
LINC = "ref: simclr README linear eval (CIFAR-10) command"
B5 = "SimCLR App. B.5"  # v1's fine-tuning protocol (no command in the README for it)
FT_BATCH = (
    "every CIFAR preset fine-tunes at batch 256: the ImageNet batch exceeds CIFAR-10's 1% "
    "labelled set (500 images); SimCLR v1's 4096 (lr 0.8, 8 steps) diverges there, 1% top-1 "
    "10.0 vs 42.7 at 256 (common.FT_CIFAR_BATCH)"
)
IMAGENET_V1 = {
    "version": Ref("v1", "[SimCLR; ref: simclr first release be133b3]"),
    "arch": Ref("resnet50", "[SimCLR §2.3; ref: run.py --resnet_depth=50]"),
    "epochs": Ref(100, f"[SimCLR §2.3 default setting; {R1} --train_epochs=100]"),
    "batch_size": Ref(4096, f"[SimCLR §2.3; {R1} --train_batch_size=4096]"),
    "lr": Ref(0.3, f"[SimCLR §2.3: 4.8 = 0.3 x 4096/256; {R1} --learning_rate=0.3]"),
    "lr_scaling": Ref(
        "linear", "[ref: model_util.learning_rate_schedule (first release): x B/256]"
    ),
    "wd": Ref(1e-6, f"[SimCLR §2.3; {R1} --weight_decay=1e-6]"),
    "momentum": Ref(0.9, "[ref: run.py --momentum=0.9; lars_optimizer.py classic_momentum=True]"),
    "warmup_epochs": Ref(10, "[SimCLR §2.3; ref: run.py --warmup_epochs=10]"),
    "tau": Ref(0.1, f"[SimCLR Tab. 5; {R1} --temperature=0.1]"),
    "proj_layers": Ref(
        2, "[ref: model_util.projection_head (first release): nl_0 + num_nlh_layers=1]"
    ),
    "proj_dim": Ref(128, "[SimCLR §2.3; ref: run.py --head_proj_dim=128]"),
    "color_s": Ref(1.0, "[SimCLR App. A; ref: run.py --color_jitter_strength=1.0]"),
    "blur": Ref(True, "[SimCLR App. A; ref: run.py --use_blur=True]"),
    "linear_epochs": Ref(90, f"[{LIN} --train_epochs=90]"),
    "linear_lr": Ref(0.1, f"[{LIN} --learning_rate=0.1, x B/256]"),
    "linear_wd": Ref(1e-6, f"[{LIN} --weight_decay=1e-6; model_util.add_weight_decay]"),
    "linear_batch_size": Ref(4096, f"[{LIN} --train_batch_size=4096]"),
    "linear_nesterov": Ref(True, f"[{LIN} --optimizer=momentum: use_nesterov=True]"),
    "linear_milestones": Ref((), f"[{LIN} --warmup_epochs=0; learning_rate_schedule: cosine]"),
    "linear_decay": Ref(0.1, "unused without milestones: the README's schedule is cosine"),
    "linear_epoch_lr": Ref(False, "[ref: learning_rate_schedule reads global_step: per step]"),
    "linear_best": Ref(False, f"[{LIN} --mode=train_then_eval: the final checkpoint]"),
    "linear_zero_init": Ref(True, f"[{LIN} --zero_init_logits_layer=True]"),
    "ft_optimizer": Ref("nesterov", f"[{B5}: Nesterov momentum 0.9; ref: get_optimizer momentum]"),
    "ft_lr_scaling": Ref("linear", f"[{B5}: LearningRate = 0.05 x BatchSize/256]"),
    "ft_epochs": Ref((60, 30), f"[{B5}: 60 epochs at 1%, 30 at 10%]"),
    "ft_batch_size": Ref(4096, f"[{B5}: batch 4096]"),
    "ft_lr": Ref((0.05, 0.05), f"[{B5}: 0.05 x BatchSize/256 (0.8)]"),
    "ft_head_lr": Ref((0.05, 0.05), f"[{B5}: one lr for every variable]"),
    "ft_proj_layers": Ref(0, f"[{B5}; ref: model.py (first release): head on the base output]"),
    "ft_milestones": Ref((), f"[{B5}: no warm-up; ref: learning_rate_schedule: cosine]"),
    "ft_decay": Ref(0.1, "unused without milestones (cosine) [ref: model_util.py]"),
    "ft_epoch_lr": Ref(False, "[ref: learning_rate_schedule reads global_step: per step]"),
    "ft_sync_bn": Ref(True, "[ref: run.py --global_bn=True]"),
    "ft_head_init": Ref("zero", "[ref: README fine-tune commands --zero_init_logits_layer=True]"),
    "ft_best": Ref(False, "[ref: README --mode=train_then_eval: the final checkpoint]"),
    "distill_epochs": Ref(0, "v1 has no distillation stage [SimCLRv2 §2 adds it]"),
    "distill_tau": Ref(1.0, "unused in v1; SimCLR v2's tau [SimCLRv2 Eq. 2; distillation colab]"),
}
V2 = {  # the v2 code (run.py at 383d414) and the SimCLR v2 paper's ImageNet recipe
    "version": Ref("v2", "[SimCLRv2; ref: simclr 244e712 'updates that include SimCLRv2']"),
    "epochs": Ref(800, "[SimCLRv2 §3.1: 800 epochs; the README's 100: v1's default setting]"),
    "lr": Ref(0.1, "[SimCLRv2 §3.1: 6.4 = 0.1 x sqrt(4096); ref: simclr issue #77]"),
    "lr_scaling": Ref("sqrt", "[SimCLRv2 §3.1; ref: README --learning_rate_scaling=sqrt]"),
    "wd": Ref(1e-4, "[SimCLRv2 §3.1; ref: README --weight_decay=1e-4, run.py default]"),
    "warmup_epochs": Ref(40, "[SimCLRv2 §3.1: warm-up 5% of 800 epochs; ref: issue #77]"),
    "proj_layers": Ref(3, "[SimCLRv2 §2; ref: run.py --num_proj_layers=3]"),
    **FT_SIMCLR_V2,
    "ft_proj_layers": Ref(1, "[SimCLRv2 §2; ref: README fine-tune command --ft_proj_selector=1]"),
    "distill_epochs": Dev(
        0, 400, "the third stage is opt-in: it needs a fine-tuned teacher (--finetune-fraction)"
    ),
}
CIFAR_V1 = {
    **IMAGENET_V1,
    "arch": Ref("resnet18", f"[SimCLR App. B.9; {RC} --resnet_depth=18]"),
    "epochs": Ref(1000, f"[SimCLR App. B.9; {RC} --train_epochs=1000]"),
    "batch_size": Ref(512, f"[{RC} --train_batch_size=512]"),
    "lr": Ref(1.0, f"[{RC} --learning_rate=1.0]"),
    "wd": Ref(1e-6, f"[{RC} (first release) --weight_decay=1e-6]"),
    "tau": Ref(0.5, f"[SimCLR App. B.9; {RC} --temperature=0.5]"),
    "color_s": Ref(0.5, f"[SimCLR App. B.9; {RC} --color_jitter_strength=0.5]"),
    "blur": Ref(False, f"[SimCLR App. B.9; {RC} --use_blur=False]"),
    "linear_epochs": Ref(100, f"[{LINC} --train_epochs=100]"),
    "linear_wd": Ref(0.0, f"[{LINC} --weight_decay=0.0]"),
    "linear_batch_size": Ref(512, f"[{LINC} --train_batch_size=512]"),
    "ft_batch_size": Dev(256, 4096, FT_BATCH),
}
CIFAR_V2 = {
    **CIFAR_V1,
    **{k: V2[k] for k in ("version", "proj_layers", "distill_epochs", "ft_proj_layers")},
    **FT_SIMCLR_V2,
    "wd": Ref(1e-4, f"[{RC} (v2) --weight_decay=1e-4]"),
    "ft_batch_size": Dev(256, 1024, FT_BATCH),
}
OFFICIAL = {
    ("--preset", "imagenet", "--version", "v1"): IMAGENET_V1,
    ("--preset", "imagenet", "--version", "v2"): {**IMAGENET_V1, **V2},
    ("--preset", "cifar", "--version", "v1"): CIFAR_V1,
    ("--preset", "cifar", "--version", "v2"): CIFAR_V2,
}
IN = {v: OFFICIAL[("--preset", "imagenet", "--version", v)] for v in ("v1", "v2")}
LARGE_NUM = 1e9  # [ref: objective.py LARGE_NUM]
EETA = 1e-3  # [ref: lars_optimizer.py EETA_DEFAULT; get_optimizer passes no eeta]
DECAY = 0.9  # [ref: run.py --batch_norm_decay=0.9]


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


# ---- across replicas [ref: objective.py tpu_cross_replica_concat; resnet.py BatchNormalization
# _cross_replica_average]: tf.tpu.cross_replica_sum, whose registered gradient is the
# cross_replica_sum of the incoming gradient --------------------------------------------------
class CrossReplicaSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossReplicaConcat(torch.autograd.Function):
    """scatter_nd at replica_id + cross_replica_sum + reshape, i.e. an all_gather forward; the
    gradient: cross_replica_sum of the incoming one, then this replica's slice (gather_nd)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.view(dist.get_world_size(), -1, *grad.shape[1:])[dist.get_rank()]


def replicas() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ---- official BN [ref: resnet.py batch_norm_relu: FLAGS.global_bn -> BatchNormalization(fused=
# False, momentum=batch_norm_decay 0.9, epsilon=1e-5); keras BN: batch moments with the biased
# variance, moving = decay * moving + (1 - decay) * batch; over several replicas the group mean is
# the mean of the shard means, the group variance the mean of the shard variances plus the mean of
# (group mean - shard mean)^2 (_moments)] ------------------------------------------------------
class OfficialBN(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, center: bool = True):
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())  # gamma
        if center:  # beta only where center=True [ref: linear_layer, batch_norm_relu]
            self.bias = nn.Parameter(bn.bias.detach().clone())
        self.center, self.eps, self.n = center, 1e-5, 0
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())  # official: biased
        self.register_buffer("running_var_bessel", bn.running_var.clone())  # for the deviation

    def forward(self, x):
        dims, shape = [0] + list(range(2, x.ndim)), [1, -1] + [1] * (x.ndim - 2)
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.n = x.numel() // x.shape[1] * replicas()
        if replicas() > 1:  # _cross_replica_average
            g_mean = CrossReplicaSum.apply(mean) / replicas()
            var = CrossReplicaSum.apply(var) / replicas()
            mean, var = g_mean, var + CrossReplicaSum.apply((g_mean - mean) ** 2) / replicas()
        with torch.no_grad():
            self.running_mean.mul_(DECAY).add_((1 - DECAY) * mean)
            self.running_var.mul_(DECAY).add_((1 - DECAY) * var)
            self.running_var_bessel.mul_(DECAY).add_((1 - DECAY) * var * self.n / (self.n - 1))
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
    """[ref: objective.py add_contrastive_loss, hidden_norm=True]: over several replicas, hidden1
    and hidden2 are concatenated across replicas (with gradient), the labels and the self-masks
    offset by replica_id * batch_size."""
    hidden = F.normalize(hidden, dim=-1)  # tf.math.l2_normalize
    h1, h2 = hidden.chunk(2)
    B, R = len(h1), replicas()
    h1_large, h2_large = h1, h2
    labels_idx = torch.arange(B)
    if R > 1:
        h1_large, h2_large = CrossReplicaConcat.apply(h1), CrossReplicaConcat.apply(h2)
        labels_idx = labels_idx + dist.get_rank() * B
    masks = F.one_hot(labels_idx, B * R)  # the positive: column labels_idx of logits_ab
    logits_aa = h1 @ h1_large.T / tau - masks * LARGE_NUM
    logits_bb = h2 @ h2_large.T / tau - masks * LARGE_NUM
    logits_ab, logits_ba = h1 @ h2_large.T / tau, h2 @ h1_large.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels_idx)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels_idx)
    return loss_a + loss_b


class OfficialLARS:
    """[ref: lars_optimizer.py LARSOptimizer.apply_gradients, as model_util.get_optimizer builds
    it: momentum 0.9, use_nesterov=False, classic_momentum=True, eeta=0.001,
    exclude_from_weight_decay=['batch_normalization', 'bias'] (+ 'head_supervised' later),
    exclude_from_layer_adaptation=None -> the same list]. Weight decay enters only here: in
    pretraining add_weight_decay(adjust_per_optimizer=True) adds no loss term for LARS. The
    exclusion is by name: BN parameters (by their module) and biases."""

    def __init__(self, ref: nn.Module, wd: float, momentum: float, bn_names=()):
        bns = (OfficialBN, nn.modules.batchnorm._BatchNorm)
        bn = {id(p) for m in ref.modules() if isinstance(m, bns) for p in m.parameters()}
        self.params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
        self.excluded = {n for n, p in self.params if id(p) in bn or "bias" in n}
        self.excluded |= set(bn_names)
        self.v = {n: torch.zeros_like(p) for n, p in self.params}  # the "Momentum" slots
        self.wd, self.m = wd, momentum

    @torch.no_grad()
    def step(self, lr: float):
        for n, p in self.params:
            grad = p.grad.clone()
            if self.wd and n not in self.excluded:  # _use_weight_decay
                grad += self.wd * p
            trust = 1.0
            if n not in self.excluded:  # _do_layer_adaptation: the norm of grad + wd * w
                w_norm, g_norm = p.norm(), grad.norm()
                if w_norm > 0 and g_norm > 0:
                    trust = EETA * w_norm / g_norm
            self.v[n] = self.m * self.v[n] + lr * trust * grad  # lr inside the buffer
            p -= self.v[n]


def close(got, want, what, rtol=1e-5):
    close_rel(got, want, what, rtol)


# lr after scaling 0.3 at batch 16 (v1: --lr 4.8 x 16/256; v2: --lr 0.075 x sqrt(16), the
# README's v2 value): LARS leaves BN parameters unadapted (step lr * g) and their gradients are
# O(1) at batch 16, so the preset's 4.8 / 6.4 would make 5 steps chaotic. A 1-epoch warm-up (4
# steps): the 5 steps cover lr 0, the warm-up and the first cosine step. The preset's weight
# decay (v1 1e-6, v2 1e-4) changes g + wd w by < 1e-5 here, below the tolerance: the third case
# runs a weight decay (WD) at which leaving the decay out, or out of the trust ratio's norm,
# moves the momentum buffers far beyond it.
WD = 0.05
CASES = {
    "v1": ("v1", ["--lr", "4.8"], 4.8, None),
    "v2": ("v2", ["--lr", "0.075"], 0.075, None),
    "v1_large_wd": ("v1", ["--lr", "4.8", "--wd", WD], 4.8, WD),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_equals_the_official_step(tmp_path, monkeypatch, case):
    version, extra, base_lr, wd = CASES[case]
    table = IN[version]
    wd = official(table, "wd") if wd is None else wd  # the preset's, or the literal above
    flags = ["--version", version, "--batch-size", 16, "--subset", 64, "--epochs", 10]
    flags += ["--warmup-epochs", 1, *extra]
    torch.manual_seed(0)
    model, opt, data, args = build(tmp_path, monkeypatch, *flags)
    layers, tau, scaling = (official(table, k) for k in ("proj_layers", "tau", "lr_scaling"))
    ref = official_model(model)
    lars = OfficialLARS(ref, wd, official(table, "momentum"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    n, B = len(data.train), 16
    for step in range(5):
        x1, x2 = torch.rand(2, B, 3, 16, 16, generator=g)
        lr = official_lr(step, base_lr, B, n, 1, 10, scaling)
        assert args.sched["lr"][step] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        # official forward [ref: model.py model_fn: views concatenated on the batch axis, base
        # network, projection head, add_contrastive_loss; the BN updates run as UPDATE_OPS]
        h = ref.backbone(torch.cat([x1, x2]))
        loss = official_loss(official_head(ref, h, layers), tau)
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
    table = IN[version]
    base, E, w, scaling = (
        official(table, k) for k in ("lr", "epochs", "warmup_epochs", "lr_scaling")
    )
    n = len(data.train)
    want = [official_lr(t, base, 16, n, w, E, scaling) for t in range(args.total_steps)]
    got = torch.tensor(args.sched["lr"], dtype=torch.float64)
    assert len(got) == args.total_steps and got[0] == 0.0
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    momentum, wd = official(table, "momentum"), official(table, "wd")
    assert opt.defaults["momentum"] == momentum and opt.defaults["trust_coefficient"] == EETA
    assert opt.param_groups[0]["weight_decay"] == wd and opt.param_groups[1]["weight_decay"] == 0


# ---- the real network: ResNet-18 with the CIFAR stem at 16 px ---------------------------------
def official_resnet18_cifar() -> nn.Module:
    """[ref: resnet.py resnet_v1(cifar_stem=True) for image_size <= 32: a 3x3 stride-1 conv
    ('SAME': pad 1), BN, ReLU, no max-pool; then ResNet v1 block groups: torchvision's resnet18]"""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net


class OfficialHead(nn.Module):
    """[ref: model_util.py projection_head + linear_layer(use_bn=True)]: dense layers without
    bias; middle layers BN (gamma, beta) + ReLU at the input width, the last proj_out_dim wide
    with a BN of gamma only (center=False)."""

    def __init__(self, d: int, out: int, layers: int):
        super().__init__()
        widths = [d] * (layers - 1) + [out]
        self.dense = nn.ModuleList(nn.Linear(d, w, bias=False) for w in widths)
        self.bn = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(layers - 1))
        self.bn_out = nn.BatchNorm1d(out, affine=False)
        self.gamma_out = nn.Parameter(torch.ones(out))

    def forward(self, h):
        for dense, bn in zip(self.dense, self.bn):
            h = F.relu(bn(dense(h)))
        return self.bn_out(self.dense[-1](h)) * self.gamma_out


def head_key_map(projector: nn.Sequential) -> dict:
    """The project's projector names -> OfficialHead's (the beta of the last BN has none)."""
    lins = [i for i, m in enumerate(projector) if isinstance(m, nn.Linear)]
    bns = [i for i, m in enumerate(projector) if isinstance(m, nn.BatchNorm1d)]
    keys = {f"projector.{i}.weight": f"dense.{j}.weight" for j, i in enumerate(lins)}
    for j, i in enumerate(bns):
        last = j == len(bns) - 1
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            keys[f"projector.{i}.{k}"] = f"bn.{j}.{k}" if not last else f"bn_out.{k}"
        if last:
            keys[f"projector.{i}.weight"] = "gamma_out"
            del keys[f"projector.{i}.bias"]
    return keys


def test_real_resnet18_cifar_preset_step(tmp_path, monkeypatch, float64):
    """The CIFAR preset (v1: ResNet-18 with the CIFAR stem, tau 0.5, wd 1e-6) on 16 px images,
    batch 8, two steps against the official network built here (torchvision's resnet18 with the
    official CIFAR stem, the projection head restated) loaded by state_dict: one step at the
    preset's weight decay, one at WD (leaving the decay out, or out of the trust norm, fails)."""
    flags = ["--preset", "cifar", "--version", "v1", "--arch", "resnet18", "--img-size", 16]
    flags += ["--batch-size", 8, "--subset", 16, "--epochs", 10, "--warmup-epochs", 0]
    flags += ["--lr", 2.0]  # x 8/256: LARS moves conv weights ~0.1% a step, BN parameters ~1%
    torch.manual_seed(0)
    model, opt, args, _ = built_by_main(simclr, monkeypatch, tmp_path, *flags)
    table = OFFICIAL[("--preset", "cifar", "--version", "v1")]
    layers, tau, wd = (official(table, k) for k in ("proj_layers", "tau", "wd"))
    backbone, head = official_resnet18_cifar(), OfficialHead(512, 128, layers)
    backbone.load_state_dict(model.backbone.state_dict(), strict=True)
    keys = head_key_map(model.projector)
    state = model.projector.state_dict()
    assert not state[f"{len(model.projector) - 1}.bias"].any()  # the absent beta stays 0
    state = {keys["projector." + k]: v for k, v in state.items() if "projector." + k in keys}
    head.load_state_dict(state, strict=True)  # wrong widths or an extra BN beta fail here
    ref = nn.ModuleDict({"backbone": backbone, "head": head})
    lars = OfficialLARS(ref, wd, official(table, "momentum"), bn_names=["head.gamma_out"])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(3)
    for step, step_wd in enumerate([wd, WD]):
        lars.wd = step_wd
        opt.param_groups[0]["weight_decay"] = step_wd  # the decayed group (C.param_groups)
        x1, x2 = torch.rand(2, 8, 3, 16, 16, generator=g)
        lr = official_lr(step, 2.0, 8, 16, 0, 10, official(table, "lr_scaling"))
        assert args.sched["lr"][step] == pytest.approx(lr, rel=1e-12)
        loss = official_loss(head(backbone(torch.cat([x1, x2]))), tau)
        for _, p in lars.params:
            p.grad = None
        loss.backward()
        lars.step(lr)
        stats = simclr.train_step(model, ([x1, x2], None, None), opt, scaler, step, args)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
    names = {f"backbone.{k}": f"backbone.{k}" for k in backbone.state_dict()}
    names.update({k: f"head.{v}" for k, v in keys.items()})
    refp, refb = dict(ref.named_parameters()), dict(ref.named_buffers())
    for name, p in model.named_parameters():
        if name in names:
            close(p.detach(), refp[names[name]].detach(), name)
            close(opt.state[p]["mu"], lars.v[names[name]], f"momentum of {name}")
    for name, b in model.named_buffers():  # running_var: the Bessel deviation (test above)
        if name.endswith("running_mean"):
            close(b, refb[names[name]], name)


# ---- two processes: the cross-replica loss and global BN -------------------------------------
def two_process_step(out_dir: str) -> dict:
    """In each of 2 gloo processes: the project's train_step under DDP (SyncBN as main() sets it)
    and the official step restated (cross-replica concat WITH gradient, replica-offset labels
    and masks, cross-replica BN moments, CrossShardOptimizer's mean of the replicas' gradients)
    on this process's half of one global batch of 8."""
    args = C.parse_args(simclr.Args, [*TINY, "--out-dir", out_dir, "--preset", "imagenet"])
    args.batch_size = 8
    C.setup_ddp(args)
    args.sched = {"lr": [0.0]}  # gradients only: the step leaves the weights as they are
    table = IN["v1"]
    torch.manual_seed(0)
    model = simclr.SimCLR(args)
    ref = official_model(model)
    model = C.convert_sync_bn(model)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(2, 8, 3, 16, 16, generator=g)
    x2[:4] *= 0.5  # the two processes see differently distributed data
    mine = slice(4 * args.rank, 4 * args.rank + 4)
    x1, x2 = x1[mine], x2[mine]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = simclr.train_step(ddp, ([x1, x2], None, None), opt, scaler, 0, args)
    h = ref.backbone(torch.cat([x1, x2]))
    loss = official_loss(
        official_head(ref, h, official(table, "proj_layers")), official(table, "tau")
    )
    loss.backward()
    grads = {}
    for n, p in ref.named_parameters():
        if p.grad is not None:  # CrossShardOptimizer(reduction=MEAN): the replicas' mean
            dist.all_reduce(p.grad)
            grads[n] = p.grad / dist.get_world_size()
    return {
        "loss": (stats["loss"], loss.detach()),
        "grads": ({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, grads),
        "mean": ({n: b for n, b in model.named_buffers() if n.endswith("running_mean")},
                 {n: b for n, b in ref.named_buffers() if n.endswith("running_mean")}),
    }  # fmt: skip


def test_two_processes_equal_the_official_cross_replica_step(tmp_path):
    ranks = spawn(two_process_step, 2, tmp_path, str(tmp_path))
    for r in ranks:
        close(*r["loss"], "loss")
        got, want = r["grads"]
        assert got.keys() == want.keys() and len(got) > 10
        for n in got:
            close(got[n], want[n], f"gradient of {n}", rtol=1e-4)
        for n, b in r["mean"][0].items():
            close(b, r["mean"][1][n], n)
    assert ranks[0]["loss"][0] != ranks[1]["loss"][0]  # each process: its own anchors
