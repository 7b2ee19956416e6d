"""cleanssl common.py - the only shared module: data, augmentations, backbones and the
method-agnostic plumbing (DDP, gathers, LARS, schedules, checkpoints, kNN, linear probe, CLI).
Anything two methods would do differently lives in the method file, not here.
"""

# ==== 0. imports ===========================================================================
import argparse
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from einops import rearrange
from PIL import Image, ImageFilter
from tqdm import tqdm


def fail(msg: str):
    """Stop with one line that names the fix (a non-zero exit, no traceback)."""
    raise SystemExit(f"error: {msg}")


# ==== 1. distributed =======================================================================
def setup_ddp(args) -> torch.device:
    """torchrun env vars -> init NCCL (cuda) or gloo (cpu); else one process. Fills args.rank,
    world_size, local_rank, is_main, device and checks the global batch divides evenly."""
    if "RANK" in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and args.device in ("", "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    args.rank, args.world_size = get_rank(), get_world_size()
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.is_main = args.rank == 0
    if not args.device:
        args.device = f"cuda:{args.local_rank}" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda":
        args.device = f"cuda:{args.local_rank}"
    if args.batch_size % args.world_size:
        fail(
            f"--batch-size {args.batch_size} (global) is not divisible by the world size "
            f"{args.world_size}; pass a multiple of {args.world_size}"
        )
    args.batch_size_per_gpu = args.batch_size // args.world_size
    if args.amp == "auto":
        args.amp = "bf16" if args.device.startswith("cuda") else "off"
    return torch.device(args.device)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] per process -> [W*B, ...] in rank order, no gradient (keys, indices, features)."""
    if get_world_size() == 1:
        return x.detach()
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient of the gathered tensor and
    returns this process's slice, so DDP's gradient averaging equals one process on the global
    batch (a plain all_gather has no gradient; torch.distributed.nn's is deprecated in 2.14)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(get_world_size())[get_rank()]


class _AllReduceWithGrad(torch.autograd.Function):
    """y = sum_r x_r on every process; the gradient of a sum is all-reduced too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [W*B, ...] in rank order, differentiable (SimCLR's negatives)."""
    return x if get_world_size() == 1 else _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes, differentiable (statistics such as global BN moments)."""
    return x if get_world_size() == 1 else _AllReduceWithGrad.apply(x)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch for any backend (gloo/CPU included): mean and variance
    are all-reduced with gradient. On CUDA `convert_sync_bn` uses torch's nn.SyncBatchNorm."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.numel() // xf.shape[1] * get_world_size()
        mean = all_reduce_with_grad(xf.sum(dims)) / count
        xc = xf - mean.view(shape)
        var = all_reduce_with_grad((xc * xc).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), self.momentum)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm -> BatchNorm over the global batch: torch's nn.SyncBatchNorm on NCCL,
    GlobalBatchNorm elsewhere; a no-op in one process."""
    if get_world_size() == 1:
        return module
    if dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            new = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            for n, p in new.named_parameters():  # e.g. a frozen BN beta stays frozen
                p.requires_grad_(getattr(child, n).requires_grad)
            setattr(module, name, new)
        else:
            convert_sync_bn(child)
    return module


@torch.no_grad()
def average_gradients(params):
    """Mean of .grad over processes (for modules trained outside DDP: the linear probe)."""
    if get_world_size() > 1:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= get_world_size()


# ==== 2. data ==============================================================================
CIFAR_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "folder", "cifar10-npz", "synthetic")


class ArrayImages(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] + labels -> (PIL image, label)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return Image.fromarray(self.x[i].numpy()), int(self.y[i])


