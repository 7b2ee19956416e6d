"""SwAV official-loop parity: facebookresearch/swav main_swav.py's training step, restated here in
plain PyTorch from the official code (cited per block), runs beside swav.train_step with the
optimizer and lr schedule that swav.main builds, from the same initial weights on the same
multi-crop batches: losses, every parameter, every buffer (BN statistics, the queue) and the
momentum buffers agree to float precision; in one process, in two gloo processes (the official
distributed_sinkhorn's all_reduces, per-rank queues, SyncBN), on the small test network and on
src/resnet50.py's ResNet-50 restated. The official side takes its constants from OFFICIAL (or
from the literal a test writes), calls nothing of swav.py's loss, Sinkhorn, queue, prototype,
optimizer or schedule code, and shares only the inputs and the initial weights."""

import copy
import math
import os
from types import SimpleNamespace

import helpers
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
import torchvision
from helpers import Dev, Ref, official, one_thread  # noqa: F401 (one_thread: autouse)
from test_ddp import spawn
from torch import nn

import common as C
import swav

# ==== official values =======================================================================
S800 = "ref: swav scripts/swav_800ep_pretrain.sh"
MAIN = "ref: swav main_swav.py argparse"
LIN = "ref: swav eval_linear.py"
SEMI = "ref: swav eval_semisup.py"
IMAGENET = {
    "arch": Ref("resnet50", f"[SwAV §4.1; {S800} --arch resnet50; src/resnet50.py]"),
    "zero_init_residual": Ref(False, "[ref: src/resnet50.py ResNet(zero_init_residual=False)]"),
    "epochs": Ref(800, f"[SwAV Tab. 1 (75.3%); {S800} --epochs 800]"),
    "batch_size": Ref(4096, f"[SwAV §4.1; {S800} --batch_size 64 x #SBATCH --gpus=64]"),
    "lr": Ref(4.8, f"[{S800} --base_lr 4.8 (absolute: main_swav.py does not scale it)]"),
    "final_lr": Ref(0.0048, f"[{S800} --final_lr 0.0048]"),
    "warmup_epochs": Ref(10, f"[{S800} --warmup_epochs 10]"),
    "start_warmup": Ref(0.3, f"[{S800} --start_warmup 0.3]"),
    "wd": Ref(1e-6, f"[{S800} --wd 0.000001; main_swav.py SGD(model.parameters()) + LARC]"),
    "tau": Ref(0.1, f"[SwAV Eq. 2; {S800} --temperature 0.1]"),
    "eps": Ref(0.05, f"[SwAV §3.1; {S800} --epsilon 0.05]"),
    "sinkhorn_iters": Ref(3, f"[SwAV §3.1; {S800} --sinkhorn_iterations 3]"),
    "dim": Ref(128, f"[SwAV §4.1; {S800} --feat_dim 128]"),
    "hidden_dim": Ref(2048, f"[{MAIN} --hidden_mlp 2048; src/resnet50.py projection_head]"),
    "n_prototypes": Ref(3000, f"[SwAV §4.1; {S800} --nmb_prototypes 3000]"),
    "queue_length": Ref(0, f"[{S800} --queue_length 0: no queue at batch 4096]"),
    "epoch_queue_starts": Ref(15, f"[{MAIN} --epoch_queue_starts 15 (unused with no queue)]"),
    "freeze_prototypes_niters": Ref(313, f"[{S800} --freeze_prototypes_niters 313]"),
    "n_local": Ref(6, f"[SwAV §3.2; {S800} --nmb_crops 2 6]"),
    "local_size": Ref(96, f"[SwAV §3.2; {S800} --size_crops 224 96]"),
    "global_scale": Ref((0.14, 1.0), f"[{S800} --min_scale_crops 0.14 --max_scale_crops 1.]"),
    "local_scale": Ref((0.05, 0.14), f"[{S800} --min_scale_crops . 0.05 --max_scale_crops . 0.14]"),
    "blur": Ref(True, "[ref: src/multicropdataset.py PILRandomGaussianBlur(p=0.5), every crop]"),
    "linear_epochs": Ref(100, f"[{LIN} --epochs 100]"),
    "linear_lr": Ref(0.3, f"[{LIN} --lr 0.3 at 32 x 8 GPUs (README command)]"),
    "linear_wd": Ref(1e-6, f"[{LIN} --wd 1e-6]"),
    "linear_batch_size": Ref(256, f"[{LIN} --batch_size 32 per GPU; README nproc_per_node=8]"),
    "linear_nesterov": Ref(False, f"[{LIN} --nesterov False]"),
    "linear_milestones": Ref((), f"[{LIN} --scheduler_type cosine (step: --decay_epochs)]"),
    "linear_decay": Ref(0.1, f"[{LIN} --gamma 0.1 (step schedule only)]"),
    "linear_epoch_lr": Ref(True, f"[{LIN} CosineAnnealingLR, scheduler.step() per epoch]"),
    "linear_best": Ref(True, f"[{LIN} best_acc, the log's 'Test accuracy']"),
    "linear_zero_init": Ref(False, f"[{LIN} RegLog: normal_(0, 0.01), bias zero_(), use_bn False]"),
    "ft_optimizer": Ref("sgd", f"[{SEMI} SGD momentum 0.9, weight_decay 0]"),
    "ft_lr_scaling": Ref(
        "linear", f"[{SEMI}: lr given at 32 x 8 = 256; README commands; x1 at batch 256]"
    ),
    "ft_epochs": Ref((20, 20), f"[{SEMI} --epochs 20; README 1% and 10% commands]"),
    "ft_batch_size": Ref(256, f"[{SEMI} --batch_size 32 per GPU; README nproc_per_node=8]"),
    "ft_lr": Ref((0.02, 0.01), "[ref: swav README semi-supervised: 1% --lr 0.02, 10% --lr 0.01]"),
    "ft_head_lr": Ref((5.0, 0.2), "[ref: swav README: 1% --lr_last_layer 5, 10% 0.2]"),
    "ft_milestones": Ref((12, 16), f"[{SEMI} --decay_epochs 12 16, MultiStepLR]"),
    "ft_decay": Ref(0.2, f"[{SEMI} --gamma 0.2]"),
    "ft_epoch_lr": Ref(True, f"[{SEMI} scheduler.step() once per epoch]"),
    "ft_sync_bn": Ref(True, f"[{SEMI} nn.SyncBatchNorm.convert_sync_batchnorm(model)]"),
    "ft_head_init": Ref("torch", f"[{SEMI} resnet50(output_dim=1000): nn.Linear's own init]"),
    "ft_best": Ref(True, f"[{SEMI} best_acc]"),
}
SOLO = "ref: solo-learn scripts/pretrain/cifar-multicrop/swav.yaml"
SOLO_AUG = "ref: solo-learn scripts/pretrain/cifar-multicrop/augmentations/swav.yaml"
# no official CIFAR run: solo-learn's multi-crop CIFAR config; the lr pair is also the official
# batch-256 scripts' (scripts/swav_400ep_bs256_pretrain.sh --base_lr 0.6 --final_lr 0.0006)
CIFAR = {
    **IMAGENET,
    "arch": Ref("resnet18", f"[{SOLO} backbone resnet18 (CIFAR stem)]"),
    "epochs": Ref(1000, f"[{SOLO} max_epochs 1000]"),
    "batch_size": Ref(256, f"[{SOLO} optimizer.batch_size 256]"),
    "lr": Ref(0.6, f"[{SOLO} lr 0.6; swav_400ep_bs256_pretrain.sh --base_lr 0.6]"),
    "final_lr": Ref(0.0006, f"[{SOLO} min_lr 0.0006; swav_400ep_bs256 --final_lr 0.0006]"),
    "warmup_epochs": Ref(10, "[ref: solo-learn solo/methods/base.py scheduler.warmup_epochs 10]"),
    "start_warmup": Dev(
        0.0,
        3e-5,
        "main_swav.py's default --start_warmup 0 instead of solo-learn's warmup_start_lr 3e-5 "
        "(base.py): the warm-up ramps differ by under 3e-5, 5e-5 of the peak lr 0.6",
    ),
    "wd": Ref(1e-6, f"[{SOLO} weight_decay 1e-6; as {S800}]"),
    "tau": Ref(0.1, f"[{SOLO} temperature 0.1]"),
    "eps": Ref(0.05, "[ref: solo-learn solo/methods/swav.py sk_epsilon default 0.05]"),
    "sinkhorn_iters": Ref(3, "[ref: solo-learn solo/methods/swav.py sk_iters default 3]"),
    "dim": Ref(128, f"[{SOLO} proj_output_dim 128]"),
    "hidden_dim": Ref(2048, f"[{SOLO} proj_hidden_dim 2048]"),
    "n_prototypes": Ref(3000, f"[{SOLO} num_prototypes 3000]"),
    "queue_length": Ref(3840, f"[{SOLO} queue_size 3840]"),
    "epoch_queue_starts": Ref(50, f"[{SOLO} epoch_queue_starts 50]"),
    "freeze_prototypes_niters": Ref(
        390, f"[{SOLO} freeze_prototypes_epochs 2 = 2 x (50000 // 256 = 195) steps]"
    ),
    "n_local": Ref(6, f"[{SOLO_AUG} num_crops 6 (crop_size 18)]"),
    "local_size": Dev(
        14,
        18,
        "local side 3/7 of img_size, SwAV's 96/224, instead of solo-learn's crop_size 18: "
        "196 instead of 324 pixels per local crop",
    ),
    "global_scale": Ref((0.2, 1.0), f"[{SOLO_AUG} crop_min_scale 0.2, crop_max_scale 1.0]"),
    "local_scale": Ref((0.08, 0.5), f"[{SOLO_AUG} crop_min_scale 0.08, crop_max_scale 0.5]"),
    "blur": Dev(
        False,
        True,
        "no blur at 32 px: solo-learn blurs the 6 local crops with p 0.1 (the global ones 0.0), "
        "main_swav.py every crop with p 0.5; one local crop in 10 differs",
    ),
    "linear_batch_size": Dev(
        512,
        256,
        "no official CIFAR linear protocol: eval_linear.py's at batch 512 as the other methods' "
        "CIFAR presets, lr 0.3 x 512 / 256 (the linear rule)",
    ),
}
OFFICIAL = {
    ("--preset", "imagenet", "--dataset", "imagenet"): IMAGENET,
    ("--preset", "cifar"): CIFAR,
}


