"""cleanssl common.py - the only module the method files share, in two parts.

PART 1, the building blocks: gathers and global BatchNorm, augmentation recipes, backbones (ResNet,
ViT, a small CNN), optimisation (LARS, schedules, EMA, optimizer step, autocast, collapse monitor).
It imports the standard library, torch, torchvision, einops, numpy, PIL only: copy it on its own.
PART 2, the run: data, checkpoints, resume, SIGTERM, evaluation, the CLI (RunArgs), logging."""

# ==== 1.0 imports =========================================================================
import math
import random
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from einops import rearrange
from PIL import Image, ImageFilter


# ==== 1.1 processes: gathers and global BatchNorm =========================================
def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [W*B, ...] by rank, no grad
    if get_world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllReduceWithGrad(torch.autograd.Function):  # sum over ranks, the gradient all-reduced too
    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    backward = forward  # d(sum_r x_r) / dx_r = 1: the backward is the same all-reduce


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:  # sum over ranks, differentiable
    return x if get_world_size() == 1 else _AllReduceWithGrad.apply(x)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [W*B, ...] by rank, with grad
    if get_world_size() == 1:
        return x
    out = x.new_zeros(get_world_size(), *x.shape)
    out[get_rank()] = x
    return all_reduce_with_grad(out).flatten(0, 1)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN over the global batch, on gloo too (SyncBatchNorm: NCCL only); sync=False: per process."""

    _check_input_dim = nn.SyncBatchNorm._check_input_dim  # any input with >= 2 dims
    sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1 or not self.sync:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        n = xf.numel() // xf.shape[1] * get_world_size()
        mean = all_reduce_with_grad(xf.sum(dims)) / n
        xc = xf - mean.view(shape)
        var = all_reduce_with_grad((xc * xc).sum(dims)) / n
        if self.track_running_stats:  # the unbiased variance, as torch's BatchNorm
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
        w, b = (self.weight.view(shape), self.bias.view(shape)) if self.affine else (1.0, 0.0)
        return (xc * torch.rsqrt(var + self.eps).view(shape) * w + b).to(x.dtype)


def convert_sync_bn(module: nn.Module) -> nn.Module:  # BatchNorms over the global batch (W > 1)
    if get_world_size() > 1 and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return global_bn(module) if get_world_size() > 1 else module


def global_bn(module: nn.Module, sync: bool = True) -> nn.Module:
    """Every BatchNorm (subclasses too, e.g. split BN) -> GlobalBatchNorm, the same state."""
    for name, c in module.named_children():
        if isinstance(c, nn.modules.batchnorm._BatchNorm):
            f = c.num_features, c.eps, c.momentum, c.affine, c.track_running_stats
            new = GlobalBatchNorm(*f)
            new.load_state_dict(c.state_dict())
            new.sync = sync
            for n, p in new.named_parameters():  # e.g. a frozen BN beta stays frozen
                p.requires_grad_(getattr(c, n).requires_grad)
            setattr(module, name, new)
        else:
            global_bn(c, sync)
    return module


# ==== 1.2 augmentation recipes (torchvision) ==============================================
def gaussian_blur(img):  # sigma ~ U(0.1, 2.0) [SimCLR App. A; ref: moco/loader.py GaussianBlur]
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class MultiView(list):  # transforms; one image -> the list of its views (2, asymmetric, multi-crop)
    def __call__(self, img) -> list:
        return [t(img) for t in self]


def to_tensor(ops: list, mean_std=None) -> T.Compose:
    return T.Compose([*ops, T.ToTensor()] + ([T.Normalize(*mean_std)] if mean_std else []))


AUG = {"scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "gray_p": 0.2}
AUG.update(blur_p=0.0, solarize_p=0.0, gray_first=False, bicubic=False, flip_p=0.5)
AUG["additive_brightness"] = False  # SimCLR v1: x + U(-b, b) instead of x * U(1 - b, 1 + b)


def add_brightness(img, d: float):
    """x + d, clipped to [0, 1] [ref: simclr data_util.py (v1)]; PIL images: + round(d * 255)."""
    if isinstance(img, torch.Tensor):
        return (img + d).clamp(0.0, 1.0)
    x = np.clip(np.asarray(img, np.float32) + d * 255, 0, 255)
    return Image.fromarray(x.round().astype(np.uint8))


class AdditiveColorJitter(T.ColorJitter):  # ColorJitter, SimCLR v1's brightness x + U(-b, b)
    def __init__(self, brightness, contrast=0, saturation=0, hue=0):
        super().__init__(0, contrast, saturation, hue)
        self.delta = brightness

    def forward(self, img):
        order, *factors = self.get_params(None, self.contrast, self.saturation, self.hue)
        factors[0], fn = float(torch.empty(1).uniform_(-self.delta, self.delta)), T.functional
        ops = (add_brightness, fn.adjust_contrast, fn.adjust_saturation, fn.adjust_hue)
        for i in order.tolist():
            if factors[i] is not None:  # None: a range of 0, off
                img = ops[i](img, factors[i])
        return img


def augmentation(size: int, mean_std=None, **kw) -> T.Compose:
    """Crop, colour jitter (random op order), grayscale, blur, solarize, flip; knobs: AUG."""
    o = SimpleNamespace(**{**AUG, **kw})
    mode = T.InterpolationMode.BICUBIC if o.bicubic else T.InterpolationMode.BILINEAR
    jitter = (AdditiveColorJitter if o.additive_brightness else T.ColorJitter)(*o.jitter)
    color = [T.RandomApply([jitter], p=o.jitter_p), T.RandomGrayscale(o.gray_p)]
    ops = [T.RandomResizedCrop(size, scale=o.scale, interpolation=mode)]
    ops += color[::-1] if o.gray_first else color
    ops += [T.RandomApply([gaussian_blur], p=o.blur_p)] if o.blur_p > 0 else []
    ops += [T.RandomSolarize(128, p=o.solarize_p)] if o.solarize_p > 0 else []
    ops += [T.RandomHorizontalFlip(o.flip_p)] if o.flip_p > 0 else []
    return to_tensor(ops, mean_std)


def simclr_augment(size, mean_std=None, s=1.0, blur=True, additive=False):
    """[SimCLR App. A; ref: simclr data_util.py] jitter 0.8s/0.2s p=0.8, gray 0.2, blur p=0.5,
    bicubic crop (0.08, 1); CIFAR: s=0.5, no blur. additive: v1's brightness x + U(-0.8s, 0.8s)."""
    jitter, kw = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), {"additive_brightness": additive}
    return augmentation(size, mean_std, jitter=jitter, blur_p=0.5 * blur, bicubic=True, **kw)


def moco_augment(size, mean_std, version="v2", scale=(0.2, 1.0), blur=True):
    """v1 [MoCo §4; ref: main_moco.py]: gray 0.2 then jitter 0.4 always; v2 [MoCo v2 §2; ref:
    --aug-plus]: jitter (0.4, 0.4, 0.4, 0.1) p=0.8, gray 0.2, blur p=0.5."""
    v1 = {"jitter": (0.4,) * 4, "jitter_p": 1.0, "gray_first": True}
    knobs = v1 if version == "v1" else {"blur_p": 0.5 * blur}
    return augmentation(size, mean_std, scale=scale, **knobs)


def byol_augment(size, mean_std, scale=(0.08, 1.0), blur=True, bicubic=False) -> MultiView:
    """Asymmetric pair [BYOL Tab. 6; MoCo v3 main_moco.py]: jitter (0.4,0.4,0.2,0.1) p=0.8, gray
    0.2, blur p=1.0 / 0.1, solarize p=0 / 0.2; bicubic crops in BYOL / Barlow Twins."""
    kw = {"scale": scale, "jitter": (0.4, 0.4, 0.2, 0.1), "bicubic": bicubic}
    view = partial(augmentation, size, mean_std, **kw)
    return MultiView([view(blur_p=1.0 * blur), view(blur_p=0.1 * blur, solarize_p=0.2)])


def multicrop_augment(global_tf, local_tf, n_global: int = 2, n_local: int = 6) -> MultiView:
    """n global + m local crops [SwAV §3.2], e.g. 2x224 (0.14, 1) + 6x96 (0.05, 0.14)."""
    return MultiView([global_tf] * n_global + [local_tf] * n_local)


# ==== 1.3 backbones =======================================================================
ARCHS = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base", "smallcnn")
VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # dim, heads
TIMM_KEYS = {"patch_embed.proj.": "patch_embed.", "attn.qkv.": "qkv.", "attn.proj.": "proj."}
TIMM_KEYS.update({"mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.2."})  # timm / DINO ViT names -> ViT's


def build_backbone(arch: str, img_size=224, zero_init_residual=False, norm_layer=None, **kw):
    """-> (module: [B, C, H, W] -> h [B, feat_dim], feat_dim). ResNets: torchvision's minus fc,
    CIFAR stem (3x3 stride-1 conv, no max-pool) [SimCLR resnet.py] at <= 64 px. kw: in_chans, width
    (R50+: width_per_group; smallcnn: all layers), stem_padding (CIFAR stem: 1 [SimCLR]; solo-learn
    2); ViT: patch_size (16; 4 at <= 64 px), num_heads, pos_embed, freeze_patch_embed."""
    in_chans, width, pad = kw.get("in_chans", 3), kw.get("width", 1.0), kw.get("stem_padding", 1)
    if arch in ARCHS and arch.startswith("resnet"):
        kw = {"norm_layer": norm_layer, "width_per_group": int(64 * width)}
        net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual, **kw)
        if img_size <= 64 or in_chans != 3:
            k, s, p = (3, 1, pad) if img_size <= 64 else (7, 2, 3)
            net.conv1 = nn.Conv2d(in_chans, 64, k, s, p, bias=False)
        net.maxpool = nn.Identity() if img_size <= 64 else net.maxpool
        dim, net.fc = net.fc.in_features, nn.Identity()
        return net, dim
    if arch in VIT_SIZES:
        (dim, heads), patch = VIT_SIZES[arch], vit_patch(img_size, kw.get("patch_size"))
        heads = kw.get("num_heads") or heads
        net = ViT(img_size, patch, dim, 12, heads, kw.get("pos_embed"), in_chans)
        net.patch_embed.requires_grad_(not kw.get("freeze_patch_embed"))  # MoCo v3: frozen
        return net, dim
    if arch == "smallcnn":  # 4 conv-BN-ReLU (3x3; strides 1,2,2,2) + pool: a CPU test encoder
        c, layers = int(32 * width), []
        chans = [in_chans, c, 2 * c, 4 * c, 8 * c]
        for i in range(4):
            conv = nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1, bias=False)
            layers += [conv, (norm_layer or nn.BatchNorm2d)(chans[i + 1]), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), int(256 * width)
    raise ValueError(f"unknown arch {arch}; choose from {', '.join(ARCHS)}")


def vit_patch(img_size: int, patch_size=0) -> int:  # the ViT's patch side: 16, 4 at <= 64 px
    return patch_size or (16 if img_size > 64 else 4)


def sincos_pos_embed(dim: int, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, dim]: sin, cos of the patch row, then of its column [ref: moco-v3 vits.py]"""
    y, x = torch.meshgrid(torch.arange(gh * 1.0), torch.arange(gw * 1.0), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    out = [f(c.flatten()[:, None] * omega) for c in (y, x) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


class Block(nn.Module):  # pre-norm transformer block, attention by F.scaled_dot_product_attention
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.heads, hidden, self.drop_path = heads, int(dim * mlp_ratio), drop_path
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def drop(self, y: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: each sample's y kept w.p. 1 - p, / (1 - p) [ref: dino drop_path]."""
        if not self.training or self.drop_path == 0:
            return y
        r = torch.rand(len(y), 1, 1, dtype=y.dtype, device=y.device)  # [B, 1, 1]
        return y.div(1 - self.drop_path) * (1 - self.drop_path + r).floor_()

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        a = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):  # -> final-norm [CLS] token [B, dim]; other sizes interpolate the positions
    def __init__(self, img_size, patch, dim, depth, heads, pos_embed="", in_chans=3, drop_path=0.0):
        super().__init__()
        g = self.grid = img_size // patch
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        sincos = pos_embed == "sincos"  # fixed; else learned
        pos = sincos_pos_embed(dim, g, g) if sincos else torch.randn(g * g, dim) * 0.02
        pos = torch.cat([torch.zeros(1, dim), pos])[None]  # [1, 1 + g^2, dim], the cls slot first
        self.pos_embed = nn.Parameter(pos, requires_grad=not sincos)
        rates = torch.linspace(0, drop_path, depth).tolist()  # block i's drop_path, 0 -> drop_path
        self.blocks = nn.Sequential(*[Block(dim, heads, drop_path=p) for p in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for m in (m for m in self.modules() if isinstance(m, nn.Linear)):  # timm's init:
            nn.init.normal_(m.weight, std=0.02)  # trunc_normal_ cut at +-2 (100 std): a normal
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x, pos = self.patch_embed(x), self.pos_embed  # [B, dim, gh, gw]
        if x.shape[-2:] != (self.grid, self.grid):
            grid = rearrange(pos[:, 1:], "1 (h w) d -> 1 d h w", h=self.grid)
            grid = F.interpolate(grid, size=x.shape[-2:], mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], rearrange(grid, "1 d h w -> 1 (h w) d")], dim=1)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
        return self.norm(self.blocks(x + pos))[:, 0]


