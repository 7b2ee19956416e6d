"""SimCLR v1/v2 - A Simple Framework for Contrastive Learning of Visual Representations (Chen,
Kornblith, Norouzi, Hinton, ICML 2020) https://arxiv.org/abs/2002.05709; v2: Big Self-Supervised
Models are Strong Semi-Supervised Learners (Chen et al., NeurIPS 2020) https://arxiv.org/abs/2006.10029
Reference code: google-research/simclr (objective.py add_contrastive_loss, model_util.py
projection_head, lars_optimizer.py)
Objective (Eq. 1): l(i,j) = -log exp(cos(z_i,z_j)/tau) / sum_{k != i} exp(cos(z_i,z_k)/tau), mean
over the N anchors of each view, summed over the two views (= 2x the mean over all 2N views, the
official scale [ref: objective.py add_contrastive_loss: loss_a + loss_b]).
vs moco.py: (1) negatives are the other 2N-2 views of the GLOBAL batch: no queue, no momentum
encoder; (2) both views go through the same encoder and the loss is symmetric; (3) the gather keeps
gradients (every process's embeddings are anchors and negatives); (4) global BatchNorm (SyncBN)
instead of shuffle-BN; (5) BN on every projector layer, inputs not mean/std-normalised; (6) LARS at
batch 4096 with warm-up + cosine; classic momentum (lr inside the momentum buffer).
Run: torchrun --nproc_per_node=8 simclr.py --preset imagenet --dataset imagenet --data-dir /path
     python simclr.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + SimCLR(nn.Module), all method state as persistent buffers =========
def projection_head(in_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """[ref: model_util.projection_head] (Linear without bias -> BN -> ReLU) x (layers - 1) ->
    Linear -> BN with gamma but no beta (center=False). Hidden width = backbone width. The paper
    does not mention these BNs; the official code has them on every layer."""
    mods, d = [], in_dim
    for i in range(layers):
        last = i == layers - 1
        mods += [nn.Linear(d, out_dim if last else in_dim, bias=False)]
        mods += [nn.BatchNorm1d(out_dim if last else in_dim)]
        if not last:
            mods += [nn.ReLU(True)]
        d = in_dim
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)  # [ref: random_normal_initializer(stddev=.01)]
    mods[-1].bias.requires_grad_(False)  # no beta: the bias stays 0
    return nn.Sequential(*mods)


class SimCLR(nn.Module):
    def __init__(self, args: "Args"):
        super().__init__()
        # zero-init of each block's last BN gamma [ref: resnet.py init_zero]
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, zero_init_residual=True
        )
        self.projector = projection_head(self.feat_dim, args.proj_dim, args.proj_layers)
        self.tau = args.tau

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # both views in one pass: BN statistics over all 2B views, as in the official code
        h = self.backbone(torch.cat([x1, x2]))  # [2B, F]
        z1, z2 = self.projector(h).chunk(2)  # [B, D] each
        return nt_xent_loss(z1, z2, self.tau), (z1, z2)


RELEASE = {}  # official releases: TensorFlow [ref: google-research/simclr]; the README maps them


# ==== 2. loss: nt_xent_loss(...) -> Tensor, pure, fp32 inside =============================
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent [SimCLR Eq. 1]. z1, z2: this process's [B, D] projections of the two views. Both
    are l2-normalised and gathered WITH gradient from all processes; each of the 2B local anchors
    is scored against the 2N-1 other views of the global batch (positive: its other view).
    Returns the sum of the two directional means over local anchors, the official scale [ref:
    objective.py add_contrastive_loss: loss = loss_a + loss_b], i.e. 2x Eq. 1's mean: LARS adds
    wd * w before its trust ratio and leaves 1-D params unadapted, so the scale matters."""
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        B, N = len(z1), len(z1) * C.get_world_size()
        cands = torch.cat([C.gather_with_grad(z1), C.gather_with_grad(z2)])  # [2N, D]
        logits = torch.cat([z1, z2]) @ cands.T / tau  # [2B, 2N]
        own = torch.arange(B, device=z1.device) + C.get_rank() * B  # rows of z1 in cands
        self_idx, pos_idx = torch.cat([own, own + N]), torch.cat([own + N, own])
        logits = logits.masked_fill(F.one_hot(self_idx, 2 * N).bool(), float("-inf"))
        return 2 * F.cross_entropy(logits, pos_idx)  # mean over 2B anchors = (a + b) / 2


