"""DINO - Emerging Properties in Self-Supervised Vision Transformers (Caron, Touvron, Misra,
Jégou, Mairal, Bojanowski, Joulin, ICCV 2021) https://arxiv.org/abs/2104.14294
Reference code: facebookresearch/dino (main_dino.py DINOLoss, DataAugmentationDINO, train loop;
utils.py clip_gradients, cancel_gradients_last_layer, cosine_scheduler, MultiCropWrapper;
vision_transformer.py DINOHead; eval_knn.py; eval_linear.py)
Objective (Eq. 3): min over the student of sum_{x in {x1g, x2g}} sum_{x' in V, x' != x}
H(P_t(x), P_s(x')), H(a, b) = -sum_k a_k log b_k, P_s = softmax(g_s(x') / tau_s) over all V crops,
P_t = softmax((g_t(x) - c) / tau_t) on the 2 global crops, no gradient; the code averages the pairs.
vs swav.py: (1) the targets come from a TEACHER, an EMA of the student (0.996 -> 1 by a per-step
cosine), not from Sinkhorn assignments of the network's own scores; (2) collapse is avoided by
centring (c, an EMA 0.9 of the teacher's global-batch mean) plus sharpening (tau_t 0.04)
instead of equipartition, and there is no queue; (3) only the 2 global crops go through the
teacher, each predicted from every other crop; (4) head: 3-layer GELU MLP 2048 -> 256, l2, then a
weight-normalised Linear to 65536 (no BN, no bias); (5) ViT-S/16 with AdamW, wd 0.04 -> 0.4 by
cosine and per-parameter gradient clipping 3.0 (SwAV: ResNet-50, LARS, wd 1e-6).
Run: torchrun --nproc_per_node=8 dino.py --preset imagenet --dataset imagenet --data-dir /path
     python dino.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import copy
import os
import warnings
from dataclasses import dataclass
from functools import partial
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + DINO(nn.Module), all method state as persistent buffers ===========
class DINOHead(nn.Module):
    """[ref: vision_transformer.DINOHead] Linear -> [BN] -> GELU -> Linear -> [BN] -> GELU ->
    Linear to the bottleneck (trunc-normal std 0.02, zero bias), l2-normalise, a weight-normed
    Linear(bottleneck, K, bias=False), g = 1 (frozen if norm_last_layer: cosine logits)."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, bn=False, norm_last=True):
        super().__init__()
        norm = (lambda d: [nn.BatchNorm1d(d)]) if bn else (lambda d: [])
        self.mlp = nn.Sequential(
            *[nn.Linear(in_dim, hidden_dim), *norm(hidden_dim), nn.GELU()],
            *[nn.Linear(hidden_dim, hidden_dim), *norm(hidden_dim), nn.GELU()],
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # = trunc_normal_ cut at +-2 (see ViT)
                nn.init.zeros_(m.bias)
        # v keeps nn.Linear's default init, as officially (the init above runs before it)
        wn = nn.utils.parametrizations.weight_norm  # weight = g * v / |v| per output row
        self.last_layer = wn(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0  # [K, 1]
        g.data.fill_(1.0)
        g.requires_grad_(not norm_last)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(h), dim=-1))  # [N, K] logits


class ViT(C.ViT):
    """common's ViT with DINO's init and position interpolation [ref: vision_transformer.py]:
    pos_embed (the [CLS] slot too), cls_token, Linear N(0, 0.02) (its trunc_normal_ cuts at +-2,
    100 std; torch < 2.14's returns +-2 itself now and then), zero bias, LayerNorm 1 / 0, the patch
    conv's torch default. Another grid: bicubic with DINO's scale factor (g' + 0.1) / g, not
    size=g' (interpolate_pos_encoding; dino issue #8)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        nn.init.normal_(self.pos_embed, std=0.02)  # [1, 1 + g^2, dim]
        nn.init.normal_(self.cls_token, std=0.02)  # [1, 1, dim]

    def pos_for(self, h: int, w: int, square: bool) -> torch.Tensor:
        """[ref: interpolate_pos_encoding] as is for the training grid of a square image."""
        g, pos = self.grid, self.pos_embed
        if h * w == g * g and square:
            return pos
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, dim, g, g]
        scale = ((h + 0.1) / g, (w + 0.1) / g)  # output floor(g x scale) = (h, w)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")  # [1, dim, h, w]
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        square = x.shape[-1] == x.shape[-2]
        x = self.patch_embed(x)  # [B, dim, h, w]
        pos = self.pos_for(*x.shape[-2:], square)  # [1, 1 + h w, dim]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
        return self.norm(self.blocks(x + pos))[:, 0]  # [B, dim]: final-norm [CLS]


class MultiCrop(nn.Module):
    """[ref: utils.MultiCropWrapper] one backbone pass per run of consecutive crops with the same
    resolution, one head pass on the concatenation; output rows crop-major: [V*B, K]."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views: list) -> torch.Tensor:
        h = [self.backbone(torch.cat(list(g))) for _, g in groupby(views, lambda v: v.shape[-1])]
        return self.head(torch.cat(h))


