"""InvaSpread - Unsupervised Embedding Learning via Invariant and Spreading Instance Feature (Ye,
Zhang, Yuen, Chang, CVPR 2019) https://arxiv.org/abs/1904.03436
Reference code: mangye16/Unsupervised_Embedding_Learning (BatchAverage.py BatchCriterion,
demo_seen.py, models/resnet_cifar.py, datasets/cifar.py)
Objective (§3; ref: BatchCriterion, negM = 1): P_ij = exp(f_i.f_j/tau) / sum_{k != i}
exp(f_i.f_k/tau) over the 2N rows of both views; L = -(1/2N) sum_i [log P_{i,pos(i)} +
sum_{j != i, pos(i)} log(1 - P_ij)], every column (the other side of each similarity) detached.
vs simclr.py: (1) besides the softmax term, a binary "spreading" term log(1 - P_ij) pushes every
negative away; (2) gradients flow only through the anchor (row) side of every similarity, the
columns and the positive are detached, so the gather crosses processes WITHOUT gradient; (3) the
head is one Linear -> 128 + l2 norm, no MLP, no BN; (4) per-process BN over both views (no
SyncBN); (5) SGD lr 0.03, batch 128, step decay, CIFAR-scale recipe (no ImageNet one exists);
(6) the paper's kNN reads the 128-d embedding (embed_knn_top1), the monitor the backbone.
Run: torchrun --nproc_per_node=8 invaspread.py --preset imagenet --dataset imagenet --data-dir /path
     python invaspread.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import json
import os
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + InvaSpread(nn.Module), all method state as persistent buffers =====
class InvaSpread(nn.Module):
    """backbone -> Linear(feat, 128) -> l2 norm [ref: models/resnet_cifar.py linear + l2norm]."""

    def __init__(self, args: "Args"):
        super().__init__()
        self.backbone, self.feat_dim = C.build_backbone(args.arch, args.img_size)
        self.projector = nn.Linear(self.feat_dim, args.dim)
        self.tau = args.tau

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        # both views in one pass, as the official cat((inputs1, inputs2)): BN statistics over the
        # 2B views of this process (on one GPU the same as the official DataParallel)
        z1, z2 = F.normalize(self.projector(self.backbone(torch.cat([x1, x2]))), dim=1).chunk(2)
        return invaspread_loss(z1, z2, self.tau), (z1, z2)


RELEASE = {}  # none released (its own resnet_cifar.py names) [ref: demo_seen.py saves {"net"}]


# ==== 2. loss: invaspread_loss(...) -> Tensor, pure, fp32 inside ==========================
def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate near 0 and at -inf (-> 0)."""
    return torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def invaspread_loss(f1: torch.Tensor, f2: torch.Tensor, tau: float) -> torch.Tensor:
    """[InvaSpread §3; ref: BatchAverage.py BatchCriterion, negM = 1] f1, f2: [B, D]
    l2-normalised features of the two views on this process. Rows (anchors): the local 2B
    features, WITH gradient. Columns: both views of ALL processes, gathered WITHOUT gradient,
    in the official order [view 1 of the global batch, view 2 of the global batch] -- the
    official code detaches the column side (x.t().data) and the positive (reordered_x.data),
    so the gradient of every similarity flows into its row only and nothing needs a
    differentiable gather. P_ij = softmax over the 2N - 1 other columns (positive included);
    loss_i = -log P_i,pos - sum_{j != i, pos} log(1 - P_ij); mean over the local rows (DDP's
    average makes it the official mean over all 2N rows). Log space: finite for any tau."""
    with torch.autocast(f1.device.type, enabled=False):
        f1, f2 = f1.float(), f2.float()
        B, N = len(f1), len(f1) * C.get_world_size()
        cands = torch.cat([C.gather_no_grad(f1), C.gather_no_grad(f2)])  # [2N, D], detached
        logits = torch.cat([f1, f2]) @ cands.T / tau  # [2B, 2N]
        own = torch.arange(B, device=f1.device) + C.get_rank() * B  # rows of f1 in cands
        self_idx, pos_idx = torch.cat([own, own + N]), torch.cat([own + N, own])
        logits = logits.masked_fill(F.one_hot(self_idx, 2 * N).bool(), float("-inf"))
        log_p = logits.log_softmax(dim=1)  # [2B, 2N], -inf on the own column
        pos = F.one_hot(pos_idx, 2 * N).bool()
        spread = log1mexp(log_p.masked_fill(pos, float("-inf"))).sum(1)  # negatives only
        return -(log_p.gather(1, pos_idx[:, None])[:, 0] + spread).mean()


