"""InstDisc - Unsupervised Feature Learning via Non-Parametric Instance Discrimination (Wu, Xiong,
Yu, Lin, CVPR 2018) https://arxiv.org/abs/1805.01978
Reference code: zhirongw/lemniscate.pytorch (lib/NCEAverage.py, lib/NCECriterion.py,
lib/LinearAverage.py, main.py, cifar.py, test.py)
Objective (§3.1-3.2): P(i|f) = exp(v_i.f/tau) / Z with v_i the stored bank row of
image i; NCE: L = -log P/(P + K/N) - sum_{K noise rows} log (K/N)/(P_noise + K/N), Z fixed after
the first batch; or (K = 0) the exact N-way softmax over the bank.
vs moco.py: (1) negatives and positives come from a memory BANK with one row per training image
(the positive is image i's stored row v_i), not from a queue of keys and a momentum encoder;
(2) the bank row is updated after use to normalise(0.5 v_i + 0.5 f_i): a momentum on the
features, not on the weights; (3) one augmented view per image, no key encoder, so no
shuffle-BN (per-process BN); (4) NCE with K=4096 uniform noise rows and a fixed Z (or the exact
softmax over all N rows) instead of InfoNCE; (5) the paper's evaluation is a weighted kNN on the
128-d embedding against the bank itself (bank_knn_top1) or recomputed (embed_knn_top1).
Run: torchrun --nproc_per_node=8 instdisc.py --preset imagenet --dataset imagenet --data-dir /path
     python instdisc.py                      (CIFAR-10 preset, one process)
"""

# ==== 0. imports ==========================================================================
import json
import math
import os
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import common as C
from common import arg, frac, ge0, gt0, unit  # Args fields with their legal ranges


# ==== 1. model: heads + InstDisc(nn.Module), all method state as persistent buffers =======
class InstDisc(nn.Module):
    """backbone -> Linear(feat, 128) -> l2 norm, no MLP [ref: models/resnet.py fc + l2norm]. The
    memory bank holds one row per training image; z is the NCE normaliser."""

    def __init__(self, args: "Args", n: int):
        super().__init__()
        self.tau, self.k = args.tau, args.nce_k
        self.backbone, self.feat_dim = C.build_backbone(args.arch, args.img_size)
        self.projector = nn.Linear(self.feat_dim, args.dim)  # the fc layer [InstDisc §3.1]
        # uniform in +-1/sqrt(D/3), NOT normalised (norm ~1) until first written [ref:
        # NCEAverage.py / LinearAverage.py memory]
        s = 1 / math.sqrt(args.dim / 3)
        self.register_buffer("bank", torch.rand(n, args.dim) * 2 * s - s)
        # the NCE normaliser Z; < 0 until estimated on the first batch [ref: NCEAverage params[2]]
        self.register_buffer("z", torch.tensor(-1.0, dtype=torch.float64))
        self.z_host = None  # z as a Python float, read once per process (no per-step host sync)
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "z_host", None))

    def forward(self, x: torch.Tensor, idx: torch.Tensor):
        f = F.normalize(self.projector(self.backbone(x)), dim=1)  # [B, D]
        if not self.k:
            return nce_loss(f, self.bank, idx, self.tau, None, None), f
        # k noise rows per sample, uniform with replacement (may hit the positive) [ref:
        # NCEAverage.py: AliasMethod over uniform unigrams], from torch's global RNG
        noise = torch.randint(len(self.bank), (len(f), self.k), device=f.device)  # [B, K]
        if self.z_host is None:  # Z: estimated on the first batch's scores, then fixed
            if self.z.item() < 0:
                self.z.fill_(estimate_z(f.detach(), self.bank, idx, noise, self.tau))
            self.z_host = self.z.item()
        return nce_loss(f, self.bank, idx, self.tau, noise, self.z_host), f


# --init: main.py's checkpoint {state_dict (DataParallel: module.) of models/resnet.py, fc -> 128,
# optimizer}, cifar.py's {net: models/resnet_cifar.py, linear -> 128, shortcut}; both lemniscate
# (its state dict: memory; params[2] = Z, estimated anew here)
RELEASE = {
    "state_dict.module.": "backbone.",
    "state_dict.module.fc.": "projector.",
    "net.module.": "backbone.",
    "net.module.linear.": "projector.",
    "net.module.layer1.0.shortcut.": "backbone.layer1.0.downsample.",
    "net.module.layer2.0.shortcut.": "backbone.layer2.0.downsample.",
    "net.module.layer3.0.shortcut.": "backbone.layer3.0.downsample.",
    "net.module.layer4.0.shortcut.": "backbone.layer4.0.downsample.",
    "lemniscate.memory": "bank",
    "lemniscate.params": None,
    "optimizer.": None,
}