class DINO(nn.Module):
    """Student: backbone + DINOHead on all crops. Teacher: the same architecture, a copy of the
    student at init, never trained (requires_grad False): an EMA of the student's parameters, its
    BN (ResNet) running stats its own, as officially. State: the centre c [1, K], on every rank."""

    def __init__(self, args: "Args"):
        super().__init__()
        if args.arch in C.VIT_SIZES:  # DINO's init and interpolation [ref]
            self.feat_dim, heads = C.VIT_SIZES[args.arch]
            vit = (args.img_size, args.patch_size, self.feat_dim, 12, heads)
            backbone = ViT(*vit, drop_path=args.drop_path)  # the student's stochastic depth [ref]
        else:
            backbone, self.feat_dim = C.build_backbone(args.arch, args.img_size)
        dims = (self.feat_dim, args.out_dim, args.hidden_dim, args.bottleneck_dim)
        head = DINOHead(*dims, args.head_bn, args.norm_last_layer)
        self.student = MultiCrop(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)  # same init [ref]
        for block in (b for b in self.teacher.modules() if isinstance(b, C.Block)):
            block.drop_path = 0.0  # the teacher: no stochastic depth [ref: main_dino.py]
        self.register_buffer("center", torch.zeros(1, args.out_dim))  # [1, K]

    def forward(self, views: list) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t = self.teacher(views[:2])  # [2B, K]: the 2 global crops only [DINO §3.1]
        return self.student(views), t  # s: [V*B, K], all crops


# --init: main_dino.py's checkpoint {student (DDP: module.), teacher (DDP for ResNets only),
# dino_loss (center), optimizer, args}; DINOHead's last layer: nn.utils.weight_norm's g, v
WRAPS = {"student.module.": "student.", "teacher.module.": "teacher.", "teacher.": "teacher."}
WN = "head.last_layer.parametrizations.weight.original"  # parametrized weight_norm's g: 0, v: 1
RELEASE = {**WRAPS, "dino_loss.center": "center", "optimizer.": None}
RELEASE.update({f"{k}head.last_layer.weight_g": f"{v}{WN}0" for k, v in WRAPS.items()})
RELEASE.update({f"{k}head.last_layer.weight_v": f"{v}{WN}1" for k, v in WRAPS.items()})


# ==== 2. loss: dino_loss(...) -> Tensor, pure, fp32 inside ================================
def dino_loss(
    s: list[torch.Tensor], t: list[torch.Tensor], center: torch.Tensor, tau_s: float, tau_t: float
) -> torch.Tensor:
    """[DINO Eq. 3; ref: main_dino.DINOLoss] s: student logits per crop, V tensors [B, K] (the
    2 global crops first); t: raw teacher logits of the 2 global crops, [B, K] each; center:
    [1, K]. P_t = softmax((t_i - c) / tau_t), no gradient; for every pair (global i, crop v),
    v != i: batch mean of -sum_k P_t log softmax(s_v / tau_s). Eq. 3 SUMS the pairs, the code
    (and this) MEANS the 2(V - 1): uniform output gives ln K; DDP averages to the global batch."""
    with torch.autocast(s[0].device.type, enabled=False):
        c = center.detach().float()
        p_t = [F.softmax((x.detach().float() - c) / tau_t, dim=-1) for x in t]  # centre, sharpen
        log_p_s = [F.log_softmax(x.float() / tau_s, dim=-1) for x in s]
        terms = [
            -(q * log_p).sum(-1).mean()
            for i, q in enumerate(p_t)
            for v, log_p in enumerate(log_p_s)
            if v != i  # skip the pairs of a crop with itself
        ]
        return torch.stack(terms).mean()