def constants(**literals):
    """The official ImageNet values (OFFICIAL), with the literals a test writes over them."""
    entry = OFFICIAL[("--preset", "imagenet", "--dataset", "imagenet")]
    return SimpleNamespace(**{**{f: official(entry, f) for f in entry}, **literals})


# the smallcnn runs' literals: 2 steps per epoch (16 images / batch 8): warm-up steps 0-3, cosine
# from step 4; the queue (2 batches) is filled at steps 2-3 and used at step 4; prototypes frozen
# at steps 0-2. Everything else at the ImageNet preset's values (lr 4.8, start 0.3, wd 1e-6, ...)
B, LOCAL, STEPS = 8, 2, 5
SMALL = {"batch_size": B, "hidden_dim": 32, "dim": 8, "n_prototypes": 16, "n_local": LOCAL}
SMALL.update(epochs=10, warmup_epochs=2, queue_length=2 * B, epoch_queue_starts=1)
SMALL.update(freeze_prototypes_niters=3)
FLAGS = ["--preset", "imagenet", "--arch", "smallcnn", "--subset", 16]
for _k, _v in SMALL.items():
    FLAGS += [f"--{_k.replace('_', '-')}", _v]


def built_by_main(monkeypatch, tmp_path, *flags):
    """swav.main as it runs, stopped where it calls fit: the model, optimizer and args."""
    return helpers.built_by_main(swav, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
def crops_forward(backbone, head, inputs):
    """[ref: src/resnet50.py ResNet.forward + forward_head] the crops in runs of equal resolution
    (torch.unique_consecutive of the widths, cumsum), one backbone pass per run, concatenated;
    then projection_head, l2-normalise (normalize=True), prototypes (no bias)."""
    widths = torch.tensor([x.shape[-1] for x in inputs])
    ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0).tolist()
    feats = [backbone(torch.cat(inputs[s:e])) for s, e in zip([0, *ends[:-1]], ends)]
    x = F.normalize(head.projection_head(torch.cat(feats)), dim=1, p=2)
    return x, head.prototypes(x)