# ==== 1.4 optimisation ====================================================================
class LARS(torch.optim.Optimizer):
    """LARS [You et al. 2017; ref: moco-v3 optimizer.py]: for ndim > 1, d = g + wd*w scaled by
    eta*|w|/|d|; 1-D params (biases, norms): no decay, no adaptation. m <- mu*m + d; w -= lr*m.
    solo=True (solo-learn's CIFAR lrs) [ref: solo/utils/lars.py]: trust eta*|w|/(|g| + wd*|w| +
    1e-8), clip_lr caps it at 1/lr. classic=True [ref: simclr lars_optimizer.py]: m <- mu*m + lr*d;
    w -= m. "adapt": False: a group not adapted (fine-tuning head) [ref: simclr model_util.py]."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001, **kw):
        d = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "clip_lr": False}
        d.update(solo=False, classic=False, adapt=True)
        super().__init__(params, {**d, **kw, "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):  # foreach ops: a few kernels per group, not per parameter
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            ds = [p.grad for p in ps]
            big = [i for i, p in enumerate(ps) if p.ndim > 1 and g["adapt"]]
            if big:  # no host sync: the trust ratios stay tensors
                pb, wd, eta = [ps[i] for i in big], g["weight_decay"], g["trust_coefficient"]
                db = torch._foreach_add([ds[i] for i in big], pb, alpha=wd)
                pn = torch.stack(torch._foreach_norm(pb))
                if g["solo"]:  # |g| + wd |w| + eps, and no decay where |w| or |g| is 0
                    gn = torch.stack(torch._foreach_norm([ds[i] for i in big]))
                    ok, trust = (pn > 0) & (gn > 0), eta * pn / (gn + wd * pn + 1e-8)
                    db = [torch.where(o, d, ds[i]) for o, d, i in zip(ok.unbind(), db, big)]
                else:
                    dn = torch.stack(torch._foreach_norm(db))
                    ok, trust = (pn > 0) & (dn > 0), eta * pn / dn
                if g["clip_lr"]:  # min(trust / lr, 1): lr 0 (warm-up start) gives 1
                    trust = (trust / g["lr"] if g["lr"] else torch.ones_like(trust)).clamp(max=1)
                torch._foreach_mul_(db, list(torch.where(ok, trust, 1.0).unbind()))
                for i, d in zip(big, db):
                    ds[i] = d
            bufs = [self.state[p].setdefault("mu", torch.zeros_like(p)) for p in ps]
            if ps:
                torch._foreach_mul_(bufs, g["momentum"])
                torch._foreach_add_(bufs, ds, alpha=g["lr"] if g["classic"] else 1.0)
                torch._foreach_add_(ps, bufs, alpha=-1.0 if g["classic"] else -g["lr"])


def param_groups(modules, wd: float) -> list[dict]:  # wd on >= 2-D params only (not biases, norms)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(base, final, total_steps, warmup_steps=0, warmup_start=0.0, linspace=False):
    """Per-step values: linear warm-up from warmup_start at step 0, base coming at step w [ref:
    moco-v3 main_moco.py adjust_learning_rate, simclr model_util.learning_rate_schedule, byol
    schedules.py, barlowtwins main.py] or, linspace=True, already at step w - 1 as
    np.linspace(warmup_start, base, w) [ref: dino utils.cosine_scheduler, swav main_swav.py,
    solo-learn LinearWarmupCosineAnnealingLR]; then half-cosine base -> final from step w."""
    w, n = warmup_steps, max(total_steps - warmup_steps, 1)
    step = (base - warmup_start) / (max(w - 1, 1) if linspace else max(w, 1))
    warm = [warmup_start + i * step for i in range(w)]  # as numpy's linspace computes it
    if linspace and w > 1:
        warm[-1] = base
    cos = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return (warm + cos)[: max(total_steps, 1)]


def step_schedule(base, total_steps, steps_per_epoch, milestones, factors=(), warmup_steps=0):
    """Per step: base x factors[i] from epoch milestones[i] on (sorted; x0.1 each), x warm-up."""
    factors = factors or [0.1 ** (i + 1) for i in range(len(milestones))]
    f = lambda e: ([1.0] + [x for m, x in zip(milestones, factors) if e >= m])[-1]
    w, spe = max(warmup_steps, 1), steps_per_epoch
    return [base * f(s // spe) * min(1.0, (s + 1) / w) for s in range(max(total_steps, 1))]


def set_lr(optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = g.get("fixed_lr", lr)


def optimizer_step(loss, optimizer, scaler, clip: float = 0.0, hook=None) -> torch.Tensor:
    """backward (fp16: scaled), unscale, hook() (e.g. p.grad = None), grad norm, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if hook is not None:
        hook()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return norm


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.amp != "off")


@torch.no_grad()
def ema_(target: list, online: list, m: float):  # target <- m * target + (1 - m) * online
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1.0 - m)


@torch.no_grad()
def embedding_stats(z1: torch.Tensor, z2: torch.Tensor | None = None) -> dict:
    """The collapse monitor, over the GLOBAL batch of embeddings z1 [B, D] (of view 1) and z2 (of
    view 2, row i the same image; None for one view); at log steps only (eigvalsh syncs). z_std:
    the mean per-dim std of l2-normalised z1 [SimSiam §4.1]: ~1/sqrt(D) healthy, 0 collapsed.
    rank: exp of the entropy of z1's singular values s, p = s / sum(s) + 1e-7 [RankMe, Garrido
    et al. 2023]: 1 to min(B, D). view_top1: how often z2[i] is z1[i]'s nearest (cosine) of all
    z2: 1/B by chance."""
    z = gather_no_grad(z1).double()  # float64 Gram: its tiny eigenvalues stay ~0
    s = torch.linalg.eigvalsh(z @ z.T if len(z) <= z.shape[1] else z.T @ z).clamp(min=0).sqrt()
    p = s / s.sum() + 1e-7
    z = F.normalize(z, dim=1)
    out = {"z_std": z.std(0).mean(), "rank": torch.exp(-(p * p.log()).sum())}
    if z2 is not None:
        near = (z @ F.normalize(gather_no_grad(z2).double(), dim=1).T).argmax(1)
        out["view_top1"] = (near == torch.arange(len(z), device=z.device)).double().mean()
    return out


def collapse_warning(s: dict, dim: int, step: int) -> str:
    """The warning for a second log step in a row whose embedding_stats (floats s, embeddings of
    D = dim) look collapsed, else "". Collapsed: z_std 0 (rank 1); healthy: ~1/sqrt(D) [SimSiam
    §4.1, Fig. 2]. The lowest healthy values measured (README "Expected training curves"): CPC's
    (non-negative pooled features) z_std x sqrt(D) 0.28, rank 7.8 (cpu-smoke, 60 steps); at
    random init, batch 8, 0.06 and 1.9 (MoCo v2): the thresholds 0.02 / sqrt(D) and 1.5 between."""
    low = {"z_std": 0.02 / math.sqrt(dim), "rank": 1.5}
    signs = ", ".join(f"{k} {s[k]:.3g} < {v:.3g}" for k, v in low.items() if s[k] < v)
    if not signs:
        return ""
    what = "try a lower --lr, check the augmentations and the data"
    return f"warning: collapse at step {step}? {signs} at 2 log steps in a row: {what}"


# ==== PART 2: the run. Data, the device pipeline, checkpoints, evaluation, CLI, logging ===
# ==== 2.0 imports =========================================================================
import argparse
import atexit
import contextlib
import copy
import dataclasses
import errno
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import signal
import sys
import time
import warnings
from functools import wraps

from tqdm import tqdm

try:
    import fcntl  # the out-dir lock; absent on Windows, where it degrades to a note
except ImportError:
    fcntl = None


def fail(msg: str):  # "error: msg" on stderr, no traceback; exit 2 as argparse (str(): the line)
    end_bars()
    print(f"error: {msg}", file=sys.stderr, flush=True)
    e = SystemExit(f"error: {msg}")
    e.code = 2
    raise e


def end_bars():  # close the open progress bars: a last message then stands on its own line, last
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ==== 2.1 processes =======================================================================
def setup_ddp(args) -> torch.device:  # torchrun's env: NCCL / gloo group; the derived args
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and args.device in ("", "cuda")
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(args.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)  # threads joined before the interpreter exits
    resolve_sizes(args)  # Args built in code, not by parse_args
    args.rank, args.world_size, args.is_main = get_rank(), get_world_size(), get_rank() == 0
    args.device = f"cuda:{args.local_rank}" if cuda else (args.device or "cpu")
    w, b, fb = args.world_size, args.batch_size, args.ft_batch_size
    if b % w:
        fail(f"--batch-size {b} is not divisible by world size {w}; pass a multiple")
    if args.finetune_fraction and fb % w:
        fail(f"--ft-batch-size {fb} is not divisible by world size {w}; pass a multiple")
    args.batch_size_per_gpu = b // w
    args.amp = {"auto": "bf16" if args.device.startswith("cuda") else "off"}.get(args.amp, args.amp)
    return torch.device(args.device)


@torch.no_grad()
def sync_buffers(model: nn.Module):
    """Every rank takes rank 0's buffers (not `per_rank` ones), as the official DDP before each
    forward; training reads batch BN statistics, so once per checkpoint gives the official model."""
    net = unwrap(model)
    for name, b in net.named_buffers():
        if get_world_size() > 1 and name not in getattr(net, "per_rank", ()):
            dist.broadcast(b, 0)


# ==== 2.2 data ============================================================================
CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder", "cifar10-npz", "synthetic")


class ArrayImages(torch.utils.data.TensorDataset):  # uint8 [N, H, W, 3] -> (PIL image, label)
    def __getitem__(self, i):
        return Image.fromarray(self.tensors[0][i].numpy()), int(self.tensors[1][i])


def synthetic_images(n: int, size: int, seed: int, num_classes: int = 10) -> ArrayImages:
    """Deterministic labelled images: a per-class smooth colour pattern plus per-image noise."""
    g = torch.Generator().manual_seed(1234)  # the class patterns: the same for every split
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size, mode="bilinear")
    g, y = torch.Generator().manual_seed(seed), torch.arange(n) % num_classes
    x = 0.7 * protos[y] + 0.3 * torch.rand(n, 3, size, size, generator=g)
    return ArrayImages((x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), y)


def npz_images(path: str, split: str) -> ArrayImages:  # CIFAR-10 JPEG npz (see its README)
    d = np.load(path)
    hdr, scans, off = d["jpeg_header"].tobytes(), d[f"{split}_scans"], d[f"{split}_offsets"]
    x = torch.empty(len(off) - 1, 32, 32, 3, dtype=torch.uint8)
    for i in range(len(off) - 1):
        jpeg = hdr + scans[off[i] : off[i + 1]].tobytes() + b"\xff\xd9"
        x[i] = torch.from_numpy(np.array(open_rgb(io.BytesIO(jpeg))))
    return ArrayImages(x, torch.from_numpy(d[f"y_{split}"]))


def base_datasets(args, flag: str = "--data-dir") -> tuple:  # (train, test or None, num_classes)
    ds, root, tv = args.dataset, args.data_dir, torchvision.datasets
    if ds == "synthetic":
        size, n = args.img_size, args.subset or 512
        return synthetic_images(n, size, 0), synthetic_images(256, size, 1), 10
    if ds == "cifar10-npz":
        path = root if root.endswith(".npz") else os.path.join(root, "cifar10_jpeg.npz")
        if not os.path.isfile(path):
            fail(f"{path} not found; pass --data-dir to the folder holding cifar10_jpeg.npz")
        return npz_images(path, "train"), npz_images(path, "test"), 10
    if ds in ("imagenet", "folder"):  # folder: train/ [val/] or, lacking train/, the folder
        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        if ds == "folder" and not os.path.isdir(train_dir):
            train_dir, val_dir = root, ""
        if not os.path.isdir(train_dir):
            fail(f"no image folder at {train_dir}; pass {flag} to a folder with train/ [val/]")
        try:  # a test split only beside labelled training images
            train = ImageFiles(train_dir)
            test = ImageFiles(val_dir) if train.classes and os.path.isdir(val_dir) else None
            return train, test, len(train.classes)
        except FileNotFoundError as e:  # no image file, or a class folder without one
            fail(f"{str(e).splitlines()[0]}; pass {flag} to a folder of images (or of classes)")
    if ds not in DATASETS:
        fail(f"unknown --dataset {ds}; choose from {', '.join(DATASETS)}")
    try:
        if ds == "stl10":  # pretrain on train+unlabeled; kNN/linear use the labelled part
            return tv.STL10(root, "train+unlabeled", download=True), tv.STL10(root, "test"), 10
        cls, nc = (tv.CIFAR10, 10) if ds == "cifar10" else (tv.CIFAR100, 100)
        return cls(root, train=True, download=True), cls(root, train=False, download=True), nc
    except (RuntimeError, OSError) as e:
        why = f"{ds} not in --data-dir {root} and not downloadable ({type(e).__name__})"
        fail(f"{why}; point --data-dir at a copy or use --dataset cifar10-npz/folder/synthetic")


def open_rgb(path) -> Image.Image:  # any mode -> RGB; 16-bit grayscale scaled, not clipped to 255
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG / TIFF grayscale
            x = (np.asarray(im, np.float32) / 257).round().clip(0, 255).astype(np.uint8)
            return Image.fromarray(x).convert("RGB")
        return im.convert("RGB")