def synthetic_images(n: int, size: int, seed: int, num_classes: int = 10) -> ArrayImages:
    """Deterministic labelled images: a per-class smooth colour pattern plus per-image noise."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(
        torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(1234)),
        size=size,
        mode="bilinear",
    )
    y = torch.arange(n) % num_classes
    x = 0.7 * protos[y] + 0.3 * torch.rand(n, 3, size, size, generator=g)
    return ArrayImages((x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), y)


def npz_images(path: str, split: str) -> ArrayImages:
    """CIFAR-10 JPEG npz: image i = header + scans[off[i]:off[i+1]] + EOI (see its README)."""
    import numpy as np  # a torchvision dependency

    d = np.load(path)
    hdr, scans, off = (d["jpeg_header"].tobytes(), d[f"{split}_scans"], d[f"{split}_offsets"])
    eoi = b"\xff\xd9"
    x = torch.empty(len(off) - 1, 32, 32, 3, dtype=torch.uint8)
    for i in range(len(off) - 1):
        with Image.open(io.BytesIO(hdr + scans[off[i] : off[i + 1]].tobytes() + eoi)) as im:
            x[i] = torch.from_numpy(np.array(im.convert("RGB")))
    return ArrayImages(x, torch.from_numpy(d[f"y_{split}"]))


def base_datasets(args) -> tuple:
    """(train, test or None, num_classes) of (PIL image, label) datasets for --dataset."""
    ds, root = args.dataset, args.data_dir
    if ds == "synthetic":
        n = args.subset or 512
        return (synthetic_images(n, args.img_size, 0), synthetic_images(256, args.img_size, 1), 10)
    if ds == "cifar10-npz":
        path = root if root.endswith(".npz") else os.path.join(root, "cifar10_jpeg.npz")
        if not os.path.isfile(path):
            fail(f"{path} not found; pass --data-dir to the folder holding cifar10_jpeg.npz")
        return npz_images(path, "train"), npz_images(path, "test"), 10
    if ds in ("imagenet", "folder"):
        train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
        if ds == "folder" and not os.path.isdir(train_dir):
            train_dir, val_dir = root, ""
        if not os.path.isdir(train_dir):
            fail(f"no image folder at {train_dir}; pass --data-dir to a folder with train/ [val/]")
        train = torchvision.datasets.ImageFolder(train_dir)
        test = torchvision.datasets.ImageFolder(val_dir) if os.path.isdir(val_dir) else None
        return train, test, len(train.classes)
    tv = {
        "cifar10": (torchvision.datasets.CIFAR10, 10),
        "cifar100": (torchvision.datasets.CIFAR100, 100),
        "stl10": (torchvision.datasets.STL10, 10),
    }
    if ds not in tv:
        fail(f"unknown --dataset {ds}; choose from {', '.join(DATASETS)}")
    cls, nc = tv[ds]
    try:
        if ds == "stl10":  # pretrain on train+unlabeled, evaluate with the labelled train split
            train, test = (
                cls(root, "train+unlabeled", download=True),
                cls(root, "test", download=True),
            )
            return train, test, nc
        return (cls(root, train=True, download=True), cls(root, train=False, download=True), nc)
    except (RuntimeError, OSError) as e:
        fail(
            f"{ds} is not in --data-dir {root} and could not be downloaded ({type(e).__name__}); "
            "point --data-dir at a copy, or use --dataset cifar10-npz / folder / synthetic"
        )


class Indexed(torch.utils.data.Dataset):
    """(transform(image), label, index): the index travels with the batch (memory banks). Keys
    (index, epoch) from ResumableSampler seed the sample's augmentation from (seed, epoch,
    index): independent of worker count and order, so a resume anywhere in an epoch is exact."""

    def __init__(self, base, transform, n: int = 0, labelled_only: bool = False, seed=None):
        self.base, self.transform, self.seed = base, transform, seed
        idx = range(len(base))
        if labelled_only and hasattr(base, "labels"):  # STL-10 unlabeled images have label -1
            idx = [i for i in idx if base.labels[i] >= 0]
        self.idx = list(idx)[:n] if n else list(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, None)
        img, y = self.base[self.idx[i]]
        if epoch is None or self.seed is None:
            return self.transform(img), y, i
        s = (self.seed * 1_000_003 + epoch) * 100_000_007 + i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            state = random.getstate()
            random.seed(s)
            try:
                return self.transform(img), y, i
            finally:
                random.setstate(state)


def build_data(args, train_tf, normalize: bool) -> SimpleNamespace:
    """Pretraining set (train_tf(mean_std) -> list of views), kNN/linear sets (normalised like
    pretraining), and the derived step counts."""
    if not args.img_size:
        args.img_size = {"imagenet": 224, "folder": 224, "stl10": 96}.get(args.dataset, 32)
    train, test, nc = base_datasets(args)
    mean_std = (
        (CIFAR_MEAN_STD if "cifar" in args.dataset else IMAGENET_MEAN_STD) if normalize else None
    )
    ev, lin = (eval_transform(args.img_size, mean_std), linear_transform(args.img_size, mean_std))
    cap = args.knn_subset
    data = SimpleNamespace(
        train=Indexed(train, train_tf(mean_std), args.subset, seed=args.seed),
        train_eval=Indexed(train, ev, cap or args.subset, labelled_only=True),
        train_linear=Indexed(train, lin, args.subset, labelled_only=True, seed=args.seed),
        test=Indexed(test, ev, cap) if test is not None else None,
        num_classes=nc,
    )
    args.steps_per_epoch = len(data.train) // args.batch_size
    if args.steps_per_epoch == 0:
        fail(
            f"{len(data.train)} training images < one global batch of {args.batch_size}; "
            "lower --batch-size"
        )
    args.total_steps = args.steps_per_epoch * args.epochs
    return data


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler(shuffle, drop_last) yielding (index, epoch) keys for Indexed; `skip`
    drops the first samples of one epoch (mid-epoch resume without loading them)."""

    skip = 0

    def __iter__(self):
        keys = [(i, self.epoch) for i in super().__iter__()][self.skip :]
        self.skip = 0
        return iter(keys)


