"""SwAV official-loop parity: facebookresearch/swav main_swav.py's training step, restated here in
plain PyTorch from the official code (cited per block), runs beside swav.train_step with the
optimizer and lr schedule that swav.main builds, from the same initial weights on the same
multi-crop batches: losses, every parameter, every buffer (BN statistics, the queue) and the
momentum buffers agree to float precision. The reference calls nothing of swav.py's loss,
Sinkhorn, queue, prototype, optimizer or schedule code; it shares only the initial modules."""

import copy
import math

import helpers
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common as C
import swav

B, LOCAL, STEPS = 8, 2, 5
# 2 steps per epoch (16 images / batch 8): warm-up steps 0-3, cosine from step 4; the queue (2
# batches) is filled at steps 2-3 and used at step 4; prototypes frozen at steps 0-2
FLAGS = ["--preset", "imagenet", "--arch", "smallcnn", "--subset", 16, "--batch-size", B]
FLAGS += ["--hidden-dim", 32, "--dim", 8, "--n-prototypes", 16, "--n-local", LOCAL]
FLAGS += ["--epochs", 10, "--warmup-epochs", 2, "--queue-length", 2 * B]
FLAGS += ["--epoch-queue-starts", 1, "--freeze-prototypes-niters", 3]


def built_by_main(monkeypatch, tmp_path, *flags):
    """swav.main as it runs, stopped where it calls fit: the model, optimizer and args."""
    return helpers.built_by_main(swav, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
class OfficialNet(nn.Module):
    """[ref: src/resnet50.py ResNet.forward / forward_head] the crops in runs of equal
    resolution (torch.unique_consecutive of the widths, cumsum), one backbone pass per run,
    concatenated; then projection_head, l2-normalise (normalize=True), prototypes (no bias)."""

    def __init__(self, backbone, projection_head, prototypes):
        super().__init__()
        self.backbone, self.projection_head, self.prototypes = backbone, projection_head, prototypes

    def forward(self, inputs):
        widths = torch.tensor([x.shape[-1] for x in inputs])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0).tolist()
        feats = [self.backbone(torch.cat(inputs[s:e])) for s, e in zip([0, *ends[:-1]], ends)]
        x = F.normalize(self.projection_head(torch.cat(feats)), dim=1, p=2)
        return x, self.prototypes(x)


@torch.no_grad()
def official_sinkhorn(out, epsilon, n_iters, world_size=1):
    """[ref: main_swav.py distributed_sinkhorn] (one process: the all_reduces are identities)"""
    Q = torch.exp(out / epsilon).t()  # [K, B]
    Bn, K = Q.shape[1] * world_size, Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)  # each prototype row -> total 1 ...
        Q /= K  # ... then 1/K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # each sample column -> 1 ...
        Q /= Bn  # ... then 1/B
    Q *= Bn  # columns sum to 1: assignments
    return Q.t()


class ApexLARC:
    """[ref: NVIDIA apex parallel/LARC.py LARC.step; main_swav.py: LARC(SGD(all params, momentum
    0.9, weight_decay=wd), trust_coefficient=0.001, clip=False); eps 1e-8 default]: the wrapped
    SGD's weight decay is taken out of it and folded into the adapted gradient of EVERY param."""

    def __init__(self, optim, trust_coefficient=0.001, eps=1e-8):
        self.optim, self.tc, self.eps = optim, trust_coefficient, eps
        self.param_groups = optim.param_groups

    @torch.no_grad()
    def step(self):
        decays = []
        for group in self.optim.param_groups:
            decays.append(group["weight_decay"])
            wd, group["weight_decay"] = group["weight_decay"], 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                if p_norm != 0 and g_norm != 0:
                    adaptive_lr = self.tc * p_norm / (g_norm + p_norm * wd + self.eps)
                    p.grad.data += wd * p.data
                    p.grad.data *= adaptive_lr
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd


def official_lr_schedule(a, iters_per_epoch):
    """[ref: main_swav.py main] np.linspace warm-up, then cosine over the remaining iterations."""
    warm = np.linspace(a.start_warmup, a.lr, iters_per_epoch * a.warmup_epochs)
    n = iters_per_epoch * (a.epochs - a.warmup_epochs)
    cos = [
        a.final_lr + 0.5 * (a.lr - a.final_lr) * (1 + math.cos(math.pi * t / n)) for t in range(n)
    ]
    return np.concatenate((warm, np.array(cos)))


