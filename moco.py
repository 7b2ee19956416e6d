"""MoCo v1/v2/v3 - Momentum Contrast for Unsupervised Visual Representation Learning (He, Fan, Wu,
Xie, Girshick, CVPR 2020) https://arxiv.org/abs/1911.05722; v2: Improved Baselines with Momentum
Contrastive Learning (Chen, Fan, Girshick, He 2020) https://arxiv.org/abs/2003.04297; v3: An
Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He, ICCV 2021)
https://arxiv.org/abs/2104.02057
Reference code: facebookresearch/moco (moco/builder.py, main_moco.py, colab CIFAR-10 demo) and
facebookresearch/moco-v3 (moco/builder.py, moco/optimizer.py, vits.py); v3 CIFAR optimizer:
vturrisi/solo-learn (scripts/pretrain/cifar/mocov3.yaml, solo/utils/lars.py)
Objective (Eq. 1): L_q = -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_{k- in queue} exp(q.k-/tau));
v3: 2 tau (L(q1, k2) + L(q2, k1)) with the keys of the global batch as candidates.
vs simclr.py: (1) keys come from a momentum (EMA) encoder, updated before the key forward; (2) v1/v2
take negatives from a queue of K past keys (gathered from all processes, no gradient, enqueued after
the loss), v3 from the keys of the global batch; (3) only the query side gets gradients, and the
loss is one-directional (v1/v2); (4) shuffle-BN (v1/v2) instead of SyncBN, emulated in one process
by split BN; (5) v1 linear head, v2 MLP head, v3 BN-MLP projector + predictor; (6) SGD with step
(v1) or cosine (v2) lr at batch 256; v3 LARS / AdamW at batch 4096.
Run: torchrun --nproc_per_node=8 moco.py --preset imagenet --dataset imagenet --data-dir /path
     python moco.py                      (CIFAR-10 preset, v2, one process)
"""

# ==== 0. imports ==========================================================================
import copy
import math
import os
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + MoCo(nn.Module), all method state as persistent buffers ===========
class SplitBatchNorm(nn.BatchNorm2d):
    """BN over `num_splits` chunks of the batch [ref: moco colab SplitBatchNorm]: one process plays
    num_splits GPUs' BN (with `shuffled_keys` their shuffle-BN); running stats: the chunks' mean."""

    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        chunks = x.chunk(self.num_splits)
        with torch.no_grad():  # each running stat <- the mean of the chunks' (var: unbiased)
            for stat, f in ((self.running_mean, torch.mean), (self.running_var, torch.var)):
                avg = torch.stack([f(c.float(), (0, 2, 3)) for c in chunks]).mean(0)
                stat.lerp_(avg, self.momentum)
        bn = lambda c: F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return torch.cat([bn(c) for c in chunks])


def v3_mlp(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """[ref: moco-v3 builder._build_mlp] (Linear no bias, BN, ReLU)s, Linear (, BN no affine)"""
    mods = []
    for i in range(layers):
        d1, d2 = in_dim if i == 0 else hidden, out_dim if i == layers - 1 else hidden
        mods.append(nn.Linear(d1, d2, bias=False))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*mods)


