"""Official-loop parity for moco.py.

MoCo v1/v2: the training step of facebookresearch/moco (moco/builder.py MoCo.forward and its
DDP helpers concat_all_gather / _batch_shuffle_ddp / _batch_unshuffle_ddp, main_moco.py train /
adjust_learning_rate and its torch.optim.SGD) and of its CIFAR-10 colab (colab/
moco_cifar10_demo.ipynb: SplitBatchNorm, ModelBase, ModelMoCo) restated in plain PyTorch.
MoCo v3: facebookresearch/moco-v3 (moco/builder.py MoCo.forward / contrastive_loss / _build_mlp,
moco/optimizer.py LARS, vits.py VisionTransformerMoCo over timm's VisionTransformer, main_moco.py
train / adjust_learning_rate / adjust_moco_momentum, its torchvision resnet50 and
torch.optim.AdamW); the CIFAR preset takes solo-learn's backbone and optimizer, restated from
vturrisi/solo-learn (solo/methods/base.py, solo/utils/lars.py, solo/utils/lr_scheduler.py). Each
reference runs beside the project's real `train_step` (model, optimizer and `args.sched` exactly
as `moco.main` builds them) for a few CPU steps from the same weights on the same inputs; v1/v2
also in 2 gloo processes, each side with its own collectives and DDP. Nothing below calls the
project's loss, optimizer, schedule, EMA, queue ops, split BN, heads or ViT; only initial weights
(deep copies of the small test CNN, or state_dicts loaded into the networks built here), the
initial queue and the inputs are shared.
"""

import copy
import math
import os
import re
import warnings
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from helpers import FT_SIMCLR_V2, TINY, Dev, Ref, built_by_main, official, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import spawn
from torch import nn

import common as C
import moco