class OfficialLoop:
    """[ref: main_swav.py main + train] the state across iterations: the queue (None until the
    epoch epoch_queue_starts begins, then zeros [2, queue_length / world, feat_dim]) and
    use_the_queue (reset to False at the start of every train() call, i.e. every epoch)."""

    def __init__(self, net, a):
        self.net, self.a = net, a
        sgd = torch.optim.SGD(net.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd)
        self.optimizer = ApexLARC(sgd, trust_coefficient=0.001)
        self.lr_schedule = official_lr_schedule(a, a.steps_per_epoch)
        self.queue, self.use_the_queue, self.crops_for_assign = None, False, [0, 1]

    def step(self, inputs, iteration):
        a, net = self.a, self.net
        epoch, it = divmod(iteration, a.steps_per_epoch)
        if it == 0:  # [ref: main loop] "optionally starts a queue"; train() resets use_the_queue
            if a.queue_length > 0 and epoch >= a.epoch_queue_starts and self.queue is None:
                self.queue = torch.zeros(2, a.queue_length // a.world_size, a.dim)
            self.use_the_queue = False
        # [ref: train] "update learning rate"
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule[iteration]
        # [ref: train] "normalize the prototypes"
        with torch.no_grad():
            w = F.normalize(net.prototypes.weight.data.clone(), dim=1, p=2)
            net.prototypes.weight.copy_(w)
        # [ref: train] multi-res forward passes
        embedding, output = net(inputs)
        embedding, bs, n_crops = embedding.detach(), inputs[0].size(0), len(inputs)
        # [ref: train] swav loss: per assigned crop, codes (with the queue), then the queue fill
        loss = 0
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id : bs * (crop_id + 1)].detach()
                if self.queue is not None:
                    if self.use_the_queue or not torch.all(self.queue[i, -1, :] == 0):
                        self.use_the_queue = True
                        out = torch.cat((self.queue[i] @ net.prototypes.weight.t(), out))
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
                q = official_sinkhorn(out, a.eps, a.sinkhorn_iters)[-bs:]
            subloss = 0
            for v in np.delete(np.arange(n_crops), crop_id):
                x = output[bs * v : bs * (v + 1)] / a.tau
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (n_crops - 1)
        loss /= len(self.crops_for_assign)
        # [ref: train] backward, "cancel gradients for the prototypes", step
        self.optimizer.optim.zero_grad()
        loss.backward()
        if iteration < a.freeze_prototypes_niters:
            for name, p in net.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        self.optimizer.step()
        return loss.detach()


# ==== parity ================================================================================
# The projection head's first bias feeds a BatchNorm, which subtracts it again: its gradient is
# zero but for rounding (~1e-8 of its weight's), and LARC rescales that noise to a step of
# lr x 0.001 x |bias| (in the official code as here), so the two runs move it in different
# random directions. It is checked by that bound instead, the gradient by its size, and the
# BN's running mean (which the bias shifts) after removing the predicted shift.
NOISE, NOISE_BN = "projector.0.bias", "projector.1.running_mean"


def close(actual, expected, what):
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    atol = 1e-5 * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def official_name(name):
    return name.replace("projector.", "projection_head.")


def test_train_step_matches_the_official_loop(monkeypatch, tmp_path):
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS)
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.img_size == 16
    net = OfficialNet(
        *(copy.deepcopy(m) for m in (model.backbone, model.projector, model.prototypes))
    )
    ref = OfficialLoop(net, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as fit builds it (no fp16)
    p_ref, b_ref = dict(net.named_parameters()), dict(net.named_buffers())
    grads = {}  # the raw gradients (before LARC rescales them in place)
    for n in (NOISE, "projector.0.weight"):
        hook = lambda g, n=n: grads.__setitem__(n, g.norm().item())  # noqa: E731
        p_ref[official_name(n)].register_hook(hook)
    g, shift, bound = torch.Generator().manual_seed(0), 0.0, 0.0
    for step in range(STEPS):
        views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
        views += [torch.randn(B, 3, 8, 8, generator=g) for _ in range(LOCAL)]
        bias = p_ref[official_name(NOISE)].detach()
        shift = 0.9 * shift + 0.1 * (model.projector[0].bias.detach() - bias)  # BN momentum 0.1
        bound += 2 * args.sched["lr"][step] * 0.001 * bias.norm().item() / (1 - 0.9)
        stats = swav.train_step(model, (views, None, None), optimizer, scaler, step, args)
        loss = ref.step([v.clone() for v in views], step)
        close(stats["loss"], loss, f"loss at step {step}")
        assert optimizer.param_groups[0]["lr"] == ref.lr_schedule[step] == args.sched["lr"][step]
        assert stats["queue"] == float(ref.use_the_queue)
        assert grads[NOISE] < 1e-5 * grads["projector.0.weight"]  # zero but for rounding
        for n, p in model.named_parameters():
            r, m_ref = (
                p_ref[official_name(n)],
                ref.optimizer.optim.state.get(p_ref[official_name(n)], {}),
            )
            assert ("momentum_buffer" in m_ref) == (p in optimizer.state), n
            if n == NOISE:
                assert (p - r).norm() <= bound, f"{n}: {(p - r).norm()} > {bound}"
                continue
            close(p.detach(), r.detach(), f"{n} after step {step}")
            if p in optimizer.state:
                close(optimizer.state[p]["momentum_buffer"], m_ref["momentum_buffer"], f"m {n}")
        for n, b in model.named_buffers():
            want = b_ref.get(official_name(n), ref.queue)
            if n == "queue" and ref.queue is None:  # not created yet: the buffer stays empty
                want = torch.zeros_like(b)
            close(b - shift if n == NOISE_BN else b, want, f"{n} after step {step}")
    # the test covered what it claims: the queue used at the last step, prototypes trained
    assert ref.use_the_queue and stats["queue"] == 1.0
    assert model.prototypes.weight in optimizer.state
    assert [round(x, 6) for x in args.sched["lr"][:5]] == [0.3, 1.8, 3.3, 4.8, 4.8]


def test_lr_schedule_is_the_official_one_at_the_presets():
    """The whole per-step schedule of both presets at their real steps per epoch (ImageNet:
    1281167 // 4096; CIFAR-10: 50000 // 256) against main_swav.py's numpy one."""
    for preset, spe in (("imagenet", 1281167 // 4096), ("cifar", 50000 // 256)):
        a = C.parse_args(swav.Args, ["--preset", preset])
        a.steps_per_epoch, a.total_steps = spe, spe * a.epochs
        got, want = np.array(swav.lr_schedule(a)), official_lr_schedule(a, spe)
        assert got.shape == want.shape == (a.total_steps,)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        w = spe * a.warmup_epochs  # base reached at the last warm-up step, and again after it
        assert got[0] == a.start_warmup and got[w - 1] == got[w] == a.lr
