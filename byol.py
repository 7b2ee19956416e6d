"""BYOL - Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning (Grill, Strub,
Altché, Tallec, Richemond et al., NeurIPS 2020) https://arxiv.org/abs/2006.07733
Reference code: google-deepmind/deepmind-research byol/ (byol_experiment.py, utils/networks.py,
utils/helpers.py regression_loss, utils/schedules.py, configs/byol.py, configs/eval.py)
Objective (Eq. 2, symmetrised): L = ||q(z1)/|q(z1)| - z_m2/|z_m2|||^2 + (views swapped), i.e.
(2 - 2 cos(p1, z_m2)) + (2 - 2 cos(p2, z_m1)), mean over the batch; z_m from the target network.
vs simsiam.py: (1) the targets z_m come from a TARGET network (backbone + projector), an EMA of
the online one with tau 0.996 -> 1 by a per-step cosine, updated after the optimizer step; SimSiam
uses the online network itself under stop-gradient; (2) projector Linear(+bias) -> BN -> ReLU ->
Linear 4096 -> 256, no output BN; predictor the same shape 256 -> 4096 -> 256; (3) the two
directions are summed, each 2 - 2 cos (SimSiam: -cos, averaged); (4) asymmetric views: blur
1.0 / 0.1, solarize 0 / 0.2; (5) LARS (bias/BN excluded) at batch 4096, 10 warm-up epochs + cosine
(CIFAR preset: solo-learn's LARS variant and warm-up, which its lr was tuned with).
Run: torchrun --nproc_per_node=8 byol.py --preset imagenet --dataset imagenet --data-dir /path
     python byol.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + BYOL(nn.Module), all method state as persistent buffers ===========
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """[ref: networks.MLP] Linear (with bias) -> BN -> ReLU -> Linear (no bias); no output BN.
    Init as Haiku's Linear: truncated normal (2 std), std 1/sqrt(fan_in), zero bias."""
    mods = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    mods.append(nn.Linear(hidden, out_dim, bias=False))
    for lin in (mods[0], mods[3]):
        s = 1 / math.sqrt(lin.in_features)
        nn.init.trunc_normal_(lin.weight, std=s, a=-2 * s, b=2 * s)
    nn.init.zeros_(mods[0].bias)
    return nn.Sequential(*mods)


class BYOL(nn.Module):
    """Online: backbone -> projector -> predictor. Target: momentum_backbone -> momentum_projector,
    an EMA of the online parameters, never trained (requires_grad False, so DDP skips them).
    Target BN running stats: its OWN, from its own train-mode forwards; the EMA averages
    parameters only [ref: byol_experiment.py: target_state comes from forward.apply].
    DEVIATION: BN running stats are torch's (init 0/1, unbiased batch var), not Haiku's
    zero-debiased EMA of the biased var; eval-time only, gap 0.9^k after k updates (2 a step):
    < 1e-4 after 44 steps (tests/test_official_byol.py measures it)."""

    def __init__(self, args: "Args"):
        super().__init__()
        # gamma = 1 in every BN by default: the paper's setting [ref: README "Note on batch norm"]
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, args.zero_init_residual, stem_padding=args.stem_padding
        )
        self.projector = mlp(self.feat_dim, args.hidden_dim, args.dim)
        self.predictor = mlp(args.dim, args.pred_hidden_dim, args.dim)
        # target starts as a copy (DEVIATION: the official code initialises it from another
        # seed and notes no significant difference [ref: _make_initial_state])
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # each view on its own: BN statistics per view, as the official apply_once_fn
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # [B, D]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [B, D]
        with torch.no_grad():  # target in train mode: batch statistics, like the online net
            z_m1 = self.momentum_projector(self.momentum_backbone(x1))  # [B, D]
            z_m2 = self.momentum_projector(self.momentum_backbone(x2))
        return byol_loss(p1, z_m2) + byol_loss(p2, z_m1), (z1, z2)  # SUM of the two directions


RELEASE = {}  # official release: JAX/Haiku pickles [ref: deepmind-research byol]; see the README


# ==== 2. loss: byol_loss(...) -> Tensor, pure, fp32 inside ================================
def byol_loss(p: torch.Tensor, z_m: torch.Tensor) -> torch.Tensor:
    """[BYOL Eq. 2; ref: helpers.regression_loss] mean over the batch of
    ||p/|p| - z_m/|z_m|||^2 = 2 - 2 cos(p, z_m). p: [B, D] online predictions; z_m: [B, D]
    target projections, detached (stop-gradient). Per process: DDP's gradient averaging makes it
    the mean over the global batch; nothing crosses processes here (only SyncBN does)."""
    with torch.autocast(p.device.type, enabled=False):
        p, z_m = F.normalize(p.float(), dim=1), F.normalize(z_m.detach().float(), dim=1)
        return (2 - 2 * (p * z_m).sum(1)).mean()