# ==== 3. method state: none (InvaSpread keeps no state beyond its parameters) =============


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x1, x2), _, _ = batch
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, z = model(x1, x2)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "tau": args.tau}
    return {**stats, "grad_norm": grad_norm, "z": z}  # monitored: the 2 views' embeddings


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h (before the 128-d head)."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone, without the 128-d head."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
@dataclass
class Args(C.RunArgs):
    """InvaSpread's fields. The official code has only the CIFAR-10 / STL-10 setting: the defaults
    below are it; fine-tuning: C.RunArgs' protocol, SimCLR v2's (none in the InvaSpread code)."""

    arch: str = arg("resnet18", "backbone [ref: demo_seen.py ResNet18]", choices=C.ARCHS)
    epochs: int = ge0(301, "epochs [ref: demo_seen.py range(start_epoch, start_epoch + 301)]")
    batch_size: int = gt0(128, "GLOBAL batch, images [ref: demo_seen.py --batch-size 128]")
    lr: float = ge0(0.03, "SGD lr, not scaled with the batch [ref: demo_seen.py --lr; README]")
    wd: float = ge0(5e-4, "weight decay, all params [ref: demo_seen.py optim.SGD]")
    lr_milestones: tuple = ge0((120, 160, 200), "lr steps [ref: adjust_learning_rate]")
    lr_factors: tuple = unit((0.1, 0.05, 0.01), "lr x these from each step [ref: idem]")
    warmup_epochs: int = ge0(0, "linear warm-up epochs [ref: demo_seen.py has none]")
    tau: float = gt0(0.1, "temperature [ref: demo_seen.py --batch-t 0.1; README 0.05-0.1]")
    dim: int = gt0(128, "embedding dim [ref: demo_seen.py --low-dim 128]")
    crop_min: float = frac(0.2, "min crop scale [ref: demo_seen.py RandomResizedCrop (0.2, 1)]")
    linear_epochs: int = ge0(
        100, "linear-eval epochs (DEVIATION: the official repo has no probe; moco main_lincls.py's)"
    )
    linear_lr: float = ge0(30.0, "linear lr per 256 [ref: moco main_lincls.py, the closest]")
    linear_wd: float = ge0(0.0, "linear-eval weight decay [ref: moco main_lincls.py]")
    linear_batch_size: int = gt0(256, "linear-eval global batch [ref: moco main_lincls.py]")
    linear_nesterov: bool = arg(False, "Nesterov momentum [ref: moco main_lincls.py: plain 0.9]")
    linear_milestones: tuple = ge0((60, 80), "linear lr x0.1 epochs [ref: moco main_lincls.py]")
    linear_decay: float = unit(0.1, "linear lr factor per milestone [ref: moco main_lincls.py]")
    linear_epoch_lr: bool = arg(
        True, "linear lr set once per epoch [ref: moco main_lincls.py adjust_learning_rate]"
    )
    linear_best: bool = arg(True, "report the best epoch's top-1 [ref: main_lincls.py best_acc1]")
    linear_zero_init: bool = arg(
        False, "zero-init classifier; off: N(0, 0.01), bias 0 [ref: main_lincls.py fc init]"
    )

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above: none. The defaults ARE the official CIFAR-10
        recipe [ref: demo_seen.py]; there is no ImageNet recipe, so --preset imagenet keeps these
        values (the same augmentation recipe at 224 px, ImageNet stem and mean/std); CIFAR's
        fine-tuning batch aside (DEVIATION: C.FT_CIFAR_BATCH)."""
        return {"ft_batch_size": C.FT_CIFAR_BATCH} if preset == "cifar" else {}

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        if self.batch_size < 2:  # the negatives are the other images of the global batch
            C.fail(f"--batch-size {self.batch_size}: one image has no negatives; pass >= 2")
        if len(self.lr_factors) != len(self.lr_milestones):
            n, ms = len(self.lr_milestones), " ".join(map(str, self.lr_factors))
            C.fail(f"--lr-factors {ms}: not one factor per --lr-milestones epoch ({n}); pass {n}")


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


# ==== 7. the paper's evaluation: kNN on the 128-d embedding ===============================
def embed(model, x: torch.Tensor) -> torch.Tensor:
    """The 128-d l2-normalised embedding, what the official kNN reads [ref: utils.py net(x)]."""
    net = C.unwrap(model)
    return F.normalize(net.projector(net.backbone(x)), dim=1)


@torch.no_grad()
def paper_knn(model, data, args) -> dict:
    """The paper's evaluation [InvaSpread §4.1; ref: utils.py kNN(K=200, sigma=batch_t)]:
    weighted kNN of the test images' 128-d embeddings against the training images' embeddings
    recomputed under the test transform, in eval(). Top-1 in %."""
    net = C.unwrap(model)
    net.eval()
    top1 = C.knn_eval(lambda x: embed(net, x), data, replace(args, knn_t=args.tau))
    net.train()
    return {"embed_knn_top1": top1, "k": args.knn_k, "t": args.tau}


def log_paper_knn(model, data, args):
    """After fit: the paper's kNN (paper_knn), one more record in out-dir/metrics.jsonl."""
    if not args.knn_every or data.test is None:
        return
    record = paper_knn(model, data, args)
    if args.is_main:
        text = json.dumps(record)
        print(text)
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as out:
            out.write(text + "\n")


# ==== 8. main(args) =======================================================================
@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # the SAME random recipe for both views: crop (0.2, 1), jitter 0.4 always, then gray 0.2,
    # flip [ref: demo_seen.py transform_train, datasets/cifar.py img1/img2]; DEVIATION: CIFAR
    # std (0.2470, 0.2435, 0.2616) from common.py, the official uses (0.2023, 0.1994, 0.2010).
    # On a GPU (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    ms = C.dataset_mean_std(args)
    knobs = {"scale": (args.crop_min, 1.0), "jitter": (0.4,) * 4, "jitter_p": 1.0}
    aug = C.augmentation(args.img_size, ms, **knobs)
    data = C.build_data(args, C.MultiView([aug, aug]), ms)
    C.prepare_run(args)
    model = InvaSpread(args).to(device)  # per-process BN (the official: per-GPU DataParallel)
    spe, T = args.steps_per_epoch, args.total_steps
    warm = args.warmup_epochs * spe
    lrs = C.step_schedule(args.lr, T, spe, args.lr_milestones, args.lr_factors, warm)
    args.sched = {"lr": lrs}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    # wd on all params [ref: demo_seen.py optim.SGD(net.parameters(), ...)]
    optimizer = torch.optim.SGD(params, args.lr, momentum=0.9, weight_decay=args.wd, **fused)
    fit(model, optimizer, data, args)
    log_paper_knn(model, data, args)  # the paper's kNN, on the 128-d embedding


if __name__ == "__main__":
    main(C.parse_args(Args))
