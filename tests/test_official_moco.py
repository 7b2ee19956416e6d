"""Official-loop parity for moco.py.

MoCo v1/v2: the training step of facebookresearch/moco (moco/builder.py MoCo.forward,
main_moco.py train / adjust_learning_rate and its torch.optim.SGD) restated in plain PyTorch.
MoCo v3: facebookresearch/moco-v3 (moco/builder.py MoCo.forward / contrastive_loss,
moco/optimizer.py LARS, main_moco.py train / adjust_learning_rate / adjust_moco_momentum); the
CIFAR preset takes solo-learn's optimizer, restated from vturrisi/solo-learn (solo/utils/lars.py,
solo/utils/lr_scheduler.py, solo/methods/base.py defaults). Each reference runs beside the
project's real `train_step` (model, optimizer and `args.sched` exactly as `moco.main` builds them)
for a few CPU steps from the same weights on the same inputs. Nothing below calls the project's
loss, optimizer, schedule, EMA or queue ops; only the initial modules (deep copies), the initial
queue and the inputs are shared. Shuffle-BN in one process: both sides run the project's
documented split-BN emulation (SplitBatchNorm modules, deep-copied) on the same permutation,
and with --bn-splits 1 plain BN.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import built_by_main
from torch import nn

import moco

B, N_IMG = 16, 32  # global batch; 32 images: 2 steps per epoch, so the per-epoch lr moves
STEPS = 5
ENC = {"q": ("backbone", "projector"), "k": ("momentum_backbone", "momentum_projector")}


def built(tmp_path, monkeypatch, *flags):
    """model, optimizer and args (with args.sched) exactly as moco.main builds them."""
    model, opt, args, _ = built_by_main(
        moco, monkeypatch, tmp_path, "--subset", N_IMG, "--batch-size", B, *flags
    )
    assert args.steps_per_epoch == N_IMG // B
    return model, opt, args


def close(a, b, msg="", scale=None):
    """rtol 1e-5 with an absolute floor of 1e-5 x the tensor's magnitude (max |ref|, or `scale`):
    5 steps of two different float summation orders differ by up to ~3e-6 of it (measured)."""
    b = torch.as_tensor(b, dtype=a.dtype)
    if not (b.numel() and b.is_floating_point()):
        return torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)
    atol = 1e-5 * max(b.abs().max().item() if scale is None else scale, 1e-30)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{msg}: {m}")


def inputs(steps=STEPS):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(B, 3, 16, 16, generator=g), torch.rand(B, 3, 16, 16, generator=g))
            for _ in range(steps)]  # fmt: skip


def run_project(model, opt, args, xs):
    scaler, out = torch.amp.GradScaler("cpu", enabled=False), []
    for k, (x1, x2) in enumerate(xs):
        torch.manual_seed(1000 + k)  # the key permutation (v1/v2): the same draw as the reference
        out.append(moco.train_step(model, ([x1, x2], None, None), opt, scaler, k, args))
    return [s["loss"].item() for s in out]


def compare_modules(model, ref, names):
    for n in names:
        want = ref[n].state_dict()
        for k, v in getattr(model, n).state_dict().items():  # parameters and BN buffers
            # a BN running mean's scale is the feature's std: after a BN without affine (v3
            # projector -> predictor) the batch means are 0 up to float noise
            var = (
                want.get(k.replace("running_mean", "running_var")) if "running_mean" in k else None
            )
            scale = (
                max(want[k].abs().max().item(), var.max().sqrt().item())
                if var is not None
                else None
            )
            close(v, want[k], f"{n}.{k}", scale)


def sgd_momentum(opt, model, names, bufs):
    for n in names:
        for k, p in getattr(model, n).named_parameters():
            if p.requires_grad:
                buf, ref = opt.state[p][bufs[0]], bufs[1][f"{n}.{k}"]
                close(buf, ref, f"momentum of {n}.{k}")


# ==== MoCo v1/v2: facebookresearch/moco ========================================================
class OfficialMoCo:
    """moco/builder.py MoCo with encoder_q = (backbone, projector), encoder_k = the momentum copy
    (deep copies of the project's initialised modules), queue [dim, K] as the official buffer."""

    def __init__(self, model, args):
        self.nets = {n: copy.deepcopy(getattr(model, n)) for ns in ENC.values() for n in ns}
        self.encoder_q = nn.Sequential(*(self.nets[n] for n in ENC["q"]))
        self.encoder_k = nn.Sequential(*(self.nets[n] for n in ENC["k"]))
        self.queue = model.queue.T.clone()  # [dim, K]: official layout; same initial values
        self.queue_ptr = torch.zeros(1, dtype=torch.long)
        self.K, self.m, self.T = len(model.queue), args.m, args.tau

    @torch.no_grad()
    def _momentum_update_key_encoder(self):  # builder.py: param_k = param_k*m + param_q*(1-m)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):  # builder.py (concat_all_gather: one process)
        ptr = int(self.queue_ptr)
        assert self.K % keys.shape[0] == 0
        self.queue[:, ptr : ptr + keys.shape[0]] = keys.T
        self.queue_ptr[0] = (ptr + keys.shape[0]) % self.K

    def forward(self, im_q, im_k):
        # builder.py MoCo.forward: q first, then (no grad) the momentum update, the shuffled key
        # forward (_batch_shuffle_ddp on one process: randperm, its argsort to restore), logits
        # [l_pos, q @ queue] / T, labels 0, then _dequeue_and_enqueue inside the forward
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            idx_shuffle = torch.randperm(im_k.shape[0])
            idx_unshuffle = torch.argsort(idx_shuffle)
            k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


def official_v1v2_lr(epoch, lr, args, cos):
    # main_moco.py adjust_learning_rate, called once per epoch before train()
    if cos:
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    for milestone in args.lr_milestones:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


@torch.no_grad()
def official_sgd(params, bufs, lr, wd, momentum=0.9):
    # main_moco.py: torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=wd) on every
    # parameter (the key encoder's have no grad): d = g + wd p; buf = d (first) | mom buf + d
    for name, p in params:
        if p.grad is None:
            continue
        d = p.grad + wd * p
        bufs[name] = d.clone() if name not in bufs else momentum * bufs[name] + d
        p.sub_(lr * bufs[name])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("bn_splits", [1, 4])
def test_official_v1v2_step_parity(tmp_path, monkeypatch, version, bn_splits):
    """5 steps over 3 epochs of the ImageNet preset (SGD, wd 1e-4, v1 step / v2 cosine per epoch),
    m 0.9 so the EMA is visible, K = 64: loss, every parameter of both encoders, the SGD momentum,
    the queue, its pointer and every BN buffer agree with the official step."""
    flags = ["--preset", "imagenet", "--version", version, "--epochs", 3, "--m", 0.9]
    flags += ["--queue-size", 64, "--dim", 16, "--bn-splits", bn_splits, "--lr", 4.8]
    flags += ["--lr-milestones", 1, 2] if version == "v1" else []
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    assert (args.wd, args.optimizer) == (1e-4, "sgd") and (args.tau == 0.07) == (version == "v1")
    ref, xs = OfficialMoCo(model, args), inputs()
    params = [(f"{n}.{k}", p) for n in ENC["q"] for k, p in ref.nets[n].named_parameters()]
    bufs, ref_losses = {}, []
    lr0 = args.lr * B / 256  # --lr at this batch [ref: moco README, linear lr scaling]
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train()
        lr = official_v1v2_lr(k // args.steps_per_epoch, lr0, args, cos=version == "v2")
        assert args.sched["lr"][k] == pytest.approx(lr, rel=1e-12), k
        torch.manual_seed(1000 + k)
        logits, labels = ref.forward(x1, x2)
        loss = F.cross_entropy(logits, labels)  # criterion = nn.CrossEntropyLoss()
        for _, p in params:
            p.grad = None  # optimizer.zero_grad()
        loss.backward()
        official_sgd(params, bufs, lr, args.wd)
        ref_losses.append(loss.item())
    T = args.total_steps  # the whole schedule, per epoch as adjust_learning_rate
    lrs = [
        official_v1v2_lr(s // args.steps_per_epoch, lr0, args, version == "v2") for s in range(T)
    ]
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses")
    compare_modules(model, ref.nets, [*ENC["q"], *ENC["k"]])
    sgd_momentum(opt, model, ENC["q"], ("momentum_buffer", bufs))
    close(model.queue, ref.queue.T, "queue")
    assert model.queue_ptr.item() == ref.queue_ptr.item() == STEPS * B % 64


# ==== MoCo v3: facebookresearch/moco-v3 (+ solo-learn's optimizer for the CIFAR preset) =========
V3 = {"base": ("backbone", "projector"), "m": ("momentum_backbone", "momentum_projector")}


def official_v3_forward(ref, x1, x2, m, T):
    # moco-v3 builder.py MoCo.forward: q1, q2 = predictor(base_encoder(x)), then (no grad) the
    # momentum update and k1, k2 = momentum_encoder(x); contrastive_loss(q1, k2) + (q2, k1)
    base = nn.Sequential(*(ref[n] for n in V3["base"]))
    mom = nn.Sequential(*(ref[n] for n in V3["m"]))
    q1, q2 = ref["predictor"](base(x1)), ref["predictor"](base(x2))
    with torch.no_grad():  # _update_momentum_encoder: param_m = param_m * m + param_b * (1 - m)
        for pb, pm in zip(base.parameters(), mom.parameters()):
            pm.data = pm.data * m + pb.data * (1.0 - m)
        k1, k2 = mom(x1), mom(x2)

    def contrastive_loss(q, k):  # normalise, gather keys (one process), logits / T, labels
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)  # arange(N) + N * rank (rank 0)
        logits = torch.einsum("nc,mc->nm", q, k) / T
        labels = torch.arange(logits.shape[0], dtype=torch.long) + logits.shape[0] * 0
        return F.cross_entropy(logits, labels) * (2 * T)

    return contrastive_loss(q1, k2) + contrastive_loss(q2, k1)


def official_v3_lr(epoch, lr, args):
    # moco-v3 main_moco.py adjust_learning_rate(epoch + i / iters_per_epoch): warm-up from 0
    if epoch < args.warmup_epochs:
        return lr * epoch / args.warmup_epochs
    w = args.warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (args.epochs - w)))