# ==== 3. method state: @torch.no_grad() momentum_update ===================================
@torch.no_grad()
def momentum_update(model: BYOL, m: float):
    """target <- m * target + (1 - m) * online, parameters only: the target's BN running stats
    are its own (from its forward passes) [BYOL Eq. 1; ref: byol_experiment._update_fn]."""
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    C.ema_(target, online, m)


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    net = C.unwrap(model)
    lr, m = args.sched["lr"][step], args.sched["m"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, z = model(x1, x2)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    # AFTER the optimizer step, with the new online weights [BYOL §3.1 "after each training
    # step"; ref: _update_fn]; MoCo instead updates before its key forward
    momentum_update(net, m)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "m": m}
    return {**stats, "grad_norm": grad_norm, "z": z}  # monitored: the 2 views' online projections


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the online backbone output h [ref: eval_experiment.py]."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the online backbone [BYOL §3.2]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
FT = "SimCLR's [SimCLR App. B.5]: BYOL's code has no semi-supervised values"
# ImageNet epochs -> lr, wd, tau_base [ref: configs/byol.py _LR_PRESETS, _WD_PRESETS, _EMA_PRESETS]
LENGTHS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99)}


@dataclass
class Args(C.RunArgs):
    """BYOL's fields: the defaults are the paper's ImageNet recipe; recipe() sets the CIFAR
    preset's (named in each help text)."""

    arch: str = arg("resnet50", "ResNet-50 v1 [BYOL §3.2]; CIFAR resnet18", choices=C.ARCHS)
    zero_init_residual: bool = arg(
        False, "zero-init each block's last BN gamma; the paper ran without [ref: byol README]"
    )
    stem_padding: int = ge0(
        1, "CIFAR stem 3x3 conv padding [SimCLR resnet.py: 1; solo-learn base.py: 2]; CIFAR 2"
    )
    epochs: int = ge0(
        1000, "epochs [BYOL §3.2]; 40/100/300 take their lr, wd, m [ref: configs/byol.py presets]"
    )
    batch_size: int = gt0(4096, "GLOBAL batch [BYOL §3.2: 4096 over 512 TPU v3 cores]; CIFAR 256")
    lr: float = ge0(
        0.2, "LARS lr per 256, x B/256 [BYOL §3.2; ref: configs/byol.py _LR_PRESETS]; CIFAR 1.0"
    )
    wd: float = ge0(
        1.5e-6, "weight decay, not on biases/BN [BYOL §3.2; ref: _WD_PRESETS]; CIFAR 1e-5"
    )
    warmup_epochs: int = ge0(10, "linear warm-up epochs, then cosine to 0 per step [BYOL §3.2]")
    warmup_start: float = ge0(
        0.0, "lr at step 0 (absolute) [ref: learning_schedule: lr*k/w]; CIFAR 3e-5"
    )
    eta: float = gt0(1e-3, "LARS trust coeff. [BYOL §3.2; ref: configs/byol.py eta]; CIFAR 0.02")
    solo: bool = arg(
        False,
        "solo-learn's LARS (trust eta|w|/(|g|+wd|w|+1e-8), capped at 1/lr) and warm-up (lr at "
        "step w-1) [ref: solo/utils/lars.py, lr_scheduler.py]; off: utils/optimizers.py lars; "
        "on for CIFAR",
    )
    m: float = unit(
        0.996, "tau_base: target EMA, -> 1 by cosine [BYOL §3.2; ref: _EMA_PRESETS]; CIFAR 0.99"
    )
    dim: int = gt0(256, "projector/predictor output dim [BYOL §3.2; ref: projector_output_size]")
    hidden_dim: int = gt0(4096, "projector hidden dim [BYOL §3.2; ref: projector_hidden_size]")
    pred_hidden_dim: int = gt0(4096, "predictor hidden dim [BYOL §3.2; ref: predictor_hidden_size]")
    crop_min: float = frac(0.08, "min crop scale [BYOL Tab. 6; ref: dataset.py 0.08]")
    blur: bool = arg(True, "blur p=1.0 / 0.1 [BYOL Tab. 6]; off at CIFAR size [ref: solo-learn]")
    linear_epochs: int = ge0(80, "linear epochs [BYOL App. C.1; ref: configs/eval.py]; CIFAR 100")
    linear_lr: float = ge0(0.2, "linear lr per 256, cosine [ref: configs/eval.py; App. C.1 sweep]")
    linear_wd: float = ge0(0.0, "linear-eval weight decay: none [BYOL App. C.1]")
    linear_batch_size: int = gt0(1024, "linear-eval global batch [BYOL App. C.1]; CIFAR 512")
    linear_nesterov: bool = arg(True, "Nesterov momentum 0.9 [ref: configs/eval.py nesterov]")
    linear_milestones: tuple = ge0((), "linear lr x0.1 epochs (empty: cosine) [ref: eval.py]")
    linear_decay: float = unit(0.1, "unused: no milestones, cosine [ref: configs/eval.py]")
    linear_epoch_lr: bool = arg(
        False, "off: lr per step [ref: eval_experiment._update_func learning_schedule(step)]"
    )
    linear_best: bool = arg(
        False, "off: the last epoch's top-1 [ref: byol README: final eval of the last checkpoint]"
    )
    linear_zero_init: bool = arg(
        False, "off: hk.Linear init [ref: eval_experiment._classif_fn] (DEVIATION: N(0, 0.01))"
    )
    # fine-tuning [ref: byol eval_experiment.py freeze_backbone=False: Nesterov SGD, cosine per
    # step, BN per device, hk.Linear init]; C.RunArgs' epochs (60, 30), SimCLR's [SimCLR App.
    # B.5], and batch 1024, as linear eval's [BYOL App. C.1]
    ft_optimizer: str = arg("nesterov", "Nesterov SGD [ref: eval_experiment.py]", choices=C.FT_OPTS)
    ft_lr_scaling: str = arg("linear", "x batch/256 [ref: eval_experiment.py]", choices=C.SCALINGS)
    ft_lr: tuple = ge0((0.05, 0.05), f"fine-tuning lr x batch/256 at 1% / 10% {FT}")
    ft_head_lr: tuple = ge0((0.05, 0.05), f"head lr x batch/256 at 1% / 10% {FT}")
    ft_sync_bn: bool = arg(False, "BatchNorm per device [ref: eval_experiment.py]")
    ft_head_init: str = arg("haiku", "hk.Linear's init [ref: eval_experiment.py]", choices=C.HEADS)

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "", epochs: int = 0) -> dict:
        """Fields that differ from the defaults above for this preset (BYOL has one version) and,
        on ImageNet, for --epochs 40, 100 or 300 (configs/byol.py's presets for those lengths)."""
        r = {}
        if preset == "imagenet" and epochs in LENGTHS:
            r.update(zip(("lr", "wd", "m"), LENGTHS[epochs]))
        if preset == "cifar":  # [ref: solo-learn scripts/pretrain/cifar/byol.yaml, asymmetric.yaml]
            r.update(arch="resnet18", batch_size=256, lr=1.0, wd=1e-5, epochs=1000, m=0.99)
            r.update(blur=False)  # view 1 no blur, view 2 solarize 0.2 only
            # solo-learn's optimizer, which its lr 1.0 was tuned with: LARS eta 0.02, clip_lr,
            # exclude_bias_n_norm (byol.yaml); warmup_cosine per step, 10 epochs from 3e-5
            # (solo/methods/base.py defaults); tau per step (momentum.py, on_train_batch_end)
            r.update(solo=True, eta=0.02, warmup_start=3e-5)
            r.update(stem_padding=2)  # solo-learn base.py: the CIFAR stem conv pads by 2
            # as solo-learn: the target starts as a copy (initialize_momentum_params); heads
            # stay the official ones (solo's last projector/predictor Linear has a bias)
            # no official CIFAR linear protocol: BYOL's (Nesterov, cosine, no wd) at the
            # 100 epochs / batch 512 of the other CIFAR presets
            r.update(linear_epochs=100, linear_batch_size=512)
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
@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # view 1: blur 1.0, no solarize; view 2: blur 0.1, solarize 0.2 [BYOL Tab. 6]; bicubic crops
    # [ref: byol utils/augmentations.py]; mean/std [ref: dataset.normalize_images]. On a GPU
    # (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    ms = C.dataset_mean_std(args)
    views = C.byol_augment(args.img_size, ms, (args.crop_min, 1.0), args.blur, bicubic=True)
    data = C.build_data(args, views, ms)
    C.prepare_run(args)
    model = C.convert_sync_bn(BYOL(args)).to(device)  # cross-replica BN everywhere [BYOL §3.2]
    lr, T = args.lr * args.batch_size / 256, args.total_steps  # lr per 256 [ref: schedules.py]
    # per step: lr s + (lr - s) k/w over w steps, then cosine [ref: learning_schedule];
    # DEVIATION: w, T count whole epochs of N // B steps; official floor(E N / B) (ImageNet,
    # B 4096: T 312000 vs 312784, w 3120 vs 3127, 0.25%)
    w, s = args.warmup_epochs * args.steps_per_epoch, args.warmup_start
    # --solo: lr reached at step w-1 [ref: solo-learn LinearWarmupCosineAnnealingLR]
    lrs = C.cosine_schedule(lr, 0.0, T, w, s, linspace=args.solo)
    # tau_k = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2 [ref: schedules.target_ema]
    args.sched = {"lr": lrs, "m": C.cosine_schedule(args.m, 1.0, T)}
    kw = {"clip_lr": True, "solo": True} if args.solo else {}  # LARS: 1-D params excluded
    optimizer = C.LARS(
        C.param_groups([model], args.wd), lr, args.wd, trust_coefficient=args.eta, **kw
    )
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
