"""Barlow Twins - Self-Supervised Learning via Redundancy Reduction (Zbontar, Jing, Misra, LeCun,
Deny, ICML 2021) https://arxiv.org/abs/2103.03230
Reference code: facebookresearch/barlowtwins (main.py BarlowTwins, LARS, adjust_learning_rate;
evaluate.py)
Objective (Eq. 1-2): L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, where C_ij = sum_b
z1_bi z2_bj / N is the cross-correlation of the two views' embeddings, each standardised per
dimension over the global batch of N images.
vs simclr.py: (1) no negatives and no temperature: the loss pulls the D x D cross-correlation of the
two views towards the identity (invariance on the diagonal, redundancy reduction off it); (2) what
crosses processes is per-dimension sums and the D x D matrix C, summed WITH gradient, not the
embeddings; (3) a huge projector (8192-8192-8192, no bias, no BN at the end) whose output the loss
standardises; (4) one encoder pass per view (BN statistics per view); (5) LARS with separate lrs
for weights (0.2) and biases/BN (0.0048), x B/256, cosine to 1/1000; (6) BYOL's asymmetric views.
Run: torchrun --nproc_per_node=8 barlow_twins.py --preset imagenet --dataset imagenet \
       --data-dir /path
     python barlow_twins.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + BarlowTwins(nn.Module), all method state as persistent buffers ====
def projection_head(in_dim: int, widths: str) -> nn.Sequential:
    """[ref: main.py BarlowTwins.__init__] "8192-8192-8192": (Linear without bias -> BN -> ReLU)
    for every width but the last, then a Linear without bias. The official code follows it with
    BatchNorm1d(affine=False); here that standardisation is part of the loss."""
    sizes, mods = [in_dim, *map(int, widths.split("-"))], []
    for d1, d2 in zip(sizes[:-2], sizes[1:-1]):
        mods += [nn.Linear(d1, d2, bias=False), nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
    return nn.Sequential(*mods, nn.Linear(sizes[-2], sizes[-1], bias=False))


class BarlowTwins(nn.Module):
    def __init__(self, args: "Args"):
        super().__init__()
        # zero-init of each residual block's last BN gamma [ref: main.py resnet50(zero_init_...)]
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, args.zero_init_residual, stem_padding=args.stem_padding
        )
        self.projector = projection_head(self.feat_dim, args.projector)
        self.lambd, self.plain = args.lambd, args.plain_all_reduce

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # one pass per view, as the official code: BN statistics never mix the two views
        z1 = self.projector(self.backbone(x1))  # [B, D]
        z2 = self.projector(self.backbone(x2))  # [B, D]
        return barlow_twins_loss(z1, z2, self.lambd, self.plain), z1, z2


# --init: main.py's checkpoint.pth {epoch, model (DDP: module.backbone, module.projector,
# module.bn: the loss's standardisation, dropped), optimizer}; resnet50.pth: a backbone file
RELEASE = {
    "model.module.backbone.": "backbone.",
    "model.module.projector.": "projector.",
    "model.module.bn.": None,
    "optimizer.": None,
}


# ==== 2. loss: barlow_twins_loss(...) -> Tensor, pure, fp32 inside ========================
def standardize(z: torch.Tensor) -> torch.Tensor:
    """(z - mean) / sqrt(var + 1e-5) per dimension over the GLOBAL batch (biased variance): the
    official BatchNorm1d(affine=False) under SyncBN, in training mode. The per-dimension sums
    cross processes with gradient, as SyncBN's backward does."""
    n = len(z) * C.get_world_size()
    z = z - C.all_reduce_with_grad(z.sum(0)) / n  # [B, D]
    return z * torch.rsqrt(C.all_reduce_with_grad((z * z).sum(0)) / n + 1e-5)


