"""DINO official-loop parity: facebookresearch/dino main_dino.py's training step (train_one_epoch
with DINOLoss, utils.MultiCropWrapper, get_params_groups, clip_gradients,
cancel_gradients_last_layer, cosine_scheduler, the optimizer main_dino.py builds) and its models
(vision_transformer.py's VisionTransformer with stochastic depth and DINOHead; torchvision's
resnet), restated here in plain PyTorch from the official code (cited per block), run beside
dino.train_step with the model, optimizer and schedules that dino.main builds, from the same
initial weights (loaded by state dict, strict) on the same multi-crop batches and RNG states:
losses, gradients, every student and teacher parameter and its update, the optimizer state and
every buffer (the centre, BN statistics) agree to each tensor's own scale; also under DDP in 2
processes. The official side's constants come from the OFFICIAL table below (a test's own
settings are literals both sides read); that side calls nothing of the project."""

import math
import re

import helpers
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from helpers import FT_SIMCLR_V2, Dev, Ref, official
from test_ddp import spawn
from torch import nn

import common as C
import dino

# ==== the official values ===================================================================
MAIN = "ref: dino main_dino.py"  # argparse defaults (= the README's vanilla ViT-S/16 run)
AUG = "ref: dino main_dino.py DataAugmentationDINO"
HEAD = "ref: dino vision_transformer.py DINOHead"
LIN = "ref: dino eval_linear.py"
R50 = "ref: dino README 'ResNet-50 and other convnets' command"
SOLO = "ref: solo-learn scripts/pretrain/cifar/dino.yaml"  # the CIFAR preset's source (R18)
SOLO_M = "ref: solo-learn solo/methods/dino.py add_and_assert_specific_cfg"  # its defaults
IMAGENET = {  # ViT-S/16, the README's vanilla run: 8 GPUs x 64, 100 epochs, main_dino.py defaults
    "arch": Ref("vit_small", f"[DINO §4.1; {MAIN} --arch; README vanilla '--arch vit_small']"),
    "patch_size": Ref(16, f"[DINO §4.1 ViT-S/16; {MAIN} --patch_size 16]"),
    "epochs": Ref(100, f"[{MAIN} --epochs 100; README vanilla run '100 epochs']"),
    "batch_size": Ref(512, f"[{MAIN} --batch_size_per_gpu 64; README vanilla '8 GPUs']"),
    "optimizer": Ref("adamw", f"[DINO §4.1; {MAIN} --optimizer adamw]"),
    "lr": Ref(5e-4, f"[DINO §4.1; {MAIN} --lr 0.0005, x batch / 256]"),
    "min_lr": Ref(1e-6, f"[{MAIN} --min_lr 1e-6]"),
    "warmup_epochs": Ref(10, f"[DINO §4.1; {MAIN} --warmup_epochs 10]"),
    "wd": Ref(0.04, f"[DINO §4.1; {MAIN} --weight_decay 0.04]"),
    "wd_end": Ref(0.4, f"[DINO §4.1; {MAIN} --weight_decay_end 0.4]"),
    "drop_path": Ref(0.1, f"[{MAIN} --drop_path_rate 0.1, the student only]"),
    "clip_grad": Ref(3.0, f"[{MAIN} --clip_grad 3.0]"),
    "freeze_last_layer": Ref(1, f"[{MAIN} --freeze_last_layer 1]"),
    "m": Ref(0.996, f"[DINO §3.1; {MAIN} --momentum_teacher 0.996]"),
    "tau_s": Ref(0.1, f"[DINO §4.1; {MAIN} DINOLoss student_temp=0.1]"),
    "tau_t": Ref(0.04, f"[{MAIN} --teacher_temp 0.04]"),
    "tau_t_warmup": Ref(0.04, f"[DINO §4.1; {MAIN} --warmup_teacher_temp 0.04]"),
    "tau_t_warmup_epochs": Ref(0, f"[{MAIN} --warmup_teacher_temp_epochs 0]"),
    "center_m": Ref(0.9, f"[DINO Eq. 4; {MAIN} DINOLoss center_momentum=0.9]"),
    "out_dim": Ref(65536, f"[DINO §3.1; {MAIN} --out_dim 65536]"),
    "hidden_dim": Ref(2048, f"[DINO App.; {HEAD} hidden_dim=2048]"),
    "bottleneck_dim": Ref(256, f"[DINO App.; {HEAD} bottleneck_dim=256]"),
    "head_bn": Ref(False, f"[{MAIN} --use_bn_in_head False]"),
    "norm_last_layer": Ref(True, f"[{MAIN} --norm_last_layer True]"),
    "n_local": Ref(8, f"[{MAIN} --local_crops_number 8]"),
    "local_size": Ref(96, f"[DINO §3.1; {AUG} RandomResizedCrop(96)]"),
    "global_scale": Ref((0.4, 1.0), f"[{MAIN} --global_crops_scale 0.4 1.]"),
    "local_scale": Ref((0.05, 0.4), f"[{MAIN} --local_crops_scale 0.05 0.4]"),
    "blur": Ref(True, f"[{AUG} GaussianBlur 1.0 / 0.1 / 0.5]"),
    "linear_epochs": Ref(100, f"[{LIN} --epochs 100]"),
    "linear_lr": Ref(1e-3, f"[{LIN} --lr 0.001, x batch / 256]"),
    "linear_wd": Ref(0.0, f"[{LIN} SGD weight_decay=0]"),
    "linear_batch_size": Ref(256, "[ref: dino README vanilla run: 'batch size 256 at evaluation']"),
    "linear_nesterov": Ref(False, f"[{LIN} SGD momentum=0.9, no Nesterov]"),
    "linear_milestones": Ref((), f"[{LIN} CosineAnnealingLR(epochs, eta_min=0)]"),
    "linear_decay": Ref(0.1, "unused: no milestones (cosine) [ref: eval_linear.py]"),
    "linear_epoch_lr": Ref(True, f"[{LIN} scheduler.step() once per epoch]"),
    "linear_best": Ref(True, f"[{LIN} best_acc: 'Max accuracy so far']"),
    "linear_zero_init": Ref(False, f"[{LIN} LinearClassifier weight N(0, 0.01), bias 0]"),
    **FT_SIMCLR_V2,
}
IMAGENET_R50 = {  # the README's RN50 command: 8 GPUs x 64, 100 epochs, the other defaults
    **IMAGENET,
    "arch": Ref("resnet50", f"[{R50} --arch resnet50]"),
    "optimizer": Ref("sgd", f"[{R50} --optimizer sgd]"),
    "lr": Ref(0.03, f"[{R50} --lr 0.03]"),
    "wd": Ref(1e-4, f"[{R50} --weight_decay 1e-4]"),
    "wd_end": Ref(1e-4, f"[{R50} --weight_decay_end 1e-4]"),
    "global_scale": Ref((0.14, 1.0), f"[{R50} --global_crops_scale 0.14 1]"),
    "local_scale": Ref((0.05, 0.14), f"[{R50} --local_crops_scale 0.05 0.14]"),
    "patch_size": Ref(16, f"[{MAIN} --patch_size 16; unused by a ResNet]"),
    "drop_path": Ref(0.1, f"[{MAIN} --drop_path_rate 0.1; unused by torchvision archs]"),
    "linear_lr": Ref(
        0.075,
        "[ref: dino issue #131: the released RN50 eval log trains at 0.3 = "
        "0.075 x 1024 / 256, eval_linear.py's batch 8 x 128]",
    ),
    "linear_batch_size": Ref(1024, f"[{LIN} --batch_size_per_gpu 128 x 8 GPUs]"),
}
WHY_OPT = "solo-learn's LARS recipe; DINO's AdamW and wd cosine kept (one recipe for R18 and ViT)"
CIFAR = {  # no DINO CIFAR recipe: solo-learn's R18 config where it has the field, else DINO's
    **IMAGENET,
    "arch": Ref("resnet18", f"[{SOLO} backbone resnet18]"),
    "batch_size": Ref(256, f"[{SOLO} optimizer.batch_size 256, 1 device]"),
    "epochs": Ref(1000, f"[{SOLO} max_epochs 1000]"),
    "out_dim": Ref(4096, f"[{SOLO} num_prototypes 4096]"),
    "m": Ref(0.9995, f"[{SOLO} base_tau 0.9995; {MAIN} --momentum_teacher help at batch 256]"),
    "tau_t": Ref(0.07, f"[DINO §4.1; {SOLO_M} teacher_temperature 0.07]"),
    "tau_t_warmup_epochs": Dev(30, 0, f"DINO §4.1's 0.04 -> 0.07 in 30 epochs; {SOLO_M}: 0"),
    "optimizer": Dev("adamw", "lars", f"{WHY_OPT} [{SOLO}]"),
    "lr": Dev(5e-4, 0.3, f"{WHY_OPT} [{SOLO}]"),
    "wd": Dev(0.04, 1e-6, f"{WHY_OPT} [{SOLO}]"),
    "wd_end": Dev(0.4, 1e-6, f"{WHY_OPT} [{SOLO}]"),
    "clip_grad": Dev(3.0, 0, f"main_dino.py's per-parameter clip kept [{SOLO_M} clip_grad 0]"),
    "n_local": Dev(8, 0, f"DINO's multi-crop kept; solo-learn trains on 2 crops [{SOLO}]"),
    "local_size": Ref(14, "[DINO §3.1's 96 / 224 of the global crop: round(32 x 96 / 224)]"),
    "global_scale": Dev((0.14, 1.0), (0.08, 1.0), f"{R50} (convnets) [{SOLO} crop_min_scale]"),
    "local_scale": Ref((0.05, 0.14), f"[{R50} --local_crops_scale 0.05 0.14 (convnets)]"),
    "blur": Ref(False, f"[{SOLO} asymmetric.yaml gaussian_blur prob 0.0]"),
    "patch_size": Dev(4, 16, "unused by a ResNet; for a ViT at 32 px see the vit_tiny entry"),
    "linear_lr": Dev(
        0.1,
        1e-3,
        "eval_linear.py's lr suits ViT [CLS] features ('tweak the LR', "
        "README); the released RN50 eval log trains at 0.3 [dino issue #131]",
    ),
    "linear_batch_size": Dev(512, 1024, f"one GPU at CIFAR scale [{LIN} 8 x 128]"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% set (500)"),
}
CIFAR_VIT = {  # --arch vit_tiny [main_dino.py --arch help: 'for quick experiments, vit_tiny']
    **CIFAR,
    "arch": Ref("vit_tiny", f"[{MAIN} --arch vit_tiny: 'for quick experiments']"),
    "global_scale": Ref((0.4, 1.0), f"[{MAIN} --global_crops_scale 0.4 1.]"),
    "local_scale": Ref((0.05, 0.4), f"[{MAIN} --local_crops_scale 0.05 0.4]"),
    "patch_size": Dev(4, 16, "an 8 x 8 grid at 32 px; 16 px patches: 2 x 2, none in 14 px locals"),
}
VIT_FLAGS = ("--preset", "imagenet", "--dataset", "imagenet")
OFFICIAL = {
    VIT_FLAGS: IMAGENET,
    (*VIT_FLAGS, "--arch", "resnet50"): IMAGENET_R50,
    ("--preset", "cifar"): CIFAR,
    ("--preset", "cifar", "--arch", "vit_tiny"): CIFAR_VIT,
}

R50_FLAGS = (*VIT_FLAGS, "--arch", "resnet50")
CIFAR_FLAGS = ("--preset", "cifar")
B, LOCAL = 8, 2
# each test's settings, literals that both sides read: the project as flags, the official side
# as values over the table's. 2 steps per epoch (16 images / batch 8): lr warm-up at steps 0-3
# (np.linspace(0, lr, 4)), the cosine from step 4; tau_t 0.04, 0.055, 0.07 in epochs 0-2; the
# last layer frozen in epoch 0
SMALL = {"subset": 16, "batch_size": B, "epochs": 10, "hidden_dim": 32, "bottleneck_dim": 16}
SMALL |= {"out_dim": 64, "n_local": LOCAL, "warmup_epochs": 2, "tau_t": 0.07}
SMALL |= {"tau_t_warmup_epochs": 3, "arch": "smallcnn"}
ADAMW = {k: official(IMAGENET, k) for k in ("optimizer", "lr", "wd", "wd_end")}  # ViT recipe
VARIANTS = {  # (table entry, settings): clip 3.0 is the preset; 0.01 makes the clipping bite
    "adamw": (VIT_FLAGS, SMALL | ADAMW),
    # lr x100 so that the decoupled weight decay moves the weights beyond float noise
    "adamw-big-lr-clip-g": (
        VIT_FLAGS,
        {**SMALL, **ADAMW, "lr": 0.05, "clip_grad": 0.01, "norm_last_layer": False},
    ),
    "sgd-rn50": (R50_FLAGS, SMALL),  # the RN50 recipe: SGD 0.03, wd 1e-4
    "lars": (R50_FLAGS, {**SMALL, "optimizer": "lars", "lr": 0.3, "clip_grad": 0.01}),
}


def flags_of(table_flags, settings: dict) -> list:
    """The project's flags: the entry's preset (its data is the synthetic set) and settings."""
    flags = list(table_flags)
    if "--dataset" in flags:
        del flags[flags.index("--dataset") : flags.index("--dataset") + 2]
    for k, v in settings.items():
        name = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(name if v else name.replace("--", "--no-"))
        else:
            flags += [name, v]
    return flags


def official_cfg(table_flags, *settings) -> dict:
    """The official side's values: the table's official ones, then the test's literals."""
    entry = OFFICIAL[table_flags]
    cfg = {k: official(entry, k) for k in entry}
    for s in settings:
        cfg |= s
    return cfg


def built_by_main(monkeypatch, tmp_path, *flags, spe=0):
    """dino.main as it runs, stopped where it calls fit: the model, optimizer and args (spe:
    steps per epoch of a full dataset, set where main reads the data size)."""
    prepare = C.prepare_run

    def prepare_run(args):
        prepare(args)
        if spe:
            args.steps_per_epoch, args.total_steps = spe, spe * args.epochs

    monkeypatch.setattr(C, "prepare_run", prepare_run)
    return helpers.built_by_main(dino, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start=0):
    """[ref: utils.py cosine_scheduler] np.linspace warm-up over warmup_epochs x niter_per_ep
    iterations, then the cosine over the remaining iterations, per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warm, cos))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(c):
    """[ref: main_dino.py DINOLoss.__init__] linspace over the warm-up epochs, then constant."""
    W, E = c["tau_t_warmup_epochs"], c["epochs"]
    return np.concatenate(
        (np.linspace(c["tau_t_warmup"], c["tau_t"], W), np.ones(E - W) * c["tau_t"])
    )


DROPPED = []  # samples whose branch drop_path dropped, per call (the test checks it bites)


def drop_path(x, drop_prob, training):
    """[ref: vision_transformer.py drop_path] keep_prob + U[0, 1) of shape (B, 1, 1), floored:
    each sample's branch kept with probability keep_prob, then x / keep_prob x that mask."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    DROPPED.append(int((random_tensor == 0).sum()))
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Attention(nn.Module):
    """[ref: vision_transformer.py Attention] qkv (bias: vit_* qkv_bias=True) reshaped
    (B, N, 3, heads, C / heads), softmax(q k^T x head_dim^-0.5) v, proj."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B_, N, D = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, D))


class Mlp(nn.Module):
    """[ref: vision_transformer.py Mlp] fc1, GELU, fc2 (dropout 0)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """[ref: vision_transformer.py Block] pre-norm (LayerNorm eps 1e-6), mlp_ratio 4, one
    DropPath module (Identity at rate 0) on both residual branches."""

    def __init__(self, dim, num_heads, dpr):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.drop_path = DropPath(dpr) if dpr > 0.0 else nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):  # [ref: vision_transformer.py PatchEmbed]
        super().__init__()
        self.patch_size, self.proj = patch_size, nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """[ref: vision_transformer.py VisionTransformer, vit_tiny / vit_small] stochastic depth
    rates torch.linspace(0, drop_path_rate, depth); the final-norm [CLS]. Its weights are loaded
    (trunc-normal init not restated)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, drop_path_rate=0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        """[ref: VisionTransformer.interpolate_pos_encoding] bicubic, scale (g' + 0.1) / g."""
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed, patch_pos_embed = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim, n = x.shape[-1], int(math.sqrt(N))
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, n, n, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        B_, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B_, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class WeightNormLinear(nn.Module):
    """[ref: DINOHead.last_layer = nn.utils.weight_norm(Linear(bottleneck, out_dim, bias=False)),
    weight_g filled with 1]: weight = g * v / ||v|| per output row."""

    def __init__(self, bottleneck_dim, out_dim):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))

    def forward(self, x):
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """[ref: vision_transformer.py DINOHead, nlayers 3, use_bn False] Linear, GELU, Linear,
    GELU, Linear to the bottleneck; l2-normalise; the weight-normed last layer, weight_g frozen
    when norm_last_layer."""

    def __init__(self, in_dim, c, norm_last_layer=True):
        super().__init__()
        hid, bot = c["hidden_dim"], c["bottleneck_dim"]
        self.mlp = nn.Sequential(nn.Linear(in_dim, hid), nn.GELU(), nn.Linear(hid, hid))
        self.mlp.extend([nn.GELU(), nn.Linear(hid, bot)])
        self.last_layer = WeightNormLinear(bot, c["out_dim"])
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """[ref: utils.py MultiCropWrapper] backbone.fc / .head set to Identity; runs of equal width
    (unique_consecutive counts, cumsum) through the backbone, concatenated, one head pass."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        widths = torch.tensor([inp.shape[-1] for inp in x])
        idx_crops = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0)
        for end_idx in idx_crops.tolist():
            output = torch.cat((output, self.backbone(torch.cat(x[start_idx:end_idx]))))
            start_idx = end_idx
        return self.head(output)


def small_cnn():
    """The test encoder (no official one): 4 conv 3x3 (strides 1, 2, 2, 2) - BN - ReLU, pool."""
    layers, chans = [], [3, 32, 64, 128, 256]
    for i in range(4):
        conv = nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1, bias=False)
        layers += [conv, nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def official_backbone(c, img_size, student: bool):
    """[ref: main_dino.py train_dino] vits.__dict__[arch](patch_size, drop_path_rate) for the
    student, without drop_path_rate for the teacher; torchvision_models.__dict__[arch]() (its fc
    made Identity by MultiCropWrapper), here with the CIFAR stem at <= 64 px [ref: SimCLR
    resnet.py: 3x3 stride-1 conv1 padding 1, no max-pool]."""
    arch = c["arch"]
    if arch.startswith("vit"):
        dim, heads = {"vit_tiny": (192, 3), "vit_small": (384, 6)}[arch]
        rate = c["drop_path"] if student else 0.0
        return VisionTransformer(img_size, c["patch_size"], dim, DEPTH, heads, rate), dim
    if arch.startswith("resnet"):
        net = getattr(torchvision.models, arch)()
        dim = net.fc.weight.shape[1]
        if img_size <= 64:
            net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
        return net, dim
    return small_cnn(), 256


def official_name(name):
    """project name (inside DINO.student / .teacher) -> the official name"""
    name = name.replace("parametrizations.weight.original0", "weight_g")
    name = name.replace("parametrizations.weight.original1", "weight_v")
    if name.startswith("backbone.") and ("blocks." in name or "patch_embed" in name):
        name = name.replace("patch_embed.", "patch_embed.proj.")
        name = re.sub(r"blocks\.(\d+)\.(qkv|proj)\.", r"blocks.\1.attn.\2.", name)
        name = name.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")
    return name


def official_nets(model, c, img_size):
    """[ref: main_dino.py train_dino] student and teacher built apart, the student loaded with
    the project's initial weights (strict: a wrong width, name or extra parameter fails), the
    teacher with the student's state dict, no gradients in the teacher."""
    nets = []
    for student in (True, False):
        backbone, dim = official_backbone(c, img_size, student)
        head = DINOHead(dim, c, c["norm_last_layer"] if student else True)
        nets.append(MultiCropWrapper(backbone, head))
    state = {official_name(k): v.clone() for k, v in model.student.state_dict().items()}
    nets[0].load_state_dict(state, strict=True)
    nets[1].load_state_dict(nets[0].state_dict(), strict=True)
    for p in nets[1].parameters():
        p.requires_grad = False
    return nets