# ==== 3. method state: none (SimCLR keeps no state beyond its parameters) =================


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, z = model(x1, x2)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "tau": args.tau}
    return {**stats, "grad_norm": grad_norm, "z": z}  # monitored: the 2 views' projections


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h (before the projector)."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone [SimCLR §4 eval]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
VERSIONS = ("v1", "v2")
FT = "[ref: README fine-tune command]"


@dataclass
class Args(C.RunArgs):
    """SimCLR's fields: the defaults are the paper's ImageNet v1 recipe; recipe() sets v2's and
    the CIFAR preset's (named in each help text)."""

    version: str = arg("v1", "v1 [SimCLR]; v2 [SimCLRv2 §2]", choices=VERSIONS)
    arch: str = arg("resnet50", "backbone [SimCLR §3]; CIFAR resnet18", choices=C.ARCHS)
    epochs: int = ge0(100, "epochs [SimCLR §2.3 default setting: 100; 1000 in Tab. 6]; CIFAR 1000")
    batch_size: int = gt0(4096, "GLOBAL batch [SimCLR §2.3 default setting]; CIFAR 512")
    lr: float = ge0(
        0.3,
        "LARS lr, x batch/256 [SimCLR §2.3: 4.8 at 4096; ref: run.py --learning_rate]; v2: 0.1 x "
        "sqrt(batch) [SimCLRv2 §3.1; ref: simclr issue #77]; CIFAR 1.0 x batch/256",
    )
    lr_scaling: str = arg(
        "linear",
        "linear: lr x B/256; sqrt: lr x sqrt(B) [SimCLRv2 App. B; "
        "ref: run.py --learning_rate_scaling]; v2 sqrt; CIFAR linear",
        choices=("linear", "sqrt"),
    )
    wd: float = ge0(
        1e-6,
        "LARS weight decay, not on BN/biases [SimCLR §2.3; ref: model_util.get_optimizer "
        "exclude_from_weight_decay]; v2 1e-4 [SimCLRv2 §3.1; ref: README v2 command]",
    )
    momentum: float = unit(0.9, "LARS classic momentum [ref: run.py --momentum, lars_optimizer.py]")
    warmup_epochs: int = ge0(
        10,
        "linear warm-up from lr 0, then cosine [SimCLR §2.3; ref: model_util.learning_rate_"
        "schedule]; v2 40 = 5% of 800 [SimCLRv2 §3.1; ref: simclr issue #77]; CIFAR 10",
    )
    tau: float = gt0(0.1, "NT-Xent temperature [SimCLR Tab. 5; ref: --temperature]; CIFAR 0.5")
    proj_layers: int = gt0(2, "projector layers (v1 2, v2 3) [ref: model_util.projection_head]")
    proj_dim: int = gt0(128, "projector output dim [SimCLR §2.3; ref: --proj_out_dim]")
    color_s: float = arg(  # 2.5: ColorJitter's hue 0.2 s <= 0.5
        1.0, "colour jitter strength s [SimCLR App. A]; CIFAR 0.5", range="[0, 2.5]"
    )
    blur: bool = arg(True, "Gaussian blur p=0.5 [SimCLR App. A]; off on CIFAR (its size)")
    linear_epochs: int = ge0(90, "linear-eval epochs [ref: README ImageNet command]; CIFAR 100")
    linear_lr: float = ge0(
        0.1, "linear-eval lr x B/256, cosine per step [ref: README; learning_rate_schedule]"
    )
    linear_wd: float = ge0(
        1e-6, "linear-eval wd, weight and bias [ref: README; model_util.add_weight_decay]; CIFAR 0"
    )
    linear_batch_size: int = gt0(
        4096, "linear-eval global batch [ref: README --train_batch_size]; CIFAR 512"
    )
    linear_nesterov: bool = arg(
        True, "Nesterov momentum 0.9 [ref: README --optimizer=momentum; model_util.get_optimizer]"
    )
    linear_milestones: tuple = ge0(
        (), "linear lr x0.1 epochs (empty: cosine) [ref: README --warmup_epochs=0: cosine]"
    )
    linear_decay: float = unit(0.1, "linear lr factor per milestone [unused: README is cosine]")
    linear_epoch_lr: bool = arg(
        False, "linear lr once per epoch, not per step [ref: model_util.learning_rate_schedule]"
    )
    linear_best: bool = arg(
        False, "linear top-1 of the best epoch, not the last [ref: README --mode=train_then_eval]"
    )
    linear_zero_init: bool = arg(
        True, "zero-initialised linear classifier [ref: README --zero_init_logits_layer=True]"
    )
    # fine-tuning [SimCLR App. B.5: Nesterov SGD, lr x batch/256; ref: model_util.get_optimizer
    # MomentumOptimizer(use_nesterov=True), --global_bn, --zero_init_logits_layer]; v2: SimCLR
    # v2's LARS protocol, C.RunArgs' defaults [SimCLRv2 §4]
    ft_optimizer: str = arg(
        "nesterov", "fine-tuning optimizer [SimCLR App. B.5]; v2 lars", choices=C.FT_OPTS
    )
    ft_lr_scaling: str = arg(
        "linear", "fine-tuning lr x batch/256 [SimCLR App. B.5]; v2 sqrt", choices=C.SCALINGS
    )
    ft_epochs: tuple = gt0((60, 30), "fine-tuning epochs at 1% / 10% [SimCLR App. B.5; v2 §4]")
    ft_batch_size: int = gt0(
        4096,
        f"fine-tuning global batch [SimCLR App. B.5]; v2 1024 {FT}; CIFAR 256 (DEVIATION: "
        "C.FT_CIFAR_BATCH)",
    )
    ft_lr: tuple = ge0(
        (0.05, 0.05), f"fine-tuning lr x batch/256 [SimCLR App. B.5]; v2 0.005 x sqrt(batch) {FT}"
    )
    ft_head_lr: tuple = ge0((0.05, 0.05), f"head lr, the same [SimCLR App. B.5]; v2 0.005 {FT}")
    ft_proj_layers: int = ge0(0, f"projector layers fine-tuned too [SimCLRv2 §2: v2 1] {FT}")
    distill_epochs: int = ge0(0, "self-distillation epochs (0: off) [SimCLRv2 §4: 400]")
    distill_tau: float = gt0(1.0, "distillation temperature [SimCLRv2 §4; ref: distillation colab]")

    @staticmethod
    def recipe(version: str = "v1", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this version / preset."""
        r = {}
        if version == "v2":  # 3-layer head [ref: run.py --num_proj_layers=3], wd 1e-4, 800
            # epochs, lr 0.1 x sqrt(B), warm-up 5% [SimCLRv2 §3.1; ref: simclr issue #77]
            r.update(proj_layers=3, wd=1e-4, epochs=800, lr=0.1, lr_scaling="sqrt")
            r.update(warmup_epochs=40)
            # fine-tuning from the head's middle layer [SimCLRv2 §2, §4; ref: README fine-tune
            # command: lars, 0.005 x sqrt(1024), --num_proj_layers=3 --ft_proj_selector=1]
            r.update(ft_optimizer="lars", ft_lr_scaling="sqrt", ft_lr=(0.005,) * 2)
            r.update(ft_head_lr=(0.005,) * 2, ft_batch_size=1024, ft_proj_layers=1)
        if preset == "cifar":  # [SimCLR App. B.9; ref: README CIFAR-10 commands (v1: wd 1e-6, v2:
            # 1e-4), default --warmup_epochs=10; linear eval: wd 0, 100 epochs, batch 512]
            r.update(arch="resnet18", batch_size=512, lr=1.0, epochs=1000, tau=0.5, color_s=0.5)
            r.update(warmup_epochs=10, blur=False, lr_scaling="linear")
            r.update(linear_epochs=100, linear_wd=0.0, linear_batch_size=512)
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        if self.batch_size < 2:  # the negatives are the other images of the global batch
            C.fail(f"--batch-size {self.batch_size}: one image has no negatives; pass >= 2")
        if self.ft_proj_layers >= self.proj_layers:  # a hidden layer: Linear, BN, ReLU
            k, why = self.ft_proj_layers, f"the projector has {self.proj_layers - 1} hidden layers"
            C.fail(f"--ft-proj-layers {k}: {why}; pass < --proj-layers {self.proj_layers}")


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


# ==== 7. SimCLR v2's self-distillation ====================================================
def distill_loss(student_logits, teacher_logits, tau: float) -> torch.Tensor:
    """Self-distillation [SimCLRv2 Eq. 2]: cross-entropy of the student's softmax(logits / tau)
    against the teacher's, mean over the batch, x tau^2 [ref: tf2/colabs distillation colab
    add_kd_loss] (the paper's tau = 1: Eq. 2 as printed)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        p = F.softmax(teacher_logits.float() / tau, dim=1)  # [B, classes], no gradient needed
        log_q = F.log_softmax(student_logits.float() / tau, dim=1)
        return -(p * log_q).sum(1).mean() * tau**2


def distill(model, data, args) -> dict:
    """SimCLR v2's third stage [SimCLRv2 §2, Eq. 2; §4]: the fine-tuned network (out-dir/
    finetune.pth, BN in eval mode) labels the training images (no labels used; crop + flip
    views) with its tempered softmax; a student of the same architecture without projection head
    (backbone + linear, random init) learns them with the pretraining's LARS, lr, weight decay,
    warm-up and batch. out-dir/distill.pth, written every epoch, lets a rerun continue."""
    B, device = args.batch_size, torch.device(args.device)
    teacher = C.finetune_net(features, model, data, args).eval()
    teacher.load_state_dict(C.load_checkpoint(os.path.join(args.out_dir, "finetune.pth"))["net"])
    backbone, d = C.build_backbone(args.arch, args.img_size, zero_init_residual=True)
    student = nn.Sequential(backbone, nn.Linear(d, data.num_classes))
    nn.init.normal_(student[1].weight, std=0.01)  # [ref: model.py LinearLayer]
    student = C.convert_sync_bn(student).to(device)  # global BN, as pretraining
    ds = C.Indexed(data.train.dataset, data.train_linear.transform, args.subset, seed=args.seed)
    lr = args.lr * (math.sqrt(B) if args.lr_scaling == "sqrt" else B / 256)
    groups = [{**g, "lr0": lr} for g in C.param_groups([student], args.wd)]
    optimizer = C.LARS(groups, lr, momentum=args.momentum, classic=True)
    total, warmup = math.ceil(len(ds) * args.distill_epochs / B), len(ds) * args.warmup_epochs // B
    sched = C.cosine_schedule(1.0, 0.0, total, warmup)  # [ref: model_util.learning_rate_schedule]

    def loss_fn(x, _):
        with torch.no_grad():
            t = teacher(x)
        return distill_loss(student(x), t, args.distill_tau)

    key = {"teacher": C.fingerprint(teacher), "student": C.fingerprint(student)}
    key.update(epochs=args.distill_epochs, tau=args.distill_tau, batch=B, lr=lr, wd=args.wd)
    path = os.path.join(args.out_dir, "distill.pth")
    out = C.fit_classifier(student, optimizer, loss_fn, ds, sched, B, path, key, args)
    top1, top5 = C.classifier_accuracy(student, data, args)
    return {"distill_top1": top1, "distill_top5": top5, "distill_loss": out["loss"]}


# ==== 8. main(args) =======================================================================
@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # two views of one recipe; inputs stay in [0, 1], no mean/std [SimCLR App. A]. v1's brightness
    # is additive (x + U(-0.8s, 0.8s)), v2's multiplicative [ref: data_util.py at the first
    # release: tf.image.random_brightness; later: random_brightness impl=simclrv1/v2]. On a GPU
    # (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    v1 = args.version == "v1"
    aug = C.simclr_augment(args.img_size, None, args.color_s, args.blur, additive=v1)
    data = C.build_data(args, C.MultiView([aug, aug]), mean_std=None)
    C.prepare_run(args)
    model = C.convert_sync_bn(SimCLR(args)).to(device)  # global BN [SimCLR §3 "Global BN"]
    sqrt, B, n = args.lr_scaling == "sqrt", args.batch_size, len(data.train)
    lr = args.lr * (math.sqrt(B) if sqrt else B / 256)
    # lr_t = lr t / w, then cosine to 0 at step n E // B + 1, w = n warmup_epochs // B: the
    # official step counts (a stream without epochs) [ref: model_util.learning_rate_schedule]
    warmup, total = n * args.warmup_epochs // B, n * args.epochs // B + 1
    args.sched = {"lr": C.cosine_schedule(lr, 0.0, total, warmup)[: max(args.total_steps, 1)]}
    # LARS: decay and trust ratio on conv/linear weights, not on BN [ref: get_optimizer]
    # classic momentum: v <- m v + lr_t d, w -= v [ref: lars_optimizer.py classic_momentum=True]
    kw = {"weight_decay": args.wd, "momentum": args.momentum, "classic": True}
    optimizer = C.LARS(C.param_groups([model], args.wd), lr=lr, **kw)
    fit(model, optimizer, data, args)
    if args.distill_epochs and data.test is not None:  # after fit's fine-tuning [SimCLRv2 §2]
        with C.eval_rng(args):  # the student's init: the same on every rank
            res = {"step": min(args.max_steps or args.total_steps, args.total_steps)}
            res.update(distill(model, data, args))
        if args.is_main:
            print(json.dumps(res))
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main(C.parse_args(Args))