# ==== 3. method state: @torch.no_grad() update_center / momentum_update / clip_and_freeze =
@torch.no_grad()
def update_center(model: DINO, t: torch.Tensor, center_m: float):
    """c <- center_m * c + (1 - center_m) * mean of the teacher logits t [2B, K] (both global
    crops) over the GLOBAL batch: the only tensor that crosses processes (an all-reduced sum,
    no gradient), so c stays identical on every rank [DINO Eq. 4; ref: DINOLoss.update_center]."""
    batch_center = t.float().sum(0, keepdim=True)  # [1, K]
    if C.get_world_size() > 1:
        dist.all_reduce(batch_center)
    batch_center /= len(t) * C.get_world_size()
    model.center.mul_(center_m).add_(batch_center, alpha=1 - center_m)


@torch.no_grad()
def momentum_update(model: DINO, m: float):
    """teacher <- m * teacher + (1 - m) * student, parameters only (the weight-norm g and v
    included; BN buffers are the teacher's own) [DINO §3.1; ref: train_one_epoch]."""
    C.ema_(list(model.teacher.parameters()), list(model.student.parameters()), m)


@torch.no_grad()
def clip_and_freeze(student: MultiCrop, clip: float, freeze: bool):
    """On the unscaled gradients: each parameter's clipped to norm <= clip [ref: clip_gradients],
    then the last layer's cancelled while frozen [ref: utils.cancel_gradients_last_layer]."""
    if clip > 0:
        for p in student.parameters():
            if p.grad is not None:
                p.grad.mul_((clip / (torch.linalg.vector_norm(p.grad) + 1e-6)).clamp(max=1.0))
    if freeze:
        for p in student.head.last_layer.parameters():
            p.grad = None


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    views, _, _ = batch
    net = C.unwrap(model)
    lr, wd, m, tau_t = (args.sched[k][step] for k in ("lr", "wd", "m", "tau_t"))
    C.set_lr(optimizer, lr)
    optimizer.param_groups[0]["weight_decay"] = wd  # the regularised group only [ref]
    with C.autocast(args):
        s, t = model(views)
    loss = dino_loss(s.chunk(len(views)), t.chunk(2), net.center, args.tau_s, tau_t)
    update_center(net, t, args.center_m)  # AFTER the loss used the old c [ref: DINOLoss]
    frozen = step < args.freeze_last_layer * args.steps_per_epoch
    hook = partial(clip_and_freeze, net.student, args.clip_grad, frozen)
    grad_norm = C.optimizer_step(loss, optimizer, scaler, hook=hook)
    # AFTER the optimizer step, with the new student weights [ref: train_one_epoch]
    momentum_update(net, m)
    stats = {"loss": loss.detach(), "lr": lr, "wd": wd, "m": m, "tau_t": tau_t}
    return {**stats, "grad_norm": grad_norm, "z": t.chunk(2)}  # monitored: teacher logits (2 crops)


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the TEACHER backbone output h [ref: eval_*.py
    --checkpoint_key teacher]: the final-norm [CLS] (ViT), the pooled features (ResNet).
    DEVIATION: eval_linear.py's ViT-S probe reads the last 4 blocks' [CLS], each normed (1536-d)."""
    return C.unwrap(model).teacher.backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the TEACHER's backbone, the encoder
    the paper evaluates [DINO §4.1; ref: eval_*.py --checkpoint_key teacher]."""
    return C.unwrap(model).teacher.backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
OPTS = ("adamw", "sgd", "lars")