def make_loader(ds, args, batch_size: int, train: bool = True):
    """Every rank draws a disjoint shard, reshuffled per epoch (set_epoch); drop_last."""
    sampler = ResumableSampler(ds, args.world_size, args.rank, train, args.seed, drop_last=train)
    return torch.utils.data.DataLoader(
        ds,
        batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=train,
        pin_memory=args.device.startswith("cuda"),
        persistent_workers=args.workers > 0,
        generator=torch.Generator(),  # its own: iterating must not advance the global RNG
    )


def loader_epoch(loader, epoch: int, skip_batches: int = 0):
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size
    return loader


# ==== 3. augmentations =====================================================================
class PILGaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max) [SimCLR App. A; ref: moco/loader.py]."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class MultiView:
    """One image -> a list of independently augmented views (2 views, asymmetric, multi-crop)."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, img) -> list:
        return [t(img) for t in self.transforms]


def _finish(ops: list, mean_std) -> T.Compose:
    ops = ops + [T.ToTensor()]
    return T.Compose(ops + ([T.Normalize(*mean_std)] if mean_std else []))


def augmentation(
    size: int,
    mean_std=None,
    *,
    scale=(0.08, 1.0),
    jitter=(0.4, 0.4, 0.4, 0.1),
    jitter_p=0.8,
    gray_p=0.2,
    blur_p=0.0,
    solarize_p=0.0,
    gray_first=False,
    interpolation=T.InterpolationMode.BILINEAR,
) -> T.Compose:
    """The shared recipe skeleton: crop, flip, colour jitter (random op order), grayscale,
    blur, solarize. The named recipes below fix its knobs to each paper's values."""
    color = [T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p), T.RandomGrayscale(gray_p)]
    ops = [T.RandomResizedCrop(size, scale=scale, interpolation=interpolation)]
    ops += color[::-1] if gray_first else color
    ops += [T.RandomApply([PILGaussianBlur()], p=blur_p)] if blur_p > 0 else []
    ops += [T.RandomSolarize(128, p=solarize_p)] if solarize_p > 0 else []
    return _finish(ops + [T.RandomHorizontalFlip()], mean_std)


def simclr_augment(size, mean_std=None, s=1.0, blur=True):
    """[SimCLR App. A; ref: google-research/simclr data_util.py] jitter 0.8s/0.2s p=0.8, gray 0.2,
    blur p=0.5 (ImageNet only), bicubic crop (0.08, 1); s=0.5 and no blur on CIFAR."""
    return augmentation(
        size,
        mean_std,
        jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
        blur_p=0.5 if blur else 0.0,
        interpolation=T.InterpolationMode.BICUBIC,
    )


