"""CPC v2 - Data-Efficient Image Recognition with Contrastive Predictive Coding (Hénaff, Srinivas,
De Fauw, Razavi, Doersch, Eslami, van den Oord, ICML 2020) https://arxiv.org/abs/1905.09272; v1:
Representation Learning with Contrastive Predictive Coding (van den Oord, Li, Vinyals, 2018)
https://arxiv.org/abs/1807.03748
Reference code: none released; the CPC v2 paper's appendix pseudocode (CPC, pixelCNN); peer code
Lightning-Universe/lightning-bolts (cpc/cpc_module.py, networks.py, transforms.py; losses CPCTask)
Objective (CPC v1 Eq. 4, InfoNCE over patches): L = -mean log exp(p . t_pos) / sum_t exp(p . t),
p = W_k c_{i,j} * 0.1 predicts t_pos = the target embedding of patch (i+k, j); the sum runs over
every patch of the global batch; summed over the steps k and the prediction directions.
vs cmc.py: (1) ONE augmented view per image, cut into a 7x7 grid of overlapping patches, instead
of two colour views (L, ab) with two encoders; (2) a masked PixelCNN context network over the grid:
rows <= i predict the patches k rows below, one 1x1 predictor per step (and per direction in v2);
(3) negatives: every other patch embedding of the global batch, gathered WITH gradient; no memory
bank; (4) encoder without BatchNorm (LayerNorm as GroupNorm(1, C)); per-patch colour dropping;
(5) Adam (pl_bolts' betas, eps, L2); linear eval on the patch embeddings mean-pooled over the grid.
Run: torchrun --nproc_per_node=8 cpc.py --preset imagenet --dataset imagenet --data-dir /path
     python cpc.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from einops import rearrange
from torch import nn

import common as C
from common import arg, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + CPC(nn.Module), all method state as persistent buffers ============
def patchify(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """[B, C, S, S] -> [B * G * G, C, patch, patch], G = (S - patch) // stride + 1, row-major:
    patch (b, i, j) = x[b, :, i*stride : i*stride+patch, j*stride : j*stride+patch]."""
    x = x.unfold(2, patch, stride).unfold(3, patch, stride)  # [B, C, G, G, patch, patch]
    return rearrange(x, "b c gh gw ph pw -> (b gh gw) c ph pw")


class PixelCNN(nn.Module):
    """Masked context network [CPC v2 App. A pixelCNN]: residual blocks of 1x1 -> ReLU -> 1x3
    (same row) -> pad one row on top + 2x1 valid conv (rows i-1 and i) -> ReLU -> 1x1, then a
    final ReLU. The output at row i depends on input rows <= i only."""

    def __init__(self, dim: int, hidden: int, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    nn.Conv2d(dim, hidden, 1),
                    nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1)),
                    nn.Conv2d(hidden, hidden, (2, 1)),
                    nn.Conv2d(hidden, dim, 1),
                ]
            )
            for _ in range(blocks)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, D, G, G] -> [B, D, G, G]
        c_res = h
        for reduce, row, down, expand in self.blocks:
            c = row(F.relu(reduce(c_res)))
            c = F.relu(down(F.pad(c, (0, 0, 1, 0))))  # shift down one row: causal over rows
            c_res = c_res + expand(c)
        return F.relu(c_res)


class CPC(nn.Module):
    """Patch encoder (backbone) -> grid h [B, D, G, G]; per direction (the grid rotated) a
    context network and one 1x1 predictor per step k; one shared 1x1 target projection."""

    ROTATIONS = (0, 2, 1, 3)  # rot90 turns: top-down, bottom-up, right-left, left-right

    def __init__(self, args: "Args"):
        super().__init__()
        # no BatchNorm: GroupNorm(1, C), a per-patch LayerNorm over (C, H, W) with per-channel
        # affine [CPC v2 §4.1 'LN']; the stem follows the image size (CIFAR stem at <= 64 px)
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, norm_layer=lambda ch: nn.GroupNorm(1, ch)
        )
        D, E, self.emb_scale = self.feat_dim, args.target_dim, args.emb_scale
        self.patch, self.stride = args.patch_size, args.patch_size // 2
        self.aug = (args.patch_flip, args.patch_crop, args.color_drop)
        self.steps = list(range(args.min_step, args.max_step + 1))
        self.context = nn.ModuleList(
            PixelCNN(D, args.context_dim, args.context_blocks) for _ in range(args.directions)
        )
        self.target = nn.Conv2d(D, E, 1)
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(D, E, 1) for _ in self.steps) for _ in range(args.directions)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> patch embeddings h [B, D, G, G] (augmented in training)."""
        patches = patchify(x, self.patch, self.stride)  # [B*G*G, 3, p, p]
        if self.training:
            patches = patch_augment(patches, *self.aug)
        h = self.backbone(patches)  # [B*G*G, D], each patch on its own
        g = (x.shape[-2] - self.patch) // self.stride + 1
        return rearrange(h, "(b gh gw) d -> b d gh gw", gh=g, gw=g)

    def objective(self, h: torch.Tensor) -> torch.Tensor:
        """Sum over directions and steps of cpc_loss [CPC v2 App. A CPC()]."""
        t = self.target(h)  # [B, E, G, G]
        t_other = other_ranks(t)  # [(W-1)B, E, G, G]: the other processes' targets
        flat = lambda v: rearrange(v, "b e gh gw -> (b gh gw) e")
        loss = 0.0
        for turn, context, predictors in zip(self.ROTATIONS, self.context, self.predictors):
            hd, td, od = (torch.rot90(v, turn, dims=(2, 3)) for v in (h, t, t_other))
            c = context(hd)  # row i of c has seen rows <= i of hd
            for k, predictor in zip(self.steps, predictors):
                p = predictor(c[:, :, :-k]) * self.emb_scale  # context row i predicts row i+k
                # positives first (the same (b, i, j) order as p), then all other patches
                targets = torch.cat([flat(td[:, :, k:]), flat(td[:, :, :k]), flat(od)])
                loss = loss + cpc_loss(flat(p), targets)
        return loss

    def forward(self, x: torch.Tensor):
        h = self.encode(x)
        return self.objective(h), h.mean((2, 3))  # loss, pooled embeddings [B, D]


