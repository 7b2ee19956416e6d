"""SimSiam official-loop parity: facebookresearch/simsiam's training step (simsiam/builder.py,
main_simsiam.py), restated here in plain PyTorch from the official code (cited per block), runs
beside simsiam.train_step with the optimizer and lr schedule that simsiam.main builds, from the
same initial weights (loaded by name) on the same batches: losses, every parameter, every BN
statistic and the momentum buffers agree to float precision, on the small test network and on
builder.py's torchvision ResNet-50. The one difference, the projector's output bias (official:
kept, frozen; here: absent), is shown and bounded: it only shifts the last BN's running mean.
The official side takes its constants from OFFICIAL (or from the literal a test writes) and
calls nothing of simsiam.py's loss, optimizer, schedule or head code."""

import copy
import math
from types import SimpleNamespace

import helpers
import torch
import torchvision
from helpers import FT_SIMCLR_V2, Dev, Ref, official, one_thread  # noqa: F401 (one_thread: autouse)
from torch import nn

import simsiam

# ==== official values =======================================================================
MAIN = "ref: simsiam main_simsiam.py argparse"
LIN = "ref: simsiam main_lincls.py"
LINEAR_WHY = (
    "main_lincls.py without --lars (SGD, the MoCo protocol) instead of the README's --lars "
    "(apex LARC) at -b 4096 --lr 0.1; [SimSiam App. A]: the SGD variant is ~1 point lower"
)
IMAGENET = {
    "arch": Ref("resnet50", "[SimSiam §3 Baseline settings; ref: simsiam README -a resnet50]"),
    "epochs": Ref(100, f"[SimSiam §3; {MAIN} --epochs 100; README: Tab. 1's last row]"),
    "batch_size": Ref(512, f"[SimSiam §3; {MAIN} -b 512 (total over the node's GPUs)]"),
    "lr": Ref(0.05, f"[SimSiam §3: lr x B / 256; {MAIN} --lr 0.05, init_lr = lr x b / 256]"),
    "wd": Ref(1e-4, f"[SimSiam §3; {MAIN} --wd 1e-4, SGD(every parameter)]"),
    "warmup_epochs": Ref(0, "[ref: main_simsiam.py adjust_learning_rate: cosine, no warm-up]"),
    "fix_pred_lr": Ref(True, "[SimSiam Tab. 1 (68.1); ref: simsiam README --fix-pred-lr]"),
    "proj_layers": Ref(3, "[SimSiam §3; ref: simsiam/builder.py 'build a 3-layer projector']"),
    "proj_hidden": Ref(2048, "[ref: builder.py prev_dim = encoder.fc.weight.shape[1]: 2048]"),
    "dim": Ref(2048, f"[SimSiam §3; {MAIN} --dim 2048]"),
    "pred_dim": Ref(512, f"[SimSiam §3; {MAIN} --pred-dim 512]"),
    "crop_min": Ref(
        0.2, "[SimSiam App. A; ref: main_simsiam.py RandomResizedCrop(scale=(0.2, 1.))]"
    ),
    "blur": Ref(True, "[ref: main_simsiam.py RandomApply([GaussianBlur([.1, 2.])], p=0.5)]"),
    "linear_epochs": Ref(90, f"[SimSiam App. A; {LIN} --epochs 90]"),
    "linear_lr": Dev(30.0, 0.1, LINEAR_WHY),
    "linear_wd": Ref(0.0, f"[SimSiam App. A; {LIN} --wd 0.]"),
    "linear_batch_size": Dev(256, 4096, LINEAR_WHY),
    "linear_nesterov": Ref(False, f"[{LIN} SGD(momentum=0.9), no nesterov]"),
    "linear_milestones": Ref((), f"[{LIN} adjust_learning_rate: cosine]"),
    "linear_decay": Ref(0.1, f"[{LIN}: no step schedule; unused with cosine]"),
    "linear_epoch_lr": Ref(True, f"[{LIN} adjust_learning_rate once per epoch]"),
    "linear_best": Ref(True, f"[{LIN} best_acc1, model_best.pth.tar]"),
    "linear_zero_init": Ref(False, f"[{LIN} fc.weight normal_(0, 0.01), fc.bias zero_()]"),
    **FT_SIMCLR_V2,  # no fine-tuning in the SimSiam code: SimCLR v2's protocol
}
APP_D = "[SimSiam App. D, CIFAR experiments"
CIFAR = {
    **IMAGENET,
    "arch": Ref("resnet18", f"{APP_D}: the CIFAR variant of ResNet-18]"),
    "epochs": Ref(800, f"{APP_D}: 800 epochs]"),
    "batch_size": Ref(512, f"{APP_D}: batch 512]"),
    "lr": Ref(0.03, f"{APP_D}: base lr 0.03 x B / 256]"),
    "wd": Ref(5e-4, f"{APP_D}: weight decay 5e-4]"),
    "proj_layers": Ref(2, f"{APP_D}: 2-layer projection MLP]"),
    "proj_hidden": Ref(2048, f"{APP_D}; ref: solo-learn cifar/simsiam.yaml proj_hidden_dim 2048]"),
    "blur": Ref(False, f"{APP_D}: no blur at 32 px]"),
    "ft_batch_size": Dev(
        256,
        1024,
        "C.FT_CIFAR_BATCH: 1% of CIFAR-10 is 500 images, batch 1024 holds each 2-8 times; SimCLR "
        "v1's 1% top-1 there 10.0 vs 42.7 at 256",
    ),
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}


