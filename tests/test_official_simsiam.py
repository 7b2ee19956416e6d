"""SimSiam official-loop parity: facebookresearch/simsiam's training step (simsiam/builder.py,
main_simsiam.py), restated here in plain PyTorch from the official code (cited per block), runs
beside simsiam.train_step with the optimizer and lr schedule that simsiam.main builds, from the
same initial weights on the same batches: losses, every parameter, every BN statistic and the
momentum buffers agree to float precision. The one difference, the projector's output bias
(official: kept, frozen; here: absent), is shown and bounded: it only shifts the last BN's
running mean. The reference calls nothing of simsiam.py's loss, optimizer or schedule code."""

import copy
import math

import helpers
import torch
from torch import nn

import simsiam

B, STEPS = 8, 5
# the ImageNet recipe (fix_pred_lr, lr 0.05 x B / 256, wd 1e-4, no warm-up) on a tiny model;
# 2 steps per epoch (16 images / batch 8) over 3 epochs, so the per-epoch cosine moves
FLAGS = ["--preset", "imagenet", "--arch", "smallcnn", "--subset", 16, "--batch-size", B]
FLAGS += ["--proj-hidden", 256, "--dim", 64, "--pred-dim", 16]


def built_by_main(monkeypatch, tmp_path, *flags):
    """simsiam.main as it runs, stopped where it calls fit: the model, optimizer and args."""
    return helpers.built_by_main(simsiam, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
class OfficialSimSiam(nn.Module):
    """[ref: simsiam/builder.py SimSiam] encoder = backbone + fc, fc = 3-layer projector whose
    output Linear keeps its (default-initialised) bias with requires_grad False ("hack: not use
    bias as it is followed by BN"), then BN without affine; 2-layer predictor. The weights are
    the project's initial ones (the output bias is the official's own nn.Linear init)."""

    def __init__(self, backbone, projector, predictor):
        super().__init__()
        last = projector[-2]
        fc6 = nn.Linear(last.in_features, last.out_features)  # with bias, as builder.py
        fc6.weight.data.copy_(last.weight.data)
        fc6.bias.requires_grad = False
        fc = nn.Sequential(
            *(copy.deepcopy(m) for m in projector[:-2]), fc6, copy.deepcopy(projector[-1])
        )
        self.encoder = nn.ModuleDict({"body": copy.deepcopy(backbone), "fc": fc})
        self.predictor = copy.deepcopy(predictor)

    def forward(self, x1, x2):
        # [ref: builder.py SimSiam.forward] one encoder pass per view; targets detached
        z1 = self.encoder["fc"](self.encoder["body"](x1))
        z2 = self.encoder["fc"](self.encoder["body"](x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


class OfficialLoop:
    """[ref: main_simsiam.py main_worker + train + adjust_learning_rate]"""

    def __init__(self, net, a):
        self.net, self.a = net, a
        # [ref: main_worker] init_lr = lr x batch / 256; with --fix-pred-lr two groups, the
        # predictor's flagged fix_lr; SGD momentum 0.9, weight decay on every parameter
        self.init_lr = a.lr * a.batch_size / 256
        groups = [
            {"params": net.encoder.parameters(), "fix_lr": False},
            {"params": net.predictor.parameters(), "fix_lr": True},
        ]
        self.optimizer = torch.optim.SGD(groups, self.init_lr, momentum=0.9, weight_decay=a.wd)
        self.criterion = nn.CosineSimilarity(dim=1)

    def adjust_learning_rate(self, epoch):
        """[ref: adjust_learning_rate] once per epoch: cosine of the epoch; fix_lr: init_lr."""
        cur_lr = self.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.a.epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = self.init_lr if group["fix_lr"] else cur_lr

    def step(self, x1, x2, iteration):
        epoch, i = divmod(iteration, self.a.steps_per_epoch)
        if i == 0:  # [ref: main_worker epoch loop] before train() of each epoch
            self.adjust_learning_rate(epoch)
        # [ref: train] loss = -(D(p1, z2).mean() + D(p2, z1).mean()) * 0.5, SGD step
        p1, p2, z1, z2 = self.net(x1, x2)
        loss = -(self.criterion(p1, z2).mean() + self.criterion(p2, z1).mean()) * 0.5
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# ==== parity ================================================================================
def close(actual, expected, what, scale=0.0):
    """~1e-5 relative; atol relative to the magnitude (or to `scale`, that of what it sums)."""
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    atol = 1e-5 * max(expected.abs().max().item(), scale)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


def official_name(name):
    return name.replace("backbone.", "encoder.body.").replace("projector.", "encoder.fc.")


def test_train_step_matches_the_official_loop(monkeypatch, tmp_path):
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS, "--epochs", 3)
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.fix_pred_lr
    torch.manual_seed(1)  # the official output bias: nn.Linear's default init
    net = OfficialSimSiam(model.backbone, model.projector, model.predictor)
    ref = OfficialLoop(net, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as fit builds it (no fp16)
    p_ref, b_ref = dict(net.named_parameters()), dict(net.named_buffers())
    bias = net.encoder["fc"][6].bias.detach().clone()
    assert bias.abs().max() > 0 and not net.encoder["fc"][6].bias.requires_grad
    last_bn = f"projector.{len(model.projector) - 1}.running_mean"
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        x1, x2 = (torch.randn(B, 3, 16, 16, generator=g) for _ in range(2))
        stats = simsiam.train_step(model, ([x1, x2], None, None), optimizer, scaler, step, args)
        loss = ref.step(x1.clone(), x2.clone(), step)
        close(stats["loss"], loss, f"loss at step {step}")
        lrs = [grp["lr"] for grp in optimizer.param_groups]
        assert lrs == [grp["lr"] for grp in ref.optimizer.param_groups], step
        for n, p in model.named_parameters():
            r = p_ref[official_name(n)]
            close(p.detach(), r.detach(), f"{n} after step {step}")
            close(
                optimizer.state[p]["momentum_buffer"], ref.optimizer.state[r]["momentum_buffer"], n
            )
        for n, b in model.named_buffers():
            want = b_ref[official_name(n)]
            # a running mean is measured on inputs of spread sqrt(running var): the predictor's
            # first BN sees W z of zero batch mean, its running mean is pure rounding (~1e-8)
            var = b_ref.get(official_name(n).replace("running_mean", "running_var"))
            scale = var.max().sqrt().item() if n.endswith("running_mean") else 0.0
            if n == last_bn:  # the official's batch means include the bias (2 BN passes a step)
                shift = bias * (1 - 0.9 ** (2 * (step + 1)))
                close(b + shift, want, f"{n} after step {step}", scale)
                torch.testing.assert_close((want - b).abs().max(), shift.abs().max())
                continue
            close(b, want, f"{n} after step {step}", scale)
    # the official frozen bias never moved; the schedule moved per epoch (3 values in 5 steps)
    assert torch.equal(net.encoder["fc"][6].bias, bias)
    base = 0.05 * B / 256
    want = [base * 0.5 * (1 + math.cos(math.pi * (s // 2) / 3)) for s in range(6)]
    assert args.sched["lr"] == want and len(set(want[:STEPS])) == 3


def test_lr_schedule_is_the_official_one_at_the_preset(monkeypatch, tmp_path):
    """The whole per-step schedule at the preset's 100 epochs: main_simsiam.py's
    adjust_learning_rate, evaluated once per epoch, for every step of that epoch."""
    _, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS)
    assert args.epochs == 100 and args.warmup_epochs == 0
    init_lr = 0.05 * B / 256
    cur = [init_lr * 0.5 * (1.0 + math.cos(math.pi * e / 100)) for e in range(100)]
    want = [cur[s // args.steps_per_epoch] for s in range(args.total_steps)]
    assert len(args.sched["lr"]) == len(want)
    torch.testing.assert_close(
        torch.tensor(args.sched["lr"]), torch.tensor(want), rtol=1e-12, atol=0
    )
    assert optimizer.param_groups[1]["fixed_lr"] == init_lr  # the predictor's fix_lr