def moco_v1_augment(size, mean_std, scale=(0.2, 1.0)):
    """[MoCo §4; ref: facebookresearch/moco main_moco.py] gray 0.2 then jitter 0.4 (always)."""
    return augmentation(
        size, mean_std, scale=scale, jitter=(0.4,) * 4, jitter_p=1.0, gray_first=True
    )


def moco_v2_augment(size, mean_std, scale=(0.2, 1.0), blur=True):
    """[MoCo v2 §2; ref: main_moco.py --aug-plus] jitter (0.4,0.4,0.4,0.1) p=0.8, blur p=0.5."""
    return augmentation(size, mean_std, scale=scale, blur_p=0.5 if blur else 0.0)


def byol_augment(size, mean_std, scale=(0.08, 1.0), blur=True) -> MultiView:
    """Asymmetric pair [BYOL Tab. 6; MoCo v3 main_moco.py]: jitter (0.4,0.4,0.2,0.1) p=0.8,
    gray 0.2, blur p=1.0 / 0.1, solarize p=0 / 0.2."""
    kw = dict(scale=scale, jitter=(0.4, 0.4, 0.2, 0.1))
    return MultiView(
        [
            augmentation(size, mean_std, blur_p=1.0 if blur else 0.0, **kw),
            augmentation(size, mean_std, blur_p=0.1 if blur else 0.0, solarize_p=0.2, **kw),
        ]
    )


def multicrop_augment(global_tf, local_tf, n_global: int = 2, n_local: int = 6) -> MultiView:
    """n global + m local crops [SwAV §3.2]: build global_tf/local_tf with `augmentation(...)`
    at their own sizes and scales, e.g. 2x224 (0.14, 1) + 6x96 (0.05, 0.14)."""
    return MultiView([global_tf] * n_global + [local_tf] * n_local)


def eval_transform(size: int, mean_std=None) -> T.Compose:
    """Resize 256/224 + centre crop at ImageNet scale; the plain image at CIFAR scale."""
    ops = [T.Resize(size * 8 // 7), T.CenterCrop(size)] if size > 64 else [T.Resize(size)]
    return _finish(ops, mean_std)


def linear_transform(size: int, mean_std=None) -> T.Compose:
    """Linear-probe training: random resized crop + flip only [MoCo main_lincls.py]."""
    return _finish([T.RandomResizedCrop(size), T.RandomHorizontalFlip()], mean_std)


# ==== 4. backbones =========================================================================
ARCHS = ("resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small", "vit_base", "smallcnn")
VIT_SIZES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # dim, heads


def build_backbone(
    arch: str,
    img_size: int = 224,
    *,
    zero_init_residual: bool = False,
    norm_layer=None,
    patch_size: int = 0,
    num_heads: int = 0,
    freeze_patch_embed: bool = False,
    pos_embed: str = "learned",
    in_chans: int = 3,
    width: float = 1.0,
) -> tuple[nn.Module, int]:
    """-> (module mapping [B, C, H, W] to h [B, feat_dim], feat_dim). ResNets get the CIFAR stem
    (3x3 stride-1 conv, no max-pool) [SimCLR resnet.py cifar_stem] when img_size <= 64."""
    if arch.startswith("resnet") and arch in ARCHS:
        net = getattr(torchvision.models, arch)(
            zero_init_residual=zero_init_residual,
            norm_layer=norm_layer,
            width_per_group=int(64 * width),
        )
        if img_size <= 64 or in_chans != 3:
            k, s, p = (3, 1, 1) if img_size <= 64 else (7, 2, 3)
            net.conv1 = nn.Conv2d(in_chans, 64, k, s, p, bias=False)
        if img_size <= 64:
            net.maxpool = nn.Identity()
        dim, net.fc = net.fc.in_features, nn.Identity()
        return net, dim
    if arch in VIT_SIZES:
        dim, heads = VIT_SIZES[arch]
        patch = patch_size or (16 if img_size > 64 else 4)
        vit = ViT(
            img_size, patch, dim, 12, num_heads or heads, pos_embed=pos_embed, in_chans=in_chans
        )
        vit.patch_embed.requires_grad_(not freeze_patch_embed)
        return vit, dim
    if arch == "smallcnn":
        return SmallCNN(norm_layer or nn.BatchNorm2d, in_chans, int(32 * width)), int(256 * width)
    fail(f"unknown --arch {arch}; choose from {', '.join(ARCHS)}")


class SmallCNN(nn.Sequential):
    """4 conv-BN-ReLU layers (3x3; strides 1,2,2,2) + global pool: a CPU-friendly test encoder."""

    def __init__(self, norm_layer, in_chans=3, c=32):
        layers, chans = [], [in_chans, c, 2 * c, 4 * c, 8 * c]
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1, bias=False),
                norm_layer(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def sincos_pos_embed(dim: int, gh: int, gw: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [MoCo v3 §4; ref: moco-v3 vits.py] -> [gh*gw, dim]."""
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out = [f(c.flatten()[:, None] * omega[None]) for c in (x, y) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = (nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(rearrange(a, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer returning the final-norm [CLS] token [B, dim]."""

    def __init__(self, img_size, patch, dim, depth, heads, pos_embed="learned", in_chans=3):
        super().__init__()
        self.patch, self.dim, self.grid = patch, dim, img_size // patch
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        pos = (
            sincos_pos_embed(dim, self.grid, self.grid)
            if pos_embed == "sincos"
            else (torch.randn(self.grid**2, dim) * 0.02)
        )
        pos = torch.cat([torch.zeros(1, dim), pos])[None]  # [1, 1 + grid^2, dim], cls slot first
        self.pos_embed = nn.Parameter(pos, requires_grad=pos_embed != "sincos")
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02), nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x)  # [B, dim, gh, gw]
        gh, gw = x.shape[-2:]
        pos = self.pos_embed
        if (gh, gw) != (self.grid, self.grid):  # other crop sizes: interpolate the grid
            grid = rearrange(pos[:, 1:], "1 (h w) d -> 1 d h w", h=self.grid)
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], rearrange(grid, "1 d h w -> 1 (h w) d")], dim=1)
        x = torch.cat(
            [self.cls_token.expand(len(x), -1, -1), rearrange(x, "b d h w -> b (h w) d")], 1
        )
        return self.norm(self.blocks(x + pos))[:, 0]