def constants(**literals):
    """The official ImageNet values (OFFICIAL), with the literals a test writes over them."""
    entry = OFFICIAL[("--preset", "imagenet")]
    return SimpleNamespace(**{**{f: official(entry, f) for f in entry}, **literals})


B, STEPS = 8, 5
# the ImageNet recipe (fix_pred_lr, lr 0.05 x B / 256, wd 1e-4, no warm-up) on a tiny model;
# 2 steps per epoch (16 images / batch 8) over 3 epochs, so the per-epoch cosine moves
SMALL = {"batch_size": B, "proj_hidden": 256, "dim": 64, "pred_dim": 16, "epochs": 3}
FLAGS = ["--preset", "imagenet", "--arch", "smallcnn", "--subset", 16]
for _k, _v in SMALL.items():
    FLAGS += [f"--{_k.replace('_', '-')}", _v]


def built_by_main(monkeypatch, tmp_path, *flags):
    """simsiam.main as it runs, stopped where it calls fit: the model, optimizer and args."""
    return helpers.built_by_main(simsiam, monkeypatch, tmp_path, *flags)[:3]


# ==== the official code, restated ===========================================================
class SmallEncoder(nn.Module):
    """A torchvision-style classifier around the test's small backbone (a copy of the project's
    smallcnn, 256 wide): features, then .fc (what builder.py replaces)."""

    def __init__(self, body, num_classes, zero_init_residual=True):
        super().__init__()
        self.body, self.fc = body, nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class OfficialSimSiam(nn.Module):
    """[ref: simsiam/builder.py SimSiam.__init__] encoder = base_encoder(num_classes=dim,
    zero_init_residual=True); encoder.fc = 3-layer projector whose output layer is the encoder's
    own fc, its bias kept with requires_grad False ("hack: not use bias as it is followed by
    BN"), then BN without affine; 2-layer predictor (bias on its output only)."""

    def __init__(self, base_encoder, dim, pred_dim):
        super().__init__()
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False),
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False),
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            self.encoder.fc,
            nn.BatchNorm1d(dim, affine=False),
        )
        self.encoder.fc[6].bias.requires_grad = False
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, x1, x2):
        # [ref: builder.py SimSiam.forward] one encoder pass per view; targets detached
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