class ImageFiles(torchvision.datasets.ImageFolder):
    """ImageFolder (images in class folders only), else all images under root, label -1; PIL's
    formats -> RGB; an undecodable file is marked in `bad` (shared: workers' too), the next used."""

    def __init__(self, root: str):
        walk = [os.path.join(d, f) for d, _, fs in os.walk(root, followlinks=True) for f in fs]
        files = sorted(filter(torchvision.datasets.folder.is_image_file, walk))
        if all(os.path.relpath(f, root).count(os.sep) == 1 for f in files):
            super().__init__(root, loader=open_rgb)  # no image file: its error
        else:  # unlabelled: images at any depth
            torchvision.datasets.VisionDataset.__init__(self, root)
            self.loader, self.classes, self.samples = open_rgb, [], [(f, -1) for f in files]
            self.targets = [-1] * len(files)
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def __getitem__(self, i: int):
        for j in range(i, i + len(self.samples)):
            try:
                return super().__getitem__(j % len(self.samples))
            except Exception:  # whatever PIL raises on a broken file
                self.bad[j % len(self.samples)] = True
        raise RuntimeError(f"no file under {self.root} can be decoded as an image")


def skipped_files(data) -> list[str]:  # the undecodable files met so far in data's folders
    sets = [getattr(d, "dataset", None) for d in (data.train, data.train_eval, data.test)]
    sets = {id(ds): ds for ds in sets if isinstance(ds, ImageFiles)}.values()  # --eval-dir's too
    return [ds.samples[j][0] for ds in sets for j in ds.bad.nonzero()[:, 0].tolist()]


class Indexed(torch.utils.data.Dataset):
    """(transform(image), label, index). Keys (index, epoch) seed the augmentation by (seed, epoch,
    index): views independent of worker count and order, so resume is exact anywhere."""

    def __init__(self, base, transform, n: int = 0, labelled_only: bool = False, seed=None):
        self.transform, self.seed, idx = transform, seed, list(range(len(base)))
        if labelled_only and hasattr(base, "labels"):  # STL-10 unlabeled images have label -1
            idx = [i for i in idx if base.labels[i] >= 0]
        self.dataset, self.indices = base, idx[:n] if n else idx

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        img, y = self.dataset[self.indices[i]]
        if epoch is None or self.seed is None:
            return self.transform(img), y, i
        s, state = (self.seed * 1_000_003 + epoch) * 100_000_007 + i, random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            out = self.transform(img)
        random.setstate(state)
        return out, y, i


def dataset_mean_std(args) -> tuple:  # the per-channel mean and std of --dataset's images
    return CIFAR_MEAN_STD if "cifar" in args.dataset else IMAGENET_MEAN_STD


def build_data(args, views, mean_std) -> SimpleNamespace:
    """Pretraining set (views: one image -> its views), kNN/linear sets under mean_std (None: none),
    step counts; the batch, the evaluation's limits and what it cannot do, checked now."""
    train, test, nc = base_datasets(args)
    labelled, e, need = train, args.eval_dir, "train/ and val/ of class folders"
    if e:  # evaluation and fine-tuning on these labelled images, pretraining on --data-dir's
        folders = SimpleNamespace(dataset="imagenet", data_dir=e)  # train/ and val/
        labelled, test, nc = base_datasets(folders, "--eval-dir")
        if test is None or labelled.classes != test.classes:
            fail(f"--eval-dir {e}: needs {need}, the same in both; pass such a folder")
    size, n, cap, ff = args.img_size, args.subset, args.knn_subset, args.finetune_fraction
    ev, seed, m = eval_transform(size, mean_std), args.seed, 0 if e else n  # --subset: --data-dir's
    data = SimpleNamespace(num_classes=nc, train=Indexed(train, views, n, seed=seed))
    data.train_eval = Indexed(labelled, ev, cap or m, labelled_only=True)
    data.train_linear = Indexed(labelled, eval_transform(size, mean_std, train=True), m, True, seed)
    data.test = Indexed(test, ev, cap) if test is not None else None
    n, B = len(data.train), args.batch_size
    if n < B:
        fail(f"--batch-size {B} is larger than the {n} training images; pass {n} or less")
    args.steps_per_epoch, args.total_steps = n // B, n // B * args.epochs
    monitors, val = args.knn_every or args.linear_epochs, os.path.join(args.data_dir, "val")
    why, fix = f"no test split ({val} not found)", "add a val/ folder"
    if not nc:  # images without labels
        why, fix = f"{train.root} has no class folders (labels)", f"pass --eval-dir DIR with {need}"
    if test is None and ff:  # asked for, with nothing to measure it on
        d = getattr(args, "distill_epochs", 0)  # SimCLR v2 distils the fine-tuned network
        what = f"--finetune-fraction {ff}" + (f" and --distill-epochs {d}" if d else "")
        drop = "--finetune-fraction" + (" and --distill-epochs" if d else "")
        fail(f"{what}: {why}; {fix} or drop {drop}")
    elif test is None and monitors and args.is_main:
        tail = "" if nc else f"; {fix}"
        print(f"note: {why}: no kNN monitor or linear probe{tail}", file=sys.stderr)
    elif nc == 1 and (monitors or ff) and args.is_main:  # one class folder
        why = f"all labelled images are of one class ({labelled.classes[0]}): every accuracy is"
        print(f"warning: {why} 100%, meaningless; give each class its own folder", file=sys.stderr)
    if test is not None and args.linear_epochs:  # the linear probe's limits
        linear_batch_size(data, args, warn=False)
    if test is not None and ff:  # fine-tuning's
        n, source = len(labelled_subset(data.train_linear, args)), f"--finetune-fraction {ff}"
        capped_batch(n, "ft_batch_size", args, "labelled images", source, warn=False)
    return data


class ResumableSampler(torch.utils.data.DistributedSampler):  # yields (index, epoch) keys
    skip = 0  # samples to drop at the start of the next epoch: resume mid-epoch without loading

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        keys, self.skip = [(i, self.epoch) for i in super().__iter__()][self.skip :], 0
        return iter(keys)


def worker_sigterm(training: torch.Tensor, worker_id: int):  # ignored while fit trains, else exit
    signal.signal(signal.SIGTERM, lambda signum, frame: None if training else os._exit(0))


def make_loader(ds, args, batch_size: int, train: bool = True, collate=None):
    """Disjoint shard per rank, reshuffled by set_epoch, drop_last; own generator (exact resume)."""
    sampler = ResumableSampler(ds, args.world_size, args.rank, train, args.seed, drop_last=train)
    kw = dict(num_workers=args.workers, persistent_workers=args.workers > 0, collate_fn=collate)
    kw.update(pin_memory=args.device.startswith("cuda"), generator=torch.Generator())
    kw["worker_init_fn"] = partial(worker_sigterm, training_flag())
    return torch.utils.data.DataLoader(ds, batch_size, sampler=sampler, drop_last=train, **kw)


def eval_transform(size: int, mean_std=None, train: bool = False) -> T.Compose:
    """train: crop + flip [MoCo main_lincls.py]; test: resize 256/224 + centre crop (> 64 px), and
    .batched: the same on float batches [B, 3, S, S] in [0, 1] of square images (in-memory data)."""
    if train:
        return to_tensor([T.RandomResizedCrop(size), T.RandomHorizontalFlip()], mean_std)
    tf = to_tensor([T.Resize(size * 8 // 7 if size > 64 else size), T.CenterCrop(size)], mean_std)
    tf.batched = T.Compose([*tf.transforms[:2], partial(normalize, mean_std=mean_std)])
    return tf


def normalize(x: torch.Tensor, mean_std=None) -> torch.Tensor:  # T.Normalize, no host-device copy
    if not mean_std:
        return x
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(*mean_std))], 1)


# ==== 2.3 the device pipeline: batched twins of the recipes, device-resident data =========
def rrc_boxes(h, w, scale, ratio=(3 / 4, 4 / 3), g=None, tries: int = 10) -> torch.Tensor:
    """T.RandomResizedCrop.get_params for B sizes h, w (float) -> [B, 4] (x0, y0, x1, y1)."""
    B, dev, lr = len(h), h.device, (math.log(ratio[0]), math.log(ratio[1]))
    area = torch.empty(B, tries, device=dev).uniform_(*scale, generator=g) * (h * w)[:, None]
    r = torch.empty(B, tries, device=dev).uniform_(*lr, generator=g).exp()
    cw, ch = (area * r).sqrt().round(), (area / r).sqrt().round()
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = fits.int().argmax(1, keepdim=True)  # the first fitting try (0 when none fits)
    cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], fits.any(1)
    fw = torch.where(w / h > ratio[1], (h * ratio[1]).round(), w)  # none fits: the whole image
    fh = torch.where(w / h < ratio[0], (w / ratio[0]).round(), h)  # with its ratio clamped
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    u = torch.rand(B, 2, device=dev, generator=g)
    x0 = torch.where(found, (u[:, 0] * (w - cw + 1)).floor(), ((w - cw) / 2).floor())
    y0 = torch.where(found, (u[:, 1] * (h - ch + 1)).floor(), ((h - ch) / 2).floor())
    return torch.stack([x0, y0, x0 + cw, y0 + ch], 1)


def gray(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1, H, W], torchvision's weights
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # hue + f turns (torchvision's)
    r, g_, b = x.unbind(1)
    v, vmin = x.amax(1), x.amin(1)
    c = v - vmin
    s, cd = c / torch.where(c == 0, 1.0, v), torch.where(c == 0, 1.0, c)  # grey: no 0 / 0
    rc, gc, bc = (v - r) / cd, (v - g_) / cd, (v - b) / cd
    h = (v == r) * (bc - gc) + ((v == g_) & (v != r)) * (2.0 + rc - bc)
    h = h + ((v != g_) & (v != r)) * (4.0 + gc - rc)
    h = (h / 6.0 + 1.0 + f[:, None, None]) % 1.0
    i6 = (h * 6.0).floor()
    fr, i = h * 6.0 - i6, i6.long() % 6
    p, q, t = ((v * (1.0 - s * k)).clamp(0.0, 1.0) for k in (1.0, fr, 1.0 - fr))
    idx = i[:, None] + torch.arange(0, 18, 6, device=x.device)[None, :, None, None]  # [B, 3, H, W]
    return torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], 1).gather(1, idx)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float = 2.0):
    """Per-sample Gaussian blur (sigma [B]), separable, reflect padding, radius 3 sigma_max."""
    B, C, H, W = x.shape
    r = min(math.ceil(3 * sigma_max), H - 1, W - 1)
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B * C, 2r + 1]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k[:, None, None, :], groups=B * C), k[:, None, :, None], groups=B * C)
    return y.view(B, C, H, W)


def crop_resize(x: torch.Tensor, box: torch.Tensor, size: int, bicubic=False) -> torch.Tensor:
    """Boxes [B, 4] (x0, y0, x1, y1 px) of x [B, C, H, W] -> crop then resize [B, C, size, size];
    shrinking: a pixel the mean of s x s samples, s = ceil(side / size) (torchvision: triangle)."""
    B, _, H, W = x.shape
    s = max(1, math.ceil(max(H, W) / size))
    t = (torch.arange(size * s, device=x.device, dtype=x.dtype) + 0.5) / (size * s)
    lo, hi = box[:, :2, None], box[:, 2:, None]  # [B, 2, 1]: (x, y)
    xy = (lo + t * (hi - lo) - 0.5).clamp(min=lo, max=hi - 1)  # pixel centres, [B, 2, size * s]
    gx, gy = (xy[:, 0] + 0.5) / W * 2 - 1, (xy[:, 1] + 0.5) / H * 2 - 1  # grid_sample's [-1, 1]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
    mode = "bicubic" if bicubic else "bilinear"
    out = F.grid_sample(x, grid, mode, "border", align_corners=False)
    return (F.avg_pool2d(out, s) if s > 1 else out).clamp(0.0, 1.0)