RELEASE = {}  # no official code or weights released [CPC v2]


# ==== 2. loss: cpc_loss(...) -> Tensor, pure, fp32 inside =================================
def cpc_loss(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """InfoNCE [CPC v1 Eq. 4; CPC v2 App. A]. preds [M, E]: the (already emb_scale-d)
    predictions for M target positions; targets [N, E], N >= M: row m < M is the true target
    embedding of the position that prediction m predicts, and EVERY other row (the other
    positives and rows M..N-1) is a negative for it. No normalisation, no temperature besides
    emb_scale. Returns the mean over the M predictions of -log softmax(preds @ targets.T)[m, m]."""
    with torch.autocast(preds.device.type, enabled=False):
        logits = preds.float() @ targets.float().T  # [M, N]
        return F.cross_entropy(logits, torch.arange(len(preds), device=preds.device))


# ==== 3. method state: none (no bank, queue or momentum encoder); patch aug, targets ======
@torch.no_grad()
def patch_augment(patches: torch.Tensor, flip: bool, crop: bool, drop: bool) -> torch.Tensor:
    """Each patch on its own [CPC v2 §4.1]: horizontal flip (p=0.5); a random sub-crop of
    p - p//16 px (60 of 64) padded back in place with zeros [CPC v1 §3.2]; colour dropping:
    keep one random channel, zero the other two (0 = the dataset mean after normalisation).
    DEVIATION: the paper's further AutoAugment-style per-patch ops are left out (per-patch PIL
    ops, far from batched tensor code)."""
    n, ch, p, device = len(patches), patches.shape[1], patches.shape[-1], patches.device
    if flip:
        flipped = torch.rand(n, 1, 1, 1, device=device) < 0.5
        patches = torch.where(flipped, patches.flip(3), patches)
    sub = p - p // 16  # the sub-crop side
    if crop and sub < p:
        top, left = torch.randint(0, p - sub + 1, (2, n, 1), device=device)
        r = torch.arange(p, device=device)
        rows, cols = (r >= top) & (r < top + sub), (r >= left) & (r < left + sub)  # [n, p]
        patches = patches * (rows[:, :, None] & cols[:, None, :])[:, None]
    if drop and ch == 3:
        keep = torch.randint(0, 3, (n,), device=device)
        patches = patches * F.one_hot(keep, 3).to(patches.dtype)[:, :, None, None]
    return patches


def other_ranks(t: torch.Tensor) -> torch.Tensor:
    """The other processes' rows of t [B, ...] -> [(W-1)B, ...], differentiable: gradients of
    this process's loss flow back to the process that computed them (the negatives are the
    whole global batch, so 2 processes == 1 process on the same batch)."""
    if C.get_world_size() == 1:
        return t[:0]
    everyone, r, b = C.gather_with_grad(t), C.get_rank(), len(t)  # [W*B, ...] in rank order
    return torch.cat([everyone[: r * b], everyone[(r + 1) * b :]])


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x,), _, _ = batch
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, h = model(x)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd}
    return {**stats, "grad_norm": grad_norm, "z": (h,)}  # monitored: pooled patch features (1 view)


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the encoder's patch embeddings mean-pooled over the grid
    [CPC v1 §3.2] (DEVIATION: CPC v2's exact linear-eval input not verified)."""
    return C.unwrap(model).encode(x).mean((2, 3))


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the patch encoder [CPC v2 §4]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
@dataclass
class Args(C.RunArgs):
    """CPC v2's fields: the defaults are the ImageNet recipe; recipe() sets the CIFAR preset's
    (named in each help text). Fine-tuning: C.RunArgs' (SimCLR v2's; none in the CPC code)."""

    # --img-size 0 on ImageNet: 256 [CPC v1 §3.2: 256 px crops -> 7x7 grid of 64 px patches]
    IMG_SIZES = {"imagenet": 256, "folder": 256, "stl10": 96}
    arch: str = arg(
        "resnet50", "patch encoder [CPC v2 §4: ResNet-50]; CIFAR resnet18", choices=C.ARCHS
    )
    epochs: int = ge0(200, "epochs [DEVIATION: the paper's count not verified here]; CIFAR 1000")
    batch_size: int = gt0(
        512, "GLOBAL batch [CPC v1 §3.2: 32 GPUs x 16; pl_bolts ImageNet: 3072]; CIFAR 64"
    )
    # lr: the pl_bolts docs results table (Adam 4e-5 at batch 3072 for its 54.82% ImageNet row, as
    # for its CIFAR-10 row), not the parser comment "imagenet: 4e-4", which also disagrees with
    # the table on CIFAR-10 (1e-5 vs 4e-5) and produced no reported number
    lr: float = ge0(4e-5, "Adam lr, unscaled [ref: pl_bolts docs self_supervised.rst]; CIFAR 4e-5")
    wd: float = ge0(1e-5, "Adam L2 on ALL params [ref: pl_bolts cpc_module configure_optimizers]")
    betas: tuple = arg(
        (0.8, 0.999), "Adam betas [ref: pl_bolts cpc_module configure_optimizers]", range="[0, 1)"
    )
    adam_eps: float = gt0(1e-7, "Adam eps [ref: pl_bolts cpc_module.py configure_optimizers]")
    warmup_epochs: int = ge0(0, "linear warm-up, then a constant lr [ref: pl_bolts: no scheduler]")
    patch_size: int = ge0(0, "patch side, stride = half (0: img/4) [CPC v1 §3.2: 64/32 of 256]")
    aug: str = arg(
        "crop",
        "image aug: crop = random crop of the image resized x300/256 + flip [CPC v1 §3.2]; CIFAR "
        "jitter = translate, colour jitter, gray [ref: pl_bolts CPCTrainTransformsCIFAR10]",
        choices=("crop", "jitter"),
    )
    color_drop: bool = arg(True, "per patch keep 1 of 3 colour channels [CPC v2 §4.1 'RC']")
    patch_flip: bool = arg(True, "per patch horizontal flip, p=0.5 [CPC v2 §4.1 'PA']")
    patch_crop: bool = arg(True, "per patch random 15/16 sub-crop, padded back [CPC v1 §3.2]")
    context_dim: int = gt0(256, "context network width [CPC v2 App. A pixelCNN: 256]")
    context_blocks: int = ge0(5, "context residual blocks [CPC v2 App. A pixelCNN: 5]")
    target_dim: int = gt0(64, "target/prediction dim [CPC v2 App. A: target_dim=64]")
    emb_scale: float = gt0(0.1, "predictions x this (= 1/temperature) [CPC v2 App. A emb_scale]")
    min_step: int = gt0(3, "first row offset predicted [CPC v2 App. A: steps_to_ignore=2]")
    max_step: int = gt0(3, "last offset [CPC v2 App. A: steps_to_predict=3; v1 §3.2: up to 5]")
    directions: int = arg(
        4, "1: top-down (v1); 2: + bottom-up; 4: + left/right [CPC v2 §4.1]", choices=(1, 2, 4)
    )
    linear_epochs: int = ge0(90, "epochs [DEVIATION: CPC v2 protocol not verified]; CIFAR 100")
    linear_lr: float = ge0(0.1, "linear lr per 256, cosine [DEVIATION: SimCLR README protocol]")
    linear_wd: float = ge0(0.0, "linear-eval weight decay [DEVIATION: SimCLR CIFAR protocol]")
    linear_batch_size: int = gt0(1024, "global batch [DEVIATION: SimCLR-style]; CIFAR 512")
    linear_nesterov: bool = arg(True, "Nesterov momentum 0.9 [ref: simclr model.py]")
    linear_milestones: tuple = ge0((), "linear lr x0.1 epochs (empty: cosine) [ref: simclr]")
    linear_decay: float = unit(0.1, "linear lr milestone factor, unused: cosine [ref: simclr]")
    linear_epoch_lr: bool = arg(
        False, "linear lr per step, cosine [ref: simclr model_util.learning_rate_schedule]"
    )
    linear_best: bool = arg(False, "linear top-1 of the last epoch [ref: simclr train_then_eval]")
    linear_zero_init: bool = arg(
        True, "zero-initialised linear head [ref: simclr README --zero_init_logits_layer=True]"
    )

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset (one version: CPC v2)."""
        r = {}
        if preset == "cifar":  # [ref: pl_bolts docs self_supervised.rst CPCv2 CIFAR-10 row]
            # Adam 4e-5, batch 64, 1000 epochs, 8 px patches / stride 4 (patch_size 0 = 32 / 4)
            r.update(arch="resnet18", batch_size=64, lr=4e-5, epochs=1000, aug="jitter")
            # DEVIATION: ResNet-18 (GroupNorm) instead of pl_bolts' CPC-ResNet-101 (LayerNorm);
            # CPC v2's per-patch augmentation kept (pl_bolts has none)
            r.update(linear_epochs=100, linear_batch_size=512)
            r.update(ft_batch_size=C.FT_CIFAR_BATCH)  # DEVIATION: C.FT_CIFAR_BATCH
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        C.check_pair(self, "betas", ordered=False)
        if self.min_step > self.max_step:
            C.fail(f"--min-step {self.min_step}: above --max-step {self.max_step}; pass <= it")
        S = self.img_size
        p = self.patch_size or S // 4
        C.check_patch(self, C.vit_patch(S), "--patch-size", p, cnn=2)  # stride p // 2 >= 1
        grid = (S - p) // (p // 2) + 1 if p <= S else 0
        if self.max_step >= grid:
            why = f"{S} px images give a {grid}x{grid} patch grid, too small to predict rows"
            what = f"--max-step < {grid}, a larger --img-size or a smaller --patch-size"
            C.fail(f"--patch-size {p}: {why} {self.min_step}..{self.max_step} ahead; pass {what}")


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
def cpc_augment(size: int, mean_std, aug: str) -> T.Compose:
    """Image-level augmentation before the patch grid; the per-patch part runs in the model."""
    if aug == "crop":  # 256 px crops of the image resized to 300 px, flip [CPC v1 §3.2]
        ops = [T.Resize((size * 300 // 256,) * 2), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:  # flip, translate +-S/8 with reflection, jitter, gray [ref: pl_bolts CIFAR transforms]
        shift = T.RandomCrop(size, padding=size // 8, padding_mode="reflect")
        ops = [T.Resize((size, size)), T.RandomHorizontalFlip(), T.RandomApply([shift], p=0.8)]
        ops += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8), T.RandomGrayscale(0.25)]
    return C.to_tensor(ops, mean_std)


@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # one view, mean/std-normalised; its ops (resize, plain crop, padded shift) have no batched
    # twin: it runs on the CPU workers everywhere
    ms = C.dataset_mean_std(args)
    data = C.build_data(args, C.MultiView([cpc_augment(args.img_size, ms, args.aug)]), ms)
    args.patch_size = args.patch_size or args.img_size // 4
    C.prepare_run(args)
    model = CPC(args).to(device)  # no BatchNorm anywhere: nothing to synchronise
    warmup = args.warmup_epochs * args.steps_per_epoch
    args.sched = {"lr": C.cosine_schedule(args.lr, args.lr, args.total_steps, warmup)}
    fused = {"fused": True} if device.type == "cuda" else {}
    # Adam on every parameter, wd as L2 added to the gradient (torch Adam) [ref: pl_bolts
    # cpc_module.py configure_optimizers: Adam(self.parameters(), betas, weight_decay, eps)]
    kw = {"betas": tuple(args.betas), "eps": args.adam_eps, "weight_decay": args.wd, **fused}
    optimizer = torch.optim.Adam(model.parameters(), args.lr, **kw)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