def barlow_twins_loss(z1, z2, lambd: float, plain: bool = False) -> torch.Tensor:
    """Barlow Twins [BT Eq. 1-2]. z1, z2: this process's [B, D] projector outputs of the two
    views. Each is standardised over the global batch, C = z1^T z2 / N is summed over processes
    and L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 (sums, not means: L grows with D).
    Every process returns the same L.
    DEVIATION: the official code sums C with a plain torch.distributed.all_reduce, which has no
    backward: each process back-propagates through its own share of C only and DDP averages, so
    its gradients are 1/W of dL/dtheta (W processes). Here C crosses processes with gradient
    (C.all_reduce_with_grad): W processes give the gradients of one process on the global batch
    (tests/test_barlow_twins.py). Under LARS the official 1/W equals wd x W on the weights and
    lr_biases / W on biases/BN (tests/test_official_barlow_twins.py): pass those, or plain=True
    (--plain-all-reduce: the official sum) on W processes, to reproduce a W-GPU official run."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = standardize(z1.float()), standardize(z2.float())
        n = len(z1) * C.get_world_size()
        if plain and C.get_world_size() > 1:  # value: the sum; gradient: this process's share
            c = z1.T @ z2 / n  # [D, D]
            total = c.detach().clone()
            torch.distributed.all_reduce(total)
            c = c + (total - c.detach())
        else:
            c = C.all_reduce_with_grad(z1.T @ z2) / n  # [D, D]
        on_diag = c.diagonal()
        return (1 - on_diag).pow(2).sum() + lambd * (c.pow(2).sum() - on_diag.pow(2).sum())


# ==== 3. method state: none (Barlow Twins keeps no state beyond its parameters) ===========


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    factor = args.sched["lr"][step]  # batch/256 x warm-up/cosine; each group has its own scale
    for g in optimizer.param_groups:  # weights: x lr, biases/BN: x lr_biases [ref: main.py]
        g["lr"] = factor * g["lr_scale"]
    with C.autocast(args):
        loss, z1, z2 = model(x1, x2)
    # solo-learn multiplies the loss by scale_loss (0.1 on CIFAR) before backward: under its LARS
    # that is not a no-op (trust eta|w|/(s|g|+wd|w|), capped) [ref: solo/losses/barlow.py]
    grad_norm = C.optimizer_step(loss * args.scale_loss, optimizer, scaler)
    with torch.no_grad():  # mean C_ii over the global batch: 1 when the twins agree everywhere
        n = len(z1) * C.get_world_size()
        c_ii = C.all_reduce_with_grad((standardize(z1.float()) * standardize(z2.float())).sum(0))
    lr = optimizer.param_groups[0]["lr"]  # the weights' lr
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "lambd": args.lambd}  # unscaled L
    stats.update(on_diag=c_ii.mean() / n, grad_norm=grad_norm)
    return {**stats, "z": (z1, z2)}  # monitored: the 2 views' projections


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h [ref: main.py saves the backbone]."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone [ref: main.py]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
FT = "[ref: README semi-supervised command (1%); the same at 10%]"


@dataclass
class Args(C.RunArgs):
    """Barlow Twins' fields: the defaults are the paper's ImageNet recipe (main.py's); recipe()
    sets the CIFAR preset's, solo-learn's (named in each help text)."""

    arch: str = arg(
        "resnet50", "backbone [BT §2 Implementation details]; CIFAR resnet18", choices=C.ARCHS
    )
    epochs: int = ge0(1000, "epochs [BT §2 Implementation details; ref: main.py --epochs]")
    batch_size: int = gt0(
        2048, "GLOBAL batch [BT §2 Implementation details; ref: --batch-size]; CIFAR 256"
    )
    lr: float = gt0(
        0.2, "LARS lr of weights, x batch/256 [BT §2; ref: --learning-rate-weights]; CIFAR 0.3"
    )
    lr_biases: float = ge0(
        0.0048,
        "biases/BN lr, x batch/256 [BT §2; ref: main.py --learning-rate-biases]. The official "
        "W-GPU run had 1/W of the gradient (see barlow_twins_loss): it equals this run with "
        "--lr-biases 0.0048/W and --wd W x 1e-6, or --plain-all-reduce on W processes; CIFAR 0.3",
    )
    wd: float = ge0(
        1e-6,
        "weight decay, not on biases/BN [ref: main.py --weight-decay 1e-6, the code of the "
        "released 73.5% model; BT §2 says 1.5e-6]; CIFAR 1e-4; an official W-GPU run: W x this "
        "(--lr-biases)",
    )
    warmup_epochs: int = ge0(10, "linear warm-up, then cosine to lr/1000 [BT §2; ref: main.py]")
    lambd: float = ge0(0.0051, "off-diagonal weight lambda [ref: main.py --lambd; BT §2: 5e-3]")
    projector: str = arg(
        "8192-8192-8192", "projector widths [BT §2; ref: main.py --projector]; CIFAR 2048-2048-2048"
    )
    blur: bool = arg(True, "blur p=1.0 / 0.1 [BT §2; ref: main.py Transform]; off on CIFAR")
    eta: float = gt0(0.001, "LARS trust coefficient [ref: main.py LARS eta=0.001]; CIFAR 0.02")
    scale_loss: float = gt0(
        1.0, "loss x this before backward [ref: main.py: none; solo: 0.1]; CIFAR 0.1"
    )
    solo: bool = arg(
        False,
        "solo-learn's step: LARS trust eta|w|/(|g|+wd|w|) capped at 1/lr (clip_lr) [ref: solo-"
        "learn solo/utils/lars.py]; warm-up from lr 3e-5 reaching lr at step W-1, cosine to 0 "
        "[ref: solo/utils/lr_scheduler.py, solo/methods/base.py]; on on CIFAR",
    )
    plain_all_reduce: bool = arg(
        False,
        "sum C over processes without gradient as main.py does (1/W of the gradient), instead of "
        "the exact multi-process gradient (DEVIATION, see barlow_twins_loss)",
    )
    zero_init_residual: bool = arg(
        True, "zero last BN gamma per block [ref: main.py resnet50]; off on CIFAR"
    )
    stem_padding: int = ge0(
        1, "CIFAR stem 3x3 conv padding [SimCLR resnet.py: 1; solo-learn base.py: 2]; CIFAR 2"
    )
    linear_epochs: int = ge0(100, "linear-eval epochs [ref: evaluate.py --epochs]")
    linear_lr: float = ge0(0.3, "linear-eval lr at batch 256 [ref: evaluate.py --lr-classifier]")
    linear_wd: float = ge0(1e-6, "linear-eval weight decay [ref: evaluate.py --weight-decay]")
    linear_batch_size: int = gt0(256, "linear-eval global batch [ref: evaluate.py --batch-size]")
    linear_nesterov: bool = arg(False, "Nesterov momentum [ref: evaluate.py: SGD momentum 0.9]")
    linear_milestones: tuple = ge0((), "lr x0.1 epochs (empty: cosine) [ref: evaluate.py cosine]")
    linear_decay: float = unit(0.1, "lr factor per milestone (unused: cosine) [ref: evaluate.py]")
    linear_epoch_lr: bool = arg(
        True, "cosine lr set once per epoch [ref: evaluate.py CosineAnnealingLR, stepped per epoch]"
    )
    linear_best: bool = arg(True, "report the best epoch's top-1 [ref: evaluate.py best_acc]")
    linear_zero_init: bool = arg(
        False, "zero-init classifier: no, normal(0, 0.01), bias 0 [ref: evaluate.py fc init]"
    )
    # fine-tuning [ref: barlowtwins evaluate.py --weights finetune: SGD, CosineAnnealingLR per
    # epoch, DDP of plain BN, fc N(0, 0.01), best_acc; DEVIATION: its top-5 is the best top-1
    # epoch's here, evaluate.py keeps the maximum of each]
    ft_optimizer: str = arg("sgd", "fine-tuning optimizer [ref: evaluate.py]", choices=C.FT_OPTS)
    ft_lr_scaling: str = arg("linear", "lr x batch/256 [ref: evaluate.py]", choices=C.SCALINGS)
    ft_epoch_lr: bool = arg(True, "cosine lr set once per epoch [ref: evaluate.py]")
    ft_sync_bn: bool = arg(False, "plain BN per process, no SyncBN [ref: evaluate.py]")
    ft_head_init: str = arg("normal", "head N(0, 0.01), bias 0 [ref: evaluate.py]", choices=C.HEADS)
    ft_best: bool = arg(True, "top-1 of the best epoch [ref: evaluate.py best_acc]")
    ft_epochs: tuple = gt0((20, 20), f"fine-tuning epochs at 1% / 10% {FT}")
    ft_batch_size: int = gt0(256, "fine-tuning global batch [ref: evaluate.py --batch-size]")
    ft_lr: tuple = ge0((0.005, 0.005), f"backbone lr x batch/256 at 1% / 10% {FT}")
    ft_head_lr: tuple = ge0((0.5, 0.5), f"classifier lr x batch/256 at 1% / 10% {FT}")

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset (no versions)."""
        r = {}
        if preset == "cifar":  # [ref: solo-learn scripts/pretrain/cifar/barlow.yaml]
            r.update(arch="resnet18", projector="2048-2048-2048", batch_size=256, blur=False)
            # solo-learn's step as it runs: its LARS (eta 0.02, clip_lr, exclude_bias_n_norm),
            # one lr for every group, its warm-up/cosine, loss x scale_loss before backward; no
            # zero-init [ref: solo/utils/lars.py, solo/methods/base.py, torchvision resnet18]
            r.update(lr=0.3, lr_biases=0.3, wd=1e-4, eta=0.02, scale_loss=0.1, solo=True)
            r.update(zero_init_residual=False, stem_padding=2)  # solo-learn base.py
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        if not all(w.isdigit() and int(w) > 0 for w in self.projector.split("-")):
            C.fail(
                f"--projector {self.projector}: not widths joined by '-'; pass e.g. 8192-8192-8192"
            )
        if self.batch_size < 2:  # C_ij standardises each dimension over the batch, as BN does
            C.fail(f"--batch-size {self.batch_size}: no std over one sample; pass >= 2")


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
def build_optimizer(model: BarlowTwins, args: Args) -> C.LARS:
    """LARS on two groups: weights (ndim > 1: wd and trust ratio) at x lr, biases and BN (1-D:
    neither) at x lr_biases [ref: main.py main_worker param_weights / param_biases, LARS
    exclude_bias_and_norm]. Sets args.sched["lr"], the per-step factor batch/256 x warm-up/cosine
    [ref: main.py adjust_learning_rate: base x step/W, then cosine to base/1000]; --solo: solo-
    learn's [ref: solo/utils/lr_scheduler.py LinearWarmupCosineAnnealingLR, warmup_start_lr 3e-5
    and min_lr 0 from solo/methods/base.py]: 3e-5 + t (lr - 3e-5)/(W-1), then cosine to 0."""
    base, total = args.batch_size / 256, args.total_steps
    w = args.warmup_epochs * args.steps_per_epoch
    if args.solo:
        start = 3e-5 / args.lr  # an absolute lr
        lr = C.cosine_schedule(base, 0.0, total, w, start, linspace=True)
    else:
        lr = C.cosine_schedule(base, base * 0.001, total, w)
    args.sched = {"lr": lr}
    groups = C.param_groups([model], args.wd)  # weights (ndim > 1) | biases and BN (ndim <= 1)
    groups[0]["lr_scale"], groups[1]["lr_scale"] = args.lr, args.lr_biases
    kw = {"clip_lr": True, "solo": True} if args.solo else {}
    return C.LARS(groups, lr=0.0, weight_decay=args.wd, trust_coefficient=args.eta, **kw)


@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # asymmetric pair: blur 1.0 / 0.1, solarize 0 / 0.2, mean/std-normalised [ref: main.py
    # Transform], bicubic crops as official. On a GPU (--pipeline auto) C.BatchAugment runs this
    # recipe batched on the device.
    ms = C.dataset_mean_std(args)
    data = C.build_data(args, C.byol_augment(args.img_size, ms, blur=args.blur, bicubic=True), ms)
    C.prepare_run(args)
    model = C.convert_sync_bn(BarlowTwins(args)).to(device)  # whole model [ref: main.py]
    optimizer = build_optimizer(model, args)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
