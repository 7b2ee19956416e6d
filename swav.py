"""SwAV - Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (Caron, Misra,
Mairal, Goyal, Bojanowski, Joulin, NeurIPS 2020) https://arxiv.org/abs/2006.09882
Reference code: facebookresearch/swav (main_swav.py train / distributed_sinkhorn, src/resnet50.py,
src/multicropdataset.py, eval_linear.py, scripts/swav_800ep_pretrain.sh; apex parallel/LARC.py)
Objective (Eq. 1-2, multi-crop §3.2): L = 1/2 sum_{i in 2 global crops} 1/(V-1) sum_{v != i}
-sum_k q_i[k] log softmax(z_v . c / tau)[k]; q_i = Sinkhorn-Knopp codes of crop i (no gradient).
vs dino.py: (1) no teacher network: the targets q are codes of the SAME network's prototype scores,
made equipartitioned over the global batch by 3 Sinkhorn-Knopp iterations (DINO: an EMA teacher,
centred and sharpened); (2) head: 2-layer MLP -> 128-d l2-normalised z, scored against 3000
l2-normalised prototypes (DINO: 3-layer MLP + weight-normed 65536-d layer); (3) prototypes
frozen for the first 313 iterations (DINO: last layer frozen in epoch 0); (4) 6 local crops of
96 px, the 2 global ones assigned; (5) a per-process queue of past z for small batches; (6) SGD
wrapped in LARC at batch 4096, lr 4.8 (DINO: AdamW, wd schedule, gradient clipping).
Run: torchrun --nproc_per_node=8 swav.py --preset imagenet --dataset imagenet --data-dir /path
     python swav.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import os
import warnings
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + SwAV(nn.Module), all method state as persistent buffers ===========
class SwAV(nn.Module):
    """backbone -> projector Linear(+bias) -> BN -> ReLU -> Linear(+bias) -> l2-normalise = z ->
    prototypes (Linear, no bias, rows kept unit-norm) = scores [ref: resnet50.py projection_head,
    prototypes]. `queue` [2, queue_length / world_size, dim]: past z of the 2 assigned crops of
    THIS process (per rank, saved per rank), rows newest first [ref: main_swav.py queue]."""

    per_rank = ("queue",)

    def __init__(self, args: "Args"):
        super().__init__()
        self.backbone, self.feat_dim = C.build_backbone(
            args.arch, args.img_size, args.zero_init_residual
        )
        self.projector = nn.Sequential(
            nn.Linear(self.feat_dim, args.hidden_dim),
            nn.BatchNorm1d(args.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(args.hidden_dim, args.dim),
        )
        self.prototypes = nn.Linear(args.dim, args.n_prototypes, bias=False)
        rows = args.queue_length // args.world_size
        self.register_buffer("queue", torch.zeros(2, rows, args.dim))
        # rows filled so far, on the host: read from the device once per process, not per step
        self.queue_rows = None
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "queue_rows", None))

    def forward(self, views: list):
        """views: crops of one batch, consecutive crops of one size share a backbone pass (BN
        statistics per resolution, as the official); one head pass -> z [V*B, D], scores [V*B, K],
        crop-major (rows v*B .. (v+1)*B-1 are crop v)."""
        h = [self.backbone(torch.cat(list(g))) for _, g in groupby(views, lambda v: v.shape[-1])]
        z = F.normalize(self.projector(torch.cat(h)), dim=1)
        return z, self.prototypes(z)


# --init: main_swav.py's checkpoint {state_dict (DDP: module.), optimizer}, hubconf.py's releases
RELEASE = {"module.": "backbone.", "module.projection_head.": "projector."}
RELEASE["module.prototypes."] = "prototypes."
RELEASE.update({"state_dict." + k: v for k, v in RELEASE.items()})
RELEASE["optimizer."] = None


# ==== 2. loss: sinkhorn(...) codes, swav_loss(...) -> Tensor, pure, fp32 inside ===========
@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp codes [SwAV §3.1; ref: main_swav.py distributed_sinkhorn]. scores [B, K]
    (this process's rows) -> Q [B, K], rows summing to 1, prototypes equipartitioned over the
    GLOBAL batch (N = B x world_size rows): the total and per-prototype sums are all-reduced, the
    per-sample sums local. fp32 (exp(1 / 0.05) overflows fp16), no gradient. The global max is
    subtracted before exp (the first normalisation cancels it); clamps act only at official 0/0."""
    world, tiny = C.get_world_size(), torch.finfo(torch.float32).tiny

    def all_sum(t, op=dist.ReduceOp.SUM):
        if world > 1:  # crosses processes: the Q total and the prototype (row) sums
            dist.all_reduce(t, op=op)
        return t

    with torch.autocast(scores.device.type, enabled=False):
        s = scores.detach().float() / eps
        q = torch.exp(s - all_sum(s.max(), dist.ReduceOp.MAX)).T  # [K, B]
        K, N = q.shape[0], q.shape[1] * world
        q /= all_sum(q.sum()).clamp_min(tiny)
        for _ in range(n_iters):
            q /= all_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny) * K  # prototype mass 1/K
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny) * N  # sample mass 1/N
        return (q * N).T  # [B, K]: rows sum to 1 (soft assignments)