class OfficialNet(nn.Module):
    """The official head [ref: src/resnet50.py projection_head, prototypes] on the test's small
    backbone (a copy of the project's smallcnn, 256 wide: the network under test is the head)."""

    def __init__(self, backbone, in_dim, hidden, dim, k):
        super().__init__()
        self.backbone = backbone
        self.projection_head = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )
        self.prototypes = nn.Linear(dim, k, bias=False)

    def forward(self, inputs):
        return crops_forward(self.backbone, self, inputs)


class OfficialResNet50(nn.Module):
    """[ref: src/resnet50.py resnet50(normalize=True, hidden_mlp, output_dim, nmb_prototypes)]:
    torchvision's Bottleneck ResNet-50 layers with the official stem (ConstantPad2d(1) then a
    7x7 stride-2 conv with padding 2: 'change padding 3 -> 2 ... because added a padding layer'),
    no fc; projection_head Linear-BN-ReLU-Linear (biases), prototypes Linear without bias."""

    def __init__(self, hidden, dim, k):
        super().__init__()
        tv = torchvision.models.resnet50()
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1, self.relu, self.maxpool = tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            tv.layer1,
            tv.layer2,
            tv.layer3,
            tv.layer4,
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.projection_head = nn.Sequential(
            nn.Linear(2048, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )
        self.prototypes = nn.Linear(dim, k, bias=False)

    def forward_backbone(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, inputs):
        return crops_forward(self.forward_backbone, self, inputs)


class OfficialSyncBN(nn.modules.batchnorm._BatchNorm):
    """[ref: main_swav.py --sync_bn pytorch: nn.SyncBatchNorm.convert_sync_batchnorm] torch's
    SyncBatchNorm (CUDA only) restated for gloo: batch moments over every process's rows (an
    all_reduce whose backward all-reduces the gradient), running var unbiased over them all."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = dist_fn.all_reduce(x.sum(dims)) / count
        var = dist_fn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * count / (count - 1))
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


def official_sync_bn(module):
    """Every BatchNorm of `module` -> OfficialSyncBN with its state (convert_sync_batchnorm)."""
    for name, c in module.named_children():
        if isinstance(c, nn.modules.batchnorm._BatchNorm):
            new = OfficialSyncBN(c.num_features, c.eps, c.momentum)
            new.load_state_dict(c.state_dict())
            setattr(module, name, new)
        else:
            official_sync_bn(c)
    return module


@torch.no_grad()
def distributed_sinkhorn(out, epsilon, n_iters, world_size):
    """[ref: main_swav.py distributed_sinkhorn] with its all_reduces (skipped in one process)."""

    def all_reduce(t):
        if world_size > 1:
            dist.all_reduce(t)
        return t

    Q = torch.exp(out / epsilon).t()  # [K, B]
    Bn, K = Q.shape[1] * world_size, Q.shape[0]  # B: the samples of EVERY process
    Q /= all_reduce(torch.sum(Q))
    for _ in range(n_iters):
        Q /= all_reduce(torch.sum(Q, dim=1, keepdim=True))  # each prototype row -> total 1 ...
        Q /= K  # ... then 1/K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # each sample column (local) -> 1 ...
        Q /= Bn  # ... then 1/B
    Q *= Bn  # columns sum to 1: assignments
    return Q.t()


class ApexLARC:
    """[ref: NVIDIA apex parallel/LARC.py LARC.step; main_swav.py: LARC(SGD(all params, momentum
    0.9, weight_decay=wd), trust_coefficient=0.001, clip=False); eps 1e-8 default]: the wrapped
    SGD's weight decay is taken out of it and folded into the adapted gradient of EVERY param."""

    def __init__(self, optim, trust_coefficient=0.001, eps=1e-8):
        self.optim, self.tc, self.eps = optim, trust_coefficient, eps
        self.param_groups = optim.param_groups

    @torch.no_grad()
    def step(self):
        decays = []
        for group in self.optim.param_groups:
            decays.append(group["weight_decay"])
            wd, group["weight_decay"] = group["weight_decay"], 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                if p_norm != 0 and g_norm != 0:
                    adaptive_lr = self.tc * p_norm / (g_norm + p_norm * wd + self.eps)
                    p.grad.data += wd * p.data
                    p.grad.data *= adaptive_lr
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd


def official_lr_schedule(c, iters_per_epoch):
    """[ref: main_swav.py main] np.linspace warm-up, then cosine over the remaining iterations."""
    warm = np.linspace(c.start_warmup, c.lr, iters_per_epoch * c.warmup_epochs)
    n = iters_per_epoch * (c.epochs - c.warmup_epochs)
    cos = [
        c.final_lr + 0.5 * (c.lr - c.final_lr) * (1 + math.cos(math.pi * t / n)) for t in range(n)
    ]
    return np.concatenate((warm, np.array(cos)))


class OfficialLoop:
    """[ref: main_swav.py main + train] c: the constants (OFFICIAL's, or a test's literals). The
    state across iterations: the queue (None until the epoch epoch_queue_starts begins, then zeros
    [2, queue_length / world_size, feat_dim], per process) and use_the_queue (reset to False at
    the start of every train() call, i.e. every epoch). `model`: the net, or its DDP wrapper."""

    def __init__(self, model, c, iters_per_epoch, world_size=1):
        self.model, self.c, self.ipe, self.world = model, c, iters_per_epoch, world_size
        self.net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        sgd = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=0.9, weight_decay=c.wd)
        self.optimizer = ApexLARC(sgd, trust_coefficient=0.001)
        self.lr_schedule = official_lr_schedule(c, iters_per_epoch)
        self.queue, self.use_the_queue, self.crops_for_assign = None, False, [0, 1]
        self.grads = {}  # the raw (averaged) gradients of the last step, before LARC

    def step(self, inputs, iteration):
        c, net = self.c, self.net
        epoch, it = divmod(iteration, self.ipe)
        if it == 0:  # [ref: main loop] "optionally starts a queue"; train() resets use_the_queue
            if c.queue_length > 0 and epoch >= c.epoch_queue_starts and self.queue is None:
                self.queue = torch.zeros(2, c.queue_length // self.world, c.dim)
            self.use_the_queue = False
        # [ref: train] "update learning rate"
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule[iteration]
        # [ref: train] "normalize the prototypes"
        with torch.no_grad():
            w = F.normalize(net.prototypes.weight.data.clone(), dim=1, p=2)
            net.prototypes.weight.copy_(w)
        # [ref: train] multi-res forward passes
        embedding, output = self.model(inputs)
        embedding, bs, n_crops = embedding.detach(), inputs[0].size(0), len(inputs)
        # [ref: train] swav loss: per assigned crop, codes (with the queue), then the queue fill
        loss = 0
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id : bs * (crop_id + 1)].detach()
                if self.queue is not None:
                    if self.use_the_queue or not torch.all(self.queue[i, -1, :] == 0):
                        self.use_the_queue = True
                        out = torch.cat((self.queue[i] @ net.prototypes.weight.t(), out))
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
                q = distributed_sinkhorn(out, c.eps, c.sinkhorn_iters, self.world)[-bs:]
            subloss = 0
            for v in np.delete(np.arange(n_crops), crop_id):
                x = output[bs * v : bs * (v + 1)] / c.tau
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (n_crops - 1)
        loss /= len(self.crops_for_assign)
        # [ref: train] backward, "cancel gradients for the prototypes", step
        self.optimizer.optim.zero_grad()
        loss.backward()
        if iteration < c.freeze_prototypes_niters:
            for name, p in net.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        self.grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        self.optimizer.step()
        return loss.detach()