class DINOLoss:
    """[ref: main_dino.py DINOLoss] forward: student / student_temp chunked into ncrops; teacher
    softmax((t - center) / temp of this epoch), detached, chunked in 2; the mean over the batch
    of -sum q log_softmax(s_v) for iq != v, summed and divided by the number of terms; then
    update_center: dist.all_reduce of the batch sum / (len(teacher_output) x world size)."""

    def __init__(self, c):
        self.c, self.ncrops, self.center = c, c["n_local"] + 2, torch.zeros(1, c["out_dim"])
        self.teacher_temp_schedule = teacher_temp_schedule(c)

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.c["tau_s"]).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_initialized():  # one process: main_dino.py's all_reduce is the identity
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        cm = self.c["center_m"]
        self.center = self.center * cm + batch_center * (1 - cm)


def get_params_groups(model):
    """[ref: utils.py get_params_groups] trainable params; biases and 1-D params unregularised."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class Optimizer:
    """The optimizers main_dino.py builds on get_params_groups(student), their updates written
    out: adamw [torch.optim.AdamW(params_groups): betas (0.9, 0.999), eps 1e-8, decoupled decay
    p *= 1 - lr wd, bias-corrected moments], sgd [torch.optim.SGD(lr=0, momentum=0.9): d = g +
    wd p, buf = d at first then 0.9 buf + d, p -= lr buf], lars [utils.py LARS: for ndim != 1,
    d = g + wd p scaled by eta |p| / |d| (1 where a norm is 0), eta 0.001; mu = 0.9 mu + d;
    p -= lr mu]. Params whose grad is None are skipped."""

    def __init__(self, kind, groups):
        self.kind, self.param_groups, self.state = kind, groups, {}
        for g in groups:
            g.setdefault("weight_decay", 0.01 if kind == "adamw" else 0.0)  # torch defaults

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in (p for p in g["params"] if p.grad is not None):
                st, d = self.state.setdefault(p, {}), p.grad
                if self.kind == "adamw":
                    st["step"] = st.get("step", 0) + 1
                    m = st.setdefault("exp_avg", torch.zeros_like(p))
                    v = st.setdefault("exp_avg_sq", torch.zeros_like(p))
                    p.mul_(1 - lr * wd)
                    m.mul_(0.9).add_(d, alpha=0.1)
                    v.mul_(0.999).addcmul_(d, d, value=0.001)
                    bc1, bc2 = 1 - 0.9 ** st["step"], 1 - 0.999 ** st["step"]
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(1e-8)
                    p.addcdiv_(m, denom, value=-lr / bc1)
                elif self.kind == "sgd":
                    d = d.add(p, alpha=wd) if wd != 0 else d
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = d.clone()
                    else:
                        st["momentum_buffer"].mul_(0.9).add_(d)
                    p.add_(st["momentum_buffer"], alpha=-lr)
                else:
                    if p.ndim != 1:
                        d = d.add(p, alpha=wd)
                        pn, dn, one = torch.norm(p), torch.norm(d), torch.ones(())
                        q = torch.where(pn > 0, torch.where(dn > 0, 0.001 * pn / dn, one), one)
                        d = d.mul(q)
                    mu = st.setdefault("mu", torch.zeros_like(p))
                    mu.mul_(0.9).add_(d)
                    p.add_(mu, alpha=-lr)


class OfficialLoop:
    """[ref: main_dino.py train_dino + train_one_epoch] DINOLoss, the optimizer on
    get_params_groups(student) and the per-iteration schedules (len(data_loader) iterations per
    epoch, drop_last), from the official values c; student may be DDP-wrapped."""

    def __init__(self, student, teacher, c, world_size=1):
        self.student, self.teacher, self.c = student, teacher, c
        self.dino_loss = DINOLoss(c)
        self.optimizer = Optimizer(c["optimizer"], get_params_groups(student))
        spe, bs = c["subset"] // c["batch_size"], c["batch_size"]  # global batch
        self.spe = spe
        lr = c["lr"] * bs / 256.0  # batch_size_per_gpu x world size / 256
        warm = c["warmup_epochs"]
        self.lr_schedule = cosine_scheduler(lr, c["min_lr"], c["epochs"], spe, warmup_epochs=warm)
        self.wd_schedule = cosine_scheduler(c["wd"], c["wd_end"], c["epochs"], spe)
        self.momentum_schedule = cosine_scheduler(c["m"], 1, c["epochs"], spe)
        self.n_clipped = 0

    def step(self, images, it):
        student, c = self.student, self.c
        epoch = it // self.spe
        # [ref: train_one_epoch] "update weight decay and learning rate according to their
        # schedule": lr in every group, weight decay in the first (regularised) only
        for i, param_group in enumerate(self.optimizer.param_groups):
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = self.wd_schedule[it]
        # [ref: train_one_epoch] teacher on the 2 global views, student on all, dino_loss
        teacher_output = self.teacher(images[:2])
        student_output = student(images)
        loss = self.dino_loss(student_output, teacher_output, epoch)
        # [ref: train_one_epoch] student update (fp32 path): zero_grad, backward, clip,
        # cancel the last layer's gradients, step
        for p in student.parameters():  # torch 1.7 zero_grad: zeros, not None
            if p.grad is not None:
                p.grad.zero_()
        loss.backward()
        if c["clip_grad"]:
            self.clip_gradients(c["clip_grad"])
        self.cancel_gradients_last_layer(epoch)
        self.optimizer.step()
        # [ref: train_one_epoch] "EMA update for the teacher", parameters only
        with torch.no_grad():
            m = self.momentum_schedule[it]
            module = getattr(student, "module", student)  # student.module under DDP
            for param_q, param_k in zip(module.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.detach()

    def clip_gradients(self, clip):
        """[ref: utils.py clip_gradients] each parameter's gradient on its own."""
        for _, p in self.student.named_parameters():
            if p.grad is not None:
                clip_coef = clip / (p.grad.data.norm(2) + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)
                    self.n_clipped += 1

    def cancel_gradients_last_layer(self, epoch):
        """[ref: utils.py cancel_gradients_last_layer]"""
        if epoch >= self.c["freeze_last_layer"]:
            return
        for n, p in self.student.named_parameters():
            if "last_layer" in n:
                p.grad = None