def mocov3_vit_init(vit: C.ViT):
    """[ref: moco-v3 vits.py VisionTransformerMoCo.__init__] Linear xavier-uniform (qkv: per q, k,
    v), zero biases; patch projection U(+-sqrt(6 / (3 p^2 + D))), zero bias; cls N(0, 1e-6)."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            fan_out = m.out_features // 3 if name.endswith("qkv") else m.out_features
            a = math.sqrt(6 / (fan_out + m.in_features))
            nn.init.uniform_(m.weight, -a, a)
            nn.init.zeros_(m.bias)
    pe, d = vit.patch_embed, vit.patch_embed.out_channels
    a = math.sqrt(6 / (pe.in_channels * math.prod(pe.kernel_size) + d))
    nn.init.uniform_(pe.weight, -a, a)
    nn.init.zeros_(pe.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)  # positions: C.sincos_pos_embed, fixed


class MoCo(nn.Module):
    def __init__(self, args: "Args", bn_splits: int = 1):
        super().__init__()
        self.version, self.tau = args.version, args.tau
        v3, vit = args.version == "v3", args.arch.startswith("vit")
        norm = partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else None
        # v3 ViT: sin-cos positions, 12 heads for ViT-S, frozen patch projection [MoCo v3 §4, §5.3]
        kw = {"patch_size": args.patch_size, "pos_embed": "sincos" if v3 else "learned"}
        kw["num_heads"] = 12 if v3 and args.arch == "vit_small" else 0
        kw.update(freeze_patch_embed=v3 and args.stop_grad_conv1, stem_padding=args.stem_padding)
        zero = v3 and args.zero_init_residual  # each block's last BN [ref: moco-v3 main_moco.py]
        self.backbone, self.feat_dim = C.build_backbone(args.arch, args.img_size, zero, norm, **kw)
        if v3 and vit:  # before the copy: the momentum encoder starts equal [ref: builder.py]
            mocov3_vit_init(self.backbone)
        f, d = self.feat_dim, args.dim
        if args.version == "v1":  # the fc layer of the ResNet, 128-d [MoCo §3.3]
            self.projector = nn.Linear(f, d)
        elif args.version == "v2":  # 2-layer MLP head, no BN [MoCo v2 §2; ref: builder.py mlp]
            self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(inplace=True), nn.Linear(f, d))
        else:  # BN-MLPs: 2 (ResNet) / 3 (ViT) layers; predictor only on the query side
            self.projector = v3_mlp(3 if vit else 2, f, args.hidden_dim, d, last_bn=True)
            self.predictor = v3_mlp(2, d, args.hidden_dim, d, last_bn=vit)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if args.queue_size:  # rows are l2-normalised keys; random at start [ref: builder.py]
            self.register_buffer("queue", F.normalize(torch.randn(args.queue_size, d), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.queue = None

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        if self.version != "v3":  # x1 -> query, x2 -> key; negatives from the queue
            q = F.normalize(self.projector(self.backbone(x1)), dim=1)  # [B, D]
            k = shuffled_keys(self.key, x2)  # [B, D], no gradient
            return info_nce_loss(q, k, self.queue.clone(), self.tau), q, k
        # v3: both directions; keys of the whole global batch are the candidates
        q1 = F.normalize(self.predictor(self.projector(self.backbone(x1))), dim=1)
        q2 = F.normalize(self.predictor(self.projector(self.backbone(x2))), dim=1)
        with torch.no_grad():
            k1, k2 = self.key(x1), self.key(x2)
        loss = info_nce_loss(q1, k2, None, self.tau) + info_nce_loss(q2, k1, None, self.tau)
        return loss * 2 * self.tau, q1, k2  # x 2 tau as the official code [ref: builder.py]


@torch.no_grad()
def shuffled_keys(key_encoder, x: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN [MoCo §3.3]: the global key batch is permuted (rank 0 draws, broadcasts), each
    process encodes a slice (BN never pairs a query with its key), the keys are un-permuted.
    Crosses processes: images, keys (no gradient), the permutation. One process: SplitBatchNorm."""
    w, r = C.get_world_size(), C.get_rank()
    x_all = C.gather_no_grad(x)  # [N, ...]
    perm = torch.randperm(len(x_all), device=x.device)
    if w > 1:
        dist.broadcast(perm, src=0)
    k_all = C.gather_no_grad(key_encoder(x_all[perm.view(w, -1)[r]]))  # [N, D], permuted
    return k_all[torch.argsort(perm)].view(w, -1, k_all.shape[1])[r]  # [B, D], this rank's