# ==== parity ================================================================================
# The projection head's first bias feeds a BatchNorm, which subtracts it again: its gradient is
# zero but for rounding (~1e-8 of its weight's), and LARC rescales that noise to a step of
# lr x 0.001 x |bias| (in the official code as here), so the two runs move it in different
# random directions. It is checked by that bound instead, the gradient by its size, and the
# BN's running mean (which the bias shifts) after removing the predicted shift.
NOISE, NOISE_BN = "projector.0.bias", "projector.1.running_mean"


def official_name(name, resnet=False):
    name = name.replace("projector.", "projection_head.")
    return name.replace("backbone.", "") if resnet else name


def load_official(net, model, resnet=False):
    """The project's initial weights into the official net by name (strict: a missing, extra or
    differently shaped tensor fails); the queue is the loop's, not the net's."""
    state = {official_name(k, resnet): v for k, v in model.state_dict().items() if k != "queue"}
    net.load_state_dict(state)
    return net


def run_both(model, optimizer, args, ref, batches, resnet=False):
    """swav.train_step and the official loop step by step on the same crops: loss, lr, queue use,
    raw gradients, parameters, momentum buffers and buffers (BN statistics, the queue)."""
    net, scaler = C.unwrap(model), torch.amp.GradScaler("cpu", enabled=False)  # as fit (no fp16)
    p_ref, b_ref = dict(ref.net.named_parameters()), dict(ref.net.named_buffers())
    state = ref.optimizer.optim.state
    shift, bound = 0.0, 0.0
    for step, views in enumerate(batches):
        bias = p_ref[official_name(NOISE, resnet)].detach()
        shift = 0.9 * shift + 0.1 * (net.projector[0].bias.detach() - bias)  # BN momentum 0.1
        bound += 2 * ref.lr_schedule[step] * 0.001 * bias.norm().item() / (1 - 0.9)
        stats = swav.train_step(model, (views, None, None), optimizer, scaler, step, args)
        loss = ref.step([v.clone() for v in views], step)
        helpers.close_rel(stats["loss"], loss, f"loss at step {step}")
        assert optimizer.param_groups[0]["lr"] == ref.lr_schedule[step] == args.sched["lr"][step]
        assert stats["queue"] == float(ref.use_the_queue)
        w = official_name("projector.0.weight", resnet)
        assert ref.grads[official_name(NOISE, resnet)].norm() < 1e-5 * ref.grads[w].norm()
        for n, p in net.named_parameters():
            r = p_ref[official_name(n, resnet)]
            assert (p.grad is None) == (official_name(n, resnet) not in ref.grads), n
            assert (p in optimizer.state) == ("momentum_buffer" in state.get(r, {})), n
            if n == NOISE:
                assert (p - r).norm() <= bound, f"{n}: {(p - r).norm()} > {bound}"
                continue
            if p.grad is not None:
                helpers.close_rel(p.grad, ref.grads[official_name(n, resnet)], f"grad {n} {step}")
            helpers.close_rel(p.detach(), r.detach(), f"{n} after step {step}")
            if p in optimizer.state:
                m_ref = state[r]["momentum_buffer"]
                helpers.close_rel(optimizer.state[p]["momentum_buffer"], m_ref, f"m {n} {step}")
        for n, b in net.named_buffers():
            want = ref.queue if n == "queue" else b_ref[official_name(n, resnet)]
            if n == "queue" and ref.queue is None:  # not created yet: the buffer stays empty
                want = torch.zeros_like(b)
            helpers.close_rel(b - shift if n == NOISE_BN else b, want, f"{n} after step {step}")
    return stats