@dataclass
class Args(C.RunArgs):
    """DINO's fields: the defaults are the README's vanilla ImageNet run (ViT-S/16); recipe()
    sets the convnets' and the CIFAR preset's (named in each help text). Fine-tuning: C.RunArgs'
    defaults, SimCLR v2's protocol [SimCLRv2 §4]: none in the DINO code."""

    # defaults: the README's vanilla run (ViT-S/16, 8 GPUs x 64, 100 epochs, main_dino.py's
    # defaults; 69.3% k-NN, 74.0% linear). The released 800-epoch ViT-S/16 (77.0% linear) differs
    # at least by --epochs 800 --batch-size 1024 --tau-t 0.07 --tau-t-warmup-epochs 30 [§4.1]
    # --n-local 10 --global-scale 0.25 1 --local-scale 0.05 0.25 [its args.txt] --no-norm-last-layer
    arch: str = arg(
        "vit_small",
        "backbone [DINO §4.1; ref: README vanilla run --arch]; CIFAR resnet18",
        choices=C.ARCHS,
    )
    patch_size: int = gt0(16, "ViT patch size [DINO §4.1 ViT-S/16; ref: --patch_size]; CIFAR 4")
    epochs: int = ge0(
        100, "epochs [ref: README vanilla run, main_dino.py --epochs 100]; CIFAR 1000"
    )
    batch_size: int = gt0(512, "GLOBAL batch [ref: README vanilla run: 8 GPUs x 64]; CIFAR 256")
    optimizer: str = arg("adamw", "adamw [DINO §4.1]; sgd: README RN50 recipe", choices=OPTS)
    lr: float = ge0(5e-4, "peak lr per 256, x B/256 [DINO §4.1; ref: --lr 0.0005]")
    min_lr: float = ge0(1e-6, "final lr of the per-step cosine [ref: main_dino.py --min_lr]")
    warmup_epochs: int = ge0(10, "lr warm-up epochs, np.linspace(0, lr) [ref: cosine_scheduler]")
    wd: float = ge0(0.04, "initial wd, not on biases/norms [DINO §4.1; ref: --weight_decay]")
    wd_end: float = ge0(0.4, "final wd of the per-step cosine [DINO §4.1; ref: --weight_decay_end]")
    drop_path: float = arg(
        0.1, "student ViT stochastic depth [ref: --drop_path_rate]", range="[0, 1)"
    )
    clip_grad: float = ge0(3.0, "per-parameter grad-norm clip (0: off) [ref: --clip_grad 3.0]")
    freeze_last_layer: int = ge0(1, "epochs with the head's last layer frozen [ref: same flag]")
    m: float = unit(
        0.996, "teacher EMA, -> 1 by cosine [DINO §3.1; ref: --momentum_teacher]; CIFAR 0.9995"
    )
    tau_s: float = gt0(0.1, "student temperature [DINO §4.1; ref: DINOLoss student_temp]")
    tau_t: float = gt0(
        0.04, "tau_t after warm-up [ref: --teacher_temp 0.04; paper/800 ep: .07]; CIFAR 0.07"
    )
    tau_t_warmup: float = gt0(0.04, "tau_t at epoch 0 [DINO §4.1; ref: --warmup_teacher_temp]")
    tau_t_warmup_epochs: int = ge0(
        0, "tau_t linspace epochs [ref: code default 0; paper 30]; CIFAR 30"
    )
    center_m: float = unit(0.9, "centre EMA coefficient [DINO Eq. 4; ref: center_momentum 0.9]")
    out_dim: int = gt0(65536, "head output dim K [DINO §3.1; ref: --out_dim 65536]; CIFAR 4096")
    hidden_dim: int = gt0(2048, "head MLP hidden dim [DINO App.; ref: DINOHead hidden_dim]")
    bottleneck_dim: int = gt0(256, "head bottleneck dim [DINO App.; ref: DINOHead bottleneck_dim]")
    head_bn: bool = arg(False, "BN in the head MLP [ref: --use_bn_in_head False, also for RN50]")
    norm_last_layer: bool = arg(
        True, "freeze weight-norm g at 1 [ref: --norm_last_layer True; 800-ep ViT-S: False]"
    )
    n_local: int = ge0(8, "local crops [ref: --local_crops_number 8; DINO Tab. 8 / 800 ep: 10]")
    local_size: int = ge0(0, "local crop px (0: img_size x 96/224, min 8) [DINO §3.1: 96 px]")
    global_scale: tuple = frac(
        (0.4, 1.0), "global crop scale [ref: --global_crops_scale; RN50 .14]; CIFAR 0.14 1"
    )
    local_scale: tuple = frac(
        (0.05, 0.4), "local crop scale [ref: --local_crops_scale; RN50 .14]; CIFAR 0.05 0.14"
    )
    blur: bool = arg(
        True, "blur 1.0 / 0.1 / 0.5 [ref: DataAugmentationDINO]; off on CIFAR (its size)"
    )
    linear_epochs: int = ge0(100, "linear-eval epochs [ref: eval_linear.py --epochs 100]")
    linear_lr: float = ge0(
        1e-3, "linear lr per 256 [ref: eval_linear.py --lr 0.001; RN50 .075]; CIFAR 0.1"
    )
    linear_wd: float = ge0(0.0, "linear-eval weight decay [ref: eval_linear.py weight_decay=0]")
    linear_batch_size: int = gt0(
        256, "linear global batch [ref: README vanilla eval log: 256]; CIFAR 512"
    )
    linear_nesterov: bool = arg(False, "Nesterov momentum [ref: eval_linear.py: plain SGD 0.9]")
    linear_milestones: tuple = ge0((), "linear lr x0.1 epochs (empty: cosine) [ref: eval_linear]")
    linear_decay: float = unit(0.1, "milestone factor; unused: cosine [ref: eval_linear.py]")
    linear_epoch_lr: bool = arg(True, "lr per epoch [ref: eval_linear.py CosineAnnealingLR]")
    linear_best: bool = arg(True, "report the best epoch [ref: eval_linear.py best_acc]")
    linear_zero_init: bool = arg(False, "classifier N(0, 0.01), bias 0 [ref: eval_linear.py]")

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset / arch."""
        arch = arch or ("resnet18" if preset == "cifar" else "vit_small")
        r = {}
        if preset == "imagenet":  # [ref: eval_knn.py]
            r.update(knn_k=20, knn_t=0.07)
        if not arch.startswith("vit"):  # convnets [ref: README "ResNet-50 and other convnets"]
            r.update(global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))
        if preset == "imagenet" and not arch.startswith("vit"):  # README RN50 command: 8 x 64,
            # 100 epochs, the code's other defaults (8 locals, tau_t 0.04 constant, clip 3.0)
            r.update(optimizer="sgd", lr=0.03, wd=1e-4, wd_end=1e-4)
            # the released RN50 linear-eval log trains at lr 0.3 [dino issue #131]: 0.075 per 256
            # at eval_linear.py's batch 8 x 128; the same per-epoch cosine, best epoch
            r.update(linear_lr=0.075, linear_batch_size=1024)
        if preset == "cifar":  # [ref: solo-learn scripts/pretrain/cifar/dino.yaml]: R18, 4096
            # prototypes, teacher EMA 0.9995 (also the README's advice for batch 256), 1000 ep
            r.update(arch="resnet18", batch_size=256, epochs=1000, out_dim=4096, m=0.9995)
            r.update(patch_size=4, blur=False)  # no blur at 32 px; 8 locals (code default)
            r.update(tau_t=0.07, tau_t_warmup_epochs=30)  # DINO §4.1: 0.04 -> 0.07 in 30 epochs
            # DEVIATION: solo-learn's LARS (lr 0.3, wd 1e-6), 2 crops; here AdamW, wd cosine, locals
            # DEVIATION: eval_linear.py's lr 0.001 suits ViT [CLS]; the RN50 log: 0.3 [issue #131]
            r.update(linear_lr=0.1, linear_batch_size=512)
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        C.check_pair(self, "global_scale")
        C.check_pair(self, "local_scale")
        self.check_batch_norm()  # the centre is an EMA over steps: one image is a batch
        if self.n_local:
            C.check_patch(self, self.patch_size, "--local-size", self.local_size)


# ==== 6. the run: fit, linear eval, evaluate (identical text in every file) ===============
def linear_probe(fn, feat_dim: int, data, args) -> dict:
    """Linear eval: frozen features (fn under no_grad on an eval() model), only a linear layer
    trains, SGD with the paper's protocol (args.linear_*), gradients averaged over processes.
    --linear-cached: features of un-augmented images, computed once (fast; a DEVIATION)."""
    device, w, B = torch.device(args.device), args.world_size, C.linear_batch_size(data, args)
    head = nn.Linear(feat_dim, data.num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if args.linear_zero_init:
        nn.init.zeros_(head.weight)
    lr, kw = args.linear_lr * B / 256, {"weight_decay": args.linear_wd}
    opt = torch.optim.SGD(head.parameters(), lr, momentum=0.9, nesterov=args.linear_nesterov, **kw)
    if args.linear_cached:
        feats, labels = C.extract(fn, data.train_eval, args)
        n_batches = len(feats) // B
    else:
        loader = C.make_loader(data.train_linear, args, B // w)
        n_batches = len(loader)
    E, ms = args.linear_epochs, args.linear_milestones
    if ms:  # x decay per milestone passed, set once per epoch
        per_epoch = [lr * args.linear_decay ** sum(e >= m for m in ms) for e in range(E)]
    else:
        per_epoch = C.cosine_schedule(lr, 0.0, E)
    sched = [v for v in per_epoch for _ in range(n_batches)]  # the lr set once per epoch
    if not (ms or args.linear_epoch_lr):  # cosine per step
        sched = C.cosine_schedule(lr, 0.0, E * n_batches)
    test, test_y = C.extract(fn, data.test, args)
    acc = []
    for epoch in C.progress(range(E), "linear probe epochs", args):
        if args.linear_cached:  # one permutation on every rank, each takes its column
            perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(epoch))
            cols = perm[: n_batches * B].view(n_batches, w, B // w)[:, args.rank].to(device)
            batches = ((feats[i], labels[i]) for i in cols)
        else:
            loader.sampler.set_epoch(epoch)
            batches = ((b[0].to(device), b[1].to(device)) for b in loader)
        for i, (x, y) in enumerate(batches):
            if not args.linear_cached:
                with torch.no_grad(), C.autocast(args):
                    x = fn(x)
            C.set_lr(opt, sched[epoch * n_batches + i])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(x.float()), y).backward()
            if w > 1:  # mean over processes, as DDP would
                for p in head.parameters():
                    torch.distributed.all_reduce(p.grad.div_(w))
            opt.step()
        with torch.no_grad():  # test top-1/top-5 after every epoch
            hit = head(test).topk(min(5, data.num_classes), dim=1).indices == test_y[:, None]
            acc.append(torch.stack([hit[:, 0].float().mean(), hit.any(1).float().mean()]) * 100)
    acc = torch.stack(acc).tolist()
    best = max(range(E), key=lambda e: acc[e][0])  # the first best epoch
    top1, top5 = acc[best] if args.linear_best else acc[-1]
    res = {"linear_top1": top1, "linear_top5": top5, "linear_top1_last": acc[-1][0]}
    return {**res, "linear_top1_best": acc[best][0], "linear_best_epoch": best + 1}


def evaluate(model, data, args, logger, step: int, final: bool) -> dict | None:
    """kNN top-1 on the test split; at the end also the linear probe, after which the model
    must be bit-identical (the sanity check of MoCo's main_lincls.py), and fine-tuning. Each in
    its own random streams (C.eval_rng): training draws what it would without evaluation. What
    this run has recorded (logger.due) is not made again. -> the evaluation record."""
    model, res = C.unwrap(model), logger.records.get(("eval", step))
    new, tune = logger.due("eval", step, final), logger.due("finetune", step, final)
    if data.test is None or not (new or tune):
        return res
    model.eval()
    fn = lambda x: features(model, x)
    with C.eval_rng(args):
        if new and args.knn_every:
            new["knn_top1"] = C.knn_eval(fn, data, args)
        if new and final and args.linear_epochs:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            new.update(linear_probe(fn, model.feat_dim, data, args))
            if any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items()):
                raise RuntimeError("linear eval changed the frozen model")
    with C.eval_rng(args):  # --finetune-fraction; the model and its checkpoint stay untouched
        tune = tune and {**tune, **C.finetune(features, model, data, args)}
    for record in [r for r in (new, tune) if r]:
        logger.write(record)
    logger.report_skipped(step)
    model.train()
    return new or res


def fit(model, optimizer, data, args):
    """Train until --epochs (auto-resume, checkpoint every epoch and --ckpt-minutes), then export
    the encoder the paper evaluates (encoder(model)) and evaluate."""
    device = torch.device(args.device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ckpt = os.path.join(args.out_dir, "ckpt.pth")
    step = C.resume(ckpt, model, optimizer, scaler, args, encoder(model), RELEASE)  # or --init
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if args.compile:
        encoder(model).compile()
    ddp = model
    if args.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")  # torch >= 2.14
        ddp = nn.parallel.DistributedDataParallel(model, ids, broadcast_buffers=False)
    loader = C.train_loader(data, args)
    logger = C.Logger(args, args.total_steps, step, data)
    loader = C.Tracked(loader, logger.bar)  # the bar moves at every step, host-side only
    end = C.last_step(args)
    while step < end:
        finite, stop = torch.ones((), dtype=torch.bool, device=device), False
        epoch, skip = divmod(step, args.steps_per_epoch)
        if not skip and args.knn_every and epoch % args.knn_every == 0:  # at 0: random init
            evaluate(model, data, args, logger, step, final=False)  # unless recorded (resumed)
        loader.sampler.set_epoch(epoch, skip * loader.batch_size)  # skip what was already done
        for views, y, idx in loader:
            views = [v.to(device, non_blocking=True, memory_format=fmt) for v in views]
            batch = (views, y.to(device, non_blocking=True), idx.to(device, non_blocking=True))
            stats = train_step(ddp, batch, optimizer, scaler, step, args)
            step += 1
            finite &= torch.isfinite(stats["loss"])
            if step % args.log_every == 0 or step == end:  # every rank stops at the same step:
                stop = C.check_step(finite, step, args)  # non-finite loss (fails); save?
                logger.log(step, {"epoch": epoch, **stats})
            if step == end or stop:
                break
        C.save_state(ckpt, model, optimizer, scaler, step, args, finite)  # SIGTERM: ends here
    if args.is_main:  # torchvision format, before the final evaluation (which may fail)
        C.save_checkpoint(os.path.join(args.out_dir, "backbone.pth"), encoder(model).state_dict())
    final = evaluate(model, data, args, logger, step, final=True)  # --epochs 0: random init
    C.neighbours(lambda x: features(C.unwrap(model).eval(), x), data, args)  # neighbours.png
    logger.close(final)  # the end-of-run summary: where the results are, the final figures


# ==== 8. main(args) =======================================================================
@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # global 1: blur 1.0; global 2: blur 0.1 + solarize 0.2; locals: blur 0.5; jitter (0.4, 0.4,
    # 0.2, 0.1) p=0.8, grayscale 0.2, bicubic crops [DINO §4.1; ref: DataAugmentationDINO]. On a
    # GPU (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    ms = C.dataset_mean_std(args)  # mean/std-normalised, ImageNet's [ref: main_dino.py]
    kw = {"jitter": (0.4, 0.4, 0.2, 0.1), "bicubic": True}
    g = partial(C.augmentation, args.img_size, ms, scale=tuple(args.global_scale), **kw)
    local = {"scale": tuple(args.local_scale), "blur_p": 0.5 * args.blur}
    loc = C.augmentation(args.local_size, ms, **local, **kw)
    glob = [g(blur_p=1.0 * args.blur), g(blur_p=0.1 * args.blur, solarize_p=0.2)]
    data = C.build_data(args, C.MultiView(glob + [loc] * args.n_local), ms)
    C.prepare_run(args)
    model = C.convert_sync_bn(DINO(args)).to(device)  # student and teacher BN [ref]
    if args.compile:  # fit() compiles encoder(model), the teacher's
        model.student.backbone.compile()
    lr, spe, T = args.lr * args.batch_size / 256, args.steps_per_epoch, args.total_steps
    W = args.tau_t_warmup_epochs  # tau_t: linspace(warm-up, final, W) per EPOCH, then final
    tau = lambda e: args.tau_t_warmup + (args.tau_t - args.tau_t_warmup) * e / max(W - 1, 1)
    args.sched = {  # per step [ref: utils.cosine_scheduler; main_dino.py DINOLoss]
        "lr": C.cosine_schedule(lr, args.min_lr, T, args.warmup_epochs * spe, linspace=True),
        "wd": C.cosine_schedule(args.wd, args.wd_end, T),
        "m": C.cosine_schedule(args.m, 1.0, T),
        "tau_t": [tau(k // spe) if k // spe < W else args.tau_t for k in range(T)] or [args.tau_t],
    }
    # regularised group first: wd from the schedule; biases and norms none [ref: get_params_groups]
    params = C.param_groups([model.student], args.wd)
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr, **fused)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr, momentum=0.9, **fused)
    else:  # [ref: utils.LARS]: eta 1e-3, 1-D params excluded
        optimizer = C.LARS(params, lr=lr, weight_decay=args.wd)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