RELEASE = {  # official: {"state_dict": DDP(MoCo).state_dict()} [ref: moco, moco-v3 main_moco.py]
    "state_dict.module.": "",  # v1/v2 queue [D, K] (here [K, D]: kept), queue_ptr; v3 predictor
    "state_dict.module.encoder_q.": "backbone.",  # v1/v2 [ref: moco builder.py]
    "state_dict.module.encoder_q.fc.": "projector.",  # v1 fc; v2 fc.0, fc.2
    "state_dict.module.encoder_k.": "momentum_backbone.",  # if absent: encoder_q's copy
    "state_dict.module.encoder_k.fc.": "momentum_projector.",
    "state_dict.module.base_encoder.": "backbone.",  # v3 [ref: moco-v3 builder.py]
    "state_dict.module.base_encoder.fc.": "projector.",  # ResNet
    "state_dict.module.base_encoder.head.": "projector.",  # ViT
    "state_dict.module.momentum_encoder.": "momentum_backbone.",
    "state_dict.module.momentum_encoder.fc.": "momentum_projector.",
    "state_dict.module.momentum_encoder.head.": "momentum_projector.",
    "optimizer.": None,  # a training checkpoint's solver state
}


# ==== 2. loss: info_nce_loss(...) -> Tensor, pure, fp32 inside ============================
def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue, tau: float) -> torch.Tensor:
    """InfoNCE [MoCo Eq. 1], the mean over q, k: [B, D] l2-normalised, this process's. queue [K, D]:
    logits [l_pos, q @ queue.T], positive at 0 (v1/v2). None: the keys of all processes (gathered,
    no gradient), the positive of query i key rank*B + i (v3)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        if queue is not None:
            l_pos = (q * k).sum(1, keepdim=True)  # [B, 1]
            logits = torch.cat([l_pos, q @ queue.float().T], dim=1) / tau  # [B, 1 + K]
            labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        else:
            logits = q @ C.gather_no_grad(k).T / tau  # [B, N]
            labels = torch.arange(len(q), device=q.device) + C.get_rank() * len(q)
        return F.cross_entropy(logits, labels)


# ==== 3. method state: @torch.no_grad() momentum_update / enqueue =========================
@torch.no_grad()
def momentum_update(model: MoCo, m: float):
    """key encoder <- m * key encoder + (1 - m) * query encoder, parameters only: the key
    encoder's BN running stats come from its own forward passes [ref: builder.py]."""
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    C.ema_(target, online, m)


@torch.no_grad()
def enqueue(model: MoCo, k: torch.Tensor):
    """FIFO: the keys of ALL processes replace the oldest rows (one queue everywhere); no sync."""
    k = C.gather_no_grad(k)  # [N, D]
    idx = (model.queue_ptr + torch.arange(len(k), device=k.device)) % len(model.queue)
    model.queue.index_copy_(0, idx, k.to(model.queue.dtype))
    model.queue_ptr.copy_((model.queue_ptr + len(k)) % len(model.queue))


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    net = C.unwrap(model)
    lr, m = args.sched["lr"][step], args.sched["m"][step]
    C.set_lr(optimizer, lr)
    momentum_update(net, m)  # before the key forward [MoCo Alg. 1]
    with C.autocast(args):
        loss, q, k = model(x1, x2)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    if net.queue is not None:
        enqueue(net, k)  # after the loss: a batch's keys are never its own negatives
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "m": m, "tau": args.tau}
    return {**stats, "grad_norm": grad_norm, "z": (q, k)}  # monitored: queries, keys


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the query backbone output h [ref: main_lincls.py]."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the query backbone [MoCo §4.1]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
OPTS, SCHED = ("sgd", "lars", "adamw"), ("step", "cosine-epoch", "cosine")
VERSIONS, AUGS = ("v1", "v2", "v3"), ("v1", "v2", "asym")


