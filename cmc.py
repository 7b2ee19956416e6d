"""CMC - Contrastive Multiview Coding (Tian, Krishnan, Isola, ECCV 2020)
https://arxiv.org/abs/1906.05849
Reference code: HobbitLong/CMC (train_CMC.py, NCE/NCEAverage.py, NCE/NCECriterion.py
NCESoftmaxLoss, models/resnet.py, dataset.py RGB2Lab, LinearProbing.py, models/LinearModel.py)
Objective (§3.2, Eq. 2-3, two views, both directions): L = L(V1 -> V2) + L(V2 -> V1); for the L
view the scores s_j = z_l . v_ab[j] / tau against the ab memory bank v_ab (symmetrically z_ab
against the L bank) for j in {i} + K noise rows; the binary NCE with P_j = exp(s_j) / Z, Z fixed
on the first batch [ref: NCEAverage, NCECriterion] (--softmax: -log softmax(s)_i), batch mean.
vs cpc.py: (1) the two views are colour channels of the SAME crop, L and ab of Lab (CPC: patches
of one image, upper rows predicting lower ones); (2) two encoders, one per view, each half the
width of a ResNet-50 (CPC: one shared LayerNorm encoder + a context network + predictors);
(3) negatives are rows of two memory banks [N, 128] of past embeddings, K sampled or all (CPC:
the other patches of the batch); (4) each embedding is compared with the OTHER view's bank, both
directions summed; the banks move by normalise(0.5 old + 0.5 new) after the step; (5) no colour
augmentation, SGD lr 0.03 at batch 128 with x0.1 steps; linear eval on both encoders concatenated.
Run: torchrun --nproc_per_node=8 cmc.py --preset imagenet --dataset imagenet --data-dir /path
     python cmc.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges

# ==== 1. model: heads + CMC(nn.Module), all method state as persistent buffers ============
# sRGB -> linear RGB -> XYZ (sRGB primaries) -> CIE Lab, D65 white, 2-degree observer: the
# formulas of skimage.color.rgb2lab, which the official dataset applies to every uint8 crop
# [ref: dataset.py RGB2Lab]. Here it runs batched on the device, on the [0, 1] RGB tensor.
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169))
RGB_TO_XYZ += ((0.019334, 0.119193, 0.950227),)
WHITE_D65 = (0.95047, 1.0, 1.08883)
# per channel: centre and half-range of L, a, b over the sRGB cube [ref: train_CMC.py normalize]
LAB_MEAN = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_STD = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB in [0, 1] -> [B, 3, H, W] Lab (L in [0, 100]), default dtype (fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.get_default_dtype())
        lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)  # undo gamma
        m = x.new_tensor(RGB_TO_XYZ) / x.new_tensor(WHITE_D65)[:, None]
        t = torch.einsum("ij,bjhw->bihw", m, lin)  # XYZ / white
        f = torch.where(t > 0.008856, t.clamp(min=0.008856).pow(1 / 3), 7.787 * t + 16 / 116)
        fx, fy, fz = f.unbind(1)
        return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse, skimage.color.lab2rgb (z clipped at 0, RGB clipped to [0, 1])."""
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, (fy - b / 200).clamp(min=0)], dim=1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16 / 116) / 7.787)
    xyz = xyz * lab.new_tensor(WHITE_D65)[:, None, None]
    lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(lab.new_tensor(RGB_TO_XYZ)), xyz)
    gamma = 1.055 * lin.clamp(min=0.0031308).pow(1 / 2.4) - 0.055  # the sRGB gamma again
    return torch.where(lin > 0.0031308, gamma, 12.92 * lin).clamp(0, 1)