# ==== 2. loss: nce_loss(...) -> Tensor, pure, fp32 inside =================================
def nce_scores(f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, noise, tau: float):
    """s = v.f / tau for the positive row bank[idx] (column 0) and the noise rows bank[noise]
    [ref: NCEAverage.py forward: idx.select(1, 0).copy_(y), bmm(weight, x) / T] -> [B, 1 + K]."""
    rows = torch.cat([idx[:, None], noise], dim=1)  # [B, 1 + K]
    return torch.einsum("bkd,bd->bk", bank[rows].float(), f.float()) / tau


def log_mean_exp(s: torch.Tensor) -> torch.Tensor:
    """log mean exp(s) over every element on every process (equal sizes), no gradient."""
    lme = torch.logsumexp(s.detach().flatten(), 0) - math.log(s.numel())
    return torch.logsumexp(C.gather_no_grad(lme[None]), 0) - math.log(C.get_world_size())


def nce_loss(f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, tau: float, noise, z):
    """f: [B, D] l2-normalised features of this process; bank: [N, D] stored rows (constants: no
    gradient reaches them); idx: [B] dataset indices (the positives); noise: [B, K] noise rows.
    Mean over the B samples. noise given: binary NCE [InstDisc §3.2; ref: NCECriterion.py],
    P = exp(s)/z, noise prob 1/N: -log P_pos/(P_pos + K/N + 1e-7) - sum_noise log
    (K/N)/(P_noise + K/N + 1e-7); z None: z = N * mean exp(s) over this batch's B x (1 + K)
    scores, averaged over processes [ref: NCEAverage.py, Z < 0]. noise None: the exact softmax,
    cross-entropy of f @ bank.T / tau against idx [ref: LinearAverage.py + nn.CrossEntropyLoss];
    z unused. Computed in log space."""
    with torch.autocast(f.device.type, enabled=False):
        f, bank, n = f.float(), bank.detach(), len(bank)  # the bank: constants
        if noise is None:
            return F.cross_entropy(f @ bank.float().T / tau, idx)  # [B, N] logits
        k, s = noise.shape[1], nce_scores(f, bank, idx, noise, tau)  # s: [B, 1 + K]
        log_z = log_mean_exp(s) + math.log(n) if z is None else math.log(z)
        log_p = s - log_z  # log P(i|f) = s - log Z
        log_den = torch.logaddexp(log_p, torch.full_like(log_p, math.log(k / n + 1e-7)))
        pos = log_p[:, 0] - log_den[:, 0]  # log P(D=1 | positive)
        noise_term = (math.log(k / n) - log_den[:, 1:]).sum(1)  # log P(D=0 | noise rows)
        return -(pos + noise_term).mean()


# ==== 3. method state: @torch.no_grad() update_bank / estimate_z ==========================
@torch.no_grad()
def update_bank(model: InstDisc, f: torch.Tensor, idx: torch.Tensor, bank_m: float):
    """v_i <- normalise(bank_m * v_i + (1 - bank_m) * f_i) [InstDisc §3.3; ref: NCEAverage.py
    backward]. The features and indices of ALL processes are gathered (no gradient) and every
    rank writes the same rows, so the banks stay identical. In place."""
    f, idx = C.gather_no_grad(f.float()), C.gather_no_grad(idx)  # [W*B, D], [W*B]
    rows = F.normalize(bank_m * model.bank[idx] + (1 - bank_m) * f, dim=1)
    model.bank.index_copy_(0, idx, rows.to(model.bank.dtype))


@torch.no_grad()
def estimate_z(f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, noise, tau: float):
    """Z = N * mean exp(v.f / tau) over the positive and noise rows of every sample of the global
    batch (the same scores as the first loss), as a float [ref: NCEAverage.py: params[2] =
    out.mean() * outputSize]."""
    log_z = log_mean_exp(nce_scores(f, bank, idx, noise, tau)) + math.log(len(bank))
    return math.exp(log_z.item())  # float64 on the host: no overflow at small tau


