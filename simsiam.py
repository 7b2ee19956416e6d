"""SimSiam - Exploring Simple Siamese Representation Learning (Chen, He, CVPR 2021)
https://arxiv.org/abs/2011.10566
Reference code: facebookresearch/simsiam (simsiam/builder.py, main_simsiam.py, main_lincls.py)
Objective (Eq. 4): L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, D(p, z) = -cos(p, z), mean over the
batch; sg = stop-gradient, minimum -1.
vs byol.py: (1) no momentum (target) encoder: the target is sg(z) of the SAME network's other view,
so there is one set of weights and nothing to EMA; (2) the loss is the symmetric negative cosine
(BYOL's 2 - 2 cos up to scale and offset), with the stop-gradient inside the loss; (3) SGD
momentum 0.9 at batch 512, lr 0.05 x B/256, wd 1e-4 on all params, cosine per epoch, no warm-up,
instead of LARS at 4096 with warm-up; (4) the predictor's lr stays fixed (not decayed); (5) the
projector is 2048-2048-2048 with BN on every layer (the last without affine) and the predictor a
smaller bottleneck 2048 -> 512 -> 2048 (BYOL 256 -> 4096 -> 256); (6) both views use the same MoCo
v2 recipe (BYOL: asymmetric blur / solarize).
Run: torchrun --nproc_per_node=8 simsiam.py --preset imagenet --dataset imagenet --data-dir /path
     python simsiam.py                      (CIFAR-10 preset, one process)
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


# ==== 1. model: heads + SimSiam(nn.Module), all method state as persistent buffers ========
def projection_mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """[ref: builder.py encoder.fc] (Linear without bias -> BN -> ReLU) x (layers - 1) -> Linear
    -> BN without affine. Hidden width 2048 [SimSiam §3] (builder.py: the backbone width, also
    2048 for ResNet-50). The official output Linear keeps a bias, frozen at its init ("hack: not
    use bias as it is followed by BN"); BN's mean subtraction cancels it, so here it is absent.
    DEVIATION, no effect on any output: the last BN's running_mean lacks that shift (|b| <=
    1/sqrt(2048) = 0.022; eval mode subtracts it again) [tests/test_official_simsiam.py].
    Default PyTorch init: a fixed std of 0.01 "may not converge" [SimSiam App. A]."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    return nn.Sequential(
        *mods, nn.Linear(d, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)
    )