class BatchAugment:
    """The batched twin of an augmentation() recipe, read from its ops (others: ValueError, it runs
    on the CPU). DEVIATION from PIL: float throughout (PIL rounds to uint8 after every op), a box
    filter when shrinking (crop_resize), bicubic a = -0.75 (PIL: -0.5), blur cut at 3 sigma_max."""

    def __init__(self, recipe: T.Compose):
        o = self.o = SimpleNamespace(**AUG, mean_std=None)  # an op absent: never applied
        o.jitter_p = o.gray_p = o.flip_p = 0.0
        o.ranges = [(1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (0.0, 0.0)]  # identity factors
        ops = recipe.transforms if isinstance(recipe, T.Compose) else [recipe]
        for op in ops:
            inner = op.transforms[0] if isinstance(op, T.RandomApply) else op
            if isinstance(op, T.RandomResizedCrop):
                o.size, o.scale = op.size[0], op.scale
                o.bicubic = op.interpolation == T.InterpolationMode.BICUBIC
            elif isinstance(inner, T.ColorJitter) and op is not inner:
                o.jitter_p, o.gray_first = op.p, o.gray_p > 0  # grayscale seen before jitter
                o.additive_brightness = isinstance(inner, AdditiveColorJitter)
                b = (-inner.delta, inner.delta) if o.additive_brightness else inner.brightness
                rs = (b, inner.contrast, inner.saturation, inner.hue)
                o.ranges = [tuple(r) if r is not None else d for r, d in zip(rs, o.ranges)]
            elif isinstance(op, T.RandomGrayscale):
                o.gray_p = op.p
            elif inner is gaussian_blur:
                o.blur_p = op.p
            elif isinstance(op, T.RandomSolarize) and op.threshold == 128:
                o.solarize_p = op.p
            elif isinstance(op, T.RandomHorizontalFlip):
                o.flip_p = op.p
            elif isinstance(op, T.Normalize):
                o.mean_std = (tuple(op.mean), tuple(op.std))
            elif not isinstance(op, T.ToTensor):
                raise ValueError(f"no batched version of {type(op).__name__}")
        if not hasattr(o, "size"):
            raise ValueError("no batched version of a recipe without RandomResizedCrop")
        self.size, self.mean_std = o.size, o.mean_std

    def sample(self, h: torch.Tensor, w: torch.Tensor, g=None) -> dict:
        """Per-sample parameters for images of sizes h, w ([B] float); an op not drawn: identity."""
        o, B, dev = self.o, len(h), h.device
        u = lambda *s: torch.rand(*s, device=dev, generator=g)
        on, f = u(B) < o.jitter_p, u(B, 4)
        ident = [0.0 if o.additive_brightness else 1.0, 1.0, 1.0, 0.0]  # additive: an offset
        jit = [torch.where(on, a + (b - a) * v, i) for (a, b), v, i in zip(o.ranges, f.T, ident)]
        p = {"box": rrc_boxes(h, w, o.scale, g=g), "flip": u(B) < o.flip_p}
        p["jitter"], p["additive"] = torch.stack(jit, 1), o.additive_brightness  # a bool: no sync
        p["order"], p["gray"] = u(B, 4).argsort(1), u(B) < o.gray_p
        p["sigma"] = torch.where(u(B) < o.blur_p, 0.1 + 1.9 * u(B), torch.zeros(B, device=dev))
        p["solarize"] = u(B) < o.solarize_p
        return p

    def __call__(self, x: torch.Tensor, g=None, hw=None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] (hw [B, 2]: true sizes, x a canvas) -> normalised views."""
        hw = hw if hw is not None else x.new_tensor([x.shape[-2:]]).float().expand(len(x), 2)
        return self.apply(x, self.sample(hw[:, 0], hw[:, 1], g), hw)

    def apply(self, x: torch.Tensor, p: dict, hw: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        each = lambda k: p[k][:, None, None, None]  # a per-sample value, over the image
        box = p["box"] * torch.stack([W / hw[:, 1], H / hw[:, 0]] * 2, 1)  # to x's pixels
        x = crop_resize(x, box, self.size, self.o.bicubic)
        grayed = lambda x: torch.where(each("gray"), gray(x).expand_as(x), x)
        x = grayed(self.jitter(x, p)) if not self.o.gray_first else self.jitter(grayed(x), p)
        if self.o.blur_p > 0:
            x = torch.where(each("sigma") > 0, gaussian_blur_batch(x, p["sigma"].clamp_min(0.1)), x)
        if self.o.solarize_p > 0:  # RandomSolarize(128) on uint8: pixels >= 128 inverted
            x = torch.where(each("solarize") & (x >= 128 / 255), 1.0 - x, x)
        return normalize(torch.where(each("flip"), x.flip(-1), x), self.mean_std)

    @staticmethod
    def jitter(x: torch.Tensor, p: dict) -> torch.Tensor:
        """torchvision's ColorJitter, in each sample's op order: blends (factor 1: the identity)
        before its hue, hue, the rest. p["additive"]: brightness x + f, clipped (0: identity)."""
        f, order = p["jitter"], p["order"]
        hue_at = (order == 3).int().argmax(1)
        towards = (lambda x: 0.0, lambda x: gray(x).mean((1, 2, 3), keepdim=True), gray)

        def blends(x, positions, keep):
            for k in positions:
                for j, target in enumerate(towards):
                    on = (order[:, k] == j) & keep(k)
                    if j == 0 and p.get("additive", False):
                        x = (x + torch.where(on, f[:, 0], 0.0)[:, None, None, None]).clamp(0, 1)
                    else:  # torchvision's _blend
                        c = torch.where(on, f[:, j], 1.0)[:, None, None, None]
                        x = (c * x + (1.0 - c) * target(x)).clamp(0.0, 1.0)
            return x

        x = blends(x, range(3), lambda k: k < hue_at)
        x = torch.where(f[:, 3, None, None, None] != 0, adjust_hue(x, f[:, 3]), x)
        return blends(x, range(1, 4), lambda k: k > hue_at)


def image_arrays(base):  # (uint8 [N, H, W, 3], labels) of in-memory images; None: image files
    if isinstance(base, ArrayImages):
        return base.tensors
    if isinstance(base, torchvision.datasets.CIFAR10):  # CIFAR-100 too
        return torch.from_numpy(base.data), torch.tensor(base.targets)
    if isinstance(base, torchvision.datasets.STL10):
        return torch.from_numpy(base.data).permute(0, 2, 3, 1), torch.from_numpy(base.labels)
    return None


def read_bytes(path: str) -> torch.Tensor:  # uint8; unreadable or empty: one 0 (undecodable)
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()) or bytearray(1), dtype=torch.uint8)
    return torch.zeros(1, dtype=torch.uint8)


def read_image(data: torch.Tensor, device):
    """One file's bytes -> [3, H, W] float in [0, 1] on device, None if nothing decodes it: nvJPEG,
    torchvision's decoders (JPEG, PNG incl. 16 bits, WebP, GIF), else PIL (BMP, TIFF, ...)."""
    rgb = torchvision.io.ImageReadMode.RGB
    with contextlib.suppress(RuntimeError):
        return torchvision.io.decode_jpeg(data, mode=rgb, device=device).float() / 255
    try:
        im = torchvision.io.decode_image(data, mode=rgb)
        im = im[0] if im.ndim == 4 else im
        im = im.float() / (65535.0 if im.dtype == torch.uint16 else 255.0)
    except RuntimeError:
        try:
            im = T.functional.to_tensor(open_rgb(io.BytesIO(data.numpy().tobytes())))
        except Exception:  # truncated, empty, or not an image
            return None
    return im.to(device, non_blocking=True)


def decode(data: list, device) -> list:  # -> [3, H, W] in [0, 1] on device (None: undecodable)
    rgb = torchvision.io.ImageReadMode.RGB
    with contextlib.suppress(RuntimeError):  # else a file is no JPEG, broken, or CMYK (nvJPEG)
        jpegs = torchvision.io.decode_jpeg(data, mode=rgb, device=device)
        return [im.float() / 255 for im in jpegs]
    return [read_image(d, device) for d in data]


def to_canvas(imgs: list, canvas: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [3, h, w] -> (each resized to [B, 3, canvas, canvas], true sizes [B, 2] for crops)."""
    hw = torch.tensor([im.shape[-2:] for im in imgs], dtype=torch.float)
    hw = hw.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hw
    resize = lambda im: F.interpolate(im[None], (canvas,) * 2, mode="bilinear", antialias=True)
    return torch.cat([resize(im) for im in imgs]).clamp_(0, 1), hw


class DeviceLoader:  # make_loader's batches (views, labels, indices), augmented on the device
    def __init__(self, ds, views: list, args, batch_size: int):
        self.device, self.batch_size = torch.device(args.device), batch_size
        self.ds, self.views, self.canvas, self.key = ds, views, 0, (args.seed, args.rank)
        arrays = image_arrays(ds.dataset)
        if arrays is not None:  # [N, 3, H, W] uint8 on the device
            idx = torch.tensor(ds.indices)
            self.x = arrays[0][idx].permute(0, 3, 1, 2).contiguous().to(self.device)
            self.y = arrays[1][idx].to(self.device)
            self.sampler = ResumableSampler(ds, args.world_size, args.rank, True, args.seed, True)
        else:  # image folder: 2 x the largest view, enough for the crops to keep their detail
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            self.canvas = 2 * max(v.size for v in self.views)
            files = Indexed(ds.dataset.samples, read_bytes)  # (file bytes, label, index)
            files.indices = ds.indices
            self.files = make_loader(files, args, batch_size, collate=list)  # lengths differ
            self.sampler = self.files.sampler

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def batches(self):  # (float images in [0, 1], true sizes or None, labels, indices) per batch
        if self.canvas:
            to = lambda t: torch.as_tensor(t).to(self.device, non_blocking=True)
            for batch in self.files:
                data, y, i = map(list, zip(*batch))  # the files' bytes, labels, indices
                imgs = decode(data, self.device)
                for k in (k for k, im in enumerate(imgs) if im is None):  # as in ImageFiles:
                    base, j = self.ds.dataset, self.ds.indices[int(i[k])]
                    base.bad[j] = True  # marked, replaced by the next decodable one
                    img, y[k] = base[(j + 1) % len(base)]
                    imgs[k] = to(T.functional.to_tensor(img))
                yield *to_canvas(imgs, self.canvas, self.device), to(y), to(i)
            return
        keys = torch.tensor([i for i, _ in self.sampler]).to(self.device, non_blocking=True)
        for i in keys[: len(keys) // self.batch_size * self.batch_size].split(self.batch_size):
            yield self.x[i].float().div_(255), None, self.y[i], i

    def __iter__(self):
        g, start = torch.Generator(self.device), self.sampler.skip // self.batch_size
        for b, (x, hw, y, i) in enumerate(self.batches(), start):
            g.manual_seed(hash((*self.key, self.sampler.epoch, b)) % 2**62)
            yield [v(x, g, hw) for v in self.views], y, i


def train_loader(data, args):  # --pipeline device: DeviceLoader of BatchAugment twins; else CPU
    ds, B = data.train, args.batch_size_per_gpu
    if on_device(args):
        try:
            return DeviceLoader(ds, [BatchAugment(t) for t in ds.transform], args, B)
        except ValueError:
            if args.pipeline == "device":
                fail("this method's augmentation has no batched version; pass --pipeline cpu")
            if args.is_main:
                print("note: augmentation has no batched version: CPU pipeline", file=sys.stderr)
    return make_loader(ds, args, B)


def on_device(args) -> bool:  # --pipeline resolved (auto: device on CUDA)
    return args.pipeline == "device" or (args.pipeline == "auto" and args.device.startswith("cuda"))


# ==== 2.4 checkpoints, resume, SIGTERM, the out-dir lock ==================================
def save_checkpoint(path: str, state: dict):  # atomic: a temp file renamed; OSError names its file
    try:
        with open(f"{path}.tmp", "wb") as f:
            torch.save(state, f)
        os.replace(f"{path}.tmp", path)
    except OSError as e:  # the partial temp file goes at the next start (claim_out_dir)
        raise OSError(e.errno, e.strerror, e.filename or f"{path}.tmp") from e


def load_checkpoint(path: str, weights_only=False, fix="delete it or pass --resume none") -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # any unreadable file: one line, with the way out
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); {fix}")


_RUN = SimpleNamespace(saved=None, sigterm=False, previous=None, training=None)  # fit's guards
_RUN.kept, _RUN.saved_at = None, 0.0  # the last good checkpoint's path; when it was saved or read
EXPLODED = 1e4  # a parameter this large in magnitude: the weights exploded (a loss may not show it)
ANEW = "pass --resume none or another --out-dir"
# on resume these must not change (a step's samples, its place in the schedules); a change of
# others (e.g. --lr, --amp after a divergence) is noted, but of these (no result) and linear_*
RESUME_FIXED = ("version", "dataset", "subset", "seed", "batch_size", "epochs", "warmup_epochs")
RESUME_QUIET = ("data_dir", "workers", "out_dir", "resume", "device", "compile", "log_every")
RESUME_QUIET += ("max_steps", "knn_every", "knn_k", "knn_t", "knn_subset", "batch_size_per_gpu")
RESUME_QUIET += ("ckpt_minutes", "init")
KINDS = {"skipped_files": "skipped", "loss": "train", "finetune_top1": "finetune", "epoch": "eval"}
_OUT_DIR_LOCK = []  # the lock file this process holds open while main() runs
REFUSED = {errno.ENOSPC: "free space", errno.EDQUOT: "free space"}  # writes, and the way on
REFUSED.update({errno.EROFS: "make it writable", errno.EACCES: "make it writable"})


def save_state(path: str, model, optimizer, scaler, step: int, args, finite=None):
    """Rank 0 saves model, optimizer, scaler, step, config; all ranks RNG + `per_rank` buffers.
    finite (fit's loss flag): a non-finite loss or state, or exploded weights, fail (`diverged`)."""
    sync_buffers(model)
    net, stop = unwrap(model), False
    if finite is not None:
        opt = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        ok = all_finite([*net.buffers(), *opt]) & all_finite(net.parameters(), EXPLODED)
        bad_loss, bad_state, stop = agreed(~finite, ~ok, _RUN.sigterm)
        if bad_loss or bad_state:
            fail(diverged(step, "loss" if bad_loss else "or exploded weights or state", args))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    rng.update({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    rng["buffers"] = {k: net.get_buffer(k).cpu() for k in getattr(net, "per_rank", ())}
    ranks = [rng] * get_world_size()
    if get_world_size() > 1:  # every rank's streams (e.g. MoCo's key permutation on rank 0)
        dist.all_gather_object(ranks, rng)
    if args.is_main:
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
        state.update(scaler=scaler.state_dict(), step=step, args=config_dict(args), ranks=ranks)
        save_checkpoint(path, state)
    _RUN.saved, _RUN.kept, _RUN.saved_at = step, path, time.monotonic()
    if finite is not None and step >= last_step(args):
        catch_sigterm(False)  # trained: a SIGTERM during the final evaluation ends it at once
    if stop:  # exit status 143 (128 + SIGTERM, as if the signal had ended it: not finished)
        if get_world_size() > 1:
            dist.barrier()  # rank 0 has written the checkpoint before any rank exits
        how = "checkpoint saved, run the same command to resume"
        e = SystemExit(f"stopped by SIGTERM at step {step}; {how}")
        e.code = 143
        if args.is_main:
            end_bars()
            print(e, file=sys.stderr, flush=True)
        raise e


@torch.no_grad()
def all_finite(tensors, bound: float = math.inf) -> torch.Tensor:
    """0-dim bool, not read here: each floating tensor's max-abs norm (NaN propagates) < bound."""
    ts = [t for t in tensors if t.is_floating_point() and t.numel()]
    dev = ts[0].device  # optimizer step counters may live on the CPU
    return (torch.stack([n.to(dev) for n in torch._foreach_norm(ts, math.inf)]) < bound).all()


def agreed(*flags) -> list[bool]:  # 0-dim tensors or bools -> True where any rank's is (1 reduce)
    dev = next(f.device for f in flags if torch.is_tensor(f))
    v = torch.stack([torch.as_tensor(f, device=dev).reshape(()).int() for f in flags])
    if get_world_size() > 1:
        dist.all_reduce(v, dist.ReduceOp.MAX)
    return [bool(x) for x in v.tolist()]


def check_step(finite: torch.Tensor, step: int, args) -> bool:
    """At a log step, one collective: a non-finite loss (fit's flag) stops all (`diverged`); -> all
    save now: a rank had SIGTERM (then exit) or is --ckpt-minutes past the last save (train on)."""
    due = 0 < args.ckpt_minutes * 60 < time.monotonic() - _RUN.saved_at
    bad, stop, save = agreed(~finite, _RUN.sigterm, due)
    if bad:
        fail(diverged(step, "loss", args))
    return stop or save


def diverged(step: int, what: str, args) -> str:  # the error, with a command going on at lr / 10
    kept = f"the last good checkpoint (step {_RUN.saved}) is kept"
    kept = "no checkpoint was saved" if _RUN.kept is None else kept
    cls, params = type(args), inspect.signature(type(args).recipe).parameters
    picks = {k: getattr(args, k) for k in params if k in vars(args)}
    base = {**{f.name: f.default for f in dataclasses.fields(cls)}, **cls.recipe(**picks)}
    given = {**vars(args), "lr": float(f"{min(args.lr / 10, base['lr']):.3g}")}
    given["resume"] = _RUN.kept or "none"
    cmd = [f"torchrun --nproc_per_node={args.world_size}" if args.world_size > 1 else "python"]
    cmd.append(os.path.basename(sys.modules[cls.__module__].__file__))
    for f in dataclasses.fields(cls):  # the flags off the recipe that the picks select
        k, v = f.name.replace("_", "-"), given[f.name]
        if f.metadata.get("derived") or (f.name not in (*picks, "lr") and v == base[f.name]):
            continue
        if isinstance(v, bool):
            cmd.append(f"--{'' if v else 'no-'}{k}")
        else:
            cmd += [f"--{k}", *map(shlex.quote, map(str, v if isinstance(v, tuple) else [v]))]
    way = f"go on at a lower lr (or --amp off): {' '.join(cmd)}"
    return f"non-finite {what} by step {step}; {kept}; {way}"


def catch_sigterm(catch: bool = True):
    """From resume until training ends, SIGTERM (a cluster's preemption, sent to every rank) only
    sets a flag, agreed on at the next log step or save (check_step, save_state): no host read."""

    def handler(signum, frame):
        _RUN.sigterm = True

    training_flag().fill_(catch)  # read by the DataLoader workers (worker_sigterm)
    with contextlib.suppress(ValueError):  # not the main thread: SIGTERM keeps its handler
        if catch and not _RUN.previous:
            _RUN.previous = [signal.signal(signal.SIGTERM, handler) or signal.SIG_DFL]
        elif not catch and _RUN.previous:
            signal.signal(signal.SIGTERM, _RUN.previous.pop())


def training_flag() -> torch.Tensor:  # whether fit trains, in memory shared with the workers
    if _RUN.training is None:
        _RUN.training = torch.zeros((), dtype=torch.bool).share_memory_()
    return _RUN.training


def misfits(have: dict, want: dict, free=(), odd=()) -> str:  # one line, "" if have fits want
    free = {*free, *(k for k in want if k.endswith("num_batches_tracked"))}  # old torchvision
    shapes = [(k, list(v.shape), list(want[k].shape)) for k, v in have.items() if k in want]
    shapes = [f"shape of {k}: checkpoint {a}, model {b}" for k, a, b in shapes if a != b]
    missing = [k for k in want if k not in have and k not in free]
    odd = [*odd, *(k for k in have if k not in want)]
    found = [("missing ", ", ", missing), ("unexpected ", ", ", odd), ("", "; ", shapes)]
    return "; ".join(w + s.join(x[:3]) + (" ..." if len(x) > 3 else "") for w, s, x in found if x)


def load_state(path: str, model, optimizer, scaler, args) -> int:
    """Everything save_state wrote -> the step, once the settings (a change that breaks the schedule
    or the samples' order: one line; others: a note; another world size keeps both, mid-epoch),
    names and shapes fit. `per_rank` buffers: this rank's, or zeros at another world size."""
    ckpt = load_checkpoint(path)
    saved, now = ckpt.get("args", {}), config_dict(args)
    if saved.get("method", now["method"]) != now["method"]:  # said before settings and tensors
        fail(f"{path} is a {saved['method']}.py checkpoint, not {now['method']}.py's; {ANEW}")
    name = lambda k: "world size" if k == "world_size" else "--" + k.replace("_", "-")
    diff = [k for k in now if k in saved and now[k] != saved[k]]
    for k in (k for k in (*RESUME_FIXED, "steps_per_epoch") if k in diff):
        a, b, flag = shown(now[k]), shown(saved[k]), name(k)
        why = f"{flag} {a} differs from the checkpoint's {b}; pass {flag} {b} to resume"
        if k == "steps_per_epoch":  # the same flags, other data (e.g. files added to a folder)
            why = f"the training data gives {a} steps per epoch, the checkpoint's {b} (images "
            why += "added or removed?); restore them to resume"
        fail(f"{why}, or --resume none / another --out-dir to start anew")
    diff = [k for k in diff if k not in RESUME_QUIET and not k.startswith("linear_")]
    net, same_world = unwrap(model), len(ckpt["ranks"]) == args.world_size
    own = getattr(net, "per_rank", ())
    mine = ckpt["ranks"][args.rank] if same_world else {"buffers": {}}
    state = {k: v for k, v in ckpt["model"].items() if k not in own}
    bad = misfits({**state, **mine["buffers"]}, net.state_dict(), own)
    if bad:
        fail(f"checkpoint {path} does not fit this model: {bad}; {ANEW}")
    try:
        net.load_state_dict(state, strict=False)  # strict but for `own`: checked above
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:120]}); {ANEW}")
    if ckpt["scaler"]:  # empty: saved without fp16 loss scaling (--amp other than fp16)
        scaler.load_state_dict(ckpt["scaler"])
    for k in own:  # another world size: zeros
        net.get_buffer(k).copy_(mine["buffers"].get(k, torch.zeros(())))
    if same_world:
        torch.set_rng_state(mine["torch"])
        random.setstate(mine["python"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
    else:  # another world size cannot continue the same random streams
        torch.manual_seed(args.seed + args.rank + ckpt["step"])
    if diff and args.is_main:
        what = ", ".join(f"{name(k)} {shown(now[k])} (was {shown(saved[k])})" for k in diff)
        why = "; random streams and per-rank state restart" if "world_size" in diff else ""
        print(f"note: resuming step {ckpt['step']} with {what}{why}", file=sys.stderr, flush=True)
    return ckpt["step"]


def resume(ckpt: str, model, optimizer, scaler, args, backbone, release: dict) -> int:
    """--resume auto (ckpt if present), a path or none -> the step to start from; config.json is
    written only now (a refused resume leaves it as it was); then SIGTERM saves and ends the run."""
    path, step = ckpt if args.resume == "auto" else args.resume, 0
    loaded = args.resume != "none" and os.path.isfile(path)
    if loaded:
        step = load_state(path, model, optimizer, scaler, args)
        if args.init and args.is_main:  # the checkpoint wins: a resume stays exact
            print(f"note: --init ignored: {path} resumes (anew: --resume none)", file=sys.stderr)
    elif args.resume not in ("auto", "none"):
        fail(f"--resume {path}: no such file; pass a checkpoint path, auto or none")
    else:
        if args.init:  # step 0, in place: the optimizer holds these parameters, its state is new
            init_weights(args.init, unwrap(model), backbone, release, args)
        torch.manual_seed(args.seed + args.rank)  # per-rank streams (e.g. MoCo's key permutation)
    if args.is_main:
        try:
            with open(os.path.join(args.out_dir, "config.json"), "w") as f:
                f.write(json.dumps(config_dict(args), indent=1))
        except OSError as e:
            fail(f"--out-dir {args.out_dir}: {e.strerror or e}; pass a folder you can write to")
    _RUN.saved, _RUN.sigterm = step if loaded else None, False
    _RUN.kept, _RUN.saved_at = path if loaded else None, time.monotonic()
    catch_sigterm(step < last_step(args))  # none when only the final evaluation is left
    return step


def init_weights(path: str, net: nn.Module, backbone: nn.Module, release: dict, args):
    """--init, in place: a backbone file (torchvision / timm names) into the backbone and each
    module of its shape, else `release` {file key prefix: model key prefix, None}, longest wins."""
    torch.serialization.add_safe_globals([argparse.Namespace])  # DINO's checkpoints hold args
    obj = load_checkpoint(path, True, "pass a PyTorch weights file (see the README)")
    todo, flat = [("", obj if isinstance(obj, dict) else {})], {}
    for pre, d in todo:  # nested dicts (appended to todo) -> dotted keys, tensor leaves only
        flat.update({f"{pre}{k}": v for k, v in d.items() if torch.is_tensor(v)})
        todo += [(f"{pre}{k}.", v) for k, v in d.items() if isinstance(v, dict)]
    for a, b in TIMM_KEYS.items():  # timm's ViT names -> ViT's
        flat = {k.replace(a, b): v for k, v in flat.items()}
    pre = {k: max((p for p in release if k.startswith(p)), key=len, default=None) for k in flat}
    odd = [k for k, p in pre.items() if p is None]  # in no prefix of the official layout
    got = {release[p] + k[len(p) :]: flat[k] for k, p in pre.items() if release.get(p) is not None}
    want, sig = backbone.state_dict(), lambda m: [(k, v.shape) for k, v in m.state_dict().items()]
    bb = {k.removeprefix("state_dict.").removeprefix("module."): v for k, v in flat.items()}
    bb = {k: v for k, v in bb.items() if k in want or not k.startswith(("fc.", "head."))}
    bad = misfits(bb, want)
    if not bad:  # also into the momentum copy, DINO's student
        copies = {n: m for n, m in net.named_modules() if sig(m) == sig(backbone)}
        for m in copies.values():
            m.load_state_dict(bb)
        note = f"{' + '.join(copies)} loaded ({len(bb)} tensors)"
    elif not got:  # nothing of the official layout either
        why = "or an official release (README)" if release else "(README: no PyTorch release)"
        fail(f"--init {path} does not fit the backbone ({bad}); pass a backbone file {why}")
    else:  # method state (queue, bank, centre) the file lacks or shapes otherwise: its init
        want, kids = net.state_dict(), dict(net.named_children())
        keep = dict(net.named_buffers(recurse=False))
        kept = [k for k in keep if k not in got or got[k].shape != keep[k].shape]
        done, copies = {k.split(".")[0] for k in got}, {}
        got = {k: v for k, v in got.items() if k not in kept}
        for n, m in kids.items():  # a frozen copy the file lacks: its original's [builder.py]
            if n not in done and not any(p.requires_grad for p in m.parameters()):
                copies.update((n, s) for s in kids if s in done and sig(kids[s]) == sig(m))
        bad = misfits(got, want, [*kept, *(k for k in want if k.split(".")[0] in copies)], odd)
        if bad:
            fail(f"--init {path} does not fit this model: {bad}; see the README for the releases")
        net.load_state_dict(got, strict=False)
        for n, s in copies.items():
            kids[n].load_state_dict(kids[s].state_dict())
        copied = "".join(f"; {n} copied from {s} (not in the file)" for n, s in copies.items())
        note = f"official layout, {len(got)} tensors{copied}; at init: {', '.join(kept) or '-'}"
    if args.is_main:
        print(f"note: --init {path}: {note}; step 0, a new optimizer", file=sys.stderr, flush=True)


def last_step(args) -> int:  # where fit's training ends: --max-steps, else all --epochs
    return min(args.max_steps or args.total_steps, args.total_steps)


def trim_metrics(path: str, step: int) -> dict:
    """-> {(kind, step): record} of steps <= step (none at 0), rewritten (of one twice: the last).
    Lines cut short and records fit does not write (InstDisc's paper kNN, distillation's) go."""
    keep = {}
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):  # a line cut short
                r = json.loads(line)
                if step and isinstance(r, dict) and record_kind(r) and r["step"] <= step:
                    keep[record_kind(r), r["step"]] = finite_record(r)
    write_records(path, keep.values())
    return keep


def record_kind(r: dict) -> str:  # the kind of record its first key in KINDS says; "": not fit's
    return next((v for k, v in KINDS.items() if k in r), "")


def finite_record(r: dict) -> dict:  # strict JSON: non-finite numbers null, named in "nonfinite"
    bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    return {**r, **dict.fromkeys(bad), "nonfinite": bad} if bad else r


def write_records(path: str, records):  # atomically, as strict JSON
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
    os.replace(f"{path}.tmp", path)


def claim_out_dir(out_dir: str):  # flock run.lock till main() or the process ends; removes *.tmp
    f = open(os.path.join(out_dir, "run.lock"), "a+")
    try:
        if fcntl is None:
            raise OSError(0, "no file locks on this system")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        print(os.getpid(), end="", file=f, flush=True)  # for the message below
        _OUT_DIR_LOCK.append(f)
    except OSError as e:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        if isinstance(e, BlockingIOError):
            busy = f"another run (pid {pid}) is using" if pid else "another run is using"
            fail(f"{busy} --out-dir {out_dir}; pass another --out-dir or wait for it to end")
        print(f"note: cannot lock {out_dir} ({e.strerror}); run one at a time", file=sys.stderr)
    for tmp in [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.endswith(".tmp")]:
        if os.path.isfile(tmp):
            os.remove(tmp)


def one_run_per_out_dir(main):
    """Decorator of every main(): at its end the out-dir lock and SIGTERM's handler go (main() may
    run again); a refused write, all images broken: one line; a crash first ends the bars."""

    @wraps(main)
    def run(args):
        _RUN.saved, made = None, not os.path.exists(args.data_dir)
        try:
            out = main(args)
            if dist.is_initialized():  # torch 2.4: a gloo group destroyed (at exit) while a
                dist.barrier()  # worker thread frees a collective's tensor (it needs the
                time.sleep(0.1)  # GIL) deadlocks: all collectives done, the GIL free a while
            return out
        except BaseException as e:
            end_bars()
            if isinstance(e, OSError) and e.errno in REFUSED:
                ckpt, way = os.path.join(run_dir(args), "ckpt.pth"), "and rerun to resume"
                kept = f"{ckpt} (step {_RUN.saved}) is intact"
                if _RUN.saved is None or not os.path.isfile(ckpt):
                    kept, way = "no checkpoint was saved", "and rerun"
                fail(f"cannot write {e.filename}: {e.strerror}; {kept}: {REFUSED[e.errno]} {way}")
            last = str(e).strip().split("RuntimeError: ")[-1]  # ImageFiles' (or a worker's)
            if isinstance(e, RuntimeError) and last.endswith("can be decoded as an image"):
                fail(f"{last}; pass --data-dir to a folder of image files PIL can read")
            raise
        finally:
            catch_sigterm(False)
            while _OUT_DIR_LOCK:
                _OUT_DIR_LOCK.pop().close()  # closing the file drops its flock
            if made:  # the --data-dir of a download that failed: rmdir removes it if empty
                with contextlib.suppress(OSError):
                    os.rmdir(args.data_dir)

    return run


# ==== 2.5 evaluation: features, kNN, linear probe, fine-tuning ============================
@torch.no_grad()
def extract(fn, ds, args, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) over a dataset, sharded over ranks and gathered -> (feats, labels) in dataset order."""
    n, w, device = len(ds), args.world_size, torch.device(args.device)
    per = math.ceil(n / w)
    order = [min(r + w * i, n - 1) for r in range(w) for i in range(per)]  # rank-major
    mine = torch.utils.data.Subset(ds, order[args.rank * per : (args.rank + 1) * per])
    arrays = image_arrays(ds.dataset) if on_device(args) else None
    if arrays is not None:  # in-memory images: to the device as uint8, transformed there
        idx = torch.tensor(ds.indices)[mine.indices].split(batch_size)
        to = lambda x: x.to(device).permute(0, 3, 1, 2).float().div_(255)
        batches = ((ds.transform.batched(to(arrays[0][i])), arrays[1][i]) for i in idx)
    else:
        batches = torch.utils.data.DataLoader(mine, batch_size, num_workers=args.workers)
    feats, labels, desc = [], [], f"features of {n} images"
    for x, y, *_ in progress(batches, desc, args, total=math.ceil(len(mine) / batch_size)):
        with autocast(args):
            feats.append(fn(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    f, y = gather_no_grad(torch.cat(feats)), gather_no_grad(torch.cat(labels))
    idx = torch.tensor(order, device=device)
    return f.new_empty(n, f.shape[1]).index_copy_(0, idx, f), y.new_empty(n).index_copy_(0, idx, y)


def progress(it, desc: str, args, total=None) -> tqdm:  # a transient bar, main process
    return tqdm(it, desc, total, leave=False, disable=not args.is_main, dynamic_ncols=True)


def capped_batch(n: int, field: str, args, what: str, source: str, warn: bool, lr=None) -> int:
    """args.<field>, or n // W * W if fewer, warned (+ lr x b/256 given lr); n < W: fail, source."""
    B, w = getattr(args, field), args.world_size
    if n < w:
        fail(f"{source}: {n} {what} for {w} processes; need at least {w}")
    b = min(B, n // w * w)
    if b < B and warn and args.is_main:
        tail = f", lr {lr * b / 256:.4g} = {lr} x {b}/256" if lr is not None else ""
        flag = "--" + field.replace("_", "-")
        tqdm.write(f"warning: {n} {what} < {flag} {B}: batch {b}{tail}", sys.stderr)
    return b


def linear_batch_size(data, args, warn: bool = True) -> int:  # --linear-batch-size (capped_batch)
    B, w, cached = args.linear_batch_size, args.world_size, args.linear_cached
    if B % w:
        fail(f"--linear-batch-size {B} is not divisible by world size {w}; pass a multiple")
    n = len(data.train_eval if cached else data.train_linear)
    k = cached and args.knn_subset  # the flag that set n
    source = f"--knn-subset {k}" if k else f"--subset {args.subset}"
    what = "linear-probe training images"
    return capped_batch(n, "linear_batch_size", args, what, source, warn, args.linear_lr)


@contextlib.contextmanager
def eval_rng(args):  # own random streams seeded by --seed, then restored: training unaffected
    dev, state = torch.device(args.device), random.getstate()
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(cuda, device_type="cuda"):
        torch.random.default_generator.manual_seed(args.seed)
        random.seed(args.seed)
        for i in cuda:
            with torch.cuda.device(i):
                torch.cuda.manual_seed(args.seed)
        try:
            yield
        finally:
            random.setstate(state)


@torch.no_grad()
def knn_predict(feats, bank, bank_labels, num_classes: int, k: int = 200, t: float = 0.1):
    """Weighted kNN [InstDisc §3.4]: cosine top-k, votes exp(sim / t) -> class scores [M, C]."""
    feats, bank, scores = F.normalize(feats, dim=1), F.normalize(bank, dim=1), []
    for chunk in feats.split(1024):
        sim, idx = (chunk @ bank.T).topk(min(k, len(bank)), dim=1)  # [m, k]
        votes = F.one_hot(bank_labels[idx], num_classes).float() * (sim / t).exp()[..., None]
        scores.append(votes.sum(1))
    return torch.cat(scores)


def knn_eval(fn, data, args) -> float:  # kNN top-1 (%) on the test split, bank: train_eval
    bank, bank_y = extract(fn, data.train_eval, args)
    test, test_y = extract(fn, data.test, args)
    pred = knn_predict(test, bank, bank_y, data.num_classes, args.knn_k, args.knn_t).argmax(1)
    return (pred == test_y).float().mean().item() * 100


def labelled_subset(ds, args) -> list[int]:  # kept labelled: --finetune-list's, or a --seed share
    if args.finetune_list:
        with open(args.finetune_list) as f:
            names = [line.strip() for line in f if line.strip()]
        where = {os.path.basename(ds.dataset.samples[j][0]): i for i, j in enumerate(ds.indices)}
        missing = [n for n in names if n not in where]
        if missing:
            why = f"{len(missing)} of its {len(names)} files are not in the training set"
            fail(f"--finetune-list {args.finetune_list}: {why}, e.g. {missing[0]}; list its images")
        return sorted(where[n] for n in names)
    arrays = image_arrays(ds.dataset)
    y = (arrays[1] if arrays is not None else torch.tensor(ds.dataset.targets))[ds.indices]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    take = lambda c: perm[y[perm] == c][: round(args.finetune_fraction * int((y == c).sum()))]
    chosen = sorted(torch.cat([take(c) for c in y.unique()]).tolist())
    if not chosen:
        fail(f"--finetune-fraction {args.finetune_fraction}: no image of any class; pass more")
    return chosen


class StreamBatches:
    """Batch sampler: steps start..total-1 of `batch` images from endless epochs, each permuted by
    (seed, epoch) as the TF pipelines; this rank's batch / W as (index, epoch) keys, alike at any
    world size and on resume (DEVIATION: SwAV's, Barlow Twins' epochs end in a smaller batch)."""

    def __init__(self, n: int, batch: int, start: int, total: int, args):
        self.n, self.batch, self.start, self.total, self.seed = n, batch, start, total, args.seed
        self.part, self.offset = batch // args.world_size, args.rank * (batch // args.world_size)

    def __iter__(self):
        perms = {}
        for s in range(self.start, self.total):
            keys, first = [], s * self.batch + self.offset
            for p in range(first, first + self.part):
                e = p // self.n
                if e not in perms:  # the epochs before e are done
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                    perms = {e: torch.randperm(self.n, generator=g).tolist()}
                keys.append((perms[e][p % self.n], e))
            yield keys


def fingerprint(module: nn.Module) -> str:  # sha1 of its state: resume only the same weights
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def fit_classifier(net, opt, loss_fn, ds, sched, batch: int, path: str, key, args, track=None):
    """Train net on loss_fn(x, y): len(sched) steps of `batch` images of ds, lr "lr0" x sched[step].
    Epoch ends: rank 0's buffers, track(net) to history, `path` saved (same key: rerun resumes)."""
    n, total, device = len(ds), len(sched), torch.device(args.device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, history, loss = 0, [], torch.tensor(math.nan)
    if args.resume != "none" and os.path.isfile(path):
        saved = load_checkpoint(path)
        if saved.get("key") == key:
            net.load_state_dict(saved["net"])
            opt.load_state_dict(saved["optimizer"])
            scaler.load_state_dict(saved["scaler"])
            step, history, loss = saved["step"], saved["history"], torch.tensor(saved["loss"])
        elif args.is_main:
            tqdm.write(f"note: {path} is of other weights or flags: starting anew", sys.stderr)
    params = [p for g in opt.param_groups for p in g["params"]]
    kw = {"batch_sampler": StreamBatches(n, batch, step, total, args), "num_workers": args.workers}
    bar = tqdm(None, os.path.basename(path)[:-4], total, initial=step, disable=not args.is_main)
    net.train()
    for x, y, _ in torch.utils.data.DataLoader(ds, pin_memory=device.type == "cuda", **kw):
        for g in opt.param_groups:
            g["lr"] = g["lr0"] * sched[step]
        with autocast(args):
            loss = loss_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grads = [p.grad for p in params if p.grad is not None]
        if get_world_size() > 1 and grads:  # their mean, in one all-reduce (DDP: in buckets),
            flat = torch.cat([g.flatten() for g in grads]).div_(get_world_size())
            dist.all_reduce(flat)  # before unscaling: an overflow on any rank is on every rank
            for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(v.view_as(g))
        scaler.step(opt)
        scaler.update()
        step += 1
        bar.update()
        if step == total or step * batch // n > (step - 1) * batch // n:  # an epoch ended
            sync_buffers(net)
            if track is not None:
                history.append(track(net.eval()))
                net.train()
            if args.is_main:
                state = {"net": net.state_dict(), "optimizer": opt.state_dict(), "step": step}
                state.update(scaler=scaler.state_dict(), history=history, loss=loss.item())
                save_checkpoint(path, {**state, "key": key})
    bar.close()
    net.eval()
    return {"loss": float(loss.detach()), "history": history}


def classifier_accuracy(net, data, args) -> list[float]:  # [top-1, top-5] (%) on the test split
    logits, y = extract(net, data.test, args)
    hit = logits.topk(min(5, data.num_classes), dim=1).indices == y[:, None]
    return [hit[:, 0].float().mean().item() * 100, hit.any(1).float().mean().item() * 100]


def projector_layers(model, k: int) -> nn.Module:
    """The first k layers of the projector (Linear [-> BN] -> ReLU each) [SimCLRv2 §2: fine-tune
    from the head's middle layer; ref: simclr tf2/model.py ProjectionHead ft_proj_selector]."""
    mods = list(unwrap(model).projector) if k else []
    ends = [i for i, m in enumerate(mods) if isinstance(m, nn.ReLU)]
    return nn.Sequential(*mods[: ends[k - 1] + 1]) if k else nn.Identity()


class FineTuneNet(nn.Module):
    """x -> linear head of fn(copy, x) [-> the first proj_layers projector layers]; copy: model
    deep-copied but for the modules fn never runs (shared); those it runs: new trainable `parts`."""

    def __init__(self, fn, model, x, num_classes: int, proj_layers=0, sync_bn=True, head="zero"):
        super().__init__()
        self.fn, self.k, called, mode = fn, proj_layers, set(), model.training
        hook = nn.modules.module.register_module_forward_pre_hook(lambda m, _: called.add(id(m)))
        try:  # eval mode: BN statistics untouched
            with torch.no_grad():
                dim = projector_layers(model, self.k)(fn(model.eval(), x)).shape[1]
        finally:
            model.train(mode)
            hook.remove()
        names = [n for n, m in model.named_modules() if id(m) in called]
        inside = lambda n, p: p == "" or n == p or n.startswith(p + ".")  # n in p's subtree
        top = [n for n in names if not any(p != n and inside(n, p) for p in names)]
        rest = [m for n, m in model.named_modules() if not any(inside(n, p) for p in top)]
        shared = {id(t): t for m in rest for t in (*m.parameters(False), *m.buffers(False))}
        net = copy.deepcopy(model, shared)  # a memo: these tensors are not copied
        for n in top:  # the recipe's BN in every part, whatever the model's (a part may be a BN)
            m = global_bn(nn.Sequential(net.get_submodule(n)), sync_bn)[0]
            m = convert_sync_bn(m) if sync_bn else m  # NCCL: torch's SyncBatchNorm
            parent, _, child = n.rpartition(".")
            if n:
                setattr(net.get_submodule(parent), child, m)
            else:  # the model itself
                net = m
        self.__dict__["copy"] = net  # not a submodule: its unused tensors are the model's
        self.parts = nn.ModuleList([net.get_submodule(n) for n in top]).requires_grad_(True)
        self.head = nn.Linear(dim, num_classes).to(x.device)  # "torch": nn.Linear's init
        w, s = self.head.weight, dim**-0.5
        if head != "torch":  # "zero"
            nn.init.zeros_(self.head.bias)
            nn.init.zeros_(w)
        if head == "normal":
            nn.init.normal_(w, std=0.01)
        elif head == "haiku":  # hk.Linear: N(0, 1 / dim) truncated at 2 std
            nn.init.trunc_normal_(w, 0.0, s, -2 * s, 2 * s)

    def forward(self, x):
        return self.head(projector_layers(self.copy, self.k)(self.fn(self.copy, x)))

    def train(self, mode: bool = True):
        self.copy.train(mode)
        return super().train(mode)


def finetune_net(fn, model, data, args) -> FineTuneNet:  # untrained (head from --seed)
    x = torch.stack([data.test[i][0] for i in range(2)]).to(torch.device(args.device))
    k = getattr(args, "ft_proj_layers", 0)
    return FineTuneNet(fn, model, x, data.num_classes, k, args.ft_sync_bn, args.ft_head_init)


def finetune(fn, model, data, args) -> dict:
    """Semi-supervised fine-tuning [SimCLR §6, Tab. 7; SimCLRv2 §2]: a copy of what fn reads (+ the
    --ft-proj-layers) and a new head on the labelled images; ft_* 1% values below 3%, else 10%."""
    if not args.finetune_fraction or data.test is None:
        return {}
    tl, col = data.train_linear, int(args.finetune_fraction >= 0.03)  # the 1% or the 10% values
    net = finetune_net(fn, model, data, args)
    ds = Indexed(tl.dataset, tl.transform, seed=args.seed)  # DEVIATION: bilinear, not bicubic crops
    ds.indices = [tl.indices[i] for i in labelled_subset(tl, args)]
    n, E, source = len(ds), args.ft_epochs[col], f"--finetune-fraction {args.finetune_fraction}"
    B = capped_batch(n, "ft_batch_size", args, "labelled images", source, warn=True)
    scale = math.sqrt(B) if args.ft_lr_scaling == "sqrt" else B / 256
    groups = [{"params": list(net.parts.parameters()), "lr0": args.ft_lr[col] * scale}]
    groups += [{"params": list(net.head.parameters()), "lr0": args.ft_head_lr[col] * scale}]
    groups[1]["adapt"] = False  # lars: the head is not adapted [ref: simclr model_util.py]
    if args.ft_optimizer == "lars":
        opt = LARS(groups, 0.0, momentum=0.9, classic=True)
    else:
        opt = torch.optim.SGD(groups, 0.0, momentum=0.9, nesterov=args.ft_optimizer == "nesterov")
    total, epoch, ms = math.ceil(n * E / B), lambda s: s * B // n, args.ft_milestones
    if ms:  # x decay from each milestone epoch on
        sched = [args.ft_decay ** sum(epoch(s) >= m for m in ms) for s in range(total)]
    elif args.ft_epoch_lr:  # cosine, set once per epoch
        sched = [0.5 * (1 + math.cos(math.pi * epoch(s) / E)) for s in range(total)]
    else:  # cosine per step
        sched = cosine_schedule(1.0, 0.0, total)
    names = ("finetune_fraction", "finetune_list", "seed", "dataset", "subset", "img_size")
    key = {k: v for k, v in config_dict(args).items() if k.startswith("ft_") or k in names}
    key["init"] = fingerprint(net)
    loss_fn = lambda x, y: F.cross_entropy(net(x).float(), y)
    track = (lambda net: classifier_accuracy(net, data, args)) if args.ft_best else None
    path = os.path.join(args.out_dir, "finetune.pth")
    out = fit_classifier(net, opt, loss_fn, ds, sched, B, path, key, args, track)
    acc = out["history"] or [classifier_accuracy(net, data, args)]
    top1, top5 = max(acc, key=lambda a: a[0]) if args.ft_best else acc[-1]  # max: the first best
    res = {"finetune_fraction": args.finetune_fraction, "finetune_images": n, "finetune_batch": B}
    res.update(finetune_optimizer=args.ft_optimizer, finetune_epochs=E, finetune_loss=out["loss"])
    return {**res, "finetune_top1": top1, "finetune_top5": top5, "finetune_top1_last": acc[-1][0]}


def neighbours(fn, data, args):
    """neighbours.png: 16 test (else training) images, each before its 8 nearest in the kNN bank."""
    bank, q, k = data.train_eval, data.test or data.train_eval, min(8, len(data.train_eval) - 1)
    if k < 1:  # fewer than 2 training images
        return
    pick = torch.randperm(len(q), generator=torch.Generator().manual_seed(args.seed))[:16].tolist()
    with eval_rng(args):
        queries = torch.utils.data.Subset(q, pick)
        f = [F.normalize(extract(fn, ds, args)[0], dim=1) for ds in (queries, bank)]
    sim = f[0] @ f[1].T  # [16, N]
    if q is bank:  # a training image is not its own neighbour
        sim[range(len(pick)), pick] = -math.inf
    near = sim.topk(k, dim=1).indices.tolist()
    if args.is_main:  # the images as the test transform gives them, without mean/std
        show = lambda ds, i: eval_transform(args.img_size)(ds.dataset[ds.indices[i]][0])
        rows = [[show(q, i)] + [show(bank, j) for j in js] for i, js in zip(pick, near)]
        torchvision.utils.save_image(sum(rows, []), f"{args.out_dir}/neighbours.png", nrow=k + 1)


# ==== 2.6 config, CLI and logging =========================================================
def arg(default, help: str, range: str = "", **kw):  # an Args field; range e.g. "[0, 1)"
    return dataclasses.field(default=default, metadata={"help": help, "range": range, **kw})


gt0, ge0 = partial(arg, range="(0, inf)"), partial(arg, range="[0, inf)")  # the usual ranges
unit, frac = partial(arg, range="[0, 1]"), partial(arg, range="(0, 1]")  # frac: crop scales
RANGE = re.compile(r"([\[(])(\S+), (\S+)([\])])")  # "[lo, hi]", "(lo, hi)", "[0, inf)", ...
PRESETS, PIPELINES = ("imagenet", "cifar"), ("auto", "device", "cpu")
AMPS, SCALINGS = ("auto", "bf16", "fp16", "off"), ("linear", "sqrt")
FT_OPTS, HEADS = ("sgd", "nesterov", "lars"), ("zero", "torch", "normal", "haiku")
FT = "SimCLR v2's [SimCLRv2 §4; ref: simclr README fine-tune command]"  # no wd, no warm-up
# DEVIATION: CIFAR presets fine-tune at batch 256 (SwAV's, Barlow Twins' own); 1024 / 4096 hold
# CIFAR-10's 1% 2-8 times a batch: SimCLR's at 4096 diverges, top-1 10.0 (random 16.2; 256: 42.7)
FT_CIFAR_BATCH = 256
RESULTS = {"metrics.jsonl": "every log step and evaluation, a JSON record a line"}
RESULTS["backbone.pth"] = "the encoder's weights (torchvision names)"
RESULTS["ckpt.pth"] = "the training state, to resume or extend the run (--resume)"
RESULTS["neighbours.png"] = "16 images, a row each: the image, then its 8 nearest training images"


def in_range(x, spec: str) -> bool:  # NaN is in no range, inf only in one closed at inf
    a, lo, hi, b = RANGE.fullmatch(spec).groups()
    lo, hi = float(lo), float(hi)
    return (lo <= x if a == "[" else lo < x) and (x <= hi if b == "]" else x < hi)


def describe(spec: str, integer: bool) -> str:  # "[0, inf)" -> ">= 0"; int "(0, inf)": ">= 1"
    a, lo, hi, b = RANGE.fullmatch(spec).groups()
    lo, hi = float(lo), float(hi)
    if integer:
        lo, a = (math.floor(lo) + 1 if a == "(" else math.ceil(lo)), "["
        hi, b = (hi, b) if math.isinf(hi) else (math.ceil(hi) - 1 if b == ")" else hi, "]")
    if math.isinf(hi):
        return f"{'>=' if a == '[' else '>'} {lo:g}"
    return f"in {a}{lo:g}, {hi:g}{b}"


def value_type(f: dataclasses.Field) -> type:  # what argparse makes of the flag (tuple: each)
    d = f.default
    return (type(d[0]) if d else float) if isinstance(d, tuple) else type(d)


def shown(v) -> str:  # a value as typed on the command line: tuple or list "60 80" (empty: "none")
    return (" ".join(map(str, v)) or "none") if isinstance(v, (tuple, list)) else str(v)


def check_ranges(args, defaults: dict):  # each value (a tuple's: each element) in its field's range
    for f in (f for f in dataclasses.fields(args) if f.metadata.get("range")):
        v, spec, integer = getattr(args, f.name), f.metadata["range"], value_type(f) is int
        values = v if isinstance(v, tuple) else (v,)
        bad = [x for x in values if not in_range(x, spec)]
        if bad:
            x, desc, d = bad[0], describe(spec, integer), defaults[f.name]
            why = "not a number" if x != x else "not finite" if math.isinf(x) else f"not {desc}"
            noun = "an integer" if integer else "a number"
            if isinstance(v, tuple):
                v, d, why, noun = shown(v), shown(d), f"{x} is {why}", noun.split()[1] + "s"
            fail(f"--{f.name.replace('_', '-')} {v}: {why}; pass {noun} {desc} (default {d})")


@dataclasses.dataclass
class RunArgs:  # the shared flags and derived fields; each Args adds its own
    IMG_SIZES = {"imagenet": 224, "folder": 224, "stl10": 96}  # --img-size 0; else 32 px
    preset: str = arg("cifar", "imagenet: paper defaults; cifar: recipe()", choices=PRESETS)
    dataset: str = arg("cifar10", "training data", choices=DATASETS)
    data_dir: str = arg("./data", "dataset root (torchvision downloads here; folder: train/ val/)")
    eval_dir: str = arg("", "labelled train/ and val/ (class folders) for kNN, linear, fine-tuning")
    img_size: int = ge0(0, "input size (0: 224 imagenet/folder (CPC 256), 96 stl10, else 32)")
    subset: int = ge0(0, "use the first N training images only (0: all; synthetic: 512)")
    workers: int = ge0(8, "DataLoader worker processes per process")
    pipeline: str = arg("auto", "device: aug on GPU; cpu: workers (auto: CUDA)", choices=PIPELINES)
    out_dir: str = arg("", "checkpoint/log folder (default runs/<method>)")
    resume: str = arg("auto", "auto: resume from out-dir/ckpt.pth if present; a path; or none")
    seed: int = arg(0, "model init (all ranks alike), aug (seed, epoch, index)", range="[0, 99999]")
    amp: str = arg("auto", "autocast (auto: bf16 on CUDA, off on CPU)", choices=AMPS)
    compile: bool = arg(False, "torch.compile the backbone")
    device: str = arg("", "cuda / cpu (default: cuda if available)")
    log_every: int = gt0(20, "log to metrics.jsonl every N steps (the only host syncs)")
    max_steps: int = ge0(0, "stop after N global steps (0: all epochs); schedules keep --epochs")
    ckpt_minutes: float = ge0(15.0, "also checkpoint at the first log step N minutes on (0: off)")
    init: str = arg("", "a new run (step 0) from weights: backbone.pth, torchvision, a release")
    knn_every: int = ge0(10, "kNN monitor every N epochs, at init and at the end (0: off)")
    knn_k: int = gt0(200, "kNN neighbours [InstDisc §3.4; MoCo CIFAR demo: 200]")
    knn_t: float = gt0(0.1, "kNN vote temperature [InstDisc §3.4; MoCo CIFAR demo: 0.1]")
    knn_subset: int = ge0(0, "kNN bank and test set: first N images only (0: all)")
    linear_cached: bool = arg(False, "linear probe on cached un-augmented features (DEVIATION)")
    finetune_fraction: float = unit(0.0, "fine-tune on this fraction of labels (0: off; 0.01, 0.1)")
    finetune_list: str = arg("", "ImageNet: the fraction's file list (simclr imagenet_subsets/)")
    ft_epochs: tuple = gt0((60, 30), f"fine-tuning epochs at 1% / 10% labels {FT}")
    ft_batch_size: int = gt0(1024, f"fine-tuning global batch {FT}; CIFAR 256 (FT_CIFAR_BATCH)")
    ft_lr: tuple = ge0((0.005, 0.005), f"fine-tuning lr at 1% / 10%, x --ft-lr-scaling {FT}")
    ft_head_lr: tuple = ge0((0.005, 0.005), f"head lr at 1% / 10%, x --ft-lr-scaling {FT}")
    ft_lr_scaling: str = arg("sqrt", f"x sqrt(batch) or x batch/256 {FT}", choices=SCALINGS)
    ft_optimizer: str = arg("lars", f"lars (head not adapted), sgd, nesterov {FT}", choices=FT_OPTS)
    ft_milestones: tuple = ge0((), f"lr x --ft-decay from these epochs (none: cosine to 0) {FT}")
    ft_decay: float = unit(0.1, "lr factor per --ft-milestones epoch")
    ft_epoch_lr: bool = arg(False, f"cosine lr set once per epoch, not per step {FT}")
    ft_sync_bn: bool = arg(True, f"BatchNorm over the global batch, not each process's {FT}")
    ft_head_init: str = arg("zero", f"zero, torch (nn.Linear's), normal, haiku {FT}", choices=HEADS)
    ft_best: bool = arg(False, f"top-1 of the best epoch, not the last {FT}")
    rank: int = arg(0, "", derived=True)
    world_size: int = arg(1, "", derived=True)
    local_rank: int = arg(0, "", derived=True)
    is_main: bool = arg(True, "", derived=True)
    batch_size_per_gpu: int = arg(0, "", derived=True)
    steps_per_epoch: int = arg(0, "", derived=True)
    total_steps: int = arg(0, "", derived=True)
    sched: dict = dataclasses.field(default_factory=dict, metadata={"derived": True})

    def check_batch_norm(self):  # a CNN's BatchNorm trains on batch statistics, not one image's
        if self.batch_size < 2 and self.arch not in VIT_SIZES:
            fail(f"--batch-size 1: {self.arch}'s BatchNorm needs >= 2 images; pass >= 2 or a ViT")


def resolve_sizes(args):  # --img-size 0: IMG_SIZES'/32; --local-size 0: x 96/224 [SwAV, DINO], >= 8
    args.img_size = args.img_size or args.IMG_SIZES.get(args.dataset, 32)
    if getattr(args, "local_size", None) == 0:
        args.local_size = max(8, round(args.img_size * 96 / 224))


def check_patch(args, patch: int, flag: str, px: int, cnn: int = 8):
    """The least crop: a ViT's patch (0: vit_patch's), a CNN's cnn px (8: halved 3x to 1x1)."""
    vit, patch = args.arch in VIT_SIZES, vit_patch(args.img_size, patch)
    least = patch if vit else cnn
    if px < least:
        given = getattr(args, flag[2:].replace("-", "_"))
        what = f"the ViT's {patch} px patch" if vit else f"the {cnn} px that {args.arch} takes"
        fail(f"{flag} {given}: {px} px crops are smaller than {what}; pass {flag} >= {least}")


def check_pair(args, name: str, ordered: bool = True):  # two numbers, lo <= hi if ordered
    v, what = getattr(args, name), "two numbers lo <= hi" if ordered else "two numbers"
    if len(v) != 2 or (ordered and v[0] > v[1]):
        why = "lo > hi" if len(v) == 2 else "not two numbers"
        fail(f"--{name.replace('_', '-')} {' '.join(map(str, v))}: {why}; pass {what}")


def run_dir(args) -> str:  # --out-dir, default runs/<method>
    return args.out_dir or os.path.join("runs", config_dict(args)["method"])


def check_flags(args):  # a writable --out-dir; fine-tuning: 1% / 10% values, list, distillation
    path, p = run_dir(args), os.path.abspath(run_dir(args))  # or the nearest folder above it
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        fail(f"--out-dir {path}: {p} is a file, not a folder; pass a folder path")
    if not os.access(p, os.W_OK | os.X_OK):
        fail(f"--out-dir {path}: cannot write in {p}; pass a folder you can write to")
    for name in ("ft_epochs", "ft_lr", "ft_head_lr"):  # the 1% and the 10% value
        check_pair(args, name, ordered=False)
    path, ds = args.finetune_list, args.dataset
    if path and not os.path.isfile(path):
        fail(f"--finetune-list {path}: no such file; pass a file of image file names, one a line")
    if path and ds not in ("imagenet", "folder"):
        fail(f"--finetune-list {path}: --dataset {ds} has no image files; pass imagenet or folder")
    if args.finetune_fraction and ds == "imagenet" and not path:
        why = "the subsets are lists; pass --finetune-list (simclr imagenet_subsets/1percent.txt)"
        fail(f"--finetune-fraction {args.finetune_fraction} on imagenet: {why}")
    if getattr(args, "distill_epochs", 0) and not args.finetune_fraction:
        why = "it distils the fine-tuned network; pass --finetune-fraction too"
        fail(f"--distill-epochs {args.distill_epochs}: {why}")


def parse_args(cls, argv=None):  # fields' metadata -> flags > recipe() (e.g. CIFAR) > ImageNet's
    doc, raw = sys.modules[cls.__module__].__doc__, argparse.RawDescriptionHelpFormatter
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
    pick = {f.name: f for f in fields if f.name in inspect.signature(cls.recipe).parameters}
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    for name in [*pick, "dataset"]:
        pre.add_argument("--" + name, type=value_type(pick[name]) if name in pick else str)
    known = {}
    with contextlib.suppress(argparse.ArgumentError):  # e.g. --preset without a value: see below
        known = vars(pre.parse_known_args(argv)[0])
    sel = {k: known[k] for k in pick if known.get(k) is not None}  # a bad choice: reported below
    sel = {k: v for k, v in sel.items() if v in pick[k].metadata.get("choices", [v])}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    resolved = {**defaults, **cls.recipe(**sel)}
    sizes = SimpleNamespace(**resolved, IMG_SIZES=cls.IMG_SIZES)  # 0 -> the dataset's size
    sizes.dataset = known.get("dataset") or sizes.dataset
    resolve_sizes(sizes)
    resolved.update({k: getattr(sizes, k) for k in ("img_size", "local_size") if k in resolved})
    p = argparse.ArgumentParser(description=doc, formatter_class=raw)
    for f in fields:
        spec, t, each = f.metadata.get("range"), value_type(f), isinstance(f.default, tuple)
        rng = f" ({'each ' if each else ''}{describe(spec, t is int)})" if spec else ""
        d = shown(resolved[f.name])  # "" (--out-dir, --device): the help says what it means
        rng += f" (default: {d})" if d else ""
        text = (f.metadata.get("help", "") + rng).replace("%", "%%")  # argparse %-formats it
        kw, flag = {"help": text, "default": argparse.SUPPRESS}, "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:  # a tuple: nargs "*"
            kw.update(type=t, nargs="*" if each else None, choices=f.metadata.get("choices"))
        p.add_argument(flag, **kw)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}
    recipe = cls.recipe(**{k: given[k] for k in pick if k in given})
    args = cls(**{**recipe, **given})
    resolve_sizes(args)
    check_ranges(args, {**defaults, **recipe})
    check_flags(args)
    check_patch(args, getattr(args, "patch_size", 0), "--img-size", args.img_size)
    args.check()
    return args


def config_dict(args) -> dict:  # the method (the file that defines type(args)), the settings
    names = [f.name for f in dataclasses.fields(args) if not f.metadata.get("derived")]
    names += ["world_size", "batch_size_per_gpu", "steps_per_epoch"]
    method = os.path.basename(sys.modules[type(args).__module__].__file__).removesuffix(".py")
    return {"method": method, **{k: getattr(args, k) for k in names}}


def prepare_run(args):  # make out-dir, print the config (resume saves it); seed init alike on ranks
    args.out_dir = run_dir(args)
    if args.is_main:
        try:  # checked by parse_args already; this catches what changed since (or main(args))
            os.makedirs(args.out_dir, exist_ok=True)
            claim_out_dir(args.out_dir)  # first: a refused run changes nothing there
        except OSError as e:
            fail(f"--out-dir {args.out_dir}: {e.strerror or e}; pass a folder you can write to")
        print(json.dumps(config_dict(args), indent=1))
    torch.manual_seed(args.seed)
    random.seed(args.seed)


class Logger:
    """metrics.jsonl (a line per log step or evaluation, one per (kind, step); those up to `initial`
    kept, known to every rank) + bar, on the main process; data's undecodable files reported."""

    def __init__(self, args, total: int, initial: int, data=None):
        self.batch, self.last, self.data, self.skipped = args.batch_size, initial, data, 0
        self.start, self.t0, self.args, self.collapsed = time.time(), time.time(), args, 0
        self.path = os.path.join(args.out_dir, "metrics.jsonl") if args.is_main else None
        self.bar = tqdm(total=total, initial=initial, disable=not args.is_main, dynamic_ncols=True)
        kept = [trim_metrics(self.path, initial) if self.path else {}]
        kept = [{k: r for k, r in kept[0].items() if k[0] != "train"}]  # never replaced: not held
        if args.world_size > 1:
            dist.broadcast_object_list(kept)
        self.records = kept[0]

    def due(self, kind: str, step: int, final: bool) -> dict | None:
        """A new record of kind at step ({"step", "epoch", "flags" at the end}), or None: this run
        has it (at the end: with the same flags) or makes none (fine-tuning: off or not the end)."""
        old, pre = self.records.get((kind, step)), ("knn_", "linear_")
        if kind == "finetune" and not (final and self.args.finetune_fraction):
            return None
        rec = {"step": step, "epoch": step / self.args.steps_per_epoch}
        if final and (kind == "finetune" or self.args.linear_epochs):
            pre = ("ft_", "finetune_") if kind == "finetune" else pre
            flags = {k: v for k, v in config_dict(self.args).items() if k.startswith(pre)}
            rec["flags"] = json.loads(json.dumps(flags))  # as read back: lists, not tuples
        return None if old and (not final or old.get("flags") == rec.get("flags")) else rec

    def report_skipped(self, step: int):
        """A record and a warning when more undecodable files were met (replaced, not dropped)."""
        paths = skipped_files(self.data) if self.data is not None and self.path else []
        if len(paths) > self.skipped:
            self.skipped = len(paths)
            what = "undecodable image files skipped so far (each replaced by the next file)"
            tqdm.write(f"warning: {len(paths)} {what}, e.g. {', '.join(paths[:3])}", sys.stderr)
            self.write({"step": step, "skipped_files": len(paths), "first": paths[:5]}, False)

    def log(self, step: int, stats: dict):
        z = stats.pop("z")  # train_step's embeddings: measured at log steps only
        stats = {k: float(v) for k, v in {**stats, **embedding_stats(*z)}.items()}  # host syncs
        warn = collapse_warning(stats, z[0].shape[1], step)  # "" if healthy
        self.collapsed = self.collapsed + 1 if warn else 0
        if self.collapsed == 2 and self.args.is_main:  # 2 log steps in a row: once per stretch
            tqdm.write(warn, sys.stderr)
        stats["img_s"] = (step - self.last) * self.batch / max(time.time() - self.t0, 1e-9)
        mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        stats["mem_gb"] = mem / 2**30
        self.t0, self.last = time.time(), step
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: f"{stats[k]:.4g}" for k in ("loss", "lr", "img_s") if k in stats})
        self.write({"step": step, **stats}, echo=False)
        self.report_skipped(step)

    def write(self, record: dict, echo: bool = True):
        """Appended, or in place of the record of the same (kind, step) with a note of the flags."""
        record = finite_record(record)
        key = (record_kind(record), record.get("step"))
        old = self.records.get(key)
        if key[0] != "train":
            self.records[key] = record
        if not self.path:
            return
        if echo:
            tqdm.write(json.dumps(record))
        if old is None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            return
        write_records(self.path, {**trim_metrics(self.path, math.inf), key: record}.values())
        new, was = record.get("flags", {}), old.get("flags", {})
        diff = [k for k in new if new[k] != was.get(k)]
        what = ", ".join(
            f"--{k.replace('_', '-')} {shown(new[k])} (was {shown(was.get(k))})" for k in diff
        )
        kind = "fine-tuning" if key[0] == "finetune" else key[0]
        tqdm.write(f"note: the {kind} record of step {key[1]} is replaced: {what}", sys.stderr)

    def close(self, final: dict | None):
        """Close the bar; print where the results are and the last evaluation's (final) figures."""
        self.bar.close()
        if not self.path:
            return
        out, t, final = os.path.dirname(self.path), round(time.time() - self.start), final or {}
        final = {**self.records.get(("finetune", final.get("step")), {}), **final}  # + its own
        lines = [f"done in {t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}; results in {out}"]
        lines += [f"  {k:<15}{v}" for k, v in RESULTS.items() if os.path.isfile(f"{out}/{k}")]
        names = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "linear_top5": "top-5"}
        labels = 100 * final.get("finetune_fraction", 0)  # the fine-tuning's share of labels
        names["finetune_top1"] = f"{labels:g}%-label fine-tuning top-1"
        figs = [f"{v} {final[k]:.2f}%" for k, v in names.items() if k in final]
        step = f" (step {final['step']})" if final else " (no test split)"
        print("\n".join(lines + [f"  final{step}: {', '.join(figs) or 'not evaluated'}"]))


class Tracked:  # a loader (sampler, batch_size, ... read through) whose batches move a bar
    def __init__(self, loader, bar: tqdm):
        self.loader, self.bar = loader, bar

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.bar.update(1)
            yield batch