# ==== 5. optimisation ======================================================================
class LARS(torch.optim.Optimizer):
    """LARS [You et al. 2017] as in SimCLR/BYOL/MoCo v3 (ref: moco-v3 moco/optimizer.py): for
    params with ndim > 1, g <- g + wd*w scaled by trust eta*|w|/|g|; 1-D params (biases, BN)
    get no weight decay and no adaptation. Momentum buffer m <- mu*m + g; w <- w - lr*m."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                trust_coefficient=trust_coefficient,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(pn)
                    q = torch.where((pn > 0) & (dn > 0), g["trust_coefficient"] * pn / dn, one)
                    d = d.mul(q)
                buf = self.state[p].setdefault("mu", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def param_groups(modules, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D params only; biases and norm params (ndim <= 1) get none."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> list[float]:
    """Per-step values: linear warm-up warmup_start -> base, then half-cosine base -> final."""
    warm = [
        warmup_start + (base - warmup_start) * (i + 1) / warmup_steps for i in range(warmup_steps)
    ]
    n = max(total_steps - warmup_steps, 1)
    cos = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return (warm + cos)[: max(total_steps, 1)]


def set_lr(optimizer, lr: float):
    for g in optimizer.param_groups:
        g["lr"] = g.get("fixed_lr", lr)


def optimizer_step(loss, optimizer, scaler, clip: float = 0.0) -> torch.Tensor:
    """backward (loss-scaled under fp16), unscale, grad norm (no host sync), clip, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return norm


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.amp != "off")


@torch.no_grad()
def ema_(target: list, online: list, m: float):
    """target <- m * target + (1 - m) * online, in place (params only)."""
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1.0 - m)