# ---- the official values, pinned: one entry per preset x version (x ViT) --------------------
MOCO, V3R = "ref: facebookresearch/moco", "ref: facebookresearch/moco-v3"
COLAB, SOLO = f"{MOCO} colab/moco_cifar10_demo.ipynb", "ref: vturrisi/solo-learn"
LIN1, LIN3 = f"{MOCO} main_lincls.py", f"{V3R} main_lincls.py"
PER256 = "the project's --lr is per 256 and x batch/256 at run time"
IMAGENET_V1 = {
    "version": Ref("v1", f"[MoCo §3; {MOCO} main_moco.py without --mlp --aug-plus --cos]"),
    "arch": Ref("resnet50", f"[MoCo §4.1; {MOCO} README -a resnet50]"),
    "epochs": Ref(200, f"[MoCo §4.1 Training; {MOCO} main_moco.py --epochs 200]"),
    "batch_size": Ref(256, f"[MoCo §4.1: 256 on 8 GPUs; {MOCO} README --batch-size 256]"),
    "lr": Ref(
        0.03,
        f"[MoCo §4.1; {MOCO} README --lr 0.03 at --batch-size 256, absolute (README: 'linear lr "
        f"scaling', --lr 0.015 at 128, by hand)]; {PER256}: the same value at 256",
    ),
    "wd": Ref(1e-4, f"[MoCo §4.1; {MOCO} main_moco.py --wd 1e-4, SGD(model.parameters())]"),
    "optimizer": Ref("sgd", f"[{MOCO} main_moco.py torch.optim.SGD(momentum=0.9)]"),
    "schedule": Ref("step", f"[{MOCO} main_moco.py adjust_learning_rate without --cos]"),
    "lr_milestones": Ref((120, 160), f"[MoCo §4.1; {MOCO} main_moco.py --schedule 120 160]"),
    "warmup_epochs": Ref(0, f"[{MOCO} main_moco.py adjust_learning_rate: no warm-up]"),
    "tau": Ref(0.07, f"[MoCo §3.1; {MOCO} main_moco.py --moco-t 0.07]"),
    "m": Ref(0.999, f"[MoCo §3.2; {MOCO} main_moco.py --moco-m 0.999]"),
    "m_cos": Ref(False, f"[{MOCO} builder.py: a constant self.m]"),
    "queue_size": Ref(65536, f"[MoCo §4.1; {MOCO} main_moco.py --moco-k 65536]"),
    "dim": Ref(128, f"[MoCo §3.3; {MOCO} main_moco.py --moco-dim 128]"),
    "hidden_dim": Ref(4096, f"v3 only [{V3R} main_moco.py --moco-mlp-dim 4096]"),
    "bn_splits": Dev(
        0,
        8,
        "0 resolves at run time: 8 BN groups in one process (the colab's --bn-splits 8; "
        "main_moco.py's 8 GPUs of 32), 1 per process under DDP, where each process is one of "
        "the official GPUs; no difference in one process",
    ),
    "aug": Ref("v1", f"[MoCo §3.3; {MOCO} main_moco.py augmentation without --aug-plus]"),
    "crop_min": Ref(0.2, f"[{MOCO} main_moco.py RandomResizedCrop(224, scale=(0.2, 1.0))]"),
    "blur": Ref(True, f"v2/asym only: the v1 recipe has none [{MOCO} main_moco.py]"),
    "patch_size": Ref(16, f"ViT only [{V3R} vits.py vit_small patch_size=16]"),
    "stop_grad_conv1": Ref(True, f"ViT only [MoCo v3 §5.3; {V3R} CONFIG.md --stop-grad-conv1]"),
    "stem_padding": Ref(1, "unused at 224 px: torchvision's 7x7 stem"),
    "zero_init_residual": Ref(
        True, f"v3 only [{V3R} main_moco.py zero_init_residual=True]; v1/v2 build none"
    ),
    "lars_solo": Ref(False, f"unused by SGD; solo-learn's LARS for v3 CIFAR [{SOLO}]"),
    "linear_epochs": Ref(100, f"[{LIN1} --epochs 100]"),
    "linear_lr": Ref(30.0, f"[{LIN1} README --lr 30.0 at -b 256, absolute]; {PER256}"),
    "linear_wd": Ref(0.0, f"[{LIN1} --wd 0]"),
    "linear_batch_size": Ref(256, f"[{LIN1} -b 256]"),
    "linear_nesterov": Ref(False, f"[{LIN1} SGD momentum 0.9]"),
    "linear_milestones": Ref((60, 80), f"[{LIN1} --schedule 60 80]"),
    "linear_decay": Ref(0.1, f"[{LIN1} adjust_learning_rate x0.1]"),
    "linear_epoch_lr": Ref(True, f"[{LIN1} adjust_learning_rate(epoch)]"),
    "linear_best": Ref(True, f"[{LIN1} best_acc1]"),
    "linear_zero_init": Ref(False, f"[{LIN1} fc normal_(0, 0.01), bias zero_]"),
    **FT_SIMCLR_V2,
}
V2 = f"{MOCO} README 'To run MoCo v2, set --mlp --moco-t 0.2 --aug-plus --cos'"
IMAGENET_V2 = {
    **IMAGENET_V1,
    "version": Ref("v2", f"[MoCo v2 §2; {V2}]"),
    "schedule": Ref("cosine-epoch", f"[{V2}; main_moco.py adjust_learning_rate(epoch)]"),
    "tau": Ref(0.2, f"[MoCo v2 Tab 1; {V2}]"),
    "aug": Ref("v2", f"[MoCo v2 §2; {V2}]"),
    "blur": Ref(True, f"[{MOCO} main_moco.py --aug-plus GaussianBlur([.1, 2.]) p=0.5]"),
}
CONF = f"{V3R} CONFIG.md"
IMAGENET_V3 = {
    **IMAGENET_V1,
    "version": Ref("v3", "[MoCo v3]"),
    "epochs": Ref(100, f"[{CONF} ResNet-50, 100-epoch; main_moco.py --epochs 100]"),
    "batch_size": Ref(4096, f"[MoCo v3 §4; {V3R} main_moco.py -b 4096]"),
    "lr": Ref(0.6, f"[{V3R} main_moco.py --lr 0.6, 'args.lr * args.batch_size / 256']"),
    "wd": Ref(1e-6, f"[{V3R} main_moco.py --wd 1e-6, LARS(model.parameters())]"),
    "optimizer": Ref("lars", f"[MoCo v3 §4; {V3R} main_moco.py --optimizer lars]"),
    "schedule": Ref("cosine", f"[{V3R} main_moco.py adjust_learning_rate(epoch + i / iters)]"),
    "lr_milestones": Ref((120, 160), "unused: cosine"),
    "warmup_epochs": Ref(10, f"[{V3R} main_moco.py --warmup-epochs 10]"),
    "tau": Ref(1.0, f"[MoCo v3 §4; {V3R} main_moco.py --moco-t 1.0]"),
    "m": Ref(0.99, f"[MoCo v3 §4; {V3R} main_moco.py --moco-m 0.99]"),
    "m_cos": Ref(True, f"[{CONF} --moco-m-cos]"),
    "queue_size": Ref(0, "none: the keys of the batch [MoCo v3 §3]"),
    "dim": Ref(256, f"[{V3R} main_moco.py --moco-dim 256]"),
    "bn_splits": Ref(0, f"unused: SyncBN [{V3R} main_moco.py convert_sync_batchnorm]"),
    "aug": Ref("asym", f"[MoCo v3 §4; {V3R} main_moco.py augmentation1 / augmentation2]"),
    "crop_min": Ref(0.2, f"[{CONF} ResNet-50 --crop-min=.2]"),
    "blur": Ref(True, f"[{V3R} main_moco.py GaussianBlur p=1.0 / 0.1]"),
    "zero_init_residual": Ref(True, f"[{V3R} main_moco.py zero_init_residual=True]"),
    "linear_epochs": Ref(90, f"[{LIN3} --epochs 90]"),
    "linear_lr": Ref(0.1, f"[{LIN3} --lr 0.1, init_lr = lr * batch / 256]"),
    "linear_batch_size": Ref(1024, f"[{LIN3} -b 1024]"),
    "linear_milestones": Ref((), f"[{LIN3} adjust_learning_rate: cosine]"),
    "linear_epoch_lr": Ref(True, f"[{LIN3} adjust_learning_rate(epoch)]"),
    "linear_best": Ref(True, f"[{LIN3} best_acc1]"),
    "linear_zero_init": Ref(False, f"[{LIN3} weight normal_(0, 0.01), bias zero_]"),
    "linear_nesterov": Ref(False, f"[{LIN3} SGD momentum 0.9]"),
    "linear_wd": Ref(0.0, f"[{LIN3} --wd 0]"),
}
VIT_S = f"{CONF} ViT-Small"
IMAGENET_VIT = {
    **IMAGENET_V3,
    "arch": Ref("vit_small", f"[MoCo v3 §4; {VIT_S} -a vit_small]"),
    "epochs": Ref(300, f"[{VIT_S} --epochs=300]"),
    "batch_size": Ref(4096, f"[{VIT_S} 4-node (the models' batch 4096), -b default]"),
    "lr": Ref(1.5e-4, f"[{VIT_S} --lr=1.5e-4, per 256 in main_moco.py]"),
    "wd": Ref(0.1, f"[{VIT_S} --weight-decay=.1, AdamW(model.parameters())]"),
    "optimizer": Ref("adamw", f"[{VIT_S} --optimizer=adamw]"),
    "warmup_epochs": Ref(40, f"[{VIT_S} --warmup-epochs=40]"),
    "tau": Ref(0.2, f"[{VIT_S} --moco-t=.2]"),
    "crop_min": Ref(0.08, f"[{V3R} main_moco.py --crop-min 0.08; the ViT commands keep it]"),
    "zero_init_residual": Ref(True, "unused by the ViT"),
    "linear_lr": Ref(3.0, f"[{CONF} ViT-Small linear --lr=3]"),
}
CIFAR_V1 = {
    **IMAGENET_V1,
    "arch": Ref("resnet18", f"[{COLAB} -a resnet18, ModelBase]"),
    "epochs": Ref(200, f"[{COLAB} args.epochs = 200]"),
    "batch_size": Ref(512, f"[{COLAB} --batch-size 512]"),
    "lr": Ref(
        0.03,
        f"[{COLAB} --lr 0.06 at batch 512, absolute: 'lr: 0.06 for batch 512 (or 0.03 for "
        f"batch 256)']; {PER256}: 0.06 at 512",
    ),
    "wd": Ref(5e-4, f"[{COLAB} --wd 5e-4]"),
    "schedule": Ref(
        "cosine-epoch",
        f"[{COLAB} args.cos = True, adjust_learning_rate(epoch)]; its epochs count from 1, the "
        "project's from 0 as main_moco.py: the colab's cosine is one epoch ahead",
    ),
    "lr_milestones": Ref((120, 160), f"unused under cos [{COLAB} --schedule default 120 160]"),
    "tau": Ref(0.1, f"[{COLAB} --moco-t 0.1]"),
    "m": Ref(0.99, f"[{COLAB} --moco-m 0.99]"),
    "queue_size": Ref(4096, f"[{COLAB} --moco-k 4096]"),
    "dim": Ref(128, f"[{COLAB} --moco-dim 128]"),
    "bn_splits": Dev(
        0,
        8,
        f"[{COLAB} --bn-splits 8]: 0 resolves to 8 in one process, 1 per process under DDP "
        "(per-GPU BN); no difference in one process",
    ),
    "aug": Ref("v2", f"[{COLAB} train_transform: aug+ without blur, ColorJitter(.4, .4, .4, .1)]"),
    "crop_min": Ref(0.08, f"[{COLAB} RandomResizedCrop(32): scale (0.08, 1)]"),
    "blur": Ref(False, f"[{COLAB} train_transform: no blur]"),
    "patch_size": Ref(4, "ViT only: 8 x 8 patches at 32 px (no official CIFAR ViT)"),
    "stem_padding": Ref(1, f"[{COLAB} ModelBase conv1 kernel 3, stride 1, padding 1]"),
    "linear_lr": Ref(30.0, f"the colab has a kNN monitor only: [{LIN1} --lr 30.0]; {PER256}"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
CIFAR_V2 = {
    **CIFAR_V1,
    "version": Ref("v2", f"the colab's recipe with v2's head and tau [{V2}]"),
    "tau": Ref(0.2, f"[MoCo v2 Tab 1; {V2}]"),
}
SOLO_Y = f"{SOLO} scripts/pretrain/cifar/mocov3.yaml"
CIFAR_V3 = {
    **IMAGENET_V3,
    "arch": Ref("resnet18", f"[{SOLO_Y} backbone resnet18]"),
    "epochs": Ref(1000, f"[{SOLO_Y} max_epochs 1000]"),
    "batch_size": Ref(256, f"[{SOLO_Y} optimizer.batch_size 256, devices [0]]"),
    "lr": Ref(0.3, f"[{SOLO_Y} lr 0.3; solo/args/pretrain.py lr x batch / 256]"),
    "wd": Ref(1e-6, f"[{SOLO_Y} weight_decay 1e-6]"),
    "tau": Ref(0.2, f"[{SOLO_Y} temperature 0.2]"),
    "m": Ref(0.99, f"[{SOLO_Y} momentum base_tau 0.99, final_tau 1.0]"),
    "hidden_dim": Ref(4096, f"[{SOLO_Y} proj_hidden_dim, pred_hidden_dim 4096]"),
    "dim": Ref(256, f"[{SOLO_Y} proj_output_dim 256]"),
    "lars_solo": Ref(True, f"[{SOLO_Y} lars, eta 0.02, clip_lr, exclude_bias_n_norm]"),
    "warmup_epochs": Ref(10, f"[{SOLO_Y} warmup_cosine; solo/methods/base.py warmup_epochs 10]"),
    "crop_min": Ref(0.08, f"[{SOLO} scripts/pretrain/cifar/augmentations/asymmetric.yaml 0.08]"),
    "blur": Ref(False, f"[{SOLO} cifar/augmentations/asymmetric.yaml gaussian_blur prob 0.0]"),
    "stem_padding": Ref(2, f"[{SOLO} solo/methods/base.py cifar conv1 padding=2]"),
    "zero_init_residual": Ref(False, f"[{SOLO} torchvision resnet18 default]"),
    "patch_size": Ref(16, "ViT only"),
    "linear_lr": Ref(0.1, f"no CIFAR probe in moco-v3 or solo-learn's yaml: [{LIN3} --lr 0.1]"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
CIFAR_VIT = {
    **IMAGENET_VIT,
    "batch_size": Ref(1024, f"no official CIFAR ViT: [{VIT_S}, 1-node -b 1024]"),
    "patch_size": Ref(4, "no official CIFAR ViT: 4 px patches, 8 x 8 tokens at 32 px"),
    "blur": Ref(False, f"no official CIFAR ViT: off as [{SOLO} cifar asymmetric.yaml]"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
IV, CV, VIT = ("--preset", "imagenet", "--version"), ("--preset", "cifar", "--version"), "vit_small"
OFFICIAL = {
    (*IV, "v1"): IMAGENET_V1,
    (*IV, "v2"): IMAGENET_V2,
    (*IV, "v3"): IMAGENET_V3,
    (*IV, "v3", "--arch", VIT): IMAGENET_VIT,
    (*CV, "v1"): CIFAR_V1,
    (*CV, "v2"): CIFAR_V2,
    (*CV, "v3"): CIFAR_V3,
    (*CV, "v3", "--arch", VIT): CIFAR_VIT,
}

B, N_IMG = 16, 32  # global batch; 32 images: 2 steps per epoch, so the per-epoch lr moves
STEPS = 5
ENC = {"q": ("backbone", "projector"), "k": ("momentum_backbone", "momentum_projector")}


def built(tmp_path, monkeypatch, *flags, batch=B, n_img=N_IMG):
    """model, optimizer and args (with args.sched) exactly as moco.main builds them."""
    model, opt, args, _ = built_by_main(
        moco, monkeypatch, tmp_path, "--subset", n_img, "--batch-size", batch, *flags
    )
    assert args.steps_per_epoch == n_img // batch
    return model, opt, args


def close(a, b, msg="", scale=None, rtol=1e-5):
    """rtol 1e-5 with an absolute floor of 1e-5 x the tensor's magnitude (max |ref|, or `scale`):
    5 steps of two different float summation orders differ by up to ~3e-6 of it (measured). A
    test whose network is measured noisier passes its own rtol (floor rtol x the magnitude)."""
    b = torch.as_tensor(b, dtype=a.dtype)
    if not (b.numel() and b.is_floating_point()):
        return torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)
    atol = rtol * max(b.abs().max().item() if scale is None else scale, 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def inputs(steps=STEPS, batch=B, size=16):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(batch, 3, size, size, generator=g),
             torch.rand(batch, 3, size, size, generator=g)) for _ in range(steps)]  # fmt: skip


def run_project(model, opt, args, xs):
    scaler, out = torch.amp.GradScaler("cpu", enabled=False), []
    for k, (x1, x2) in enumerate(xs):
        torch.manual_seed(1000 + k)  # the key permutation (v1/v2): the same draw as the reference
        out.append(moco.train_step(model, ([x1, x2], None, None), opt, scaler, k, args))
    return [s["loss"].item() for s in out]


@torch.no_grad()
def perturb_momentum_encoder(model, scale=0.5):
    """The key encoder made different from the query encoder (on both sides: shared initial
    weights), so the EMA coefficient m shows from the first step."""
    g = torch.Generator().manual_seed(3)
    for n in ENC["k"]:
        for p in getattr(model, n).parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())


def compare_state(got: dict, want: dict, what: str, rtol=1e-5):
    """Parameters, BN buffers, optimizer states. A bias's scale is its layer's weight's too (a
    zero-initialised bias moved by a gradient sum that cancels: float noise is relative to the
    layer, not to the bias's few steps); a BN running mean's scale is the feature's std (after a
    BN without affine, v3 projector -> predictor, the batch means are 0 up to float noise)."""
    assert got.keys() == want.keys(), what
    for k, v in got.items():
        sib = k.replace("running_mean", "running_var") if "running_mean" in k else None
        sib = k[: -len("bias")] + "weight" if k.endswith("bias") else sib
        scale = None
        if sib in want:
            s = want[sib].abs().max().item()
            scale = max(want[k].abs().max().item(), s**0.5 if "running" in k else s)
        close(v, want[k], f"{what}.{k}", scale, rtol)


def compare_modules(model, ref, names):
    for n in names:
        compare_state(getattr(model, n).state_dict(), ref[n].state_dict(), n)


def momentum_buffers(opt, model, names, key, bufs):
    for n in names:
        for k, p in getattr(model, n).named_parameters():
            if p.requires_grad:
                close(opt.state[p][key], bufs[f"{n}.{k}"], f"momentum of {n}.{k}")


# ==== MoCo v1/v2: facebookresearch/moco and its CIFAR-10 colab ==================================
class ColabSplitBatchNorm(nn.BatchNorm2d):
    """[ref: moco colab SplitBatchNorm] training: the batch viewed as [N / s, C * s, H, W] (sample
    n in group n % s), one batch_norm over it with running stats and affine repeated s times; the
    running stats <- the mean of the s updated copies. Eval: plain batch_norm."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        N, Ch, H, W = x.shape
        s = self.num_splits
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        w, b = self.weight.repeat(s), self.bias.repeat(s)
        out = F.batch_norm(x.view(-1, Ch * s, H, W), mean, var, w, b, True, self.momentum, self.eps)
        self.running_mean.data.copy_(mean.view(s, Ch).mean(dim=0))
        self.running_var.data.copy_(var.view(s, Ch).mean(dim=0))
        return out.view(N, Ch, H, W)


def colab_bn(module, splits):
    """The colab's norm layer in place of each BatchNorm2d of a copied network (same state):
    SplitBatchNorm when splits > 1, else nn.BatchNorm2d [ref: colab ModelBase]."""
    for name, m in list(module.named_children()):
        if isinstance(m, nn.BatchNorm2d):
            bn = (
                ColabSplitBatchNorm(m.num_features, splits)
                if splits > 1
                else nn.BatchNorm2d(m.num_features)
            )
            bn.load_state_dict(m.state_dict())
            setattr(module, name, bn)
        else:
            colab_bn(m, splits)
    return module


def split_order(n, splits):
    """The colab's group j holds samples j, j + s, ...; the project's (per-GPU slices) holds the
    j-th contiguous chunk. The reference takes the batch as x[order], so its groups hold the
    project's samples: order[r * s + j] = j * (n / s) + r."""
    return torch.arange(n).view(splits, n // splits).T.flatten()


class OfficialMoCo(nn.Module):
    """moco/builder.py MoCo (one process: the colab's _batch_shuffle_single_gpu) with encoder_q =
    (backbone, projector), encoder_k = the momentum encoder, queue [dim, K] as the official
    buffer; its norm layers the colab's for `splits` groups; m, T and K given by the test."""

    def __init__(self, q_nets, k_nets, queue, m, T, K, splits):
        super().__init__()
        self.encoder_q = colab_bn(nn.Sequential(*map(copy.deepcopy, q_nets)), splits)
        self.encoder_k = colab_bn(nn.Sequential(*map(copy.deepcopy, k_nets)), splits)
        self.encoder_k.requires_grad_(False)  # param_k.requires_grad = False [ref: builder.py]
        self.register_buffer("queue", torch.zeros(queue.shape[1], K))
        self.queue.copy_(queue.T)  # the shared initial queue; K from the table
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.m, self.T, self.K, self.splits = m, T, K, splits

    @torch.no_grad()
    def _momentum_update_key_encoder(self):  # param_k = param_k * m + param_q * (1 - m)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):  # concat_all_gather: one process
        ptr = int(self.queue_ptr)
        assert self.K % keys.shape[0] == 0
        self.queue[:, ptr : ptr + keys.shape[0]] = keys.T
        self.queue_ptr[0] = (ptr + keys.shape[0]) % self.K

    def forward(self, im_q, im_k, idx_shuffle):
        # builder.py forward: q, then (no grad) the momentum update, the shuffled key forward
        # (idx_shuffle: the colab's randperm), logits [l_pos, q @ queue] / T, labels 0, enqueue
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels

    def step(self, x1, x2, seed):
        """One forward on the batch in the colab's group order, the permutation drawn as the
        colab does (torch.randperm(N)) under `seed`, expressed in that order."""
        order = split_order(len(x1), self.splits)
        torch.manual_seed(seed)
        perm = torch.randperm(len(x1))
        logits, labels = self(x1[order], x2[order], torch.argsort(order)[perm[order]])
        return F.cross_entropy(logits, labels)  # criterion = nn.CrossEntropyLoss()

    def project_queue(self, written, batch):
        """The queue [K, dim] in the project's sample order (rows of each written batch block)."""
        rows, order = self.queue.T.clone(), torch.argsort(split_order(batch, self.splits))
        w = min(written, self.K)
        rows[:w] = rows[:w].view(-1, batch, rows.shape[1])[:, order].reshape(w, -1)
        return rows


def main_moco_lr(epoch, lr, epochs, milestones, cos):
    # main_moco.py adjust_learning_rate, called once per epoch (from 0) before train()
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for milestone in milestones:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


@torch.no_grad()
def official_sgd(params, bufs, lr, wd, momentum=0.9):
    # torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=wd) on every parameter
    # (the key encoder's have no grad): d = g + wd p; buf = d (first) | momentum buf + d
    for name, p in params:
        if p.grad is None:
            continue
        d = p.grad + wd * p
        bufs[name] = d.clone() if name not in bufs else momentum * bufs[name] + d
        p.sub_(lr * bufs[name])


def run_official_v1v2(ref, xs, lrs, wd):
    params = list(ref.encoder_q.named_parameters())
    bufs, losses = {}, []
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train()
        loss = ref.step(x1, x2, 1000 + k)
        for _, p in params:
            p.grad = None  # optimizer.zero_grad()
        loss.backward()
        official_sgd(params, bufs, lrs[k], wd)
        losses.append(loss.item())
    return losses, bufs


def opt_state(opt, module, key="momentum_buffer") -> dict:
    return {k: opt.state[p][key] for k, p in module.named_parameters() if p.requires_grad}


def check_v1v2(model, opt, ref, losses, ref_losses, bufs, steps, batch):
    close(torch.tensor(losses), ref_losses, "losses")
    nets = {**dict(zip(ENC["q"], ref.encoder_q)), **dict(zip(ENC["k"], ref.encoder_k))}
    compare_modules(model, nets, [*ENC["q"], *ENC["k"]])
    got = {f"{i}.{k}": v for i, n in enumerate(ENC["q"]) for k, v in
           opt_state(opt, getattr(model, n)).items()}  # fmt: skip
    compare_state(got, bufs, "SGD momentum")
    close(model.queue, ref.project_queue(steps * batch, batch), "queue")
    assert model.queue_ptr.item() == ref.queue_ptr.item() == steps * batch % ref.K


V1V2 = [("v1", (), 1e-4), ("v2", (), 0.5), ("v2", ("--bn-splits", 1), 1e-4), ("v1", (), 0.5)]


@pytest.mark.parametrize("version, splits, wd", V1V2)
def test_official_v1v2_step_parity(tmp_path, monkeypatch, version, splits, wd):
    """5 steps over 3 epochs of the ImageNet preset (SGD, v1 step / v2 cosine per epoch, lr per
    epoch), m 0.9 on a perturbed key encoder so the EMA shows, K = 64, wd the preset's 1e-4 or
    0.5 (visible); split BN with the table's 8 groups (the project at its default) or 1: loss,
    every parameter and BN buffer of both encoders, the SGD momentum, the queue and its pointer
    agree with the official step."""
    T = OFFICIAL[(*IV, version)]
    flags = ["--preset", "imagenet", "--version", version, "--epochs", 3, "--m", 0.9, *splits]
    flags += ["--queue-size", 64, "--dim", 16, "--lr", 4.8, "--wd", wd]
    flags += ["--lr-milestones", 1, 2] if version == "v1" else []
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    perturb_momentum_encoder(model)
    n_splits = splits[1] if splits else official(T, "bn_splits")  # the colab's 8
    qk = [getattr(model, n) for n in ENC["q"]], [getattr(model, n) for n in ENC["k"]]
    tau = official(T, "tau")
    ref = OfficialMoCo(*qk, model.queue, 0.9, tau, 64, n_splits)
    xs = inputs()
    lr0 = 0.3  # main_moco.py --lr at batch 16 for the project's 4.8 per 256 (absolute)
    cos = official(T, "schedule") == "cosine-epoch"
    spe, ms = args.steps_per_epoch, (1, 2)
    lrs = [main_moco_lr(s // spe, lr0, 3, ms, cos) for s in range(args.total_steps)]
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    ref_losses, bufs = run_official_v1v2(ref, xs, lrs, wd)
    losses = run_project(model, opt, args, xs)
    check_v1v2(model, opt, ref, losses, ref_losses, bufs, STEPS, B)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_official_v1v2_imagenet_preset_values(tmp_path, monkeypatch, version):
    """Two steps at the ImageNet preset's own values (lr 0.03 per 256, wd 1e-4, m 0.999, K 65536,
    tau, dim 128, v1 step / v2 cosine over 200 epochs, 8 split-BN groups) against the official
    step at the table's values: an official user passes --lr 0.03 x 16 / 256 at batch 16."""
    key = (*IV, version)
    T = OFFICIAL[key]
    model, opt, args = built(tmp_path, monkeypatch, *key)
    perturb_momentum_encoder(model)
    K, m, tau = official(T, "queue_size"), official(T, "m"), official(T, "tau")
    qk = [getattr(model, n) for n in ENC["q"]], [getattr(model, n) for n in ENC["k"]]
    ref = OfficialMoCo(*qk, model.queue, m, tau, K, official(T, "bn_splits"))
    assert ref.queue.shape == (official(T, "dim"), 65536)
    lr0 = official(T, "lr") * B / 256  # README: linear lr scaling by hand
    cos, E = official(T, "schedule") == "cosine-epoch", official(T, "epochs")
    spe, ms = args.steps_per_epoch, official(T, "lr_milestones")
    lrs = [main_moco_lr(s // spe, lr0, E, ms, cos) for s in range(args.total_steps)]
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    xs = inputs(2)
    ref_losses, bufs = run_official_v1v2(ref, xs, lrs, official(T, "wd"))
    losses = run_project(model, opt, args, xs)
    check_v1v2(model, opt, ref, losses, ref_losses, bufs, 2, B)


def colab_model_base(dim, splits, mlp):
    """[ref: colab ModelBase] torchvision resnet18(num_classes=dim) with the colab's norm layer,
    conv1 3x3 stride 1 padding 1, no max-pool, Flatten before fc; v2: fc -> Linear, ReLU, fc
    [ref: moco builder.py --mlp]. Children as the colab's nn.Sequential (net.0, net.1, ...)."""
    norm = partial(ColabSplitBatchNorm, num_splits=splits) if splits > 1 else nn.BatchNorm2d
    net, mods = torchvision.models.resnet18(num_classes=dim, norm_layer=norm), []
    if mlp:
        net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), net.fc)
    for name, module in net.named_children():
        if name == "conv1":
            module = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if isinstance(module, nn.MaxPool2d):
            continue
        if name == "fc":
            mods.append(nn.Flatten(1))
        mods.append(module)
    return nn.Sequential(*mods)


def colab_names(backbone: dict, projector: dict) -> dict:
    """The project's backbone / projector entries under the colab's names: conv1 0, bn1 1,
    layer1-4 3-6, the head 9 (ModelBase.net)."""
    names = {"conv1": "0", "bn1": "1", "layer1": "3", "layer2": "4", "layer3": "5", "layer4": "6"}
    out = {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in backbone.items()}
    return {**out, **{f"9.{k}": v for k, v in projector.items()}}


def test_official_v2_cifar_resnet18_colab(tmp_path, monkeypatch):
    """The CIFAR v2 preset on the real network: the colab's ModelBase (ResNet-18, CIFAR stem,
    SplitBatchNorm with its 8 groups) with v2's MLP head, built here and loaded with the
    project's weights (strict), one step at the preset's lr, wd, m, tau and K on 16 px batch 8
    (over more steps its 8 one-sample BN groups amplify float noise past 1e-5): loss, both
    encoders (parameters and BN buffers), the SGD momentum and the queue agree."""
    key = (*CV, "v2")
    T = OFFICIAL[key]
    model, opt, args = built(tmp_path, monkeypatch, *key, "--arch", "resnet18", batch=8, n_img=16)
    perturb_momentum_encoder(model)
    splits, dim, K = official(T, "bn_splits"), official(T, "dim"), official(T, "queue_size")
    nets = []
    for names in ENC.values():
        net = colab_model_base(dim, splits, mlp=True)
        net.load_state_dict(colab_names(*(getattr(model, n).state_dict() for n in names)))
        nets.append(net)
    m, tau = official(T, "m"), official(T, "tau")
    ref = OfficialMoCo([nets[0]], [nets[1]], model.queue, m, tau, K, splits)
    lr0 = official(T, "lr") * 8 / 256  # the colab's --lr 0.06 at 512, at batch 8
    lrs = [lr0]  # epoch 0 of the cosine (the colab's epochs count from 1: a listed Ref)
    assert args.sched["lr"][:1] == pytest.approx(lrs, rel=1e-12)
    xs = inputs(1, batch=8)
    ref_losses, bufs = run_official_v1v2(ref, xs, lrs, official(T, "wd"))
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses")
    for names, net in zip(ENC.values(), (ref.encoder_q[0], ref.encoder_k[0])):
        got = colab_names(*(getattr(model, n).state_dict() for n in names))
        compare_state(got, net.state_dict(), "/".join(names))
    got = colab_names(*(opt_state(opt, getattr(model, n)) for n in ENC["q"]))
    compare_state({f"0.{k}": v for k, v in got.items()}, bufs, "SGD momentum")
    close(model.queue, ref.project_queue(8, 8), "queue")
    assert model.queue_ptr.item() == ref.queue_ptr.item() == 8


# ---- 2 processes: builder.py's cross-process helpers vs the project's train_step under DDP -------
@torch.no_grad()
def concat_all_gather(tensor):
    # [ref: moco builder.py concat_all_gather] all_gather into ones_like buffers, no gradient
    out = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor, async_op=False)
    return torch.cat(out, dim=0)


class OfficialDDPMoCo(OfficialMoCo):
    """builder.py MoCo across processes: per-GPU nn.BatchNorm2d (splits 1), _batch_shuffle_ddp,
    _batch_unshuffle_ddp and _dequeue_and_enqueue of the gathered keys."""

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):  # [ref: builder.py] the keys of all GPUs first
        super()._dequeue_and_enqueue(concat_all_gather(keys))

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        # [ref: builder.py _batch_shuffle_ddp] gather, randperm on every rank, rank 0's broadcast,
        # this rank's row of the shuffled index; idx_unshuffle = argsort
        x_gather = concat_all_gather(x)
        idx_shuffle = torch.randperm(x_gather.shape[0])
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        # [ref: builder.py _batch_unshuffle_ddp] gather, this rank's row of idx_unshuffle
        x_gather = concat_all_gather(x)
        return x_gather[idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]]

    def forward(self, im_q, im_k):
        # [ref: builder.py MoCo.forward] as OfficialMoCo.forward with the DDP shuffle
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        self._dequeue_and_enqueue(k)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long)


def as_official(model, names, fn) -> dict:
    """fn(module) of the project's modules `names` under encoder_q / encoder_k's names (0., 1.)."""
    out = {}
    for i, n in enumerate(names):
        out.update({f"{i}.{k}": v.clone() for k, v in fn(getattr(model, n)).items()})
    return out


def _two_process_steps(out_dir):
    """In each of 2 gloo processes, for v1 and v2: moco.main (the ImageNet preset, global batch
    8: per-GPU BN, bn_splits 1) up to fit, its model under DDP as fit wraps it, one train_step on
    this rank's half of a fixed global batch; beside it builder.py's MoCo under DDP as
    main_moco.py wraps it (broadcast_buffers on), criterion, backward and its SGD step. The key
    encoder is perturbed and m is 0.9 on both sides, so the EMA shows."""
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
    got, res = {}, {}
    moco.fit = lambda model, opt, data, args: got.update(m=model, o=opt, a=args)  # this process
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(8, 3, 16, 16, generator=g), torch.rand(8, 3, 16, 16, generator=g)
    x2[:4] *= 0.5  # the ranks' key batches differ in distribution: per-GPU BN statistics show
    for version in ("v1", "v2"):
        T = OFFICIAL[(*IV, version)]
        flags = [*TINY, "--out-dir", os.path.join(out_dir, version), "--subset", 16, "--epochs", 1]
        flags += [*IV, version, "--batch-size", 8, "--queue-size", 32, "--dim", 16, "--m", 0.9]
        moco.main(C.parse_args(moco.Args, [*map(str, flags), "--lr", "4.8"]))
        model, opt, args = got["m"], got["o"], got["a"]
        assert args.world_size == 2 and type(model.backbone[1]) is nn.BatchNorm2d  # per GPU
        perturb_momentum_encoder(model)
        qk = [getattr(model, n) for n in ENC["q"]], [getattr(model, n) for n in ENC["k"]]
        ref = OfficialDDPMoCo(*qk, model.queue, 0.9, official(T, "tau"), 32, 1)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # as fit
        mine = slice(args.rank * 4, args.rank * 4 + 4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        torch.manual_seed(5 + args.rank)  # each rank draws its own permutation: rank 0's wins
        stats = moco.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
        grad = lambda mod: {k: p.grad for k, p in mod.named_parameters() if p.grad is not None}
        params = list(ref.encoder_q.named_parameters())
        ref_ddp = nn.parallel.DistributedDataParallel(ref)  # [ref: main_moco.py]
        torch.manual_seed(5 + args.rank)
        logits, labels = ref_ddp(x1[mine], x2[mine])
        loss = F.cross_entropy(logits, labels)
        loss.backward()  # DDP: the gradients averaged over the 2 processes
        ref_grads = {k: p.grad.clone() for k, p in params}
        bufs = {}  # main_moco.py: lr 0.03 x 8 / 256 at batch 8 (README), epoch 0; wd the table's
        official_sgd(params, bufs, 4.8 * 8 / 256, official(T, "wd"))
        sd = lambda mod: mod.state_dict()
        res[version] = {
            "loss": (stats["loss"].detach(), loss.detach()),
            "grads": (as_official(model, ENC["q"], grad), ref_grads),
            "query": (as_official(model, ENC["q"], sd), ref.encoder_q.state_dict()),
            "key": (as_official(model, ENC["k"], sd), ref.encoder_k.state_dict()),
            "momentum": (as_official(model, ENC["q"], partial(opt_state, opt)), bufs),
            "queue": (model.queue.clone(), ref.queue.T.clone()),
            "ptr": (model.queue_ptr.item(), ref.queue_ptr.item()),
        }
    return res


def test_official_v1v2_two_processes(tmp_path):
    """2 gloo processes, one global batch of 8, v1 and v2 at the ImageNet preset: the project's
    train_step under DDP and builder.py's concat_all_gather / _batch_shuffle_ddp /
    _batch_unshuffle_ddp / enqueue of the gathered keys under DDP agree on every rank: loss, the
    averaged gradients, both encoders after the step (with each rank's own per-GPU BN
    statistics), the SGD momentum, the queue (the same on both ranks) and its pointer."""
    ranks = spawn(_two_process_steps, 2, tmp_path, str(tmp_path))
    for version in ("v1", "v2"):
        for r in ranks:
            got = r[version]
            close(*got["loss"], f"{version} loss")
            for what in ("grads", "query", "key", "momentum"):
                compare_state(*got[what], f"{version} {what}")
            close(*got["queue"], f"{version} queue")
            assert got["ptr"][0] == got["ptr"][1] == 8
        assert not torch.equal(ranks[0][version]["loss"][0], ranks[1][version]["loss"][0])
        assert torch.equal(ranks[0][version]["queue"][0], ranks[1][version]["queue"][0])
        k0, k1 = (r[version]["key"][0]["0.1.running_mean"] for r in ranks)
        assert not torch.equal(k0, k1)  # per-GPU BN: each rank's own key batch statistics


# ==== MoCo v3: facebookresearch/moco-v3 (+ solo-learn's optimizer for the CIFAR preset) =========
V3 = {"base": ("backbone", "projector"), "m": ("momentum_backbone", "momentum_projector")}


def official_v3_forward(ref, x1, x2, m, T):
    # moco-v3 builder.py MoCo.forward: q1, q2 = predictor(base_encoder(x)), then (no grad) the
    # momentum update and k1, k2 = momentum_encoder(x); contrastive_loss(q1, k2) + (q2, k1)
    base = nn.Sequential(*(ref[n] for n in V3["base"]))
    mom = nn.Sequential(*(ref[n] for n in V3["m"]))
    q1, q2 = ref["predictor"](base(x1)), ref["predictor"](base(x2))
    with torch.no_grad():  # _update_momentum_encoder: param_m = param_m * m + param_b * (1 - m)
        for pb, pm in zip(base.parameters(), mom.parameters()):
            pm.data = pm.data * m + pb.data * (1.0 - m)
        k1, k2 = mom(x1), mom(x2)

    def contrastive_loss(q, k):  # normalise, gather keys (one process), logits / T, labels
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)  # arange(N) + N * rank (rank 0)
        logits = torch.einsum("nc,mc->nm", q, k) / T
        labels = torch.arange(logits.shape[0], dtype=torch.long) + logits.shape[0] * 0
        return F.cross_entropy(logits, labels) * (2 * T)

    return contrastive_loss(q1, k2) + contrastive_loss(q2, k1)


def official_v3_lr(epoch, lr, warmup_epochs, epochs):
    # moco-v3 main_moco.py adjust_learning_rate(epoch + i / iters_per_epoch): warm-up from 0
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    w = warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (epochs - w)))


