"""Official-loop parity for invaspread.py.

The InvaSpread training step is restated here in plain PyTorch from the official code,
mangye16/Unsupervised_Embedding_Learning (demo_seen.py, BatchAverage.py BatchCriterion,
models/resnet_cifar.py ResNet18, models/normalize.py), and run beside the project's real
`train_step` (with the optimizer and `args.sched` exactly as `invaspread.main` builds them) for a
few CPU steps from the same weights on the same inputs. Nothing below calls the project's loss,
optimizer or schedule; only the initial weights (by state_dict or deep copies of the tiny
encoder) and the inputs are shared.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FT_SIMCLR_V2, Dev, Ref, built_by_main, official
from torch import nn

import invaspread

# ---- the official values, each from its source ---------------------------------------------
DEMO = "ref: Unsupervised_Embedding_Learning demo_seen.py"
LIN = (
    "no linear protocol in InvaSpread (kNN only): MoCo's [ref: facebookresearch/moco main_lincls.py"
)
CIFAR = {
    "arch": Ref("resnet18", f"[InvaSpread §4.1; {DEMO} models.ResNet18 (models/resnet_cifar.py)]"),
    "epochs": Ref(301, f"[{DEMO} range(start_epoch, start_epoch + 301)]"),
    "batch_size": Ref(128, f"[{DEMO} --batch-size default 128; README command]"),
    "lr": Ref(0.03, f"[{DEMO} --lr default 0.03, not scaled; README command]"),
    "wd": Ref(5e-4, f"[{DEMO} optim.SGD(net.parameters(), momentum=0.9, weight_decay=5e-4)]"),
    "lr_milestones": Ref((120, 160, 200), f"[{DEMO} adjust_learning_rate, per epoch]"),
    "lr_factors": Ref((0.1, 0.05, 0.01), f"[{DEMO} adjust_learning_rate: x0.1, x0.05, x0.01]"),
    "warmup_epochs": Ref(0, f"[{DEMO}: no warm-up]"),
    "tau": Ref(0.1, f"[{DEMO} --batch-t default 0.1; README: 0.05-0.1]"),
    "dim": Ref(128, f"[InvaSpread §4.1; {DEMO} --low-dim default 128]"),
    "crop_min": Ref(0.2, f"[{DEMO} transform_train RandomResizedCrop(scale=(0.2, 1.))]"),
    "linear_epochs": Ref(100, f"{LIN} --epochs 100]"),
    "linear_lr": Ref(30.0, f"{LIN} --lr 30, batch 256]"),
    "linear_wd": Ref(0.0, f"{LIN} --wd 0]"),
    "linear_batch_size": Ref(256, f"{LIN} --batch-size 256]"),
    "linear_nesterov": Ref(False, f"{LIN} SGD momentum 0.9]"),
    "linear_milestones": Ref((60, 80), f"{LIN} --schedule 60 80]"),
    "linear_decay": Ref(0.1, f"{LIN} adjust_learning_rate x0.1 per milestone]"),
    "linear_epoch_lr": Ref(True, f"{LIN} adjust_learning_rate once per epoch]"),
    "linear_best": Ref(True, f"{LIN} best_acc1]"),
    "linear_zero_init": Ref(False, f"{LIN} fc normal_(0, 0.01), bias zero_()]"),
    **FT_SIMCLR_V2,  # no fine-tuning protocol in InvaSpread: C.RunArgs' (SimCLR v2's)
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
NO_IN = "; no ImageNet recipe in the paper (CIFAR-10, STL-10, unseen categories) nor the code"
IMAGENET = {  # the CIFAR-10 recipe, unchanged (224 px, ImageNet stem and mean/std)
    **{k: Ref(v.value, v.cite[:-1] + NO_IN + "]") for k, v in CIFAR.items() if isinstance(v, Ref)},
    "ft_batch_size": FT_SIMCLR_V2["ft_batch_size"],
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}
CF = OFFICIAL[("--preset", "cifar")]

N, B, STEPS = 64, 8, 4  # training images, batch (images; 2B views), steps
SPE = N // B  # steps per epoch (drop_last)


def built(tmp_path, monkeypatch, *flags, data=False):
    """model, optimizer and args (with args.sched) exactly as invaspread.main builds them."""
    flags = ("--subset", N, "--batch-size", B, *flags)
    model, opt, args, d = built_by_main(invaspread, monkeypatch, tmp_path, *flags)
    return (model, opt, args) + ((d,) if data else ())


def close(a, b, msg=""):
    """1e-5 relative, with an absolute floor of 1e-5 of the tensor's largest magnitude: fp32
    summation-order noise of the two sides measures <= 2e-6 of the largest entry (momentum
    buffers; parameters <= 1.5e-6) on 1 and 4 threads."""
    b = torch.as_tensor(b, dtype=a.dtype)
    atol = 1e-5 * max(b.abs().max().item(), 1e-30) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{msg}: {m}")


# ---- the official code, restated -----------------------------------------------------------
# demo_seen.py adjust_learning_rate (per epoch): x0.1 in [120, 160), x0.05 in [160, 200),
# x0.01 from 200
def official_lr(base, epoch):
    if 120 <= epoch < 160:
        return base * 0.1
    if 160 <= epoch < 200:
        return base * 0.05
    return base * 0.01 if epoch >= 200 else base


# models/resnet_cifar.py ResNet.forward: ... linear, then models/normalize.py Normalize(2)
def official_net(backbone, linear, x):
    out = linear(backbone(x))
    return out.div(out.pow(2).sum(1, keepdim=True).pow(1.0 / 2))


def batch_criterion(x, neg_m, t):
    """BatchAverage.py BatchCriterion.forward on x = net(cat(inputs1, inputs2)), [2B, D]:
    pos = exp(x . reordered(x).data / T); all = exp(x @ x.t().data / T) * (1 - I);
    negM == 1: all_div = all.sum(1); lnPmt = pos / all_div; lnPon = log(1 - all / all_div)
    summed over the row minus log(1 - lnPmt) (the positive's term); loss = -(sum log lnPmt +
    negM sum lnPon) / 2B."""
    n = x.size(0)
    diag_mat = 1 - torch.eye(n)
    reordered = torch.cat((x.narrow(0, n // 2, n // 2), x.narrow(0, 0, n // 2)), 0)
    pos = (x * reordered.detach()).sum(1).div(t).exp()
    all_prob = torch.mm(x, x.t().detach()).div(t).exp() * diag_mat
    if neg_m == 1:
        all_div = all_prob.sum(1)
    else:
        all_div = (all_prob.sum(1) - pos) * neg_m + pos
    ln_pmt = torch.div(pos, all_div)
    ln_pon = -torch.div(all_prob, all_div.repeat(n, 1).t()).add(-1)
    ln_pon = ln_pon.log().sum(1) - (-ln_pmt.add(-1)).log()
    ln_pmt = ln_pmt.log()
    return -(ln_pmt.sum(0) + ln_pon.sum(0) * neg_m) / n


def sgd_step(params, bufs, lr, wd, momentum=0.9):
    """demo_seen.py optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4): every
    parameter decayed; d = g + wd p; buf = d (first step) or m buf + d; p -= lr buf."""
    with torch.no_grad():
        for i, p in enumerate(params):
            d = p.grad + wd * p
            bufs[i] = d.clone() if bufs[i] is None else bufs[i].mul_(momentum).add_(d)
            p.sub_(lr * bufs[i])


def official_knn(net, train_set, test_set, k, sigma):
    """utils.py kNN: net.eval(); trainFeatures = net(inputs) of the training set under the test
    transform (batches of 100); per test batch: dist = features @ trainFeatures, top-K, one-hot
    of the neighbours' labels weighted by exp(yd / sigma), summed, sorted descending; top-1 in
    % (top1 * 100 / total)."""
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=100)
    top1, total = 0, 0
    with torch.no_grad():
        train_features = torch.cat([net(x) for x, _, _ in loader(train_set)]).t()
        train_labels = torch.cat([torch.as_tensor(y) for _, y, _ in loader(train_set)])
        c = int(train_labels.max()) + 1
        for inputs, targets, _ in loader(test_set):
            yd, yi = torch.mm(net(inputs), train_features).topk(k, dim=1, largest=True)
            retrieval = torch.gather(train_labels.view(1, -1).expand(len(inputs), -1), 1, yi)
            one_hot = torch.zeros(len(inputs) * k, c).scatter_(1, retrieval.view(-1, 1), 1)
            weights = yd.clone().div_(sigma).exp_()
            probs = (one_hot.view(len(inputs), -1, c) * weights.view(len(inputs), -1, 1)).sum(1)
            predictions = probs.sort(1, True)[1]
            top1 += predictions.eq(torch.as_tensor(targets).view(-1, 1))[:, 0].sum().item()
            total += len(inputs)
    return top1 * 100.0 / total


# models/resnet_cifar.py: ResNet18 = ResNet(BasicBlock, [2, 2, 2, 2], pool_len=4, low_dim=128)
class OfficialBlock(nn.Module):
    """resnet_cifar.py BasicBlock: relu(bn1(conv1 3x3, stride)), bn2(conv2 3x3), + shortcut
    (empty, or conv 1x1 stride + BN where the shape changes), relu."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class OfficialResNet18(nn.Module):
    """resnet_cifar.py ResNet: conv1 3x3 stride 1 (no max-pool), bn1, relu, layer1-4 (64, 128,
    256, 512; strides 1, 2, 2, 2), F.avg_pool2d(out, pool_len=4) (32 px: 4x4 maps), linear to
    low_dim, Normalize(2) (x / |x|)."""

    def __init__(self, low_dim=128, pool_len=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(OfficialBlock(in_planes, planes, stride)))
            layers[-1].append(OfficialBlock(planes, planes))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, low_dim)
        self.pool_len = pool_len

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, self.pool_len).view(len(out), -1)
        out = self.linear(out)
        return out.div(out.pow(2).sum(1, keepdim=True).pow(1.0 / 2))