def prediction_mlp(dim: int, hidden: int) -> nn.Sequential:
    """[ref: builder.py predictor] bottleneck Linear (no bias) -> BN -> ReLU -> Linear (bias), no
    BN on the output [SimSiam §3, §4.4]."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, dim),
    )


class SimSiam(nn.Module):
    def __init__(self, args: "Args"):
        super().__init__()
        # zero-init of each block's last BN gamma [SimSiam App. A; ref: builder.py]
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, zero_init_residual=True
        )
        self.projector = projection_mlp(self.feat_dim, args.proj_hidden, args.dim, args.proj_layers)
        self.predictor = prediction_mlp(args.dim, args.pred_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # one pass per view, as builder.py: BN statistics are per view (over the global batch)
        z1 = self.projector(self.backbone(x1))  # [B, D]
        z2 = self.projector(self.backbone(x2))  # [B, D]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [B, D]
        return simsiam_loss(p1, p2, z1, z2), (z1, z2)


RELEASE = {  # official: {"state_dict": DDP(SimSiam).state_dict()} [ref: main_simsiam.py]
    "state_dict.module.encoder.": "backbone.",  # torchvision ResNet [ref: builder.py]
    "state_dict.module.encoder.fc.": "projector.",  # its fc is the projector
    # the frozen output bias, absent here (projection_mlp): eval-mode z lacks its shift
    "state_dict.module.encoder.fc.6.bias": None,
    "state_dict.module.predictor.": "predictor.",
    "optimizer.": None,  # a training checkpoint's solver state
}


# ==== 2. loss: simsiam_loss(...) -> Tensor, pure, fp32 inside =============================
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor):
    """[SimSiam Eq. 4] -(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2, mean over this process's B rows
    (= the global mean once DDP averages gradients). The stop-gradient lives here: z gets its
    gradient only through p. Nothing crosses processes but BN moments (SyncBN) and gradients."""
    with torch.autocast(p1.device.type, enabled=False):
        p1, p2, z1, z2 = p1.float(), p2.float(), z1.detach().float(), z2.detach().float()
        cos12, cos21 = F.cosine_similarity(p1, z2, dim=1), F.cosine_similarity(p2, z1, dim=1)
        return -(cos12.mean() + cos21.mean()) / 2


# ==== 3. method state: none (no momentum encoder, queue or bank: the stop-gradient suffices) ==


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)  # a group with "fixed_lr" (the predictor) keeps its lr
    with C.autocast(args):
        loss, z = model(x1, x2)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    stats = {"loss": loss.detach(), "lr": lr, "lr_pred": optimizer.param_groups[-1]["lr"]}
    return {**stats, "wd": args.wd, "grad_norm": grad_norm, "z": z}  # monitored: projections


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h (pool5) [SimSiam App. A]."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone [SimSiam App. A]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
LINEAR = (  # the linear-eval optimizer: the paper's SGD variant, as section 6 is SGD only
    "DEVIATION: official LARS (apex LARC, trust 0.001, no clip) at batch 4096, lr 0.1 x B/256 "
    "(paper text 0.02) [ref: README, main_lincls.py --lars]; here main_lincls.py without --lars "
    "at -b 256 --lr 30, the SGD variant of [SimSiam App. A] (~1 point lower there)"
)


@dataclass
class Args(C.RunArgs):
    """SimSiam's fields: the defaults are the paper's ImageNet recipe; recipe() sets the CIFAR
    preset's (named in each help text). Fine-tuning: C.RunArgs' protocol, SimCLR v2's [SimCLRv2
    §4; ref: simclr README fine-tune command]: none in the SimSiam code."""

    arch: str = arg(
        "resnet50", "backbone [SimSiam §3 Baseline settings]; CIFAR resnet18", choices=C.ARCHS
    )
    epochs: int = ge0(100, "epochs [SimSiam §3 Baseline settings; ref: main_simsiam.py]; CIFAR 800")
    batch_size: int = gt0(512, "GLOBAL batch [SimSiam §3; ref: main_simsiam.py --batch-size]")
    lr: float = ge0(
        0.05, "SGD lr per 256, x batch/256 [SimSiam §3; ref: main_simsiam.py --lr]; CIFAR 0.03"
    )
    wd: float = ge0(
        1e-4, "weight decay on ALL params incl. BN/bias [SimSiam App. A; ref: --wd]; CIFAR 5e-4"
    )
    warmup_epochs: int = ge0(
        0, "linear warm-up x cosine, not on a fixed predictor lr [SimSiam §3: none]"
    )
    fix_pred_lr: bool = arg(
        True, "predictor lr fixed at the base lr [SimSiam Tab. 1; ref: README --fix-pred-lr]"
    )
    proj_layers: int = gt0(3, "projector layers [SimSiam §3: 3]; CIFAR 2 [SimSiam App. D]")
    proj_hidden: int = gt0(2048, "projector hidden width [SimSiam §3: 2048-d; ref: builder.py]")
    dim: int = gt0(2048, "z and p dim d [SimSiam §3, App. B; ref: main_simsiam.py --dim]")
    pred_dim: int = gt0(512, "predictor hidden (bottleneck) dim [SimSiam §3; ref: --pred-dim]")
    crop_min: float = frac(0.2, "min crop scale [SimSiam App. A; ref: main_simsiam.py]")
    blur: bool = arg(True, "Gaussian blur p=0.5 [SimSiam App. A]; off on CIFAR [SimSiam App. D]")
    linear_epochs: int = ge0(90, "linear-eval epochs [SimSiam App. A; ref: main_lincls.py]")
    linear_lr: float = ge0(30.0, f"linear-eval SGD lr per 256, cosine. {LINEAR}")
    linear_wd: float = ge0(0.0, "linear-eval weight decay [SimSiam App. A; ref: main_lincls.py]")
    linear_batch_size: int = gt0(256, f"linear-eval global batch. {LINEAR}")
    linear_nesterov: bool = arg(False, "Nesterov momentum [SimSiam App. A: plain momentum 0.9]")
    linear_milestones: tuple = ge0((), "linear lr decay epochs (empty: cosine) [SimSiam App. A]")
    linear_decay: float = unit(0.1, "lr factor per milestone (unused: cosine) [ref: main_lincls]")
    linear_epoch_lr: bool = arg(
        True, "lr set once per epoch [ref: main_lincls.py adjust_learning_rate, per epoch]"
    )
    linear_best: bool = arg(True, "report the best epoch's top-1 [ref: main_lincls.py best_acc1]")
    linear_zero_init: bool = arg(
        False, "classifier N(0, 0.01), bias 0 [ref: main_lincls.py fc.weight.data.normal_]"
    )

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset (SimSiam has no versions)."""
        r = {}
        if preset == "cifar":  # [SimSiam App. D: CIFAR ResNet-18, 2-layer projector, no blur]
            r.update(arch="resnet18", epochs=800, batch_size=512, lr=0.03, wd=5e-4)
            r.update(proj_layers=2, blur=False)
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        if self.batch_size < 2:
            C.fail(f"--batch-size {self.batch_size}: BatchNorm needs >= 2 samples; pass >= 2")


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
def build_optimizer(model: SimSiam, lr: float, args: Args) -> torch.optim.SGD:
    """SGD momentum 0.9, wd on every parameter [SimSiam App. A; ref: main_simsiam.py]; with
    --fix-pred-lr the predictor is its own group whose lr C.set_lr leaves at `lr`."""
    enc = [p for m in (model.backbone, model.projector) for p in m.parameters() if p.requires_grad]
    pred = {"params": [p for p in model.predictor.parameters() if p.requires_grad]}
    if args.fix_pred_lr:
        pred["fixed_lr"] = lr
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.SGD([{"params": enc}, pred], lr, momentum=0.9, weight_decay=args.wd, **fused)


@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # the same MoCo v2 recipe for both views [SimSiam App. A; ref: main_simsiam.py]. On a GPU
    # (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    ms = C.dataset_mean_std(args)
    aug = C.moco_augment(args.img_size, ms, "v2", (args.crop_min, 1.0), args.blur)
    data = C.build_data(args, C.MultiView([aug, aug]), ms)
    C.prepare_run(args)
    model = C.convert_sync_bn(SimSiam(args)).to(device)  # SyncBN everywhere [SimSiam §3]
    lr, spe, T = args.lr * args.batch_size / 256, args.steps_per_epoch, args.total_steps
    warm = max(args.warmup_epochs * spe, 1)
    # cosine evaluated once per epoch, no floor [ref: main_simsiam.py adjust_learning_rate]
    cos = lambda s: 0.5 * (1 + math.cos(math.pi * (s // spe) / args.epochs))
    args.sched = {"lr": [lr * min(1.0, (s + 1) / warm) * cos(s) for s in range(T)] or [lr]}
    fit(model, build_optimizer(model, lr, args), data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