def official_v3_m(epoch, m, epochs):
    # moco-v3 main_moco.py adjust_moco_momentum (--moco-m-cos); solo-learn's MomentumUpdater
    # (base_tau 0.99 -> final_tau 1.0 by cosine over the steps) computes the same values
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m)


def solo_lrs(base, total, warmup, start=3e-5):
    # solo-learn LinearWarmupCosineAnnealingLR.get_lr (chainable; stepped every step,
    # interval "step"; warmup_start_lr 3e-5, min_lr 0 [base.py defaults])
    out = [start]
    for t in range(1, total):
        prev = out[-1]
        if t < warmup:
            out.append(prev + (base - start) / (warmup - 1))
        elif t == warmup:
            out.append(base)
        else:
            n = total - warmup
            ratio = (1 + math.cos(math.pi * (t - warmup) / n)) / (
                1 + math.cos(math.pi * (t - warmup - 1) / n)
            )
            out.append(ratio * prev)
    return out


@torch.no_grad()
def official_lars(params, bufs, lr, wd, momentum=0.9, eta=1e-3):
    # moco-v3 moco/optimizer.py LARS.step over model.parameters(): ndim > 1: dp = g + wd p,
    # q = eta |p| / |dp| where both norms > 0, else 1; mu = momentum mu + dp; p -= lr mu
    for name, p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=wd)
            pn, un = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(pn)
            q = torch.where(pn > 0.0, torch.where(un > 0, eta * pn / un, one), one)
            dp = dp.mul(q)
        mu = bufs.setdefault(name, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


@torch.no_grad()
def solo_lars(params, bufs, lr, wd, momentum=0.9, eta=0.02, eps=1e-8):
    # solo-learn solo/utils/lars.py LARS.step, mocov3.yaml kwargs clip_lr True, eta 0.02,
    # exclude_bias_n_norm True (1-D params: no wd, no adaptation); buffer = clone(d_p) first
    for name, p in params:
        d_p = p.grad
        pn, gn = torch.norm(p.data), torch.norm(p.grad.data)
        if p.ndim != 1 and pn != 0 and gn != 0:
            lars_lr = eta * pn / (gn + pn * wd + eps)
            lars_lr = min(lars_lr / lr, 1)  # clip_lr
            d_p = d_p.add(p, alpha=wd) * lars_lr
        if name not in bufs:
            bufs[name] = torch.clone(d_p).detach()
        else:
            bufs[name].mul_(momentum).add_(d_p)
        p.add_(bufs[name], alpha=-lr)


@pytest.mark.parametrize("preset, wd", [("imagenet", None), ("imagenet", 1.0), ("cifar", None),
                                        ("cifar", 1.0)])  # fmt: skip
def test_official_v3_step_parity(tmp_path, monkeypatch, preset, wd):
    """5 steps of v3 (smallcnn, BN-MLP projector and predictor): imagenet = moco-v3's LARS
    (eta 1e-3) and warm-up from 0 at 1 warm-up epoch (2 steps) then cosine; cifar = solo-learn's
    LARS (eta 0.02, trust capped at 1/lr) and warm-up from 3e-5 over 2 epochs (4 steps). m 0.5 ->
    1 by cosine so the EMA is visible. Loss, every parameter, the LARS momentum and every BN
    buffer agree with the reference; the whole lr and m schedules match the official formulas. wd:
    the preset's 1e-6, or 1.0 where leaving the decay out of the update or the trust ratio shows."""
    solo, T = preset == "cifar", OFFICIAL[("--preset", preset, "--version", "v3")]
    wd_ref = official(T, "wd") if wd is None else wd
    flags = ["--preset", preset, "--version", "v3", "--hidden-dim", 32, "--dim", 16, "--m", 0.5]
    flags += ["--epochs", 4, "--warmup-epochs", 2 if solo else 1, "--lr", 3.0 if solo else 10.0]
    model, opt, args = built(tmp_path, monkeypatch, *flags, *(("--wd", wd) if wd else ()))
    assert official(T, "optimizer") == "lars" and official(T, "lars_solo") == solo
    names = (*V3["base"], "predictor", *V3["m"])
    ref, xs = {n: copy.deepcopy(getattr(model, n)) for n in names}, inputs()
    online = (*V3["base"], "predictor")
    params = [(f"{n}.{k}", p) for n in online for k, p in ref[n].named_parameters()]
    spe, n = args.steps_per_epoch, args.total_steps
    lr0 = (
        (3.0 if solo else 10.0) * B / 256
    )  # the test's --lr: main_moco.py / solo-learn x batch / 256
    if solo:
        lrs = solo_lrs(lr0, n, (2 if solo else 1) * spe)
    else:  # main_moco.py: epoch + i / iters_per_epoch, for every step
        lrs = [official_v3_lr(s / spe, lr0, 1, 4) for s in range(n)]
    assert lrs[0] == (3e-5 if solo else 0.0)
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    ms = [official_v3_m(s / spe, 0.5, 4) for s in range(n)]
    close(torch.tensor(args.sched["m"], dtype=torch.float64), ms, "m schedule")
    bufs, ref_losses = {}, []
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train(): lr and m per iteration
        loss = official_v3_forward(ref, x1, x2, ms[k], official(T, "tau"))
        for _, p in params:
            p.grad = None
        loss.backward()
        step = solo_lars if solo else official_lars
        step(params, bufs, lrs[k], wd_ref)
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses")
    compare_modules(model, ref, names)
    got = {
        f"{n}.{k}": v for n in online for k, v in opt_state(opt, getattr(model, n), "mu").items()
    }
    compare_state(got, bufs, "LARS momentum")


# ---- v3 ViT: vits.py VisionTransformerMoCo (timm's VisionTransformer) restated ----------------
class TimmAttention(nn.Module):
    # [ref: timm vision_transformer.py Attention, qkv_bias=True as vits.py] qkv reshaped to
    # (3, B, heads, N, head_dim), softmax(q k^T * head_dim^-0.5) v, heads concatenated, proj
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, Ch = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, Ch // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, Ch))


class TimmMlp(nn.Module):  # [ref: timm layers Mlp] fc1, GELU, fc2 (dropout 0)
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):  # [ref: timm Block] pre-norm, LayerNorm eps 1e-6 (vits.py norm_layer)
    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TimmMlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):  # [ref: timm PatchEmbed] conv patch x patch, flatten, transpose
    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        self.patch_size, self.grid_size = (patch_size,) * 2, (img_size // patch_size,) * 2
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def build_2d_sincos_position_embedding(grid_size, embed_dim, temperature=10000.0):
    # [ref: moco-v3 vits.py] meshgrid(grid_w, grid_h) ("ij"), omega = 1 / T^(d / (D / 4)),
    # [sin, cos](w * omega), [sin, cos](h * omega); a zero slot for [cls] first
    h, w = grid_size
    grid_w, grid_h = torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = [torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)]
    return torch.cat([torch.zeros(1, embed_dim), torch.cat(pos, dim=1)])[None]