def lab_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB in [0, 1] -> the two views, normalised: L [B, 1, H, W] and ab [B, 2, H, W]
    [ref: models/resnet.py torch.split(x, [1, 2], dim=1)]."""
    lab = rgb_to_lab(x)
    mean, std = (lab.new_tensor(v)[:, None, None] for v in (LAB_MEAN, LAB_STD))
    return ((lab - mean) / std).split([1, 2], dim=1)


def view_encoder(arch: str, img_size: int, in_chans: int, width: float) -> tuple[nn.Module, int]:
    """One view's encoder -> (module: x -> h, feat_dim). ResNets: torchvision's (CIFAR stem at
    <= 64 px), every stage's planes x width, the 64-channel stem kept [ref: models/resnet.py base
    = int(64 * width)], He-normal fan-out. Else C.build_backbone (smallcnn scales, a ViT not)."""
    if not arch.startswith("resnet"):
        return C.build_backbone(arch, img_size, in_chans=in_chans, width=width)
    net, _ = C.build_backbone(arch, img_size, in_chans=in_chans)
    block, base, net.inplanes = type(net.layer1[0]), int(64 * width), 64
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):  # rebuilt at this width
        n = len(getattr(net, name))
        setattr(net, name, net._make_layer(block, base * 2**i, n, stride=1 if i == 0 else 2))
    for m in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, base * 8 * block.expansion


class TwoEncoders(nn.ModuleDict):
    """The backbone: "l" (1 input channel) and "ab" (2). backbone.pth holds both half-width
    encoders (keys l.* and ab.*); each is a torchvision ResNet minus fc, other input channels."""

    def forward(self, l: torch.Tensor, ab: torch.Tensor):
        return self["l"](l), self["ab"](ab)


class CMC(nn.Module):
    """Per view: encoder -> Linear(feat, dim) -> l2 norm [ref: models/resnet.py fc, l2norm].
    Two memory banks [N, dim], one row per training image and view, identical on every rank.
    BN per process, as the official DataParallel (no SyncBN: nothing is contrasted in-batch)."""

    def __init__(self, args: "Args", n: int):
        super().__init__()
        enc_l, d = view_encoder(args.arch, args.img_size, 1, args.width)
        enc_ab, _ = view_encoder(args.arch, args.img_size, 2, args.width)
        self.backbone, self.feat_dim = TwoEncoders({"l": enc_l, "ab": enc_ab}), 2 * d
        self.projector = nn.ModuleDict({"l": nn.Linear(d, args.dim), "ab": nn.Linear(d, args.dim)})
        self.tau, self.nce_k, self.nce = args.tau, args.nce_k, args.nce_k > 0 and not args.softmax
        stdv = 1 / math.sqrt(args.dim / 3)  # uniform rows of about unit norm [ref: NCEAverage]
        self.register_buffer("bank_l", torch.rand(n, args.dim) * 2 * stdv - stdv)
        self.register_buffer("bank_ab", torch.rand(n, args.dim) * 2 * stdv - stdv)
        # NCE normalisers (Z_l, Z_ab), < 0 until set on the first batch [ref: NCEAverage params]
        self.register_buffer("nce_z", torch.full((2,), -1.0, dtype=torch.float64))
        self.z_host = None  # nce_z as Python floats, read once per process (no per-step sync)
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "z_host", None))

    def forward(self, x: torch.Tensor, idx: torch.Tensor):
        h_l, h_ab = self.backbone(*lab_views(x))  # [B, feat] each
        z_l = F.normalize(self.projector["l"](h_l).float(), dim=1)  # [B, D]
        z_ab = F.normalize(self.projector["ab"](h_ab).float(), dim=1)
        s_l, s_ab = cmc_scores(z_l, z_ab, self.bank_l, self.bank_ab, idx, self.tau, self.nce_k)
        if self.nce and self.z_host is None:  # Z: set on the first batch, then fixed
            if (self.nce_z < 0).any():
                self.nce_z.copy_(estimate_z(s_l, s_ab, len(self.bank_l)))
            self.z_host = tuple(self.nce_z.tolist())
        z = self.z_host if self.nce else None
        return cmc_loss(s_l, s_ab, idx, self.nce_k, len(self.bank_l), z), z_l, z_ab


# --init: train_CMC.py's checkpoint {model (MyResNetsCMC), contrast (NCEAverage), optimizer, opt}
ENC = "model.encoder.module."  # DataParallel(ResNetV1-3): l_to_ab on L, ab_to_l on ab, fc each
RELEASE = {ENC + "l_to_ab.": "backbone.l.", ENC + "l_to_ab.fc.": "projector.l."}
RELEASE.update({ENC + "ab_to_l.": "backbone.ab.", ENC + "ab_to_l.fc.": "projector.ab."})
RELEASE.update({"contrast.memory_l": "bank_l", "contrast.memory_ab": "bank_ab"})
RELEASE.update({"contrast.params": None, "optimizer.": None})  # params[2:4]: Z, set anew


# ==== 2. loss: cmc_loss(...) -> Tensor, pure, fp32 inside =================================
def cmc_scores(f_l, f_ab, bank_l, bank_ab, idx: torch.Tensor, tau: float, k: int) -> tuple:
    """[CMC §3.2; ref: NCEAverage.forward] f_l, f_ab: [B, D] l2-normalised embeddings of the L and
    ab views; bank_l, bank_ab: [N, D] memory banks (constants: no gradient); idx: [B] dataset
    indices. Each view's embedding is scored against the OTHER view's bank, s = f . row / tau:
    k > 0: rows [idx_i] + k noise rows, uniform with replacement (torch.randint, global RNG), the
    same for both views [ref: AliasMethod, uniform unigrams] -> [B, 1 + k]; k = 0: all -> [B, N]."""
    with torch.autocast(f_l.device.type, enabled=False):
        f_l, f_ab, bank_l, bank_ab = (t.float() for t in (f_l, f_ab, bank_l, bank_ab))
        bank_l, bank_ab = bank_l.detach(), bank_ab.detach()
        if k == 0:  # the whole bank: the positive in column idx_i
            return f_l @ bank_ab.T / tau, f_ab @ bank_l.T / tau
        noise = torch.randint(len(bank_l), (len(idx), k), device=f_l.device)
        cand = torch.cat([idx[:, None], noise], dim=1)  # [B, 1 + k], positive first
        s_l = torch.einsum("bd,bkd->bk", f_l, bank_ab[cand]) / tau  # out_l: L vs the ab bank
        return s_l, torch.einsum("bd,bkd->bk", f_ab, bank_l[cand]) / tau  # out_ab


def cmc_loss(s_l, s_ab, idx: torch.Tensor, k: int, n: int, z=None) -> torch.Tensor:
    """Sum over the two views of a mean over the B anchors; s_l, s_ab: cmc_scores; n: bank rows.
    z = (Z_l, Z_ab) and k > 0: binary NCE [CMC Eq. 2-3; ref: NCECriterion], P = exp(s) / Z, noise
    prob 1/n: -log P_0/(P_0 + k/n + 1e-7) - sum_{j>0} log (k/n)/(P_j + k/n + 1e-7), in log space.
    z None: softmax-CE at column 0 [ref: NCESoftmaxLoss, --softmax]; k = 0 at column idx_i."""
    with torch.autocast(s_l.device.type, enabled=False):
        if z is None:
            target = idx if k == 0 else torch.zeros_like(idx)
            return sum(F.cross_entropy(s.float(), target) for s in (s_l, s_ab))
        loss = 0.0
        for s, z_v in zip((s_l, s_ab), z):
            log_p = s.float() - math.log(z_v)  # log P_j
            log_den = torch.logaddexp(log_p, torch.full_like(log_p, math.log(k / n + 1e-7)))
            pos = log_p[:, 0] - log_den[:, 0]  # log D_1 of the positive
            noise = (math.log(k / n) - log_den[:, 1:]).sum(1)  # log D_0 of the k noise rows
            loss = loss - (pos + noise).mean()
        return loss


# ==== 3. method state: @torch.no_grad() update_bank / estimate_z ==========================
@torch.no_grad()
def update_bank(banks: tuple, zs: tuple, idx: torch.Tensor, bank_m: float):
    """Per view: bank[i] <- normalise(bank_m * bank[i] + (1 - bank_m) * z_i) for the rows of ALL
    processes (z, idx gathered once, no gradient; every rank writes the same rows: the banks stay
    identical) [ref: NCEAverage.forward "update memory"]. banks [N, D], zs [B, D]: view order."""
    z, idx = C.gather_no_grad(torch.cat(zs, dim=1)), C.gather_no_grad(idx)  # [W*B, V*D], [W*B]
    for bank, z_v in zip(banks, z.split([t.shape[1] for t in zs], dim=1)):
        rows = F.normalize(bank[idx] * bank_m + z_v.to(bank.dtype) * (1 - bank_m), dim=1)
        bank.index_copy_(0, idx, rows)


@torch.no_grad()
def estimate_z(s_l: torch.Tensor, s_ab: torch.Tensor, n: int) -> torch.Tensor:
    """(Z_l, Z_ab) = n * mean exp(s) over the [B, 1 + K] scores of the global batch (every
    process's, equal sizes), float64 [ref: NCEAverage: params[2] = out_l.mean() * outputSize]."""
    s = torch.stack([s_l.detach().float(), s_ab.detach().float()]).flatten(1)  # [2, B(1+K)]
    lme = torch.logsumexp(s, 1) - math.log(s.shape[1])  # log mean exp per view, this process
    lme = torch.logsumexp(C.gather_no_grad(lme[None]), 0) - math.log(C.get_world_size())
    return (lme.double() + math.log(n)).exp()


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x,), _, idx = batch  # one RGB crop per image: both views come from it
    net = C.unwrap(model)
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, z_l, z_ab = model(x, idx)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    # after the loss, with this step's embeddings: a row is the positive before it is rewritten
    update_bank((net.bank_l, net.bank_ab), (z_l, z_ab), idx, args.bank_m)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "tau": args.tau}
    if net.nce:  # the fixed normalisers, logged
        stats.update(nce_z_l=net.nce_z[0].clone(), nce_z_ab=net.nce_z[1].clone())
    return {**stats, "grad_norm": grad_norm, "z": (z_l, z_ab)}  # monitored: L and ab embeddings


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: RGB [0, 1] -> Lab views -> both encoders, concatenated
    [B, feat_dim] [ref: LinearProbing.py torch.cat((feat_l, feat_ab), dim=1), --layer 6]."""
    return torch.cat(C.unwrap(model).backbone(*lab_views(x)), dim=1)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): both view encoders (TwoEncoders)."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
@dataclass
class Args(C.RunArgs):
    """CMC's fields: ImageNet defaults, recipe() the CIFAR preset's; fine-tuning: C.RunArgs'."""

    arch: str = arg(
        "resnet50", "each view's encoder [ref: --model resnet50v1]; CIFAR resnet18", choices=C.ARCHS
    )
    width: float = arg(  # 1/32: one channel at least in every layer of smallcnn
        0.5,
        "ResNet stage width, stem kept: v1 0.5, v2 1, v3 2 [ref: models/resnet.py ResNetV1]",
        range="[0.03125, inf)",
    )
    epochs: int = ge0(240, "epochs [ref: train_CMC.py --epochs 240]; CIFAR 200")
    batch_size: int = gt0(128, "GLOBAL batch [ref: train_CMC.py --batch_size; README resnet50v1]")
    lr: float = ge0(0.03, "SGD lr, not scaled with the batch [ref: train_CMC.py --learning_rate]")
    wd: float = ge0(1e-4, "weight decay, all params [ref: train_CMC.py --weight_decay]; CIFAR 5e-4")
    warmup_epochs: int = ge0(0, "linear warm-up epochs: none [ref: train_CMC.py]")
    lr_milestones: tuple = ge0(
        (120, 160, 200), "lr x0.1 epochs [ref: --lr_decay_epochs]; CIFAR 120 160"
    )
    tau: float = gt0(0.07, "temperature [ref: --nce_t 0.07; README: 0.1 on STL-10]; CIFAR 0.1")
    softmax: bool = arg(
        False, "softmax-CE, not NCE [ref: --softmax, off in README commands; weights: NCE]"
    )
    nce_k: int = ge0(  # K: 4096 in the README and the released weights, 16384 train_CMC.py's
        4096, "noise rows per anchor, 0: softmax over the whole bank [README; code 16384]; CIFAR 0"
    )
    bank_m: float = arg(  # m = 1: the bank would never change
        0.5, "bank momentum: row <- normalise(m row + (1 - m) z) [ref: --nce_m]", range="[0, 1)"
    )
    dim: int = gt0(128, "embedding dim per view [ref: train_CMC.py --feat_dim]")
    crop_min: float = frac(
        0.08, "min crop scale, ResNets on ImageNet [ref: train_CMC.py crop_low]; CIFAR 0.2"
    )
    linear_epochs: int = ge0(60, "linear-eval epochs [ref: LinearProbing.py --epochs]")
    linear_lr: float = ge0(30.0, "linear lr per 256 [ref: README: 30 resnet50v1/v2, 50 v3]")
    linear_wd: float = ge0(0.0, "linear-eval weight decay [ref: LinearProbing.py]")
    linear_batch_size: int = gt0(256, "linear-eval global batch [ref: LinearProbing.py]")
    linear_nesterov: bool = arg(False, "plain momentum 0.9 [ref: LinearProbing.py]")
    linear_milestones: tuple = ge0((30, 40, 50), "linear lr steps [ref: --lr_decay_epochs]")
    linear_decay: float = unit(0.2, "linear lr factor [ref: LinearProbing.py --lr_decay_rate]")
    linear_epoch_lr: bool = arg(True, "linear lr per epoch [ref: util.py adjust_learning_rate]")
    linear_best: bool = arg(True, "best epoch's top-1 [ref: LinearProbing.py main best_acc1]")
    linear_zero_init: bool = arg(False, "N(0, 0.01) head [ref: models/LinearModel.py initilize]")

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset (CMC has one version)."""
        r = {}
        if preset == "cifar":  # no official CIFAR recipe; the CIFAR-10 recipe of InstDisc, whose
            # memory-bank code CMC builds on [ref: lemniscate.pytorch cifar.py + README: ResNet-18,
            # batch 128, lr 0.03, wd 5e-4, 200 epochs, x0.1 at 120 and 160, tau 0.1, --nce-k 0]
            r.update(arch="resnet18", epochs=200, wd=5e-4, lr_milestones=(120, 160), tau=0.1)
            r.update(nce_k=0)  # exact softmax over the 50k-row banks: affordable at CIFAR scale
            r.update(crop_min=0.2)  # [ref: train_CMC.py crop_low 0.2 off full ImageNet; lemniscate]
            # linear probe: CMC's protocol above (lr 30 on frozen features, as the MoCo CIFAR demo)
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """The limits over several fields (C.parse_args calls it); --nce-k's wait for the data."""
        self.check_batch_norm()  # the negatives come from the bank


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
    # one crop + flip, no colour augmentation [ref: train_CMC.py get_train_loader]; every split
    # RGB in [0, 1], Lab views made on the device (section 1); on a GPU C.BatchAugment batches it
    aug = C.augmentation(args.img_size, None, scale=(args.crop_min, 1.0), jitter_p=0.0, gray_p=0.0)
    data = C.build_data(args, C.MultiView([aug]), mean_std=None)
    n = len(data.train)
    if not 0 <= args.nce_k <= n:
        why = f"--nce-k {args.nce_k} is not in [0, {n}], {n} = training images"
        C.fail(f"{why}; pass 0 (softmax over the whole bank) or a smaller K")
    C.prepare_run(args)
    model = CMC(args, n).to(device)
    lr, spe, warm = args.lr, args.steps_per_epoch, args.warmup_epochs * args.steps_per_epoch
    # x0.1 once epoch >= milestone [ref: util.py 1-based epoch >]
    args.sched = {"lr": C.step_schedule(lr, args.total_steps, spe, args.lr_milestones, (), warm)}
    fused = {"fused": True} if device.type == "cuda" else {}
    # wd on all params [ref: train_CMC.py set_optimizer]
    optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=args.wd, **fused)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