@dataclass
class Args(C.RunArgs):
    """MoCo's fields: the defaults are the paper's ImageNet v1 recipe; recipe() sets v2's (the
    default), v3's, the CIFAR preset's. Fine-tuning: C.RunArgs' (SimCLR v2's), none in MoCo's."""

    version: str = arg("v2", "v1 [MoCo]; v2 [MoCo v2]; v3 [MoCo v3]", choices=VERSIONS)
    arch: str = arg(
        "resnet50", "backbone [MoCo §4; v3 also vit_small/base]; CIFAR resnet18", choices=C.ARCHS
    )
    epochs: int = ge0(200, "epochs [MoCo §4 Training; v3 R50 100, ref: moco-v3 CONFIG.md]")
    batch_size: int = gt0(256, "GLOBAL batch [MoCo §4 Training; v3 4096, CONFIG.md]; CIFAR 512")
    lr: float = ge0(0.03, "lr per 256 [MoCo §4; v3 LARS 0.6 / ViT AdamW 1.5e-4, CONFIG.md]")
    wd: float = ge0(1e-4, "weight decay, all params (sgd) [MoCo §4; v3 1e-6 / ViT 0.1]; CIFAR 5e-4")
    optimizer: str = arg(
        "sgd", "sgd [MoCo §4]; v3 lars (R50) / adamw (ViT) [MoCo v3 §4]", choices=OPTS
    )
    schedule: str = arg(
        "step", "step [MoCo §4]; v2, CIFAR cosine-epoch [ref: --cos]; v3 cosine", choices=SCHED
    )
    lr_milestones: tuple = ge0((120, 160), "epochs of the x0.1 lr steps [MoCo §4 Training]")
    warmup_epochs: int = ge0(0, "linear warm-up epochs [v3: 10 R50 / 40 ViT, ref: CONFIG.md]")
    tau: float = gt0(0.07, "temperature [MoCo §3.3: 0.07; v2 0.2; v3 1.0 R50 / 0.2 ViT]; CIFAR 0.2")
    m: float = unit(0.999, "key-encoder momentum [MoCo §3.2, §4.1; v3 0.99 -> 1]; CIFAR 0.99")
    m_cos: bool = arg(False, "m -> 1 by 1 - (1 - m)(1 + cos(pi t / T)) / 2 [MoCo v3 §4]")
    queue_size: int = ge0(
        65536, "queue K, a multiple of the global batch [MoCo §4.1; ref: --moco-k]; CIFAR 4096"
    )
    dim: int = gt0(128, "embedding dim [MoCo §3.3; v3 256]")
    hidden_dim: int = gt0(4096, "v3 projector/predictor hidden dim [ref: moco-v3 --moco-mlp-dim]")
    bn_splits: int = ge0(0, "v1/v2: BN groups per process (0: 8 alone, 1 in DDP) [ref: colab]")
    aug: str = arg(
        "v1", "v1 [MoCo §3.3], v2 aug+ [MoCo v2], asym [MoCo v3]; CIFAR v2", choices=AUGS
    )
    crop_min: float = frac(
        0.2, "min crop scale [ref: main_moco.py 0.2; moco-v3 CONFIG.md R50 0.2]; CIFAR 0.08"
    )
    blur: bool = arg(True, "blur in v2/asym aug [MoCo v2 §2]; off on CIFAR (its size) [ref: colab]")
    patch_size: int = gt0(16, "ViT patch size [MoCo v3 §4]; CIFAR 4")
    stop_grad_conv1: bool = arg(True, "v3 ViT: frozen random patch projection [MoCo v3 §5.3]")
    stem_padding: int = ge0(
        1, "CIFAR stem 3x3 conv padding [SimCLR resnet.py: 1; solo-learn base.py: 2]"
    )
    zero_init_residual: bool = arg(
        True, "v3: zero last BN gamma per block [ref: moco-v3 main_moco.py; solo-learn: off]"
    )
    linear_epochs: int = ge0(100, "linear-eval epochs [ref: main_lincls.py; v3 90]")
    linear_lr: float = ge0(30.0, "linear lr per 256 [ref: main_lincls.py; v3 0.1 R50 / 3 ViT]")
    linear_wd: float = ge0(0.0, "linear-eval weight decay [ref: main_lincls.py]")
    linear_batch_size: int = gt0(256, "linear-eval global batch [ref: main_lincls.py; v3 1024]")
    linear_nesterov: bool = arg(False, "Nesterov momentum [ref: main_lincls.py: plain 0.9]")
    linear_milestones: tuple = ge0((60, 80), "linear lr x0.1 epochs [ref: main_lincls.py]")
    linear_decay: float = unit(0.1, "linear lr factor per milestone [ref: main_lincls.py: x0.1]")
    linear_epoch_lr: bool = arg(
        True, "linear lr set once per epoch [ref: main_lincls.py adjust_learning_rate(epoch)]"
    )
    linear_best: bool = arg(
        True, "linear top-1 of the best epoch [ref: main_lincls.py keeps best_acc1, model_best]"
    )
    linear_zero_init: bool = arg(False, "linear head N(0, 0.01), bias 0 [ref: main_lincls.py]")
    lars_solo: bool = arg(
        False,
        "solo-learn's LARS (eta 0.02, trust capped at 1/lr) and warm-up from 3e-5, which its lrs "
        "were tuned with [ref: solo-learn solo/utils/lars.py, lr_scheduler.py, mocov3.yaml]",
    )

    @staticmethod
    def recipe(version: str = "v2", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults for this version / preset / arch, as cited."""
        vit, cifar, r = arch.startswith("vit"), preset == "cifar", {}
        if version == "v2":  # [ref: moco README "--mlp --moco-t 0.2 --aug-plus --cos"]
            r = {"tau": 0.2, "aug": "v2", "schedule": "cosine-epoch"}
        if cifar and version != "v3":  # [ref: moco colab CIFAR-10 demo: R18, batch 512, lr 0.06,
            # wd 5e-4, K 4096, m 0.99, cos, RandomResizedCrop(32) scale 0.08, no blur; v2: tau 0.2]
            r.update(arch="resnet18", epochs=200, batch_size=512, wd=5e-4, crop_min=0.08)
            r.update(blur=False, queue_size=4096, m=0.99, schedule="cosine-epoch", aug="v2")
            r.update(patch_size=4)  # a ViT at 32 px
            r["tau"] = 0.1 if version == "v1" else 0.2
        if version == "v3":  # R50 100 ep [ref: moco-v3 CONFIG.md, main_moco.py, main_lincls.py]
            r = {"epochs": 100, "batch_size": 4096, "queue_size": 0, "dim": 256}
            r.update(optimizer="lars", lr=0.6, wd=1e-6, schedule="cosine", warmup_epochs=10)
            r.update(tau=1.0, m=0.99, m_cos=True, aug="asym", linear_milestones=())
            r.update(linear_epochs=90, linear_lr=0.1, linear_batch_size=1024)
        if version == "v3" and vit:  # ViT 300 ep, AdamW [MoCo v3 §4; ref: CONFIG.md ViT-S/B]
            r.update(epochs=300, optimizer="adamw", lr=1.5e-4, wd=0.1, warmup_epochs=40)
            r.update(tau=0.2, crop_min=0.08, linear_lr=3.0)  # crop: main_moco.py default
        if version == "v3" and vit and cifar:  # CONFIG.md ViT-S 1-node batch; 32 px: patch 4,
            r.update(batch_size=1024, patch_size=4, blur=False)  # no blur [as solo-learn cifar]
        if version == "v3" and cifar and not vit:  # [ref: solo-learn pretrain/cifar/mocov3.yaml]
            r.update(arch="resnet18", epochs=1000, batch_size=256, lr=0.3, wd=1e-6, tau=0.2)
            r.update(lars_solo=True, crop_min=0.08, blur=False)  # asymmetric.yaml: no blur
            r.update(stem_padding=2, zero_init_residual=False)  # solo-learn base.py, resnet.py
        if cifar:
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """Limits over several fields (C.parse_args calls it); --bn-splits vs the batch: main."""
        B = self.batch_size
        if self.queue_size % B:
            k, why = B * max(1, self.queue_size // B), f"not a multiple of the global batch {B}"
            C.fail(f"--queue-size {self.queue_size}: {why}; pass a multiple of it, e.g. {k}")
        if self.version == "v3" and self.batch_size < 2:
            C.fail(f"--batch-size {self.batch_size}: the v3 heads' BatchNorm needs >= 2; pass >= 2")
        self.check_batch_norm()  # v1/v2: the backbone's (v3: the heads' too, above)


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
    # v1/v2 per-GPU BN: each rank's running stats follow its own batches; the official DDP's
    # broadcast of rank 0's (every forward) is done by C.save_state (checkpoint, evaluation, export)
    bn_splits = args.bn_splits or (8 if args.world_size == 1 else 1)
    if args.version != "v3" and args.batch_size_per_gpu % bn_splits:
        bad = f"batch per process {args.batch_size_per_gpu} is not divisible by --bn-splits"
        C.fail(f"{bad} {bn_splits}; change --batch-size or --bn-splits")
    # On a GPU (--pipeline auto) C.BatchAugment runs these recipes batched on the device.
    mean_std, scale = C.dataset_mean_std(args), (args.crop_min, 1.0)
    if args.aug == "asym":  # two recipes: blur 1.0 / 0.1, solarize 0 / 0.2 [MoCo v3 §4]
        views = C.byol_augment(args.img_size, mean_std, scale, args.blur)
    else:  # the same recipe for query and key
        aug = C.moco_augment(args.img_size, mean_std, args.aug, scale, args.blur)
        views = C.MultiView([aug, aug])
    data = C.build_data(args, views, mean_std)  # mean/std-normalised [ref: main_moco.py]
    C.prepare_run(args)
    model = MoCo(args, bn_splits if args.version != "v3" else 1)
    if args.version == "v3":  # SyncBN everywhere in v3 [MoCo v3 §4]; v1/v2 keep per-GPU BN
        model = C.convert_sync_bn(model)
    model = model.to(device)
    lr, spe, T = args.lr * args.batch_size / 256, args.steps_per_epoch, args.total_steps
    if args.schedule == "step":
        lrs = C.step_schedule(lr, T, spe, args.lr_milestones)
    elif args.schedule == "cosine-epoch":  # updated once per epoch [ref: main_moco.py]
        lrs = [lr * 0.5 * (1 + math.cos(math.pi * (s // spe) / args.epochs)) for s in range(T)]
    elif args.lars_solo:  # per step: 3e-5 -> lr at step w - 1, then cosine [ref: solo-learn
        w = args.warmup_epochs * spe  # LinearWarmupCosineAnnealingLR; base.py warmup_start_lr]
        lrs = C.cosine_schedule(lr, 0.0, T, w, 3e-5, linspace=True)
    else:  # per step: from 0, lr at step w, then cosine [ref: moco-v3 adjust_learning_rate]
        lrs = C.cosine_schedule(lr, 0.0, T, args.warmup_epochs * spe)
    ms = C.cosine_schedule(args.m, 1.0, T) if args.m_cos else [args.m] * max(T, 1)
    args.sched = {"lr": lrs or [lr], "m": ms}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    if args.optimizer == "sgd":  # wd on all params [ref: main_moco.py]
        optimizer = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=args.wd, **fused)
    elif args.optimizer == "lars":  # no wd / adaptation for 1-D params [ref: moco-v3 optimizer.py]
        solo = {"trust_coefficient": 0.02, "clip_lr": True, "solo": True} if args.lars_solo else {}
        optimizer = C.LARS(params, lr, weight_decay=args.wd, momentum=0.9, **solo)
    else:
        optimizer = torch.optim.AdamW(params, lr, weight_decay=args.wd, **fused)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