def swav_loss(scores: list[torch.Tensor], q: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Swapped prediction [SwAV Eq. 1-2, §3.2; ref: main_swav.py train]. scores: per crop [B, K]
    (z . prototypes); q: codes [B, K] of the first len(q) crops (targets, no gradient). The mean
    over assigned crops i, other crops v of -sum_k q_i log softmax(scores_v / tau), batch mean."""
    with torch.autocast(scores[0].device.type, enabled=False):
        logp = [F.log_softmax(s.float() / tau, dim=1) for s in scores]
        loss = 0.0
        for i, q_i in enumerate(q):
            q_i = q_i.detach().float()
            ce = [-(q_i * lp).sum(1).mean() for v, lp in enumerate(logp) if v != i]
            loss = loss + sum(ce) / (len(scores) - 1)
        return loss / len(q)


# ==== 3. method state: @torch.no_grad() normalize_prototypes / enqueue ====================
@torch.no_grad()
def normalize_prototypes(model: SwAV):
    """Prototype rows back to unit norm, in place, before every step's forward [SwAV §4.1; ref:
    main_swav.py "normalize the prototypes"]; the gradient is taken w.r.t. unit-norm rows."""
    model.prototypes.weight.copy_(F.normalize(model.prototypes.weight, dim=1))


@torch.no_grad()
def enqueue(queue: torch.Tensor, z: torch.Tensor):
    """FIFO: queue [2, R, D] shifts by B rows, the new z [2, B, D] goes first [ref: main_swav.py
    "fill the queue"]; done after the codes, so a batch never meets itself in Sinkhorn."""
    b = z.shape[1]
    queue[:, b:] = queue[:, :-b].clone()
    queue[:, :b] = z


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
class LARC(torch.optim.Optimizer):
    """apex LARC (trust 0.001, clip False) around SGD momentum 0.9 [ref: main_swav.py; apex
    parallel/LARC.py], on EVERY parameter (biases and BN too, unlike C.LARS): where |p| and |g|
    are > 0, g <- (g + wd p) tc |p| / (|g| + wd |p| + eps), else g unchanged (no decay either);
    then SGD: m <- 0.9 m + g; p -= lr m. Tensor math only (no host sync)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eps": 1e-8}
        super().__init__(params, {**defaults, "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            wd, tc = g["weight_decay"], g["trust_coefficient"]
            for p in (p for p in g["params"] if p.grad is not None):
                pn, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                rate = tc * pn / (gn + wd * pn + g["eps"])
                d = torch.where((pn > 0) & (gn > 0), (p.grad + wd * p) * rate, p.grad)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                p.add_(buf.mul_(g["momentum"]).add_(d), alpha=-g["lr"])


def lr_schedule(args: "Args") -> list:
    """Per-step lr [ref: main_swav.py lr_schedule]: np.linspace(start_warmup, lr, w) over w =
    warmup_epochs x steps_per_epoch steps (lr reached AT the last warm-up step), then final +
    (lr - final)(1 + cos(pi t / n)) / 2 for t = 0 .. n - 1, n = total - w."""
    w = args.warmup_epochs * args.steps_per_epoch
    return C.cosine_schedule(args.lr, args.final_lr, args.total_steps, w, args.start_warmup, True)


def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    views, _, _ = batch
    net, B = C.unwrap(model), len(views[0])
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    normalize_prototypes(net)
    with C.autocast(args):
        z, scores = model(views)  # [V*B, D], [V*B, K]
    z_a = z.detach().float()[: 2 * B].view(2, B, -1)  # the 2 global (assigned) crops
    # the queue: filled from epoch_queue_starts on, used once full (its last row non-zero)
    # [ref: main_swav.py use_the_queue]; the filled rows are counted, not read, per step
    on = net.queue.shape[1] > 0 and step >= args.epoch_queue_starts * args.steps_per_epoch
    if on and net.queue_rows is None:
        net.queue_rows = int(net.queue[0].any(1).sum())  # unit z rows: none is all zeros
    use_queue = on and net.queue_rows >= net.queue.shape[1]
    q = []
    for i in range(2):  # codes of each global crop, prepended queue scores with the current
        s = scores[i * B : (i + 1) * B].detach()  # prototypes, the batch rows kept
        if use_queue:
            s = torch.cat([net.queue[i] @ net.prototypes.weight.detach().T, s.float()])
        q.append(sinkhorn(s, args.eps, args.sinkhorn_iters)[-B:])  # [B, K]
    if on:
        enqueue(net.queue, z_a)
        net.queue_rows = min(net.queue_rows + B, net.queue.shape[1])
    loss = swav_loss(list(scores.split(B)), q, args.tau)
    # frozen prototypes: grad dropped after backward (no momentum, no wd) [ref: main_swav.py]
    frozen = step < args.freeze_prototypes_niters
    hook = (lambda: setattr(net.prototypes.weight, "grad", None)) if frozen else None
    grad_norm = C.optimizer_step(loss, optimizer, scaler, hook=hook)
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "queue": float(use_queue)}
    return {**stats, "grad_norm": grad_norm, "z": z[: 2 * B].chunk(2)}  # monitored: 2 global crops


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h (pooled) [ref: eval_linear.py]."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone [ref: eval_linear.py]."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
@dataclass
class Args(C.RunArgs):
    """SwAV's fields: the defaults are the official ImageNet recipe (800 epochs, batch 4096);
    recipe() sets the CIFAR preset's (named in each help text)."""

    arch: str = arg("resnet50", "net [SwAV §4; ref: resnet50.py]; CIFAR resnet18", choices=C.ARCHS)
    zero_init_residual: bool = arg(False, "zero-init last BN gamma per block [ref: resnet50.py]")
    epochs: int = ge0(800, "epochs [SwAV Tab. 1, 75.3%; ref: swav_800ep_pretrain.sh]; CIFAR 1000")
    batch_size: int = gt0(4096, "GLOBAL batch [SwAV §4.1; ref: 64 GPUs x 64]; CIFAR 256")
    lr: float = ge0(4.8, "ABSOLUTE lr, not x B [ref: --base_lr 4.8; bs256 scripts 0.6]; CIFAR 0.6")
    final_lr: float = ge0(0.0048, "cosine ends here [ref: --final_lr, 800ep script]; CIFAR 0.0006")
    warmup_epochs: int = ge0(10, "linspace from start_warmup, then cosine [ref: scripts]; CIFAR 10")
    start_warmup: float = ge0(0.3, "warm-up starts at this lr [ref: --start_warmup 0.3]; CIFAR 0")
    wd: float = ge0(1e-6, "weight decay on ALL params incl. biases/BN [ref: --wd, SGD + LARC]")
    tau: float = gt0(0.1, "softmax temperature [SwAV Eq. 2; ref: --temperature]")
    eps: float = gt0(0.05, "Sinkhorn entropy weight [SwAV §3.1; ref: --epsilon]")
    sinkhorn_iters: int = gt0(3, "Sinkhorn iterations [SwAV §3.1; ref: --sinkhorn_iterations]")
    dim: int = gt0(128, "z dim [SwAV §4.1; ref: --feat_dim]")
    hidden_dim: int = gt0(2048, "projector hidden dim [ref: hidden_mlp 2048]")
    n_prototypes: int = gt0(3000, "number of prototypes K [SwAV §4.1; ref: --nmb_prototypes]")
    queue_length: int = ge0(0, "z queue, global, k x B (0: none) [ref: 4096 runs: 0]; CIFAR 3840")
    epoch_queue_starts: int = ge0(15, "queue fills from then [ref: --epoch_queue_starts]; CIFAR 50")
    freeze_prototypes_niters: int = ge0(313, "frozen N steps [ref: main_swav.py]; CIFAR 390")
    n_local: int = ge0(6, "local crops (+ 2 global, both assigned) [SwAV §3.2; ref: --nmb_crops]")
    local_size: int = ge0(0, "local crop px (0: img_size x 96/224, min 8) [ref: --size_crops 96]")
    global_scale: tuple = frac((0.14, 1.0), "scale [ref: --min/max_scale_crops]; CIFAR 0.2 1.0")
    local_scale: tuple = frac((0.05, 0.14), "scale [ref: --min/max_scale_crops]; CIFAR 0.08 0.5")
    blur: bool = arg(True, "blur p=0.5 on every crop [ref: multicropdataset.py]; off on CIFAR")
    linear_epochs: int = ge0(100, "linear-eval epochs [ref: eval_linear.py --epochs]")
    linear_lr: float = ge0(0.3, "linear lr at batch 256 (8 x 32) [ref: eval_linear.py --lr]")
    linear_wd: float = ge0(1e-6, "linear-eval weight decay [ref: eval_linear.py --wd]")
    linear_batch_size: int = gt0(256, "global batch [ref: eval_linear.py 32 x 8]; CIFAR 512")
    linear_nesterov: bool = arg(False, "Nesterov momentum [ref: eval_linear.py --nesterov]")
    linear_milestones: tuple = ge0(
        (), "linear lr decay epochs (empty: cosine) [ref: eval_linear.py --scheduler_type cosine]"
    )
    linear_decay: float = unit(0.1, "lr factor per milestone [ref: eval_linear.py --gamma]")
    linear_epoch_lr: bool = arg(True, "lr once per epoch [ref: eval_linear.py CosineAnnealingLR]")
    linear_best: bool = arg(True, "report the best epoch's top-1 [ref: eval_linear.py best_acc]")
    linear_zero_init: bool = arg(
        False, "classifier N(0, 0.01), bias 0, no BN [ref: eval_linear.py RegLog, use_bn False]"
    )
    ft_optimizer: str = arg("sgd", "SGD [ref: eval_semisup.py]", choices=C.FT_OPTS)
    ft_lr_scaling: str = arg("linear", "lr x batch/256 [ref: eval_semisup.py]", choices=C.SCALINGS)
    ft_epochs: tuple = gt0((20, 20), "fine-tuning epochs at 1% / 10% [ref: eval_semisup.py]")
    ft_batch_size: int = gt0(256, "fine-tuning global batch [ref: eval_semisup.py 32 x 8]")
    ft_lr: tuple = ge0((0.02, 0.01), "backbone lr x batch/256 at 1% / 10% [ref: README --lr]")
    ft_head_lr: tuple = ge0((5.0, 0.2), "head lr x batch/256 [ref: README --lr_last_layer]")
    ft_milestones: tuple = ge0((12, 16), "lr x --ft-decay from [ref: eval_semisup.py MultiStepLR]")
    ft_decay: float = unit(0.2, "lr factor per milestone [ref: eval_semisup.py MultiStepLR]")
    ft_epoch_lr: bool = arg(True, "lr set once per epoch [ref: eval_semisup.py]")
    ft_head_init: str = arg("torch", "nn.Linear's init [ref: eval_semisup.py]", choices=C.HEADS)
    ft_best: bool = arg(True, "top-1 of the best epoch [ref: eval_semisup.py best_acc]")

    @staticmethod
    def recipe(version: str = "", preset: str = "cifar", arch: str = "") -> dict:
        """Fields that differ from the defaults above for this preset (SwAV has one version)."""
        r = {}
        if preset == "cifar":  # [ref: solo-learn scripts/pretrain/cifar-multicrop/swav.yaml]
            r.update(arch="resnet18", batch_size=256, epochs=1000)  # wd 1e-6 as ImageNet
            # lr as the official batch-256 recipe (0.6 -> 0.0006) [ref: swav_400ep_bs256 script;
            # solo-learn 0.6 / min_lr 0.0006]; solo's 10 warm-up epochs start from ~0
            # DEVIATION: solo-learn's LARS (eta 0.02, lr clipped, no biases/BN); here apex LARC
            r.update(lr=0.6, final_lr=0.0006, warmup_epochs=10, start_warmup=0.0)
            # queue 3840 from epoch 50; prototypes frozen 2 epochs = 2 x 195 steps [ref: solo-learn]
            r.update(queue_length=3840, epoch_queue_starts=50, freeze_prototypes_niters=390)
            # crops 2 x 32 (0.2, 1) + 6 local (0.08, 0.5) [ref: cifar-multicrop augmentations/
            # swav.yaml, local 18 px]; DEVIATION: local side 3/7 of img_size as SwAV's 96/224
            # (14 px), SwAV's jitter on every crop, no blur at 32 px (solo: 0 global, 0.1 local)
            r.update(global_scale=(0.2, 1.0), local_scale=(0.08, 0.5), blur=False)
            r.update(linear_batch_size=512)  # no official CIFAR protocol: eval_linear.py's
        return r

    def check(self):
        """The limits over several fields, after each field's range (C.parse_args calls it)."""
        C.check_pair(self, "global_scale")
        C.check_pair(self, "local_scale")
        if self.batch_size < 2:  # Sinkhorn spreads each prototype's mass equally over the batch
            C.fail(
                f"--batch-size {self.batch_size}: the codes of one sample are all 1/K; pass >= 2"
            )
        if self.n_local:
            C.check_patch(self, 0, "--local-size", self.local_size)


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
    # 2 global + n_local local crops, mean/std-normalised [ref: multicrop]. On a GPU (--pipeline
    # auto) C.BatchAugment runs this recipe batched on the device.
    ms = C.dataset_mean_std(args)
    kw = {"jitter": (0.8, 0.8, 0.8, 0.2), "blur_p": 0.5 if args.blur else 0.0}
    g = C.augmentation(args.img_size, ms, scale=tuple(args.global_scale), **kw)
    loc = C.augmentation(args.local_size, ms, scale=tuple(args.local_scale), **kw)
    data = C.build_data(args, C.multicrop_augment(g, loc, 2, args.n_local), ms)
    B = args.batch_size  # after build_data's check of the batch against the data size
    if args.queue_length % B:  # the official code cuts it to k
        k, why = args.queue_length // B * B or B, f"not a multiple of the global batch {B}"
        C.fail(f"--queue-length {args.queue_length}: {why}; pass a multiple, e.g. {k}")
    C.prepare_run(args)
    # SyncBN everywhere, global (DEVIATION: the 4096 runs synced apex BN in groups of 8 GPUs)
    model = C.convert_sync_bn(SwAV(args)).to(device)
    args.sched = {"lr": lr_schedule(args)}
    params = [p for p in model.parameters() if p.requires_grad]  # all of them, one group
    optimizer = LARC(params, lr=args.lr, weight_decay=args.wd)
    fit(model, optimizer, data, args)


if __name__ == "__main__":
    main(C.parse_args(Args))