def official_v3_m(epoch, args):
    # moco-v3 main_moco.py adjust_moco_momentum (--moco-m-cos); solo-learn's MomentumUpdater
    # (base_tau 0.99 -> final_tau 1.0 by cosine over the steps) computes the same values
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs)) * (1.0 - args.m)


def solo_lrs(base, total, warmup, start=3e-5):
    # solo-learn LinearWarmupCosineAnnealingLR.get_lr (chainable; stepped every step,
    # interval "step"; warmup_start_lr 3e-5, min_lr 0 [base.py defaults])
    out = [start]
    for t in range(1, total):
        prev = out[-1]
        if t < warmup:
            out.append(prev + (base - start) / (warmup - 1))
        elif t == warmup:
            out.append(base)
        else:
            n = total - warmup
            ratio = (1 + math.cos(math.pi * (t - warmup) / n)) / (
                1 + math.cos(math.pi * (t - warmup - 1) / n)
            )
            out.append(ratio * prev)
    return out


@torch.no_grad()
def official_lars(params, bufs, lr, wd, momentum=0.9, eta=1e-3):
    # moco-v3 moco/optimizer.py LARS.step over model.parameters(): ndim > 1: dp = g + wd p,
    # q = eta |p| / |dp| where both norms > 0, else 1; mu = momentum mu + dp; p -= lr mu
    for name, p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=wd)
            pn, un = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(pn)
            q = torch.where(pn > 0.0, torch.where(un > 0, eta * pn / un, one), one)
            dp = dp.mul(q)
        mu = bufs.setdefault(name, torch.zeros_like(p))
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


