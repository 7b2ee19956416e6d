"""Official-loop parity: cmc.py's train_step beside a restatement of HobbitLong/CMC's training
step (train_CMC.py train(), NCE/NCEAverage.py, NCE/NCECriterion.py, util.py), written here from
the official source. Both sides start from the same initialised networks and memory banks and see
the same images, dataset indices and noise rows; the project side is main()'s real optimizer and
args.sched and the real train_step. Compared: the loss of every step, then every parameter, every
buffer (both banks, the Z constants, BN statistics) and SGD's momentum buffers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FT_SIMCLR_V2, Dev, Ref, built_by_main, close_rel, official, one_thread  # noqa: F401
from torch import nn

import cmc

# ---- the official values, pinned: one entry per preset --------------------------------------
CMC = "ref: HobbitLong/CMC"
PROBE = f"[{CMC} LinearProbing.py"
IMAGENET = {
    "arch": Ref("resnet50", f"[CMC §4; {CMC} README 'train_CMC.py --model resnet50v1']"),
    "width": Ref(0.5, f"[{CMC} models/resnet.py ResNetV1: resnet50(in_channel=1|2, width=0.5)]"),
    "epochs": Ref(240, f"[{CMC} train_CMC.py --epochs 240]"),
    "batch_size": Ref(128, f"[{CMC} train_CMC.py --batch_size 128; README resnet50v1 command]"),
    "lr": Ref(0.03, f"[{CMC} train_CMC.py --learning_rate 0.03]"),
    "wd": Ref(1e-4, f"[{CMC} train_CMC.py --weight_decay 1e-4, SGD(model.parameters())]"),
    "warmup_epochs": Ref(0, f"[{CMC} util.py adjust_learning_rate: no warm-up]"),
    "lr_milestones": Ref((120, 160, 200), f"[{CMC} train_CMC.py --lr_decay_epochs 120,160,200]"),
    "tau": Ref(0.07, f"[{CMC} train_CMC.py --nce_t 0.07; README: 0.07 for ImageNet]"),
    "softmax": Ref(False, f"[{CMC} README training commands: no --softmax, NCE]"),
    "nce_k": Dev(
        4096,
        16384,
        "the README's flag list ('--nce_k ... Default: 4096') and its K = 4096 CMC rows; "
        "train_CMC.py's argparse default, which the README's resnet50v1 command runs, is 16384; "
        "not measured at ImageNet scale",
    ),
    "bank_m": Ref(0.5, f"[{CMC} train_CMC.py --nce_m 0.5]"),
    "dim": Ref(128, f"[{CMC} train_CMC.py --feat_dim 128]"),
    "crop_min": Ref(0.08, f"[{CMC} train_CMC.py parse_option: crop_low 0.08 for ResNets]"),
    "linear_epochs": Ref(60, f"{PROBE} --epochs 60]"),
    "linear_lr": Ref(30.0, f"[{CMC} README: '--learning_rate 30 --layer 6' for resnet50v1]"),
    "linear_wd": Ref(0.0, f"{PROBE} --weight_decay 0]"),
    "linear_batch_size": Ref(256, f"{PROBE} --batch_size 256]"),
    "linear_nesterov": Ref(False, f"{PROBE} set_optimizer: SGD momentum 0.9]"),
    "linear_milestones": Ref((30, 40, 50), f"{PROBE} --lr_decay_epochs 30,40,50]"),
    "linear_decay": Ref(0.2, f"{PROBE} --lr_decay_rate 0.2]"),
    "linear_epoch_lr": Ref(True, f"[{CMC} util.py adjust_learning_rate, once per epoch]"),
    "linear_best": Ref(True, f"{PROBE} best_acc1]"),
    "linear_zero_init": Ref(False, f"[{CMC} models/LinearModel.py initilize: N(0, 0.01), 0]"),
    **FT_SIMCLR_V2,
}
LEM = "no CMC CIFAR recipe: InstDisc's CIFAR-10 one, whose memory-bank code CMC builds on "
LEM += "[ref: zhirongw/lemniscate.pytorch"
CIFAR = {
    **IMAGENET,
    "arch": Ref("resnet18", f"{LEM} cifar.py ResNet18]; CMC's resnet18v1 halves"),
    "epochs": Ref(200, f"{LEM} cifar.py 200 epochs]"),
    "batch_size": Ref(128, f"{LEM} cifar.py batch_size=128]; CMC's default too"),
    "wd": Ref(5e-4, f"{LEM} cifar.py weight_decay=5e-4]"),
    "lr_milestones": Ref((120, 160), f"{LEM} cifar.py adjust_learning_rate]"),
    "tau": Ref(0.1, f"{LEM} README CIFAR command --nce-t 0.1]"),
    "nce_k": Ref(0, f"{LEM} README CIFAR command --nce-k 0: LinearAverage]"),
    "crop_min": Ref(0.2, f"{LEM} cifar.py scale=(0.2, 1.)]; CMC's crop_low default 0.2"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}
IN, CI = OFFICIAL[("--preset", "imagenet")], OFFICIAL[("--preset", "cifar")]

N, B, STEPS = 32, 16, 5  # 32 images, batch 16: 2 steps per epoch, lr milestones at epochs 1, 2


def project_run(tmp_path, monkeypatch, flags):
    """main() up to fit(): the real model, optimizer and args.sched."""
    base = ["--subset", N, "--batch-size", B, "--epochs", 3, "--lr-milestones", 1, 2]
    return built_by_main(cmc, monkeypatch, tmp_path, *base, "--lr", 0.05, *flags)[:3]


def l2norm(x):  # models/resnet.py Normalize(2)
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


# dataset.py RGB2Lab: skimage.color.rgb2lab(np.asarray(img, np.uint8)), whose formulas are
# restated here [ref: scikit-image skimage/color/colorconv.py rgb2xyz, xyz2lab; sRGB primaries,
# D65 white, 2-degree observer], in float64 as numpy computes them
XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169))
XYZ_FROM_RGB += ((0.019334, 0.119193, 0.950227),)
REF_WHITE_D65 = (0.95047, 1.0, 1.08883)
# train_CMC.py get_train_loader: transforms.Normalize of the Lab image, view 'Lab'
LAB_NORM_MEAN = ((0 + 100) / 2, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_NORM_STD = ((100 - 0) / 2, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)


def rgb2lab(rgb):
    """[B, 3, H, W] RGB in [0, 1] (uint8 / 255, _prepare_colorarray) -> Lab [B, 3, H, W] fp64."""
    arr = rgb.double()
    # rgb2xyz: undo the sRGB gamma (linear below 0.04045), then the sRGB -> XYZ matrix
    arr = torch.where(arr > 0.04045, ((arr + 0.055) / 1.055) ** 2.4, arr / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", torch.tensor(XYZ_FROM_RGB, dtype=torch.float64), arr)
    # xyz2lab: divide by the white point; f(t) = t^(1/3) above (6/29)^3 = 0.008856, else the
    # line 7.787 t + 16/116 (= t / (3 (6/29)^2) + 4/29)
    t = xyz / torch.tensor(REF_WHITE_D65, dtype=torch.float64)[:, None, None]
    f = torch.where(t > 0.008856, t.clamp(min=0.008856) ** (1 / 3), 7.787 * t + 16.0 / 116.0)
    x, y, z = f.unbind(1)
    return torch.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], dim=1)


def official_views(rgb):
    """RGB2Lab -> ToTensor -> Normalize(mean, std) -> inputs.float() (train()) -> the split of
    models/resnet.py ResNetV1.forward: torch.split(x, [1, 2], dim=1) -> (L, ab). inputs.float()
    is the default dtype here: float64 under the float64 fixture."""
    mean = torch.tensor(LAB_NORM_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(LAB_NORM_STD, dtype=torch.float64)[:, None, None]
    lab = ((rgb2lab(rgb) - mean) / std).to(torch.get_default_dtype())
    return torch.split(lab, [1, 2], dim=1)


class OfficialCMC:
    """train_CMC.py set_model / set_optimizer / train, one step per call."""

    def __init__(self, model, n_data, K, T, momentum, softmax, lr, decay_epochs, wd, spe):
        self.net = copy.deepcopy(model)  # the same initialised encoders and fc heads
        # NCEAverage.__init__: memory_l, memory_ab, params [K, T, Z_l = -1, Z_ab = -1, momentum]
        self.memory_l = model.bank_l.clone()
        self.memory_ab = model.bank_ab.clone()
        self.K, self.T, self.Z_l, self.Z_ab, self.momentum = K, T, -1.0, -1.0, momentum
        self.n_data, self.softmax = n_data, softmax
        # set_optimizer: SGD(model.parameters(), lr, momentum 0.9, weight_decay): every param
        self.params = list(self.net.parameters())
        self.buf = [None] * len(self.params)
        self.base_lr, self.decay_epochs, self.wd, self.spe = lr, decay_epochs, wd, spe
        self.lr = lr

    def model(self, x):
        # models/resnet.py ResNetV1.forward: split the Lab image into L and ab, one encoder each,
        # fc + l2norm; the Lab image of dataset.py RGB2Lab, normalised (official_views)
        l, ab = official_views(x)
        feat_l = l2norm(self.net.projector["l"](self.net.backbone["l"](l)))
        feat_ab = l2norm(self.net.projector["ab"](self.net.backbone["ab"](ab)))
        return feat_l, feat_ab

    def contrast(self, l, ab, y, noise):
        """NCEAverage.forward(l, ab, y); noise: [B, K] rows (AliasMethod over uniform unigrams)."""
        bsz, D = l.shape
        if self.K == 0:  # no such path in CMC: lemniscate lib/LinearAverage.py (exact softmax;
            # its backward takes the gradient with the memory BEFORE it writes the rows)
            out_l = torch.mm(l, self.memory_ab.clone().t()) / self.T
            out_ab = torch.mm(ab, self.memory_l.clone().t()) / self.T
        else:
            idx = torch.cat([y[:, None], noise], dim=1)  # draw(B * (K + 1)); idx[:, 0] = y
            weight_l = torch.index_select(self.memory_l, 0, idx.view(-1)).detach()
            out_ab = torch.bmm(weight_l.view(bsz, self.K + 1, D), ab.view(bsz, D, 1))
            weight_ab = torch.index_select(self.memory_ab, 0, idx.view(-1)).detach()
            out_l = torch.bmm(weight_ab.view(bsz, self.K + 1, D), l.view(bsz, D, 1))
            if self.softmax:
                out_ab, out_l = out_ab / self.T, out_l / self.T
            else:
                out_ab, out_l = torch.exp(out_ab / self.T), torch.exp(out_l / self.T)
                if self.Z_l < 0:  # set on the first batch, a constant afterwards
                    self.Z_l = (out_l.mean() * self.n_data).item()
                if self.Z_ab < 0:
                    self.Z_ab = (out_ab.mean() * self.n_data).item()
                out_l, out_ab = out_l / self.Z_l, out_ab / self.Z_ab
        with torch.no_grad():  # update memory, still inside forward (before the loss)
            for memory, feat in ((self.memory_l, l), (self.memory_ab, ab)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(self.momentum).add_(torch.mul(feat, 1 - self.momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_l, out_ab

    def criterion(self, x, y):
        if self.K == 0:  # lemniscate: nn.CrossEntropyLoss on the [B, N] scores, target y
            return F.cross_entropy(x, y)
        if self.softmax:  # NCECriterion.py NCESoftmaxLoss: CE at label 0
            return F.cross_entropy(x.squeeze(), torch.zeros(len(x), dtype=torch.long))
        # NCECriterion.forward, eps 1e-7, Pn = 1 / n_data, m = K
        bsz, m, Pn = x.shape[0], x.size(1) - 1, 1 / float(self.n_data)
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + 1e-7)).log_()
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + 1e-7)).log_()
        return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz

    def step(self, step, x, y, noise):
        if step % self.spe == 0:  # util.py adjust_learning_rate at each (1-based) epoch start
            epoch = step // self.spe + 1
            steps = sum(epoch > e for e in self.decay_epochs)
            if steps > 0:
                self.lr = self.base_lr * 0.1**steps  # --lr_decay_rate 0.1
        feat_l, feat_ab = self.model(x)
        out_l, out_ab = self.contrast(feat_l, feat_ab, y, noise)
        loss = self.criterion(out_l, y) + self.criterion(out_ab, y)
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():  # torch.optim.SGD(momentum=0.9, weight_decay=wd), dampening 0
            for i, p in enumerate(self.params):
                d_p = p.grad + self.wd * p
                self.buf[i] = d_p.clone() if self.buf[i] is None else self.buf[i] * 0.9 + d_p
                p.sub_(self.lr * self.buf[i])
        return loss.reshape(())


def close(got, ref, what, scale=1e-6, extra=0.0):
    """rtol 1e-5, atol scale x the largest |ref|. Gradient-like tensors (momentum buffers, sums of
    partly cancelling terms; the official NCE divides where the project works in log space)
    take scale 1e-5: the measured differences are ~1e-6 of the largest entry."""
    atol, ref = scale * max(ref.abs().max().item(), 1e-12) + extra, ref.to(got.dtype)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


# name -> (flags, the official side's constants: the same literals, or the table's value)
VARIANTS = {  # the CIFAR preset (--preset cifar, the default) with these flags
    "nce": (["--nce-k", 8, "--tau", 0.07], dict(K=8, T=0.07)),  # README commands: NCE
    # --softmax: NCESoftmaxLoss; --nce_m other than 0.5 (where old and new weigh the same)
    "softmax": (
        ["--nce-k", 8, "--tau", 0.07, "--softmax", "--bank-m", 0.7],
        dict(K=8, T=0.07, softmax=True, momentum=0.7),
    ),
    "full_bank": ([], {}),  # the CIFAR preset: softmax over the whole bank
    "wd": (["--nce-k", 8, "--wd", 0.5], dict(K=8, wd=0.5)),  # wd visible: 0.025 p per step
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_train_step_matches_the_official_loop(tmp_path, monkeypatch, name, float64):
    """float64: in fp32 a ReLU input within rounding of 0 can flip sides (seen at step 2 of 'wd'
    on torch 2.4.1: one element of 32,768, 1.6e-9 vs -2.7e-7), a kink, not a step difference."""
    flags, given = VARIANTS[name]
    model, opt, args = project_run(tmp_path, monkeypatch, flags)
    spe = args.steps_per_epoch
    assert spe == 2 and args.total_steps == 6
    c = dict(K=official(CI, "nce_k"), T=official(CI, "tau"), momentum=official(CI, "bank_m"))
    c.update(softmax=official(CI, "softmax"), wd=official(CI, "wd"))
    c.update(given)
    ref = OfficialCMC(
        model, N, c["K"], c["T"], c["momentum"], c["softmax"], 0.05, (1, 2), c["wd"], spe
    )
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randint(0, 256, (B, 3, 16, 16), generator=g) / 255  # uint8 crops, ToTensor
        idx = torch.randperm(N, generator=g)[:B]
        torch.manual_seed(100 + step)  # the project draws its noise rows from the global RNG
        stats = cmc.train_step(model, ([x], None, idx), opt, scaler, step, args)
        torch.manual_seed(100 + step)  # the same uniform rows for the official side
        noise = torch.randint(N, (B, c["K"])) if c["K"] else None
        loss = ref.step(step, x, idx, noise)
        close(stats["loss"], loss.detach(), f"loss at step {step}")
        assert stats["lr"] == pytest.approx(ref.lr, rel=1e-12)
    assert ref.lr == pytest.approx(0.05 * 0.01)  # both decays were passed
    named_ref = dict(ref.net.named_parameters())
    for n, p in model.named_parameters():
        q = named_ref[n].detach()  # + 1e-5 of the change: BN biases start at 0 (measured 8e-7)
        close(p.detach(), q, n, extra=1e-5 * (q - init[n]).abs().max().item())
        i = [id(q) for q in ref.params].index(id(named_ref[n]))
        close(opt.state[p]["momentum_buffer"], ref.buf[i], n + " momentum", scale=1e-5)
    ref_buffers = dict(ref.net.named_buffers())
    ref_buffers.update(bank_l=ref.memory_l, bank_ab=ref.memory_ab)
    ref_buffers["nce_z"] = torch.tensor([ref.Z_l, ref.Z_ab], dtype=torch.float64)
    for n, b in model.named_buffers():
        close(b, ref_buffers[n].to(b.dtype), n)
    moved = (model.bank_l - ref.net.bank_l).abs().amax(1) > 0  # the rows of the batches moved
    assert moved.sum() >= B
    if name == "nce":  # Z set on step 0 and logged
        assert (model.nce_z > 0).all() and stats["nce_z_l"].item() == model.nce_z[0].item()


# ---- the real network: CMC's split-Lab ResNet-50 halves, restated ---------------------------
class Bottleneck(nn.Module):
    """[ref: CMC models/resnet.py Bottleneck]: 1x1 -> 3x3 (stride) -> 1x1 to 4 x planes, BN after
    each, ReLU after the first two and after the residual sum; downsample on the shortcut."""

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class CMCResNet50(nn.Module):
    """[ref: CMC models/resnet.py ResNet(Bottleneck, [3, 4, 6, 3], low_dim, in_channel, width)]:
    the 7x7 stride-2 stem keeps 64 channels (self.inplanes = 64), every stage has base * 2^i
    planes with base = int(64 * width); avgpool, fc to low_dim, Normalize(2). AvgPool2d(7) is the
    mean over layer4's 7x7 map at 224 px: the mean over the whole map here."""

    def __init__(self, in_channel, width, low_dim):
        super().__init__()
        self.inplanes, base = 64, int(64 * width)
        self.conv1 = nn.Conv2d(in_channel, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(base, 3, 1)
        self.layer2 = self._make_layer(base * 2, 4, 2)
        self.layer3 = self._make_layer(base * 4, 6, 2)
        self.layer4 = self._make_layer(base * 8, 3, 2)
        self.fc = nn.Linear(base * 8 * 4, low_dim)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            conv = nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return l2norm(self.fc(x.mean((2, 3))))


class ResNetV1(nn.Module):
    """[ref: CMC models/resnet.py ResNetV1('resnet50')]: l_to_ab on L, ab_to_l on ab."""

    def __init__(self, width, low_dim):
        super().__init__()
        self.l_to_ab = CMCResNet50(1, width, low_dim)
        self.ab_to_l = CMCResNet50(2, width, low_dim)

    def forward(self, x):
        l, ab = official_views(x)
        return self.l_to_ab(l), self.ab_to_l(ab)


def test_real_split_lab_resnet50_matches_cmc_resnet50v1(tmp_path, monkeypatch):
    """The ImageNet preset's two half-width ResNet-50s at 72 px (the 7x7 stem and max-pool kept:
    above 64 px), batch 8, beside CMC's ResNetV1 with the project's initial weights (strict load:
    a wrong width, stem or extra layer fails), NCE with 8 noise rows, the preset's wd: one step.
    The float32 Lab input of the project and skimage's float64 one differ by 3e-7, which this
    freshly initialised net at batch 8 (train-mode BN) amplifies to 17% of a tensor's update
    (measured): both sides read the project's Lab here, after checking it equals the official one
    to 1e-6 (the Lab formulas themselves are pinned by the small-network test above)."""
    flags = ["--preset", "imagenet", "--arch", official(IN, "arch"), "--img-size", 72]
    model, opt, args = built_by_main(
        cmc, monkeypatch, tmp_path, "--subset", N, "--batch-size", B, *flags, "--nce-k", 8
    )[:3]
    width, dim = official(IN, "width"), official(IN, "dim")
    net = ResNetV1(width, dim)
    names = {"l": "l_to_ab.", "ab": "ab_to_l."}
    state = {}  # the project's names -> CMC's
    for k, v in model.state_dict().items():
        part, view, rest = k.split(".", 2) if k.count(".") >= 2 else (k, None, None)
        if part == "backbone":
            state[names[view] + rest] = v.clone()
        elif part == "projector":
            state[names[view] + "fc." + rest] = v.clone()
    net.load_state_dict(state, strict=True)
    lr, wd, tau, m = (official(IN, f) for f in ("lr", "wd", "tau", "bank_m"))
    ref = OfficialCMC(model, N, 8, tau, m, official(IN, "softmax"), lr, (), wd, 10**9)
    ref.net, ref.params = net, list(net.parameters())
    ref.buf, ref.model = [None] * len(ref.params), net
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (B, 3, 72, 72), generator=g) / 255
    idx = torch.randperm(N, generator=g)[:B]
    for mine, want in zip(cmc.lab_views(x), official_views(x)):
        close_rel(mine, want, "Lab", rtol=1e-6)
    monkeypatch.setitem(globals(), "official_views", cmc.lab_views)
    torch.manual_seed(7)
    stats = cmc.train_step(model, ([x], None, idx), opt, scaler, 0, args)
    torch.manual_seed(7)
    loss = ref.step(0, x, idx, torch.randint(N, (B, 8)))
    close_rel(stats["loss"], loss.detach(), "loss")
    mine = model.state_dict()
    for k, before in state.items():
        view, rest = "l" if k.startswith("l_to_ab.") else "ab", k.split(".", 1)[1]
        name = f"backbone.{view}.{rest}"
        name = f"projector.{view}.{rest[3:]}" if rest.startswith("fc.") else name
        want = net.state_dict()[k].float()  # + 1e-5 of the change: BN biases start at 0
        atol = 1e-5 * (want.abs().max() + (want - before.float()).abs().max()).item()
        torch.testing.assert_close(
            mine[name].float(), want, rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}"
        )
    close_rel(model.bank_l, ref.memory_l, "bank_l")
    close_rel(model.bank_ab, ref.memory_ab, "bank_ab")
    close_rel(model.nce_z, torch.tensor([ref.Z_l, ref.Z_ab], dtype=torch.float64), "Z")