class OfficialLoop:
    """[ref: main_simsiam.py main_worker + train + adjust_learning_rate]; c: the constants."""

    def __init__(self, net, c, iters_per_epoch):
        self.net, self.c, self.ipe = net, c, iters_per_epoch
        # [ref: main_worker] init_lr = lr x batch / 256; with --fix-pred-lr two groups, the
        # predictor's flagged fix_lr; SGD momentum 0.9, weight decay on every parameter
        self.init_lr = c.lr * c.batch_size / 256
        groups = [
            {"params": net.encoder.parameters(), "fix_lr": False},
            {"params": net.predictor.parameters(), "fix_lr": c.fix_pred_lr},
        ]
        self.optimizer = torch.optim.SGD(groups, self.init_lr, momentum=0.9, weight_decay=c.wd)
        self.criterion = nn.CosineSimilarity(dim=1)

    def adjust_learning_rate(self, epoch):
        """[ref: adjust_learning_rate] once per epoch: cosine of the epoch; fix_lr: init_lr."""
        cur_lr = self.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.c.epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = self.init_lr if group["fix_lr"] else cur_lr

    def step(self, x1, x2, iteration):
        epoch, i = divmod(iteration, self.ipe)
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


def official_name(name, body="encoder.body."):
    return name.replace("backbone.", body).replace("projector.", "encoder.fc.")


def load_official(net, model, body="encoder.body."):
    """The project's initial weights into the official net by name: strict but for the official
    output bias, the one tensor the project does not have (it keeps its own nn.Linear init)."""
    state = {official_name(k, body): v for k, v in model.state_dict().items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["encoder.fc.6.bias"] and not unexpected, (missing, unexpected)
    return net


def run_both(model, optimizer, args, ref, batches, body="encoder.body."):
    """simsiam.train_step and the official loop step by step on the same views: loss, lrs,
    parameters, momentum buffers, BN statistics (the last BN's shifted by the official bias)."""
    net, scaler = ref.net, torch.amp.GradScaler("cpu", enabled=False)  # as fit (no fp16)
    p_ref, b_ref = dict(net.named_parameters()), dict(net.named_buffers())
    bias = net.encoder.fc[6].bias.detach().clone()
    assert bias.abs().max() > 0 and not net.encoder.fc[6].bias.requires_grad
    last_bn = f"projector.{len(model.projector) - 1}.running_mean"
    for step, (x1, x2) in enumerate(batches):
        stats = simsiam.train_step(model, ([x1, x2], None, None), optimizer, scaler, step, args)
        loss = ref.step(x1.clone(), x2.clone(), step)
        close(stats["loss"], loss, f"loss at step {step}")
        lrs = [grp["lr"] for grp in optimizer.param_groups]
        assert lrs == [grp["lr"] for grp in ref.optimizer.param_groups], step
        for n, p in model.named_parameters():
            r = p_ref[official_name(n, body)]
            close(p.detach(), r.detach(), f"{n} after step {step}")
            m_ref = ref.optimizer.state[r]["momentum_buffer"]
            close(optimizer.state[p]["momentum_buffer"], m_ref, f"m {n} after step {step}")
        for n, b in model.named_buffers():
            want = b_ref[official_name(n, body)]
            # a running mean is measured on inputs of spread sqrt(running var): the predictor's
            # first BN sees W z of zero batch mean, its running mean is pure rounding (~1e-8)
            var = b_ref.get(official_name(n, body).replace("running_mean", "running_var"))
            scale = var.max().sqrt().item() if n.endswith("running_mean") else 0.0
            if n == last_bn:  # the official's batch means include the bias (2 BN passes a step)
                shift = bias * (1 - 0.9 ** (2 * (step + 1)))
                close(b + shift, want, f"{n} after step {step}", scale)
                torch.testing.assert_close((want - b).abs().max(), shift.abs().max())
                continue
            close(b, want, f"{n} after step {step}", scale)
    assert torch.equal(net.encoder.fc[6].bias, bias)  # the official frozen bias never moved
    return stats


def small_batches(size=16, n=STEPS, b=B):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(b, 3, size, size, generator=g) for _ in range(2)] for _ in range(n)]