# ==== 4. train_step(model, batch, optimizer, scaler, step, args) -> dict[str, float] ======
def train_step(model, batch, optimizer, scaler, step: int, args: "Args") -> dict:
    (x,), _, idx = batch
    net = C.unwrap(model)
    lr = args.sched["lr"][step]
    C.set_lr(optimizer, lr)
    with C.autocast(args):
        loss, f = model(x, idx)
    grad_norm = C.optimizer_step(loss, optimizer, scaler)
    update_bank(net, f, idx, args.bank_m)  # after the loss: the positive was the stored row
    stats = {"loss": loss.detach(), "lr": lr, "wd": args.wd, "tau": args.tau}
    if net.k:
        stats["nce_z"] = net.z.clone()
    return {**stats, "grad_norm": grad_norm, "z": (f,)}  # monitored: the embeddings (1 view)


def features(model, x: torch.Tensor) -> torch.Tensor:
    """What kNN and linear eval read: the backbone output h (the paper's conv features)."""
    return C.unwrap(model).backbone(x)


def encoder(model) -> nn.Module:
    """What fit exports (backbone.pth, torchvision names): the backbone, without the fc layer."""
    return C.unwrap(model).backbone


# ==== 5. config: Args(C.RunArgs): the method's cited fields, recipe(), check() ============
@dataclass
class Args(C.RunArgs):
    """InstDisc's fields: the defaults are the paper's ImageNet recipe; recipe() sets the CIFAR
    preset's (named in each help text); fine-tuning: C.RunArgs' (none in the InstDisc code)."""

    arch: str = arg(
        "resnet50",
        "backbone [ref: README ResNet-50 model; main.py default R18]; CIFAR resnet18",
        choices=C.ARCHS,
    )
    epochs: int = ge0(200, "epochs [ref: main.py --epochs 200]")
    batch_size: int = gt0(256, "GLOBAL batch [ref: main.py -b 256]; CIFAR 128 [ref: cifar.py]")
    lr: float = ge0(0.03, "SGD lr, not scaled with the batch [ref: main.py --lr 0.03, README]")
    wd: float = ge0(
        1e-4, "weight decay, all params [ref: main.py --wd 1e-4]; CIFAR 5e-4 [ref: cifar.py]"
    )
    lr_milestones: tuple = ge0(
        (120, 160),
        "x0.1 lr at these epochs, set per epoch [ref: main.py, cifar.py adjust_learning_rate]",
    )
    warmup_epochs: int = ge0(0, "linear warm-up epochs [ref: none in main.py, cifar.py]")
    tau: float = gt0(
        0.07, "temperature [InstDisc §3.1; ref: --nce-t 0.07]; CIFAR 0.1 [ref: cifar.py]"
    )
    nce_k: int = ge0(
        4096,
        "noise rows K; 0: exact softmax over the bank [ref: main.py --nce-k]; CIFAR 0 "
        "[ref: README]",
    )
    bank_m: float = arg(  # m = 1: the bank would never change
        0.5, "bank momentum: v <- norm(m v + (1-m) f) [§3.3; ref: --nce-m 0.5]", range="[0, 1)"
    )
    dim: int = gt0(128, "embedding dim [InstDisc §3.1; ref: main.py --low-dim 128]")
    crop_min: float = frac(0.2, "min crop scale [ref: main.py RandomResizedCrop scale=(0.2, 1)]")
    aug: str = arg(
        "imagenet",
        "imagenet: gray, jitter, flip [ref: main.py]; cifar: jitter, gray, no flip [ref: cifar.py]"
        "; CIFAR cifar",
        choices=("imagenet", "cifar"),
    )
    linear_epochs: int = ge0(
        100, "linear-eval epochs (DEVIATION: lemniscate has no probe; moco main_lincls.py's)"
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
        """Fields that differ from the defaults above for this preset (InstDisc has one version)."""
        r = {}
        if preset == "cifar":  # [ref: lemniscate cifar.py + README "--nce-k 0 --nce-t 0.1"]
            r.update(arch="resnet18", batch_size=128, wd=5e-4, tau=0.1, nce_k=0, aug="cifar")
            # lr 0.03, 200 epochs, x0.1 at 120 and 160 (lr * 0.1 ** ((epoch - 80) // 40)): as above
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


# ==== 7. the paper's kNN: the 128-d embedding against the memory bank =====================
def embed(model, x: torch.Tensor) -> torch.Tensor:
    """The 128-d l2-normalised embedding f, what the official kNN reads [ref: test.py net(x)]."""
    net = C.unwrap(model)
    return F.normalize(net.projector(net.backbone(x)), dim=1)


@torch.no_grad()
def paper_knn(model, data, args) -> dict:
    """The paper's evaluation [InstDisc §3.4; ref: test.py kNN(K=200, sigma=nce_t)]: weighted
    kNN of the test images' 128-d embeddings, top-1 in %, against (bank_knn_top1) the memory
    BANK rows, as main.py's final kNN (recompute_memory=0), and (embed_knn_top1) the training
    images' embeddings recomputed under the test transform in eval(), cifar.py's final "last
    accuracy" (recompute_memory=1). Labels of the training images from the dataset."""
    net, base = C.unwrap(model), data.train.dataset
    ys = base.tensors[1] if isinstance(base, C.ArrayImages) else getattr(base, "targets", None)
    ys = torch.as_tensor(base.labels if ys is None else ys)[torch.tensor(data.train.indices)]
    ys, t = ys.to(net.bank.device), args.tau  # sigma = the training temperature
    net.eval()
    test, test_y = C.extract(lambda x: embed(net, x), data.test, args)
    recomputed = C.knn_eval(lambda x: embed(net, x), data, replace(args, knn_t=t))
    net.train()
    known = ys >= 0  # STL-10's unlabeled images have label -1
    scores = C.knn_predict(test, net.bank[known], ys[known], data.num_classes, args.knn_k, t)
    bank_top1 = (scores.argmax(1) == test_y).float().mean().item() * 100
    return {"bank_knn_top1": bank_top1, "embed_knn_top1": recomputed, "k": args.knn_k, "t": t}


# ==== 8. main(args) =======================================================================
@C.one_run_per_out_dir  # the out-dir lock that C.prepare_run takes ends with main()
def main(args: Args):
    device = C.setup_ddp(args)
    # one view per image; mean/std-normalised [ref: main.py; DEVIATION: cifar.py's CIFAR std
    # is (0.2023, 0.1994, 0.2010), common.py's the exact (0.2470, 0.2435, 0.2616)]. On a GPU
    # (--pipeline auto) C.BatchAugment runs this recipe batched on the device.
    ms, scale = C.dataset_mean_std(args), (args.crop_min, 1.0)
    if args.aug == "imagenet":  # gray 0.2, then jitter 0.4 always, flip [ref: main.py] = MoCo v1
        aug = C.moco_augment(args.img_size, ms, "v1", scale)
    else:  # jitter first, then gray, NO flip [ref: cifar.py: RandomHorizontalFlip commented out]
        knobs = {"jitter": (0.4,) * 4, "jitter_p": 1.0, "flip_p": 0.0}
        aug = C.augmentation(args.img_size, ms, scale=scale, **knobs)
    data = C.build_data(args, C.MultiView([aug]), ms)
    if not 0 <= args.nce_k < len(data.train):
        C.fail(
            f"--nce-k {args.nce_k} is not in [0, {len(data.train)}) (the training images); "
            "pass fewer noise rows, or 0 for the exact softmax"
        )
    C.prepare_run(args)
    model = InstDisc(args, len(data.train)).to(device)  # per-process BN, as DataParallel's
    spe, T = args.steps_per_epoch, args.total_steps
    warm = args.warmup_epochs * spe
    args.sched = {"lr": C.step_schedule(args.lr, T, spe, args.lr_milestones, (), warm)}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    # wd on all params [ref: main.py optim.SGD(model.parameters(), ...)]
    optimizer = torch.optim.SGD(params, args.lr, momentum=0.9, weight_decay=args.wd, **fused)
    fit(model, optimizer, data, args)
    if args.knn_every and data.test is not None and not args.eval_dir:  # the paper's kNN (the
        # memory bank holds --data-dir's images: with --eval-dir, no labels of its own)
        record = paper_knn(model, data, args)
        if args.is_main:
            line = json.dumps(record)
            print(line)
            with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main(C.parse_args(Args))