def small_batches(rank=0, world=1):
    """STEPS global multi-crop batches (2 x 16 px + LOCAL x 8 px), this process's rows; the
    second half of the batch brighter, so the processes' rows differ in distribution."""
    g, b, out = torch.Generator().manual_seed(0), B // world, []
    for _ in range(STEPS):
        views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
        views += [torch.randn(B, 3, 8, 8, generator=g) for _ in range(LOCAL)]
        for v in views:
            v[B // 2 :] = 0.5 * v[B // 2 :] + 0.3
        out.append([v[rank * b : (rank + 1) * b] for v in views])
    return out


def official_small(model, c):
    """The official head on a copy of the project's small backbone, the project's weights."""
    net = OfficialNet(copy.deepcopy(model.backbone), 256, c.hidden_dim, c.dim, c.n_prototypes)
    return load_official(net, model)


def test_train_step_matches_the_official_loop(monkeypatch, tmp_path):
    """The preset's values (wd 1e-6) over 5 steps: warm-up, cosine, queue, frozen prototypes."""
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS)
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.img_size == 16
    c = constants(**SMALL)
    ref = OfficialLoop(official_small(model, c), c, iters_per_epoch=16 // B)
    stats = run_both(model, optimizer, args, ref, small_batches())
    # the test covered what it claims: the queue used at the last step, prototypes trained
    assert ref.use_the_queue and stats["queue"] == 1.0
    assert model.prototypes.weight in optimizer.state
    assert [round(x, 6) for x in args.sched["lr"][:5]] == [0.3, 1.8, 3.3, 4.8, 4.8]


def test_large_weight_decay_step_matches_the_official_loop(monkeypatch, tmp_path):
    """wd 0.05, where wd x |p| is a few % of |g|: LARC folds the decay into the adapted gradient
    AND the trust ratio's denominator; the momentum buffers show both. 2 steps (from the third
    on, this tiny net's BN statistics at lr 3.3 amplify rounding beyond float precision)."""
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS, "--wd", 0.05)
    c = constants(**SMALL, wd=0.05)
    ref = OfficialLoop(official_small(model, c), c, iters_per_epoch=16 // B)
    run_both(model, optimizer, args, ref, small_batches()[:2])
    params = dict(ref.net.named_parameters())
    ratio = [0.05 * params[n].norm() / g.norm() for n, g in ref.grads.items()]
    assert max(ratio) > 0.01  # the decay is a visible part of the step


def ddp_parity(tmp, flags):
    """In each of 2 gloo processes: swav.main's model and LARC under DDP (as fit wraps it) beside
    the official loop under DDP with its SyncBN and distributed_sinkhorn, on this process's half
    of the same global batches (asserted here, per process) -> this process's queue. Float64
    (helpers.float64's reason): in fp32, 5 steps at lr up to 4.8 left 4 of 73,728 gradient
    entries at 1.2e-5 of the largest on torch 2.4.1."""
    with helpers.float64():
        rank, got = dist.get_rank(), {}
        swav.fit = lambda model, opt, data, args: got.update(m=model, o=opt)
        args = helpers.tiny_args(swav, os.path.join(tmp, f"rank{rank}"), *flags)
        swav.main(args)
        model, optimizer = got["m"], got["o"]
        assert args.world_size == 2 and args.batch_size_per_gpu == B // 2
        c = constants(**SMALL)
        net = official_sync_bn(official_small(model, c))
        ref = OfficialLoop(nn.parallel.DistributedDataParallel(net), c, 16 // B, world_size=2)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        stats = run_both(ddp, optimizer, args, ref, small_batches(rank, 2))
        assert stats["queue"] == 1.0 and ref.queue.shape == (2, B, c.dim)  # queue_length / 2 rows
        return {"queue": model.queue.clone()}


def test_two_processes_match_the_official_distributed_loop(tmp_path):
    """The global Sinkhorn (sum of Q, prototype row sums all-reduced, B = batch x world), the
    per-process queues (filled, then used), SyncBN and DDP's averaged gradients."""
    ranks = spawn(ddp_parity, 2, tmp_path, str(tmp_path), FLAGS)
    assert not torch.allclose(ranks[0]["queue"], ranks[1]["queue"])  # each process its own


def test_resnet50_step_matches_the_official_network(monkeypatch, tmp_path):
    """src/resnet50.py's ResNet-50 (its padded stem, projection head, prototypes) at the preset
    (lr 0.3, the warm-up's start; wd 1e-6; prototypes frozen; 2048-128-3000 head), batch 4 of
    2 x 32 px + 2 x 16 px crops, one step; the model built for 224 px (the ImageNet stem)."""
    flags = ["--preset", "imagenet", "--arch", "resnet50", "--img-size", 224, "--subset", 8]
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *flags, "--batch-size", 4)
    c = constants()
    net = load_official(OfficialResNet50(c.hidden_dim, c.dim, c.n_prototypes), model, resnet=True)
    ref = OfficialLoop(net, c, iters_per_epoch=8 // 4)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]]
    run_both(model, optimizer, args, ref, batches, resnet=True)
    assert ref.lr_schedule[0] == 0.3 and c.freeze_prototypes_niters > 1
    assert model.prototypes.weight.grad is None  # frozen at the preset's first 313 steps


def test_lr_schedule_is_the_official_one_at_the_presets():
    """The whole per-step schedule of both presets at their real steps per epoch (ImageNet:
    1281167 // 4096; CIFAR-10: 50000 // 256) against main_swav.py's numpy one, built from
    OFFICIAL's values."""
    for flags, spe in zip(OFFICIAL, (1281167 // 4096, 50000 // 256)):
        a = C.parse_args(swav.Args, list(flags))
        a.steps_per_epoch, a.total_steps = spe, spe * a.epochs
        c = SimpleNamespace(**{f: official(OFFICIAL[flags], f) for f in OFFICIAL[flags]})
        got, want = np.array(swav.lr_schedule(a)), official_lr_schedule(c, spe)
        assert got.shape == want.shape == (a.total_steps,)
        # CIFAR: the warm-up from 0, not solo-learn's 3e-5 (OFFICIAL's Dev), 3e-5 apart at most
        atol = 1e-15 if flags[1] == "imagenet" else 3e-5
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=atol)
        w = spe * c.warmup_epochs  # base reached at the last warm-up step, and again after it
        assert got[w - 1] == got[w] == c.lr