def official_small(model, c):
    torch.manual_seed(1)  # the official output bias: nn.Linear's default init
    body = lambda **kw: SmallEncoder(copy.deepcopy(model.backbone), **kw)  # noqa: E731
    return load_official(OfficialSimSiam(body, c.dim, c.pred_dim), model)


def test_train_step_matches_the_official_loop(monkeypatch, tmp_path):
    """The preset's values (lr 0.05 x 8 / 256, wd 1e-4, fixed predictor lr) over 5 steps."""
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS)
    assert args.steps_per_epoch == 2 and args.amp == "off" and args.fix_pred_lr
    c = constants(**SMALL)
    ref = OfficialLoop(official_small(model, c), c, iters_per_epoch=16 // B)
    run_both(model, optimizer, args, ref, small_batches())
    # the schedule moved per epoch (3 values in 5 steps), the predictor's lr did not
    base = c.lr * B / 256
    want = [base * 0.5 * (1 + math.cos(math.pi * (s // 2) / 3)) for s in range(6)]
    assert args.sched["lr"] == want and len(set(want[:STEPS])) == 3
    assert optimizer.param_groups[1]["lr"] == base


def test_large_weight_decay_step_matches_the_official_loop(monkeypatch, tmp_path):
    """wd 0.5: SGD's decay moves every parameter by lr x wd x p, 8e-4 of it per step."""
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *FLAGS, "--wd", 0.5)
    c = constants(**SMALL, wd=0.5)
    ref = OfficialLoop(official_small(model, c), c, iters_per_epoch=16 // B)
    run_both(model, optimizer, args, ref, small_batches(n=2))


def test_resnet50_step_matches_the_official_network(monkeypatch, tmp_path):
    """builder.py on torchvision's ResNet-50 (zero_init_residual, fc -> the 2048-2048-2048
    projector, 2048-512-2048 predictor) at the preset (lr 0.05 x 4 / 256, wd 1e-4, fixed
    predictor lr), batch 4 of 32 px views, one step; the model built for 224 px (its stem)."""
    flags = ["--preset", "imagenet", "--arch", "resnet50", "--img-size", 224, "--subset", 8]
    model, optimizer, args = built_by_main(monkeypatch, tmp_path, *flags, "--batch-size", 4)
    c = constants(batch_size=4)
    torch.manual_seed(1)
    net = OfficialSimSiam(torchvision.models.resnet50, c.dim, c.pred_dim)
    ref = OfficialLoop(load_official(net, model, body="encoder."), c, iters_per_epoch=8 // 4)
    run_both(model, optimizer, args, ref, small_batches(32, 1, 4), body="encoder.")


def test_lr_schedule_is_the_official_one_at_the_presets(monkeypatch, tmp_path):
    """The whole per-step schedule at each preset's epochs: main_simsiam.py's
    adjust_learning_rate, evaluated once per epoch, for every step of that epoch."""
    for flags, entry in OFFICIAL.items():
        small = ["--arch", "smallcnn", "--subset", 16, "--batch-size", B]
        _, optimizer, args = built_by_main(monkeypatch, tmp_path / flags[1], *small, *flags)
        c = SimpleNamespace(**{f: official(entry, f) for f in entry})
        init_lr = c.lr * B / 256  # the test's batch, the preset's lr and epochs
        cur = [init_lr * 0.5 * (1.0 + math.cos(math.pi * e / c.epochs)) for e in range(c.epochs)]
        want = [cur[s // args.steps_per_epoch] for s in range(args.total_steps)]
        got = torch.tensor(args.sched["lr"], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
        assert optimizer.param_groups[1]["fixed_lr"] == init_lr  # the predictor's fix_lr