def official_name(name):
    """The project's parameter name -> the official network's (torchvision's downsample is
    resnet_cifar.py's shortcut; the 128-d head is its linear)."""
    name = name.removeprefix("backbone.").replace("downsample", "shortcut")
    return name.replace("projector.", "linear.")


# ---- the tests -------------------------------------------------------------------------------
def test_schedule_is_the_official_adjust_learning_rate(tmp_path, monkeypatch):
    _, _, args = built(tmp_path, monkeypatch)
    epochs, lr = official(CF, "epochs"), official(CF, "lr")
    assert len(args.sched["lr"]) == epochs * SPE  # range(0, 0 + 301)
    want = [official_lr(lr, s // SPE) for s in range(epochs * SPE)]  # set once per epoch
    assert args.sched["lr"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("start_epoch, wd", [(160, None), (200, None), (120, 0.05)])
def test_training_steps_match_the_official_loop(tmp_path, monkeypatch, start_epoch, wd):
    """4 steps around an lr step: losses, lrs, every parameter, BN buffer and momentum buffer. At
    the preset's wd 5e-4 (on every parameter, biases and BN too) and at 0.05: without the decay,
    or without it on the 1-D parameters, the momentum buffers differ."""
    flags = () if wd is None else ("--wd", wd)
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    wd = official(CF, "wd") if wd is None else wd
    tau, lr0 = official(CF, "tau"), official(CF, "lr")
    backbone, linear = copy.deepcopy(model.backbone), copy.deepcopy(model.projector)
    ref_params = [*backbone.parameters(), *linear.parameters()]  # net.parameters()
    bufs = [None] * len(ref_params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(5)
    start = start_epoch * SPE - 2  # two steps before and two after an lr step
    for step in range(start, start + STEPS):
        x1, x2 = (torch.rand(B, 3, 16, 16, generator=g) for _ in range(2))
        got = invaspread.train_step(model, ([x1, x2], None, None), opt, scaler, step, args)

        # demo_seen.py train(): adjust_learning_rate(epoch); inputs = cat((inputs1, inputs2));
        # zero_grad; features = net(inputs); loss = criterion(features); backward; step
        lr = official_lr(lr0, step // SPE)
        for p in ref_params:
            p.grad = None
        features = official_net(backbone, linear, torch.cat((x1, x2), 0))
        loss = batch_criterion(features, 1, tau)  # --batch-m 1
        loss.backward()
        sgd_step(ref_params, bufs, lr, wd)

        close(got["loss"], loss.detach(), f"loss at step {step}")
        assert got["lr"] == pytest.approx(lr, rel=1e-12)
    for (name, p), r in zip(model.named_parameters(), ref_params):
        close(p.detach(), r.detach(), name)
    ref_buffers = {f"backbone.{k}": v for k, v in backbone.named_buffers()}
    for name, v in model.named_buffers():  # BN statistics over the 2B views of the batch
        close(v.float(), ref_buffers[name].float(), name)
    for (name, p), buf in zip(model.named_parameters(), bufs):
        close(opt.state[p]["momentum_buffer"], buf, f"momentum buffer of {name}")


def test_paper_knn_is_the_official_knn_on_the_128d_embedding(tmp_path, monkeypatch):
    """demo_seen.py: kNN(epoch, net, trainloader, testloader, 200, args.batch_t, ...) on net(x),
    the l2-normalised 128-d output (not the backbone)."""
    flags = ["--knn-k", 20, "--knn-every", 1]
    model, _, args, data = built(tmp_path, monkeypatch, *flags, data=True)
    got = invaspread.paper_knn(model, data, args)
    assert model.training  # back in train mode
    model.eval()
    net = lambda x: official_net(model.backbone, model.projector, x)
    want = official_knn(net, data.train_eval, data.test, 20, 0.1)  # --batch-t 0.1
    assert got["embed_knn_top1"] == pytest.approx(want, rel=1e-9)
    assert (got["k"], got["t"]) == (20, 0.1)


def test_real_resnet18_step_matches_the_official_network(tmp_path, monkeypatch, float64):
    """The real network at 32 px, batch 8: the project's ResNet-18 (torchvision's, CIFAR stem,
    fc = Identity) + Linear(512, 128) + l2 norm against models/resnet_cifar.py's ResNet18 written
    out above, loaded with the project's weights by state_dict (strict: every name and shape);
    one step at the preset's lr, wd and tau: loss, every parameter, BN buffer and momentum."""
    flags = ("--arch", "resnet18", "--img-size", 32, "--subset", 16, "--batch-size", 8)
    model, opt, args, _ = built_by_main(invaspread, monkeypatch, tmp_path, *flags)
    net = OfficialResNet18(official(CF, "dim"))
    net.load_state_dict({official_name(k): v for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.rand(8, 3, 32, 32, generator=g) for _ in range(2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = invaspread.train_step(model, ([x1, x2], None, None), opt, scaler, 0, args)
    params = dict(net.named_parameters())
    bufs = [None] * len(params)
    loss = batch_criterion(net(torch.cat((x1, x2), 0)), 1, official(CF, "tau"))
    loss.backward()
    sgd_step(list(params.values()), bufs, official(CF, "lr"), official(CF, "wd"))
    close(got["loss"], loss.detach(), "loss")
    ref_state, ref_bufs = net.state_dict(), dict(zip(params, bufs))
    for name, v in model.state_dict().items():
        close(v.float(), ref_state[official_name(name)].float(), name)
    for name, p in model.named_parameters():
        buf = ref_bufs[official_name(name)]
        close(opt.state[p]["momentum_buffer"], buf, f"momentum buffer of {name}")