@torch.no_grad()
def solo_lars(params, bufs, lr, wd, momentum=0.9, eta=0.02, eps=1e-8):
    # solo-learn solo/utils/lars.py LARS.step, mocov3.yaml kwargs clip_lr True, eta 0.02,
    # exclude_bias_n_norm True (1-D params: no wd, no adaptation); buffer = clone(d_p) first
    for name, p in params:
        d_p = p.grad
        pn, gn = torch.norm(p.data), torch.norm(p.grad.data)
        if p.ndim != 1 and pn != 0 and gn != 0:
            lars_lr = eta * pn / (gn + pn * wd + eps)
            lars_lr = min(lars_lr / lr, 1)  # clip_lr
            d_p = d_p.add(p, alpha=wd) * lars_lr
        if name not in bufs:
            bufs[name] = torch.clone(d_p).detach()
        else:
            bufs[name].mul_(momentum).add_(d_p)
        p.add_(bufs[name], alpha=-lr)


@pytest.mark.parametrize("preset", ["imagenet", "cifar"])
def test_official_v3_step_parity(tmp_path, monkeypatch, preset):
    """5 steps of v3 (smallcnn, BN-MLP projector and predictor): imagenet = moco-v3's LARS
    (eta 1e-3) and warm-up from 0 at 1 warm-up epoch (2 steps) then cosine; cifar = solo-learn's
    LARS (eta 0.02, trust capped at 1/lr) and warm-up from 3e-5 over 2 epochs (4 steps). m 0.5 ->
    1 by cosine so the EMA is visible. Loss, every parameter, the LARS momentum and every BN
    buffer agree with the reference; the whole lr and m schedules match the official formulas."""
    solo = preset == "cifar"
    flags = ["--preset", preset, "--version", "v3", "--hidden-dim", 32, "--dim", 16, "--m", 0.5]
    flags += ["--epochs", 4, "--warmup-epochs", 2 if solo else 1, "--lr", 3.0 if solo else 10.0]
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    assert args.optimizer == "lars" and args.lars_solo == solo and args.m_cos
    assert (args.wd, args.tau) == (1e-6, 0.2 if solo else 1.0)
    names = (*V3["base"], "predictor", *V3["m"])
    ref, xs = {n: copy.deepcopy(getattr(model, n)) for n in names}, inputs()
    online = (*V3["base"], "predictor")
    params = [(f"{n}.{k}", p) for n in online for k, p in ref[n].named_parameters()]
    spe, T, lr0 = args.steps_per_epoch, args.total_steps, args.lr * B / 256  # lr * batch / 256
    if solo:
        lrs = solo_lrs(lr0, T, args.warmup_epochs * spe)
    else:  # main_moco.py: epoch + i / iters_per_epoch, for every step
        lrs = [official_v3_lr(s / spe, lr0, args) for s in range(T)]
    assert lrs[0] == (3e-5 if solo else 0.0)
    close(torch.tensor(args.sched["lr"], dtype=torch.float64), lrs, "lr schedule")
    ms = [official_v3_m(s / spe, args) for s in range(T)]
    close(torch.tensor(args.sched["m"], dtype=torch.float64), ms, "m schedule")
    bufs, ref_losses = {}, []
    for k, (x1, x2) in enumerate(xs):  # main_moco.py train(): lr and m per iteration
        loss = official_v3_forward(ref, x1, x2, ms[k], args.tau)
        for _, p in params:
            p.grad = None
        loss.backward()
        step = solo_lars if solo else official_lars
        step(params, bufs, lrs[k], args.wd)
        ref_losses.append(loss.item())
    losses = run_project(model, opt, args, xs)
    close(torch.tensor(losses), ref_losses, "losses")
    compare_modules(model, ref, names)
    sgd_momentum(opt, model, online, ("mu", bufs))