def v3_build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    # [ref: moco-v3 builder.py MoCo._build_mlp] Linear(bias=False), BN, ReLU; last: BN(affine=False)
    mlp = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


class VisionTransformerMoCo(nn.Module):
    """[ref: moco-v3 vits.py VisionTransformerMoCo over timm VisionTransformer] patch embedding,
    [cls], fixed 2-D sin-cos positions, depth blocks, LayerNorm, head(x[:, 0]); the head is
    builder.py MoCo_ViT's 3-layer projector (default init: built after the ViT's init)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_dim, dim):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = TimmPatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = build_2d_sincos_position_embedding(self.patch_embed.grid_size, embed_dim)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.Sequential(*[TimmBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for name, m in self.named_modules():  # vits.py weight initialization
            if isinstance(m, nn.Linear):
                if "qkv" in name:  # the weights of Q, K, V separately
                    val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        val = math.sqrt(6.0 / float(3 * patch_size * patch_size + embed_dim))
        nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.patch_embed.proj.requires_grad_(False)  # --stop-grad-conv1
        self.head = v3_build_mlp(3, embed_dim, mlp_dim, dim)  # MoCo_ViT: 3-layer projector

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


VIT_NAMES = [  # the project's ViT names -> timm's, the projector -> head
    (r"^patch_embed\.", "patch_embed.proj."),
    (r"^blocks\.(\d+)\.(qkv|proj)\.", r"blocks.\1.attn.\2."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"blocks.\1.mlp.fc2."),
]


def vit_names(backbone: dict, projector: dict) -> dict:
    out = {}
    for k, v in backbone.items():
        for pattern, repl in VIT_NAMES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return {**out, **{f"head.{k}": v for k, v in projector.items()}}


def check_vits_init(vit, patch, dim):
    """The project's initial ViT against vits.py's formulas: uniform(+-bound) weights (max |w|
    <= bound and within 2% of it; std within 6% of bound / sqrt(3)), zero biases, [cls]
    N(0, 1e-6), the positions equal to build_2d_sincos_position_embedding, frozen."""

    def uniform(w, bound, what):
        assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound, what
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.06, what

    uniform(vit.patch_embed.weight, math.sqrt(6 / (3 * patch * patch + dim)), "patch_embed")
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            fan_out = m.out_features // 3 if name.endswith("qkv") else m.out_features
            uniform(m.weight, math.sqrt(6 / (fan_out + m.in_features)), name)
            assert not m.bias.any(), name
    assert not vit.patch_embed.bias.any()
    assert 0.8e-6 < vit.cls_token.std().item() < 1.2e-6 and vit.cls_token.abs().max() < 6e-6
    close(vit.pos_embed.data, build_2d_sincos_position_embedding((16 // patch,) * 2, dim), "pos")
    assert not (vit.pos_embed.requires_grad or vit.patch_embed.weight.requires_grad)


def vit_inputs(steps, batch=4):
    """Images of different brightness and colour offset: the [cls] features then differ across
    the batch of 4, which the heads' BatchNorm divides by."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(2 * steps):
        x = torch.rand(batch, 3, 16, 16, generator=g) * torch.rand(batch, 1, 1, 1, generator=g) * 2
        out.append(x + torch.randn(batch, 3, 1, 1, generator=g))
    return list(zip(out[::2], out[1::2]))


