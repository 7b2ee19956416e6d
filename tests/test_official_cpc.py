"""Official-loop parity: cpc.py's train_step beside a restatement of CPC v2's objective and the
optimizer the preset cites. CPC v2 released no code: the objective is the pseudocode of the
paper's appendix (Hénaff et al. 2020, App. A, functions CPC() and pixelCNN()), applied per
prediction direction to the patch grid rotated; the optimizer is pl_bolts' CPC_v2
configure_optimizers (Lightning-AI/lightning-bolts src/pl_bolts/models/self_supervised/cpc/
cpc_module.py): Adam(self.parameters(), lr, betas=(0.8, 0.999), weight_decay=1e-5, eps=1e-7), no
scheduler. Both sides start from the same initialised networks and see the same images (per-patch
augmentation off: random, and outside the pseudocode; tested in test_cpc.py); the project side
is main()'s real optimizer and args.sched and the real train_step. Compared: every step's loss,
Adam's moments and the update at every step, then every parameter."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FT_SIMCLR_V2, Dev, Ref, built_by_main, official, one_thread  # noqa: F401
from torch import nn

import cpc

# ---- the official values, pinned: one entry per preset --------------------------------------
# CPC v2 released no code: the paper (Hénaff et al. 2020: §4.1, App. A pseudocode), CPC v1 (van
# den Oord et al. 2018 §3.2) and pl_bolts' CPC_v2 (Lightning-AI/lightning-bolts
# src/pl_bolts/models/self_supervised/cpc/cpc_module.py, docs self_supervised.rst) are the sources
BOLTS = "ref: pl_bolts cpc_module.py CPC_v2.configure_optimizers"
APPA = "[CPC v2 App. A pseudocode"
SIMCLR = "no CPC v2 probe code: SimCLR's linear protocol [ref: google-research/simclr README"
IMAGENET = {
    "arch": Ref("resnet50", "[CPC v2 §5 Tab. 1: the ResNet-50 row, 63.8% linear top-1]"),
    "epochs": Dev(200, "not given", "CPC v2 states no epoch count; 200 as InstDisc/MoCo v1"),
    "batch_size": Ref(512, "[CPC v1 §3.2: 32 GPUs x 16 images]"),
    "lr": Ref(4e-5, "[ref: pl_bolts docs self_supervised.rst CPCv2 results: Adam lr 4e-5]"),
    "wd": Ref(1e-5, f"[{BOLTS}: Adam(weight_decay=1e-5), L2 on every parameter]"),
    "betas": Ref((0.8, 0.999), f"[{BOLTS}: betas=(0.8, 0.999)]"),
    "adam_eps": Ref(1e-7, f"[{BOLTS}: eps=1e-7]"),
    "warmup_epochs": Ref(0, f"[{BOLTS}: no scheduler, a constant lr]"),
    "patch_size": Ref(0, "[CPC v1 §3.2: 64 px patches of 256 px crops, stride 32] (0: img / 4)"),
    "aug": Ref("crop", "[CPC v1 §3.2: 256 px crops of the image resized to 300 px, flips]"),
    "color_drop": Ref(True, "[CPC v2 §4.1 'RC': drop 2 of 3 colour channels per patch]"),
    "patch_flip": Ref(True, "[CPC v2 §4.1 'PA': per-patch augmentation, flips]"),
    "patch_crop": Ref(True, "[CPC v1 §3.2: random 60 x 60 sub-crops of the 64 px patches]"),
    "context_dim": Ref(256, f"{APPA} pixelCNN: Conv2D(256, 1x1), Conv2D(256, 1x3)]"),
    "context_blocks": Ref(5, f"{APPA} pixelCNN: for _ in range(5)]"),
    "target_dim": Ref(64, f"{APPA} CPC(target_dim=64)]"),
    "emb_scale": Ref(0.1, f"{APPA} CPC(emb_scale=0.1)]"),
    "min_step": Ref(3, f"{APPA} steps_to_ignore=2: first offset i + 1 = 3]"),
    "max_step": Ref(3, f"{APPA} steps_to_predict=3: last offset 3]"),
    "directions": Ref(4, "[CPC v2 §4.1 'BU' bottom-up + 'HP' horizontal predictions: 4]"),
    "linear_epochs": Ref(90, f"{SIMCLR} ImageNet linear eval --train_epochs=90]"),
    "linear_lr": Ref(0.1, f"{SIMCLR} --learning_rate=0.1, linear scaling]"),
    "linear_wd": Dev(0.0, 1e-6, "SimCLR's CIFAR-10 linear eval (wd 0); ImageNet's 1e-6: tiny"),
    "linear_batch_size": Dev(1024, 4096, "SimCLR's ImageNet 4096 needs 32 TPUs; not measured"),
    "linear_nesterov": Ref(True, f"{SIMCLR} --optimizer=momentum: Nesterov, model_util.py]"),
    "linear_milestones": Ref((), f"{SIMCLR}: cosine, model_util.learning_rate_schedule]"),
    "linear_decay": Ref(0.1, "unused without milestones (cosine) [ref: simclr model_util.py]"),
    "linear_epoch_lr": Ref(False, f"{SIMCLR}: the lr per step, global_step]"),
    "linear_best": Ref(False, f"{SIMCLR} --mode=train_then_eval: the last checkpoint]"),
    "linear_zero_init": Ref(True, f"{SIMCLR} --zero_init_logits_layer=True]"),
    **FT_SIMCLR_V2,
}
CIFAR = {  # no CPC v2 CIFAR recipe: pl_bolts' CIFAR-10 row and CPCTrainTransformsCIFAR10
    **IMAGENET,
    "arch": Dev(
        "resnet18", "CPC-ResNet-101 (LayerNorm)", "pl_bolts' cpc_resnet101: far from CPU sizes"
    ),
    "epochs": Ref(1000, "[ref: pl_bolts docs CPCv2 CIFAR-10 row: 1000 epochs]"),
    "batch_size": Ref(64, "[ref: pl_bolts docs CPCv2 CIFAR-10 row: batch 64]"),
    "lr": Ref(4e-5, "[ref: pl_bolts docs CPCv2 CIFAR-10 row: lr 4e-5]"),
    "aug": Ref("jitter", "[ref: pl_bolts transforms.py CPCTrainTransformsCIFAR10]"),
    "patch_size": Ref(0, "[ref: pl_bolts cpc_module.py cifar10: patch_size 8 (= 32 / 4)]"),
    "linear_epochs": Ref(100, f"{SIMCLR} CIFAR-10 linear eval --train_epochs=100]"),
    "linear_wd": Ref(0.0, f"{SIMCLR} CIFAR-10 linear eval --weight_decay=0.0]"),
    "linear_batch_size": Ref(512, f"{SIMCLR} CIFAR-10 linear eval --train_batch_size=512]"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}
IN = OFFICIAL[("--preset", "imagenet")]

# CPC v2 §4.1: besides the top-down predictions of CPC v1 ('BU') bottom-up ones and ('HP')
# horizontal ones; each direction is the top-down objective on the latent grid [B, H, W, D]
# re-oriented so that its rows run the way the predictions go (its own context network and
# predictors): out[b, i, j] = latents[b, row(i, j), col(i, j)]
PAPER_DIRECTIONS = {
    "top-down": lambda z: z,  # rows i <= r predict row r + k
    "bottom-up": lambda z: z.flip(1).flip(2),  # the grid turned 180 degrees: row G-1-i
    "right-to-left": lambda z: z.flip(2).transpose(1, 2),  # out[b, i, j] = z[b, j, G-1-i]
    "left-to-right": lambda z: z.flip(1).transpose(1, 2),  # out[b, i, j] = z[b, G-1-j, i]
}
ORDER = ("top-down", "bottom-up", "right-to-left", "left-to-right")  # --directions 1, 2, 4

N, B, STEPS = 32, 8, 4  # 16 px images, 4 px patches at stride 2: a 7 x 7 grid as in the paper
SMALL = ["--context-dim", "16", "--context-blocks", "2", "--target-dim", "16"]
NO_AUG = ["--no-color-drop", "--no-patch-flip", "--no-patch-crop"]


def project_run(tmp_path, monkeypatch, flags):
    """main() up to fit(): the real model, optimizer and args.sched."""
    base = ["--subset", N, "--batch-size", B, "--epochs", 1, *SMALL, *NO_AUG]
    return built_by_main(cpc, monkeypatch, tmp_path, *base, *flags)[:3]


def conv(x, layer, padding=0):  # NHWC in and out, as the pseudocode's Conv2D
    return F.conv2d(x.permute(0, 3, 1, 2), layer.weight, layer.bias, padding=padding).permute(
        0, 2, 3, 1
    )


def pixel_cnn(latents, blocks):
    """CPC v2 App. A pixelCNN(latents): latents [B, H, W, D]; per block 1x1 -> ReLU -> 1x3 (SAME)
    -> pad one row on top -> 2x1 VALID -> ReLU -> 1x1 back to D, residual; a final ReLU."""
    cres = latents
    for c1, c13, c21, c1b in blocks:
        c = F.relu(conv(cres, c1))
        c = conv(c, c13, padding=(0, 1))
        c = F.pad(c, (0, 0, 0, 0, 1, 0))  # Pad(c, [[0, 0], [1, 0], [0, 0], [0, 0]])
        c = F.relu(conv(c, c21))
        cres = cres + conv(c, c1b)
    return F.relu(cres)


def cpc_objective(latents, target, context_blocks, pred_convs, emb_scale, steps_to_ignore):
    """CPC v2 App. A CPC(latents, target_dim, emb_scale, steps_to_ignore, steps_to_predict)."""
    loss = 0.0
    context = pixel_cnn(latents, context_blocks)
    targets = conv(latents, target)
    batch_dim, col_dim, rows = targets.shape[:-1]
    targets = targets.reshape(-1, targets.shape[-1])
    for i, pred in enumerate(pred_convs, start=steps_to_ignore):  # range(ignore, predict)
        col_dim_i = col_dim - i - 1
        total_elements = batch_dim * col_dim_i * rows
        preds_i = conv(context, pred)[:, : -(i + 1), :, :] * emb_scale
        preds_i = preds_i.reshape(-1, preds_i.shape[-1])
        logits = preds_i @ targets.T
        b = torch.arange(total_elements) // (col_dim_i * rows)
        col = torch.arange(total_elements) % (col_dim_i * rows)
        labels = b * col_dim * rows + (i + 1) * rows + col
        loss = loss + F.cross_entropy(logits, labels)
    return loss


class OfficialCPC:
    def __init__(self, model, args, steps_to_ignore, directions, wd=None):
        self.net = copy.deepcopy(model)  # the same initialised encoder, context nets, 1x1 convs
        self.patch, self.directions = args.patch_size, ORDER[:directions]
        self.emb_scale, self.ignore = official(IN, "emb_scale"), steps_to_ignore
        # pl_bolts configure_optimizers: torch Adam over self.parameters(): L2 wd on every param
        self.params = list(self.net.parameters())
        self.lr, (self.b1, self.b2) = official(IN, "lr"), official(IN, "betas")
        self.eps, self.wd = official(IN, "adam_eps"), official(IN, "wd") if wd is None else wd
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def latents(self, x):
        """The image cut into overlapping patches (stride patch / 2), each encoded on its own:
        [B, H, W, D] [CPC v1 §3.2; CPC v2 §4]."""
        p, s = self.patch, self.patch // 2
        g = (x.shape[-1] - p) // s + 1
        patches = [
            x[:, :, i * s : i * s + p, j * s : j * s + p] for i in range(g) for j in range(g)
        ]
        h = self.net.backbone(torch.stack(patches, dim=1).flatten(0, 1))  # [B * g * g, D]
        return h.view(len(x), g, g, -1)

    def step(self, x):
        lat = self.latents(x)
        loss = 0.0
        for d, direction in enumerate(self.directions):  # the grid re-oriented, its own nets
            blocks = self.net.context[d].blocks
            rot = PAPER_DIRECTIONS[direction](lat)
            loss = loss + cpc_objective(
                rot, self.net.target, blocks, self.net.predictors[d], self.emb_scale, self.ignore
            )
        for p in self.params:
            p.grad = None
        loss.backward()
        self.t += 1
        with torch.no_grad():  # torch.optim.Adam (L2: weight_decay added to the gradient)
            bc1, bc2 = 1 - self.b1**self.t, 1 - self.b2**self.t
            for p, m, v in zip(self.params, self.m, self.v):
                g = p.grad + self.wd * p
                m.mul_(self.b1).add_((1 - self.b1) * g)
                v.mul_(self.b2).add_((1 - self.b2) * g * g)
                p.sub_(self.lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + self.eps))
        return loss


def close(got, ref, what, scale=1e-6):
    atol = scale * max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


VARIANTS = {  # flags, the pseudocode's steps_to_ignore, the directions, the wd
    "paper": ([], 2, official(IN, "directions"), None),  # offset 3 only, 4 directions
    "two_steps": (["--directions", 2, "--min-step", 2, "--max-step", 3], 1, 2, None),
    # L2 (torch Adam, pl_bolts) vs decoupled (AdamW) made visible: 0.5 p in every gradient
    "wd": (["--wd", 0.5], 2, official(IN, "directions"), 0.5),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_step_matches_the_official_loop(tmp_path, monkeypatch, name):
    flags, steps_to_ignore, directions, wd = VARIANTS[name]
    model, opt, args = project_run(tmp_path, monkeypatch, flags)
    assert args.total_steps >= STEPS and args.patch_size == 4
    ref = OfficialCPC(model, args, steps_to_ignore, directions, wd)
    named_ref, index = (
        dict(ref.net.named_parameters()),
        {id(p): i for i, p in enumerate(ref.params)},
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(B, 3, 16, 16, generator=g)  # normalised images
        old = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = cpc.train_step(model, ([x], None, None), opt, scaler, step, args)
        loss = ref.step(x)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
        assert stats["lr"] == ref.lr  # constant: pl_bolts returns no scheduler
        # the gradients, through Adam's moments (L2 wd inside), against the independent
        # restatement: to 1e-5 of each tensor's largest entry, with a floor of 1e-6 of the largest
        # over the model (target.bias: its exact gradient is 0, a shift shared by all targets
        # cancels in the softmax; what remains is wd x p plus float noise)
        m_max = max(m.abs().max().item() for m in ref.m)
        v_max = max(v.abs().max().item() for v in ref.v)
        for n, p in model.named_parameters():
            st, i = opt.state[p], index[id(named_ref[n])]
            assert st["step"].item() == ref.t == step + 1
            for key, r, top in (("exp_avg", ref.m[i], m_max), ("exp_avg_sq", ref.v[i], v_max)):
                atol = max(1e-5 * r.abs().max().item(), 1e-6 * top)
                torch.testing.assert_close(
                    st[key], r, rtol=1e-5, atol=atol, msg=lambda m: f"{n} {key} @{step}: {m}"
                )
            # the update from these moments: Adam's formula with pl_bolts' lr, betas and eps
            bc1, bc2 = 1 - ref.b1**ref.t, 1 - ref.b2**ref.t
            upd = (
                ref.lr / bc1 * st["exp_avg"] / (st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + ref.eps)
            )
            rounding = 2 * torch.finfo(torch.float32).eps * old[n].abs().max().item()
            atol = 1e-3 * upd.abs().max().item() + rounding
            torch.testing.assert_close(p.detach(), old[n] - upd, rtol=0, atol=atol)
    # the two runs side by side: Adam divides by sqrt(v) + 1e-7, so an element whose gradient is
    # ~0 turns float noise into an update of up to ~lr (target.bias: its exact gradient is 0, a
    # shift shared by all targets cancels in the softmax); measured <= 1% of lr x steps
    for n, p in model.named_parameters():
        q = named_ref[n].detach()
        atol = 1e-6 * q.abs().max().item() + 0.1 * ref.lr * STEPS
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
    assert not list(model.buffers())  # no method state: no bank, queue or BN statistics


# ---- the real network: a ResNet-18 patch encoder without BatchNorm, restated ----------------
def layer_norm(ch):
    """CPC v2 §4.1 'LN': layer normalisation of each patch's [C, H, W] map, per-channel affine
    (DEVIATION of the project: GroupNorm(1, C); pl_bolts' LayerNorm([C, H, W]) has a per-pixel
    one)."""
    return nn.GroupNorm(1, ch)


class Block(nn.Module):
    """torchvision BasicBlock (conv3x3 -> norm -> relu -> conv3x3 -> norm, + shortcut, relu)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = layer_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = layer_norm(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            conv = nn.Conv2d(cin, planes, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, layer_norm(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class PatchResNet18(nn.Module):
    """CPC v2 §4: a ResNet encoder applied to each patch on its own, spatially mean-pooled;
    ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool) for 8 px patches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = layer_norm(64)
        cin, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(Block(cin, planes, stride), Block(planes, planes, 1)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))


def test_real_resnet18_patch_encoder_step_matches(tmp_path, monkeypatch):
    """The CIFAR preset's ResNet-18 (LayerNorm-style, no BN) at 32 px: 8 px patches at stride 4,
    a 7 x 7 grid, batch 2; the restated encoder loaded with the project's weights (strict), the
    pseudocode's context network and objective in the paper's 4 directions, pl_bolts' Adam:
    one step, the loss and every parameter."""
    flags = ["--arch", "resnet18", "--img-size", 32, "--batch-size", 2, "--subset", 8]
    model, opt, args = built_by_main(cpc, monkeypatch, tmp_path, *flags, *SMALL, *NO_AUG)[:3]
    assert args.patch_size == 8
    encoder = PatchResNet18()
    encoder.load_state_dict(model.backbone.state_dict(), strict=True)
    ref = OfficialCPC(model, args, 2, official(IN, "directions"))
    ref.net.backbone = encoder
    ref.params = list(ref.net.parameters())
    ref.m = [torch.zeros_like(p) for p in ref.params]
    ref.v = [torch.zeros_like(p) for p in ref.params]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = cpc.train_step(model, ([x], None, None), opt, scaler, 0, args)
    loss = ref.step(x)
    close(stats["loss"], loss.detach(), "loss")
    # Adam's first step moves each element by ~lr; float noise in a ~0 gradient moves it by up to
    # lr too (see above): parameters to 1e-6 of the tensor plus 0.1 lr
    named_ref = dict(ref.net.named_parameters())
    for n, p in model.named_parameters():
        q = named_ref[n].detach()
        atol = 1e-6 * q.abs().max().item() + 0.1 * ref.lr
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=atol, msg=lambda m: f"{n}: {m}")