# ==== 6. checkpoints =======================================================================
def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def save_checkpoint(path: str, state: dict):
    """Atomic: write a temp file, then rename over the old checkpoint (rank 0 only)."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); delete it or pass --resume none")


def all_gather_object(obj) -> list:
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_state(path: str, model, optimizer, scaler, step: int, args):
    """Rank 0 writes model (with its buffers), optimizer, scaler, step, config and every rank's
    RNG state, atomically."""
    rngs = all_gather_object(rng_state())
    if args.is_main:
        state = {
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "args": config_dict(args),
            "rng": rngs,
        }
        save_checkpoint(path, state)


def load_state(path: str, model, optimizer, scaler, args) -> int:
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(
            f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:120]}); "
            "pass another --out-dir or --resume none"
        )
    scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt["rng"]
    if len(rngs) == args.world_size:
        set_rng_state(rngs[args.rank])
    else:  # a different world size cannot continue the same streams
        torch.manual_seed(args.seed + args.rank + ckpt["step"])
    return ckpt["step"]


# ==== 7. evaluation ========================================================================
@torch.no_grad()
def extract(fn, ds, args, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) over the whole dataset, sharded over processes and gathered: -> (feats, labels),
    in dataset order, identical on every rank."""
    n, w, device = len(ds), args.world_size, torch.device(args.device)
    per = math.ceil(n / w)
    idx = [min(args.rank + w * i, n - 1) for i in range(per)]  # pad the last shard by repeats
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx), batch_size, num_workers=args.workers
    )
    feats, labels = [], []
    for x, y, _ in loader:
        with autocast(args):
            feats.append(fn(x.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(y, device=device))
    f, y = gather_no_grad(torch.cat(feats)), gather_no_grad(torch.cat(labels))
    order = torch.tensor(
        [min(r + w * i, n - 1) for r in range(w) for i in range(per)], device=device
    )
    out_f = torch.empty(n, f.shape[1], device=device).index_copy_(0, order, f)
    return out_f, torch.empty(n, dtype=y.dtype, device=device).index_copy_(0, order, y)


@torch.no_grad()
def knn_predict(feats, bank, bank_labels, num_classes: int, k: int = 200, t: float = 0.1):
    """Weighted kNN [InstDisc §3.4]: cosine top-k, votes exp(sim / t) -> class scores [M, C]."""
    feats, bank = F.normalize(feats, dim=1), F.normalize(bank, dim=1)
    scores = []
    for chunk in feats.split(1024):
        sim, idx = (chunk @ bank.T).topk(min(k, len(bank)), dim=1)  # [m, k]
        votes = F.one_hot(bank_labels[idx], num_classes).float() * (sim / t).exp()[..., None]
        scores.append(votes.sum(1))
    return torch.cat(scores)


def knn_eval(fn, data, args) -> float:
    """kNN top-1 (%) on the test split, bank = training images under the test transform."""
    bank, bank_y = extract(fn, data.train_eval, args)
    test, test_y = extract(fn, data.test, args)
    pred = knn_predict(test, bank, bank_y, data.num_classes, args.knn_k, args.knn_t).argmax(1)
    return (pred == test_y).float().mean().item() * 100


def linear_probe(fn, feat_dim: int, data, args) -> dict:
    """Linear eval: frozen features (fn runs under no_grad on an eval() model), only a linear
    layer trains, SGD with the method's protocol (args.linear_*), gradients averaged over
    processes. --linear-cached: features of un-augmented images computed once (fast)."""
    device, w = torch.device(args.device), args.world_size
    head = nn.Linear(feat_dim, data.num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01), nn.init.zeros_(head.bias)
    bs = args.linear_batch_size // w
    lr = args.linear_lr * args.linear_batch_size / 256
    opt = torch.optim.SGD(
        head.parameters(),
        lr,
        momentum=0.9,
        weight_decay=args.linear_wd,
        nesterov=args.linear_nesterov,
    )
    if args.linear_cached:
        feats, labels = extract(fn, data.train_eval, args)
        n_batches = len(feats) // args.linear_batch_size
    else:
        loader = make_loader(data.train_linear, args, bs)
        n_batches = len(loader)
    if args.linear_milestones:  # step decay at the given epochs
        sched = [
            lr * 0.1 ** sum(e >= m for m in args.linear_milestones)
            for e in range(args.linear_epochs)
            for _ in range(n_batches)
        ]
    else:
        sched = cosine_schedule(lr, 0.0, args.linear_epochs * n_batches)
    step = 0
    for epoch in range(args.linear_epochs):
        if args.linear_cached:  # same permutation on every rank, each takes its column
            g = torch.Generator().manual_seed(args.seed + epoch)
            perm = torch.randperm(len(feats), generator=g)[: n_batches * args.linear_batch_size]
            idx = perm.view(n_batches, w, bs)[:, args.rank].to(device)
            batches = ((feats[i], labels[i]) for i in idx)
        else:
            batches = (
                (b[0].to(device, non_blocking=True), b[1].to(device))
                for b in loader_epoch(loader, epoch)
            )
        for x, y in batches:
            if not args.linear_cached:
                with torch.no_grad(), autocast(args):
                    x = fn(x)
            loss = F.cross_entropy(head(x.float()), y)
            set_lr(opt, sched[step])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(head.parameters())
            opt.step()
            step += 1
    test, test_y = extract(fn, data.test, args)
    with torch.no_grad():
        top5 = head(test).topk(min(5, data.num_classes), dim=1).indices
    return {
        "linear_top1": (top5[:, 0] == test_y).float().mean().item() * 100,
        "linear_top5": (top5 == test_y[:, None]).any(1).float().mean().item() * 100,
    }


def collapse_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalised z [SimSiam §4.1]: ~1/sqrt(D) healthy, 0 collapsed."""
    return F.normalize(z.detach().float(), dim=1).std(0).mean()


# ==== 8. config, CLI and logging ===========================================================
def parse_args(cls, argv=None):
    """argparse from the dataclass: one flag per field, help from field metadata. Values come
    from, in order: the field defaults (paper's ImageNet recipe), cls.recipe(version, preset)
    overrides (e.g. the CIFAR preset), then the flags given on the command line."""
    p = argparse.ArgumentParser(
        description=sys.modules[cls.__module__].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):
            continue
        kw = dict(help=f.metadata.get("help", ""), default=argparse.SUPPRESS)
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            p.add_argument(flag, nargs="*", type=type(default[0]) if default else float, **kw)
        else:
            p.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **kw)
    given = vars(p.parse_args(argv))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    sel = {k: given[k] for k in ("version", "preset", "arch") if k in given}
    return cls(**{**cls.recipe(**sel), **given})


def config_dict(args) -> dict:
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if not f.metadata.get("derived") or f.name in ("world_size", "batch_size_per_gpu")
    }


class Logger:
    """metrics.jsonl (one line per log step) + tqdm bar, on the main process only."""

    def __init__(self, args, total: int, initial: int):
        self.is_main, self.t0, self.last = args.is_main, time.time(), initial
        self.file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if self.is_main else None
        self.bar = tqdm(total=total, initial=initial, disable=not self.is_main, dynamic_ncols=True)
        self.imgs_per_step = args.batch_size

    def log(self, step: int, stats: dict):
        stats = {k: float(v) for k, v in stats.items()}  # the only host sync of the train loop
        now = time.time()
        stats["img_s"] = (step - self.last) * self.imgs_per_step / max(now - self.t0, 1e-9)
        stats["mem_gb"] = (
            torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
        )
        self.t0, self.last = now, step
        if self.is_main:
            self.file.write(json.dumps({"step": step, **stats}) + "\n")
            self.file.flush()
            self.bar.update(step - self.bar.n)
            keys = ("loss", "lr", "img_s")
            self.bar.set_postfix({k: f"{stats[k]:.4g}" for k in keys if k in stats})
        return stats

    def write(self, record: dict):
        if self.is_main:
            tqdm.write(json.dumps(record))
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def prepare_run(args):
    """Create out-dir, print the resolved config and save it next to the checkpoint."""
    method = os.path.basename(sys.modules[type(args).__module__].__file__).removesuffix(".py")
    args.out_dir = args.out_dir or os.path.join("runs", method)
    if args.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        cfg = config_dict(args)
        print(json.dumps(cfg, indent=1))
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    torch.manual_seed(args.seed)  # identical model init on every rank
    random.seed(args.seed)