def test_official_v3_vit_small_adamw(tmp_path, monkeypatch):
    """The ImageNet ViT-S preset (12 heads, frozen patch projection, fixed sin-cos positions,
    3-layer projector, 2-layer predictor with its last BN, AdamW, lr 1.5e-4 per 256, tau 0.2,
    m 0.99 -> 1) at 16 px with 8 px patches, batch 4, 4 steps over 2 epochs (warm-up 1): the
    initial weights match vits.py's formulas; vits.py + builder.py MoCo_ViT built here, loaded
    with the project's weights (strict) and stepped with main_moco.py's torch.optim.AdamW, lr
    and m schedules: loss, every parameter and BN buffer, AdamW's moments agree. wd 300 (lr x wd
    = 7e-4 per step) so the decoupled decay shows. Tolerance 3e-4 of each tensor's scale: through
    12 blocks and the heads' BatchNorm over 4 samples the official float32 gradients differ from
    float64 by 3e-5 of it (measured); at this lr (2.3e-6 at batch 4) Adam's normalised steps on
    entries whose gradient is float noise (the key bias) stay below it."""
    key = (*IV, "v3", "--arch", VIT)
    T = OFFICIAL[key]
    flags = [*key, "--patch-size", 8, "--hidden-dim", 32, "--dim", 16, "--epochs", 2]
    flags += ["--warmup-epochs", 1, "--wd", 300.0]
    model, opt, args = built(tmp_path, monkeypatch, *flags, batch=4, n_img=8)
    check_vits_init(model.backbone, 8, 384)
    perturb_momentum_encoder(model)
    mlp_dim, dim, heads = 32, 16, 12  # vits.py vit_small: num_heads=12
    nets = {}
    for side, names in V3.items():
        nets[side] = VisionTransformerMoCo(16, 8, 384, 12, heads, mlp_dim, dim)
        nets[side].load_state_dict(vit_names(*(getattr(model, n).state_dict() for n in names)))
    predictor = v3_build_mlp(2, dim, mlp_dim, dim)  # MoCo_ViT: last_bn (default True)
    predictor.load_state_dict(model.predictor.state_dict())
    nets["m"].requires_grad_(False)  # builder.py: param_m.requires_grad = False
    ref = {"backbone": nets["base"], "predictor": predictor, "momentum_backbone": nets["m"]}
    ref.update(projector=nn.Identity(), momentum_projector=nn.Identity())  # inside head
    # main_moco.py: torch.optim.AdamW(model.parameters(), lr, weight_decay=wd)
    all_params = [*nets["base"].parameters(), *nets["m"].parameters(), *predictor.parameters()]
    ref_opt = torch.optim.AdamW(all_params, 0.0, weight_decay=300.0)
    spe, n, E, lr0 = args.steps_per_epoch, args.total_steps, 2, official(T, "lr") * 4 / 256
    lrs = [official_v3_lr(s / spe, lr0, 1, E) for s in range(n)]
    ms = [official_v3_m(s / spe, official(T, "m"), E) for s in range(n)]
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    close(torch.tensor(args.sched["m"], dtype=torch.float64), ms, "m schedule")
    xs, ref_losses = vit_inputs(n), []
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train(): lr and m per iteration
        for g in ref_opt.param_groups:
            g["lr"] = lrs[k]
        loss = official_v3_forward(ref, x1, x2, ms[k], official(T, "tau"))
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses", rtol=3e-4)
    for side, names in V3.items():
        got = vit_names(*(getattr(model, n).state_dict() for n in names))
        compare_state(got, nets[side].state_dict(), side, rtol=3e-4)
    compare_state(model.predictor.state_dict(), predictor.state_dict(), "predictor", rtol=3e-4)
    named = {**dict(nets["base"].named_parameters()), **dict(predictor.named_parameters())}
    for moment in ("exp_avg", "exp_avg_sq"):
        got = vit_names(*(opt_state(opt, getattr(model, n), moment) for n in V3["base"]))
        got.update(opt_state(opt, model.predictor, moment))
        want = {k: ref_opt.state[named[k]][moment] for k in got}
        compare_state(got, want, moment, rtol=3e-4)