# ==== parity ================================================================================
def crops(g, b, size, local_size, n_local):
    views = [torch.randn(b, 3, size, size, generator=g) for _ in range(2)]
    return views + [torch.randn(b, 3, local_size, local_size, generator=g) for _ in range(n_local)]


def run_both(model, optimizer, args, ref, steps, size, local_size, n_local, b=B, ddp=None):
    """steps of dino.train_step and of the official loop on the same crops (this process's
    slice of a global batch of b x world size), each step from the same RNG state (drop_path's
    draws); after each, everything is compared (compare()). ddp: model under DDP."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as fit builds it (no fp16)
    g = torch.Generator().manual_seed(0)
    rank, world = C.get_rank(), C.get_world_size()
    for step in range(steps):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        views = crops(g, b * world, size, local_size, n_local)
        views[1][: b * world // 2] *= 0.5  # ranks see differently distributed data
        views = [v[rank * b : (rank + 1) * b] for v in views]
        torch.manual_seed(100 + step + 1000 * rank)
        batch = (views, None, None)
        stats = dino.train_step(ddp or model, batch, optimizer, scaler, step, args)
        torch.manual_seed(100 + step + 1000 * rank)
        loss = ref.step([v.clone() for v in views], step)
        helpers.close_rel(stats["loss"], loss, f"loss at step {step}")
        want = (ref.lr_schedule[step], ref.wd_schedule[step], ref.momentum_schedule[step])
        tau = ref.dino_loss.teacher_temp_schedule[step // ref.spe]
        got = (stats["lr"], stats["wd"], stats["m"], stats["tau_t"])
        assert got == pytest.approx((*want, tau), rel=1e-12, abs=1e-15)
        for grp, grp_ref in zip(optimizer.param_groups, ref.optimizer.param_groups, strict=True):
            assert grp["lr"] == grp_ref["lr"] and grp["weight_decay"] == grp_ref["weight_decay"]
        compare(model, optimizer, ref, before, step)
        with torch.no_grad():  # the next step from the same weights: AdamW's rounding-level
            for n, p in model.named_parameters():  # differences (compare()) would grow
                net, name = n.split(".", 1)
                net = getattr(ref, net)
                dict(getattr(net, "module", net).named_parameters())[official_name(name)].copy_(p)


def compare(model, optimizer, ref, before, step):
    """Every student / teacher parameter, its update since init (each to its own scale), the
    optimizer state, every buffer and the centre. AdamW divides by sqrt(v) + 1e-8: a gradient
    that is zero in exact arithmetic (the attention's key bias: softmax ignores a shift common
    to a query's logits), or near 0 by chance, is rounding noise, which AdamW turns into steps
    of up to lr: those entries (all the key bias; at most 1 in 1000 elsewhere) may differ by
    up to 2 x lr; their gradients and moments are compared as the rest."""
    nets = {"student": ref.student, "teacher": ref.teacher}
    params = {n: dict(getattr(net, "module", net).named_parameters()) for n, net in nets.items()}
    buffers = {n: dict(getattr(net, "module", net).named_buffers()) for n, net in nets.items()}
    lr = ref.lr_schedule[step]
    for n, p in model.named_parameters():
        net, name = n.split(".", 1)
        q = params[net][official_name(name)]
        what = f"{n} after step {step}"
        assert p.requires_grad == q.requires_grad, n
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:  # clipped, last layer cancelled: what the optimizer steps on
            helpers.close_rel(p.grad, q.grad, f"gradient of {what}", rtol=1e-4)
        d, d_ref = (p - before[n]).detach(), (q - before[n]).detach()
        # the update to its own scale; the EMA's (1 - m) x update to 2e-2 of it (p's rounding
        # is 1e-3 of it); a few ulps of p where the update is only rounding (a frozen layer)
        rtol = 2e-3 if net == "student" else 2e-2
        tol = rtol * d_ref.abs().max() + 4 * torch.finfo(q.dtype).eps * q.abs().max()
        off = (d - d_ref).abs() > tol
        if ref.c["optimizer"] == "adamw":
            if n.endswith("qkv.bias"):  # [q | k | v]: the key bias, all noise
                off[len(p) // 3 : 2 * len(p) // 3] = False
            # an entry whose gradient is near 0 by chance: its step's sign is the noise's
            assert off.float().mean() <= 1e-3, f"{what}: {int(off.sum())} entries off"
            assert ((d - d_ref).abs() <= 2 * lr + tol).all(), what
        else:
            assert not off.any(), f"update of {what}: {(d - d_ref).abs().max()} > {tol}"
        st, st_ref = optimizer.state.get(p, {}), ref.optimizer.state.get(q, {})
        assert {k for k in st if k != "step"} == {k for k in st_ref if k != "step"}, n
        for k in (k for k in st_ref if k != "step"):
            helpers.close_rel(st[k], st_ref[k], f"{k} of {what}", rtol=1e-4)
    for n, b in model.named_buffers():
        if n == "center":
            helpers.close_rel(b, ref.dino_loss.center, f"center after step {step}", rtol=1e-5)
        else:
            net, name = n.split(".", 1)
            helpers.close_rel(b, buffers[net][official_name(name)], f"{n} after {step}")


DEPTH = 3  # ViT blocks in these tests (12 in the presets): rates linspace(0, 0.1, 3) both sides


def build(monkeypatch, tmp_path, table_flags, settings, img_size=16):
    vit = dino.ViT
    monkeypatch.setattr(dino, "ViT", lambda s, p, d, depth, h, **kw: vit(s, p, d, DEPTH, h, **kw))
    model, optimizer, args = built_by_main(
        monkeypatch, tmp_path, *flags_of(table_flags, settings), "--img-size", img_size
    )
    c = official_cfg(table_flags, settings)
    student, teacher = official_nets(model, c, img_size)
    return model, optimizer, args, OfficialLoop(student, teacher, c)


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_matches_the_official_loop(monkeypatch, tmp_path, variant):
    """The small CNN (no official encoder): 5 steps across the warm-up, the frozen last layer
    (epoch 0), the teacher-temperature warm-up and each optimizer."""
    model, optimizer, args, ref = build(monkeypatch, tmp_path, *VARIANTS[variant])
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.img_size == 16
    assert args.optimizer == {"sgd-rn50": "sgd", "lars": "lars"}.get(variant, "adamw")
    run_both(model, optimizer, args, ref, 5, 16, 8, LOCAL)
    # the test covered what it claims: warm-up from 0, the last layer frozen in epoch 0 only
    assert ref.lr_schedule[0] == 0 and ref.lr_schedule[3] == ref.lr_schedule[4]
    v_ref = dict(ref.student.named_parameters())["head.last_layer.weight_v"]
    assert v_ref in ref.optimizer.state  # trained from epoch 1; g only if not norm_last_layer
    wn = model.student.head.last_layer.parametrizations.weight
    assert (wn.original0 in optimizer.state) == (not args.norm_last_layer) == (variant[-1] == "g")
    assert ref.n_clipped > 0 or variant in ("adamw", "sgd-rn50")
    taus = ref.dino_loss.teacher_temp_schedule
    assert taus[2] == pytest.approx(0.07) and taus[0] == pytest.approx(0.04)


# the ViT: the preset's drop_path 0.1, AdamW and wd cosine; lr x20 (a visible step) from step 0
VIT = {"arch": "vit_tiny", "patch_size": 8, "local_size": 16, "subset": 4, "batch_size": 4}
VIT |= {"epochs": 4, "warmup_epochs": 0, "hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64}
VIT |= {"n_local": 2, "tau_t": 0.07, "tau_t_warmup_epochs": 2, "lr": 0.01}
VIT_WD = {"wd": 2.0, "wd_end": 20.0}  # the decay at 2 x lr x wd ~ 1e-4 of each weight


@pytest.mark.parametrize("wd", ["preset", "large"])
def test_vit_train_step_matches_the_official_vit(monkeypatch, tmp_path, wd):
    """vit_tiny/8 at 32 px (16 px locals: the interpolated positions), the student with
    stochastic depth (the same draws), the teacher without: 2 steps (epochs) of batch 4, the
    last layer frozen in the first, the teacher temperature 0.04 then 0.07."""
    settings = VIT | (VIT_WD if wd == "large" else {})
    model, optimizer, args, ref = build(monkeypatch, tmp_path, VIT_FLAGS, settings, img_size=32)
    assert args.drop_path == ref.c["drop_path"] == 0.1 and args.optimizer == "adamw"
    DROPPED.clear()
    run_both(model, optimizer, args, ref, 2, 32, 16, 2, b=4)
    assert sum(DROPPED) > 0  # stochastic depth dropped some branches, in the same places
    assert args.wd == ref.c["wd"] == (2.0 if wd == "large" else 0.04)


def ddp_parity(tmp_path):
    """In each of 2 processes: dino.main's model and optimizer under DDP as fit wraps them, and
    the official loop (its student under DDP, DINOLoss.update_center's all_reduce) on this
    rank's half of the same global batch: 2 steps compared on every rank. -> the centres."""
    mp = pytest.MonkeyPatch()
    settings = VIT | {"subset": 8, "batch_size": 8, "img_size": 16, "local_size": 8}
    model, optimizer, args, ref = build(mp, tmp_path, VIT_FLAGS, settings, img_size=16)
    assert args.world_size == 2 and args.batch_size_per_gpu == 4
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    ref.student = nn.parallel.DistributedDataParallel(ref.student)  # [ref: train_dino]
    ref.optimizer = Optimizer(ref.c["optimizer"], get_params_groups(ref.student))
    run_both(model, optimizer, args, ref, 2, 16, 8, 2, b=4, ddp=ddp)
    mp.undo()
    return {"center": model.center, "center_ref": ref.dino_loss.center}


def test_two_processes_match_the_official_ddp_loop(tmp_path):
    """The centre is the EMA of the GLOBAL batch's teacher mean (all_reduce of the sum, divided
    by len(teacher_output) x world size), the same on both ranks; the loss, gradients (DDP's
    mean), student and teacher of each rank are the official ones (checked in each process)."""
    ranks = spawn(ddp_parity, 2, tmp_path, tmp_path)
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    helpers.close_rel(ranks[0]["center"], ranks[1]["center_ref"], "centre", rtol=1e-5)


def test_resnet18_cifar_train_step_matches_torchvision(monkeypatch, tmp_path):
    """The CIFAR preset (R18, CIFAR stem, AdamW + wd cosine) against torchvision's resnet18:
    2 steps (epochs) at 16 px, batch 2, the teacher's own BN statistics. The table's Devs (a
    choice of value, not of code: AdamW, its wd, clipping) run at the project's value on both
    sides."""
    devs = {k: CIFAR[k].value for k in ("optimizer", "wd", "wd_end", "clip_grad")}
    settings = {**devs, "tau_t_warmup_epochs": 2}
    settings |= {"arch": "resnet18", "subset": 2, "batch_size": 2, "epochs": 4, "n_local": 2}
    settings |= {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "local_size": 8}
    settings |= {"lr": 0.01, "freeze_last_layer": 0, "warmup_epochs": 0}
    model, optimizer, args, ref = build(monkeypatch, tmp_path, CIFAR_FLAGS, settings)
    assert args.arch == "resnet18" and args.wd == 0.04 and args.optimizer == "adamw"
    run_both(model, optimizer, args, ref, 2, 16, 8, 2, b=2)


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_schedules_are_the_official_ones_at_the_presets(monkeypatch, tmp_path, arch):
    """The whole per-step lr / wd / momentum / tau_t schedules of the ImageNet preset (ViT: the
    README's vanilla run, 8 x 64; convnets: the RN50 command, 8 x 64) at ImageNet's real steps
    per epoch (1281167 // 512) against main_dino.py's numpy ones; the teacher-temperature
    warm-up of the paper (0.04 -> 0.07 in 30 epochs) too."""
    flags = ["--preset", "imagenet", "--arch", arch, "--subset", 512, "--hidden-dim", 32]
    flags += ["--out-dim", 64, "--bottleneck-dim", 16, "--img-size", 16, "--local-size", 16]
    table_flags = VIT_FLAGS if arch.startswith("vit") else R50_FLAGS
    for settings in ({}, {"tau_t": 0.07, "tau_t_warmup_epochs": 30}):
        spe = 1281167 // 512
        extra = flags_of((), settings)
        model, opt, a = built_by_main(
            monkeypatch, tmp_path / str(len(extra)), *flags, *extra, spe=spe
        )
        c = official_cfg(table_flags, settings)
        assert c["batch_size"] == 512 and c["epochs"] == 100 and c["warmup_epochs"] == 10
        E, bs = c["epochs"], c["batch_size"]
        lr = cosine_scheduler(c["lr"] * bs / 256, c["min_lr"], E, spe, c["warmup_epochs"])
        want = {
            "lr": lr,
            "wd": cosine_scheduler(c["wd"], c["wd_end"], E, spe),
            "m": cosine_scheduler(c["m"], 1, E, spe),
            "tau_t": np.repeat(teacher_temp_schedule(c), spe),
        }
        for k, v in want.items():
            got = np.array(a.sched[k])
            assert got.shape == v.shape == (a.total_steps,), k
            np.testing.assert_allclose(got, v, rtol=1e-12, atol=1e-15, err_msg=k)
        w = spe * c["warmup_epochs"]  # the peak AT the last warm-up step, and again after it
        assert a.sched["lr"][0] == 0 and a.sched["lr"][w - 1] == a.sched["lr"][w]
        assert (a.optimizer, type(opt).__name__) == (
            ("adamw", "AdamW") if arch.startswith("vit") else ("sgd", "SGD")
        )
        # get_params_groups: the same tensors in the same two groups (ViT: cls_token and
        # pos_embed are 3-D, so regularised; LayerNorm and biases not)
        groups_ref = get_params_groups(model.student)
        for grp, grp_ref in zip(opt.param_groups, groups_ref, strict=True):
            assert [id(p) for p in grp["params"]] == [id(p) for p in grp_ref["params"]]
        assert opt.param_groups[1]["weight_decay"] == 0.0