# ---- v3 ResNet-50: main_moco.py's torchvision resnet50 + builder.py MoCo_ResNet ---------------
def official_resnet50_v3(mlp_dim, dim):
    # [ref: moco-v3 main_moco.py] torchvision resnet50(zero_init_residual=True,
    # num_classes=mlp_dim); [ref: builder.py MoCo_ResNet] fc -> _build_mlp(2, 2048, mlp_dim, dim)
    net = torchvision.models.resnet50(zero_init_residual=True, num_classes=mlp_dim)
    net.fc = v3_build_mlp(2, net.fc.weight.shape[1], mlp_dim, dim)
    return net


def test_official_v3_resnet50_lars(tmp_path, monkeypatch):
    """The ImageNet v3 preset on the real network: ResNet-50 built for 224 px (the ImageNet
    stem; zero-init of each block's last BN), fed 32 px, batch 4, the 2-layer projector and the
    predictor without its last BN (MoCo_ResNet), moco-v3's LARS (eta 1e-3, wd 1e-6), tau 1, m
    0.99 -> 1 by cosine; 2 steps over 2 epochs with 1 of warm-up (lr 0, then half). The official
    network built here, loaded with the project's weights (strict): loss, every parameter and BN
    buffer of both encoders and the predictor, and LARS's momentum agree. --lr 40 per 256 (0.625
    at batch 4) so the trust-scaled steps (lr x 1e-3 of each weight) show."""
    key = (*IV, "v3")
    T = OFFICIAL[key]
    flags = [
        *key,
        "--arch",
        "resnet50",
        "--img-size",
        224,
        "--hidden-dim",
        64,
        "--dim",
        16,
        "--epochs",
        2,
    ]
    flags += ["--warmup-epochs", 1, "--lr", 40.0]
    model, opt, args = built(tmp_path, monkeypatch, *flags, batch=4, n_img=8)
    assert official(T, "arch") == "resnet50" and official(T, "zero_init_residual")
    for m in model.backbone.modules():  # torchvision zero_init_residual: bn3 weight 0
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            assert not m.bn3.weight.any()
    perturb_momentum_encoder(model)
    nets = {}
    for side, (bb, proj) in V3.items():
        nets[side] = official_resnet50_v3(64, 16)
        sd = getattr(model, bb).state_dict()
        sd.update({f"fc.{k}": v for k, v in getattr(model, proj).state_dict().items()})
        nets[side].load_state_dict(sd)
    nets["m"].requires_grad_(False)  # builder.py: param_m.requires_grad = False
    predictor = v3_build_mlp(2, 16, 64, 16, False)  # MoCo_ResNet: no last BN
    predictor.load_state_dict(model.predictor.state_dict())
    ref = {"backbone": nets["base"], "predictor": predictor, "momentum_backbone": nets["m"]}
    ref.update(projector=nn.Identity(), momentum_projector=nn.Identity())  # inside fc
    params = [*nets["base"].named_parameters(), *predictor.named_parameters(prefix="pred")]
    spe, n, E, lr0 = args.steps_per_epoch, args.total_steps, 2, 40.0 * 4 / 256
    lrs = [official_v3_lr(s / spe, lr0, 1, E) for s in range(n)]
    ms = [official_v3_m(s / spe, official(T, "m"), E) for s in range(n)]
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    close(torch.tensor(args.sched["m"], dtype=torch.float64), ms, "m schedule")
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g))]
    xs.append((torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)))
    bufs, ref_losses = {}, []
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train()
        loss = official_v3_forward(ref, x1, x2, ms[k], official(T, "tau"))
        for _, p in params:
            p.grad = None
        loss.backward()
        official_lars(params, bufs, lrs[k], official(T, "wd"))
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses")
    for side, (bb, proj) in V3.items():
        got = getattr(model, bb).state_dict()
        got.update({f"fc.{k}": v for k, v in getattr(model, proj).state_dict().items()})
        compare_state(got, nets[side].state_dict(), side)
    compare_state(model.predictor.state_dict(), predictor.state_dict(), "predictor")
    got = {**opt_state(opt, model.backbone, "mu")}
    got.update({f"fc.{k}": v for k, v in opt_state(opt, model.projector, "mu").items()})
    got.update({f"pred.{k}": v for k, v in opt_state(opt, model.predictor, "mu").items()})
    compare_state(got, bufs, "LARS momentum")
