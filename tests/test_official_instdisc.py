"""Official-loop parity for instdisc.py.

The InstDisc training step is restated here in plain PyTorch from the official code,
zhirongw/lemniscate.pytorch (main.py, cifar.py, lib/NCEAverage.py, lib/LinearAverage.py,
lib/NCECriterion.py, lib/alias_multinomial.py, lib/normalize.py, models/resnet.py), and run
beside the project's real `train_step` (with the optimizer and `args.sched` exactly as
`instdisc.main` builds them) for a few CPU steps from the same weights, the same memory bank, the
same inputs and the same noise indices. Nothing below calls the project's loss, optimizer,
schedule, Z estimate or bank update; only the initial modules (deep copies), the initial bank and
the inputs are shared.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FT_SIMCLR_V2, TINY, Dev, Ref, built_by_main, close_rel, official, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import spawn
from torch import nn

import common as C
import instdisc

# ---- the official values, pinned: one entry per preset --------------------------------------
LEM = "ref: zhirongw/lemniscate.pytorch"
LINCLS = "no probe in lemniscate (the paper's linear classifiers on conv features, no code); "
LINCLS += "MoCo's, the closest protocol [ref: facebookresearch/moco main_lincls.py"
IMAGENET = {
    "arch": Ref("resnet50", f"[InstDisc Tab 2 ResNet-50 54.0%; {LEM} README ResNet-50 model]"),
    "epochs": Ref(200, f"[{LEM} main.py --epochs 200]"),
    "batch_size": Ref(256, f"[{LEM} main.py -b 256; README command -b 256]"),
    "lr": Ref(0.03, f"[{LEM} main.py --lr 0.03; README command --lr 0.03]"),
    "wd": Ref(1e-4, f"[{LEM} main.py --weight-decay 1e-4, SGD(model.parameters())]"),
    "lr_milestones": Ref((120, 160), f"[{LEM} main.py adjust_learning_rate: epoch < 120, < 160]"),
    "warmup_epochs": Ref(0, f"[{LEM} main.py adjust_learning_rate: no warm-up]"),
    "tau": Ref(0.07, f"[InstDisc §3.1 tau = 0.07; {LEM} main.py --nce-t 0.07]"),
    "nce_k": Ref(4096, f"[InstDisc §3.2 m = 4096; {LEM} main.py --nce-k 4096]"),
    "bank_m": Ref(0.5, f"[{LEM} main.py --nce-m 0.5; lib/NCEAverage.py momentum]"),
    "dim": Ref(128, f"[InstDisc §3.1 128-d; {LEM} main.py --low-dim 128]"),
    "crop_min": Ref(0.2, f"[{LEM} main.py RandomResizedCrop(224, scale=(0.2, 1.))]"),
    "aug": Ref("imagenet", f"[{LEM} main.py: RandomGrayscale(0.2), ColorJitter(0.4 x4), flip]"),
    "linear_epochs": Ref(100, f"{LINCLS} --epochs 100]"),
    "linear_lr": Ref(30.0, f"{LINCLS} --lr 30]"),
    "linear_wd": Ref(0.0, f"{LINCLS} --wd 0]"),
    "linear_batch_size": Ref(256, f"{LINCLS} -b 256]"),
    "linear_nesterov": Ref(False, f"{LINCLS} SGD momentum 0.9, no nesterov]"),
    "linear_milestones": Ref((60, 80), f"{LINCLS} --schedule 60 80]"),
    "linear_decay": Ref(0.1, f"{LINCLS} adjust_learning_rate x0.1]"),
    "linear_epoch_lr": Ref(True, f"{LINCLS} adjust_learning_rate once per epoch]"),
    "linear_best": Ref(True, f"{LINCLS} best_acc1]"),
    "linear_zero_init": Ref(False, f"{LINCLS} fc normal_(0, 0.01), bias zero_]"),
    **FT_SIMCLR_V2,
}
CIFAR = {  # lemniscate cifar.py and the README's CIFAR command "--nce-k 0 --nce-t 0.1 --lr 0.03"
    **IMAGENET,
    "arch": Ref("resnet18", f"[{LEM} cifar.py models ResNet18 (models/resnet_cifar.py)]"),
    "batch_size": Ref(128, f"[{LEM} cifar.py DataLoader(batch_size=128)]"),
    "lr": Ref(0.03, f"[{LEM} cifar.py --lr 0.03; README CIFAR command --lr 0.03]"),
    "epochs": Ref(200, f"[{LEM} cifar.py range(start_epoch, start_epoch + 200)]"),
    "wd": Ref(5e-4, f"[{LEM} cifar.py SGD(weight_decay=5e-4)]"),
    "lr_milestones": Ref((120, 160), f"[{LEM} cifar.py lr * 0.1 ** ((epoch - 80) // 40)]"),
    "tau": Ref(0.1, f"[{LEM} cifar.py --nce-t 0.1; README CIFAR command]"),
    "nce_k": Ref(0, f"[{LEM} README CIFAR command --nce-k 0: LinearAverage, exact softmax]"),
    "crop_min": Ref(0.2, f"[{LEM} cifar.py RandomResizedCrop(32, scale=(0.2, 1.))]"),
    "aug": Ref("cifar", f"[{LEM} cifar.py: ColorJitter(0.4 x4), RandomGrayscale(0.2), no flip]"),
    "ft_batch_size": Dev(256, 1024, "C.FT_CIFAR_BATCH: 1024 exceeds CIFAR-10's 1% labelled set"),
}
OFFICIAL = {("--preset", "imagenet"): IMAGENET, ("--preset", "cifar"): CIFAR}
IN, CI = OFFICIAL[("--preset", "imagenet")], OFFICIAL[("--preset", "cifar")]

N, B, K, STEPS = 64, 8, 16, 4  # training images (bank rows), batch, NCE noise rows, steps
SPE = N // B  # steps per epoch


def built(tmp_path, monkeypatch, *flags, data=False):
    """model, optimizer and args (with args.sched) exactly as instdisc.main builds them."""
    flags = ("--subset", N, "--batch-size", B, *flags)
    model, opt, args, d = built_by_main(instdisc, monkeypatch, tmp_path, *flags)
    return (model, opt, args) + ((d,) if data else ())


def close(a, b, msg=""):
    """1e-5 relative, with an absolute floor of 1e-5 of the tensor's largest magnitude: fp32
    summation-order noise of the two sides measures <= 2e-6 of the largest entry (momentum
    buffers; parameters and the bank <= 1e-6) on 1 and 4 threads."""
    b = torch.as_tensor(b, dtype=a.dtype)
    atol = 1e-5 * max(b.abs().max().item(), 1e-30) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{msg}: {m}")


# ---- the official code, restated -----------------------------------------------------------
# lemniscate main.py adjust_learning_rate: lr, x0.1 from epoch 120, x0.01 from epoch 160
def main_py_lr(base, epoch):
    return base if epoch < 120 else base * 0.1 if epoch < 160 else base * 0.01


# lemniscate cifar.py adjust_learning_rate: lr * 0.1 ** ((epoch - 80) // 40) from epoch 80
def cifar_py_lr(base, epoch):
    return base * (0.1 ** ((epoch - 80) // 40)) if epoch >= 80 else base


# lemniscate lib/normalize.py Normalize(2): x / (sum x^2) ** 0.5; models/resnet.py: fc then it
def official_net(backbone, fc, x):
    out = fc(backbone(x))
    return out.div(out.pow(2).sum(1, keepdim=True).pow(0.5))


def momentum_write(memory, rows, x, y, m):
    """The memory update in NCEFunction.backward / LinearAverageOp.backward: the rows read in the
    forward, times momentum, plus x * (1 - momentum), divided by their l2 norm, index_copy_."""
    w = rows * m + x * (1 - m)
    memory.index_copy_(0, y, w.div(w.pow(2).sum(1, keepdim=True).pow(0.5)))


class NCEFunction(torch.autograd.Function):
    """lib/NCEAverage.py NCEFunction: forward out = exp(bmm(memory[idx], x) / T) / Z, Z set to
    out.mean() * N when params[2] < 0; backward: grad * out / T bmm weight, then the memory
    update of the positive rows (inside backward, before the optimizer step)."""

    @staticmethod
    def forward(ctx, x, y, memory, idx, params):
        k, t, z = int(params[0].item()), params[1].item(), params[2].item()
        idx[:, 0] = y  # idx.select(1, 0).copy_(y)
        weight = memory.index_select(0, idx.view(-1)).view(len(x), k + 1, -1)
        out = torch.bmm(weight, x.view(len(x), -1, 1)).div_(t).exp_()
        if z < 0:
            params[2] = out.mean() * memory.size(0)
            z = params[2].item()
        out = out.div_(z).view(len(x), k + 1)
        ctx.save_for_backward(x, memory, y, weight, out, params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, memory, y, weight, out, params = ctx.saved_tensors
        t, m = params[1].item(), params[3].item()
        g = (grad_out * out / t).view(len(x), 1, -1)
        grad_x = torch.bmm(g, weight).view_as(x)
        momentum_write(memory, weight[:, 0].clone(), x, y, m)
        return grad_x, None, None, None, None


class LinearAverageOp(torch.autograd.Function):
    """lib/LinearAverage.py LinearAverageOp: forward x @ memory.T / T (memory a constant);
    backward grad / T @ memory, then the memory update of the positive rows."""

    @staticmethod
    def forward(ctx, x, y, memory, params):
        ctx.save_for_backward(x, memory, y, params)
        return torch.mm(x, memory.t()).div_(params[0].item())

    @staticmethod
    def backward(ctx, grad_out):
        x, memory, y, params = ctx.saved_tensors
        grad_x = torch.mm(grad_out / params[0].item(), memory)
        momentum_write(memory, memory.index_select(0, y), x, y, params[1].item())
        return grad_x, None, None, None


def nce_criterion(x, n):
    """lib/NCECriterion.py: Pn = 1/N, eps 1e-7; lnPmt = Pmt / (Pmt + K Pn + eps), lnPon = K Pn /
    (Pon + K Pn + eps), both logged; loss = -(sum lnPmt + sum lnPon) / batchSize."""
    k, pn = x.size(1) - 1, 1 / float(n)
    ln_pmt = (x[:, 0] / (x[:, 0] + k * pn + 1e-7)).log()
    ln_pon = ((k * pn) / (x[:, 1:] + k * pn + 1e-7)).log()
    return -(ln_pmt.sum(0) + ln_pon.sum()) / len(x)


def sgd_step(params, bufs, lr, wd, momentum=0.9):
    """torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=wd) of main.py /
    cifar.py: every parameter decayed; d = g + wd p; buf = d (first step) or m buf + d;
    p -= lr buf."""
    with torch.no_grad():
        for i, p in enumerate(params):
            d = p.grad + wd * p
            bufs[i] = d.clone() if bufs[i] is None else bufs[i].mul_(momentum).add_(d)
            p.sub_(lr * bufs[i])


def alias_table(probs):
    """lib/alias_multinomial.py AliasMethod.__init__ (the table only)."""
    probs = probs / probs.sum() if probs.sum() > 1 else probs
    n = len(probs)
    prob, alias, smaller, larger = torch.zeros(n), torch.zeros(n, dtype=torch.long), [], []
    for kk, p in enumerate(probs):
        prob[kk] = n * p
        (smaller if prob[kk] < 1.0 else larger).append(kk)
    while smaller and larger:
        small, large = smaller.pop(), larger.pop()
        alias[small] = large
        prob[large] = (prob[large] - 1.0) + prob[small]
        (smaller if prob[large] < 1.0 else larger).append(large)
    for last in smaller + larger:
        prob[last] = 1
    return prob, alias


def official_knn(net, train_features, train_labels, test_set, k, sigma):
    """test.py kNN: net.eval(); per test batch of 100: dist = features @ trainFeatures, top-K,
    one-hot of the neighbours' labels weighted by exp(yd / sigma), summed; predictions sorted
    descending; top-1 = prediction 0 == target. trainFeatures = lemniscate.memory.t(), or with
    recompute_memory=1 net(inputs) of the training set under the test transform."""
    c, top1, total = int(train_labels.max()) + 1, 0, 0
    with torch.no_grad():
        for inputs, targets, _ in torch.utils.data.DataLoader(test_set, batch_size=100):
            features = net(inputs)
            yd, yi = torch.mm(features, train_features).topk(k, dim=1, largest=True, sorted=True)
            retrieval = torch.gather(train_labels.view(1, -1).expand(len(inputs), -1), 1, yi)
            one_hot = torch.zeros(len(inputs) * k, c).scatter_(1, retrieval.view(-1, 1), 1)
            weights = yd.clone().div_(sigma).exp_()
            probs = (one_hot.view(len(inputs), -1, c) * weights.view(len(inputs), -1, 1)).sum(1)
            predictions = probs.sort(1, True)[1]
            top1 += predictions.eq(torch.as_tensor(targets).view(-1, 1))[:, 0].sum().item()
            total += len(inputs)
    return top1 / total


# ---- the tests -------------------------------------------------------------------------------
def test_official_noise_sampler_is_uniform_with_replacement():
    """NCEAverage draws with AliasMethod(torch.ones(N)): every prob is 1, so draw() returns its
    uniform kk = random_(0, N) unchanged (b = bernoulli(1) = 1): the project's
    torch.randint(N, (B, K)) is the same distribution (may include the positive)."""
    for n in (N, 1000, 1281167 // 1000):
        prob, alias = alias_table(torch.ones(n))
        assert torch.equal(prob, torch.ones(n))
        kk = torch.randint(n, (500,))
        b = torch.bernoulli(prob[kk])
        assert torch.equal(kk * b.long() + alias[kk] * (1 - b).long(), kk)


@pytest.mark.parametrize("preset", ["imagenet", "cifar"])
def test_schedule_is_the_official_adjust_learning_rate(tmp_path, monkeypatch, preset):
    _, _, args = built(tmp_path, monkeypatch, "--preset", preset, "--nce-k", K)
    adjust, table = (main_py_lr, IN) if preset == "imagenet" else (cifar_py_lr, CI)
    epochs = official(table, "epochs")
    assert len(args.sched["lr"]) == epochs * SPE
    want = [adjust(official(table, "lr"), s // SPE) for s in range(epochs * SPE)]  # per epoch
    assert args.sched["lr"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "preset,flags,wd",
    [
        ("imagenet", ["--nce-k", str(K)], None),  # main.py: NCEAverage, the preset's wd
        ("cifar", [], None),  # cifar.py --nce-k 0: LinearAverage
        ("imagenet", ["--nce-k", str(K), "--wd", "0.5"], 0.5),  # wd visible: 0.015 p per step
    ],
    ids=["main.py-NCEAverage", "cifar.py-LinearAverage", "main.py-wd0.5"],
)
def test_training_steps_match_the_official_loop(tmp_path, monkeypatch, preset, flags, wd):
    model, opt, args = built(tmp_path, monkeypatch, "--preset", preset, *flags)
    official_lr = main_py_lr if preset == "imagenet" else cifar_py_lr
    table = IN if preset == "imagenet" else CI
    nce = official(table, "nce_k") > 0 or "--nce-k" in flags
    tau, bank_m = official(table, "tau"), official(table, "bank_m")
    wd = official(table, "wd") if wd is None else wd
    # shared: the initialised networks (deep copies) and the initial memory
    backbone, fc = copy.deepcopy(model.backbone), copy.deepcopy(model.projector)
    memory = model.bank.clone()  # NCEAverage / LinearAverage register_buffer('memory')
    initial_memory = memory.clone()
    params = torch.tensor([K, tau, -1, bank_m] if nce else [tau, bank_m])
    ref_params = [*backbone.parameters(), *fc.parameters()]  # main.py: model.parameters()
    bufs = [None] * len(ref_params)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(3)
    start = 120 * SPE - 2  # the last steps of epoch 119 and the first of epoch 120: the decay
    for step in range(start, start + STEPS):
        x = torch.rand(B, 3, 16, 16, generator=g)
        y = torch.randperm(N, generator=g)[:B]  # the dataset indices of the batch
        torch.manual_seed(step)  # the same noise rows on both sides (drawn first in the step)
        got = instdisc.train_step(model, ([x], None, y), opt, scaler, step, args)
        torch.manual_seed(step)
        noise = torch.randint(N, (B, K)) if nce else None

        # main.py / cifar.py train(): adjust_learning_rate per epoch, zero_grad, net, lemniscate,
        # criterion, backward (the memory update), optimizer.step
        lr = official_lr(official(table, "lr"), step // SPE)
        for p in ref_params:
            p.grad = None
        feature = official_net(backbone, fc, x)
        if nce:
            idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), noise], 1)  # col 0 <- y
            loss = nce_criterion(NCEFunction.apply(feature, y, memory, idx, params), N)
        else:  # cifar.py: nn.CrossEntropyLoss on LinearAverage's logits, target the index
            logits = LinearAverageOp.apply(feature, y, memory, params)
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        sgd_step(ref_params, bufs, lr, wd)

        close(got["loss"], loss.detach(), f"loss at step {step}")
        assert got["lr"] == pytest.approx(lr, rel=1e-12)
    # every parameter, every buffer (BN statistics), the memory, Z, the momentum buffers
    for (name, p), r in zip(model.named_parameters(), ref_params):
        close(p.detach(), r.detach(), name)
    ref_buffers = {f"backbone.{k}": v for k, v in backbone.named_buffers()}
    for name, v in model.named_buffers():
        if name.startswith("backbone."):
            close(v.float(), ref_buffers[name].float(), name)
    close(model.bank, memory, "bank")
    assert not torch.equal(memory, initial_memory)  # rows were written (and compared above)
    if nce:
        assert model.z.item() == pytest.approx(params[2].item(), rel=1e-5)
    for (name, p), buf in zip(model.named_parameters(), bufs):
        close(opt.state[p]["momentum_buffer"], buf, f"momentum buffer of {name}")


def test_paper_knn_is_the_official_knn_on_the_bank_and_recomputed(tmp_path, monkeypatch):
    """bank_knn_top1: main.py's final kNN (recompute_memory=0) against the memory; embed_knn_top1:
    cifar.py's final kNN (recompute_memory=1), training features recomputed in eval()."""
    flags = ["--preset", "imagenet", "--nce-k", K, "--knn-k", 20, "--knn-every", 1]
    model, _, args, data = built(tmp_path, monkeypatch, *flags, data=True)
    with torch.no_grad():  # every row written once, as after training (the memory is unit-norm)
        model.bank.copy_(torch.nn.functional.normalize(torch.randn_like(model.bank), dim=1))
        model.bank[:16] = instdisc.embed(
            model.eval(), torch.stack([data.train_eval[i][0] for i in range(16)])
        )
    model.train()
    got = instdisc.paper_knn(model, data, args)
    assert model.training  # back in train mode

    net = lambda x: official_net(model.backbone, model.projector, x)
    model.eval()
    labels = torch.as_tensor([data.train_eval[i][1] for i in range(len(data.train_eval))])
    bank = official_knn(net, model.bank.t(), labels, data.test, 20, official(IN, "tau"))
    loader = torch.utils.data.DataLoader(data.train_eval, batch_size=100)
    with torch.no_grad():
        recomputed = torch.cat([net(x) for x, _, _ in loader]).t()
    embed = official_knn(net, recomputed, labels, data.test, 20, official(IN, "tau"))
    assert got["bank_knn_top1"] == pytest.approx(bank * 100, rel=1e-9)
    assert got["embed_knn_top1"] == pytest.approx(embed * 100, rel=1e-9)
    assert (got["k"], got["t"]) == (20, 0.07)


# ---- the real network: lemniscate's CIFAR ResNet-18, restated -------------------------------
class CifarBasicBlock(nn.Module):
    """[ref: lemniscate models/resnet_cifar.py BasicBlock]: relu(bn1(conv1)), bn2(conv2), plus
    the shortcut (1x1 conv + BN where the stride or width changes), relu."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            conv = nn.Conv2d(cin, planes, 1, stride, bias=False)
            self.shortcut = nn.Sequential(conv, nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """[ref: lemniscate models/resnet_cifar.py ResNet(BasicBlock, [2, 2, 2, 2], low_dim)]: 3x3
    stride-1 stem, no max-pool, avg_pool2d(4), linear to low_dim, then lib/normalize.py."""

    def __init__(self, low_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(CifarBasicBlock(cin, planes, stride)))
            layers[-1].append(CifarBasicBlock(planes, planes, 1))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, low_dim)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.linear(F.avg_pool2d(out, 4).flatten(1))
        return out.div(out.pow(2).sum(1, keepdim=True).pow(0.5))


def test_real_resnet18_steps_match_lemniscate_cifar_net(tmp_path, monkeypatch):
    """The CIFAR preset's ResNet-18 at 32 px, batch 8, beside lemniscate's CIFAR ResNet-18 with
    the project's initial weights (strict load), LinearAverage + CrossEntropyLoss, cifar.py's
    SGD at its wd: two steps, the loss, every parameter, BN statistics and the bank."""
    flags = ("--preset", "cifar", "--arch", official(CI, "arch"), "--img-size", 32)
    model, opt, args = built(tmp_path, monkeypatch, *flags)
    net = CifarResNet18(official(CI, "dim"))
    state = {}  # the project's names -> lemniscate's
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            state[k[len("backbone.") :].replace("downsample", "shortcut")] = v.clone()
        elif k.startswith("projector."):
            state["linear." + k[len("projector.") :]] = v.clone()
    net.load_state_dict(state, strict=True)  # a wrong width, stem or extra layer fails here
    memory, bufs = model.bank.clone(), [None] * len(list(net.parameters()))
    params = torch.tensor([official(CI, "tau"), official(CI, "bank_m")])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    g = torch.Generator().manual_seed(4)
    for step in range(2):
        x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randperm(N, generator=g)[:B]
        got = instdisc.train_step(model, ([x], None, y), opt, scaler, step, args)
        for p in net.parameters():
            p.grad = None
        loss = F.cross_entropy(LinearAverageOp.apply(net(x), y, memory, params), y)
        loss.backward()
        sgd_step(list(net.parameters()), bufs, official(CI, "lr"), official(CI, "wd"))
        close_rel(got["loss"], loss.detach(), f"loss at step {step}")
    ref, mine = net.state_dict(), model.state_dict()
    for k in state:
        name = "backbone." + k.replace("shortcut", "downsample")
        name = "projector." + k[len("linear.") :] if k.startswith("linear.") else name
        close_rel(mine[name].float(), ref[k].float(), k, rtol=1e-4)
    close_rel(model.bank, memory, "bank")


# ---- two processes: the bank, Z, loss and gradients vs the official single process ----------
def two_process_step(k):
    """The project's train_step on this rank's half of a fixed global batch of 8 (per-process BN,
    as DataParallel's per-device BN), noise rows from seed 10 + rank. -> loss, grads, bank, z."""
    flags = ["--preset", "imagenet", "--nce-k", str(k), "--batch-size", "8"]
    args = C.parse_args(instdisc.Args, [*TINY, "--out-dir", "unused", *flags])
    C.setup_ddp(args)
    args.sched = {"lr": [0.0]}  # lr 0: the gradients stay readable after the step
    torch.manual_seed(0)
    model = instdisc.InstDisc(args, 20)
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    x, idx = global_batch()
    b = args.batch_size_per_gpu
    mine = slice(args.rank * b, (args.rank + 1) * b)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(10 + args.rank)
    stats = instdisc.train_step(ddp, ([x[mine]], None, idx[mine]), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": stats["loss"], "grads": grads, "bank": model.bank.clone(), "z": model.z}


def global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g)
    x[:4] *= 0.5  # the two halves differ in distribution
    return x, torch.randperm(20, generator=g)[:8]


def test_two_processes_match_the_official_single_process_on_the_global_batch(tmp_path):
    """lemniscate runs one process (DataParallel over the GPUs): NCEAverage sets Z once from the
    FIRST batch, Z = mean(exp(out)) * N over the whole batch, then writes the bank rows of the
    whole batch. Two project processes (gathered: rank 0's rows, then rank 1's) == that process
    on the global batch in the gathered order: Z, the bank, the mean loss and the gradients."""
    k = 6
    ranks = spawn(two_process_step, 2, tmp_path, k)
    flags = ["--preset", "imagenet", "--nce-k", str(k), "--batch-size", "8"]
    args = C.parse_args(instdisc.Args, [*TINY, "--out-dir", "unused", *flags])
    torch.manual_seed(0)
    model = instdisc.InstDisc(args, 20)  # the same initial weights and bank as every rank
    backbone, fc = model.backbone, model.projector
    memory = model.bank.clone()
    x, y = global_batch()
    noise = []
    for r in range(2):  # each rank's noise rows, in the gathered order
        torch.manual_seed(10 + r)
        noise.append(torch.randint(20, (4, k)))
    idx = torch.cat([torch.zeros(8, 1, dtype=torch.long), torch.cat(noise)], 1)
    # DataParallel: each device's BN on its chunk, the outputs gathered in device order
    feature = torch.cat([official_net(backbone, fc, chunk) for chunk in x.split(4)])
    tau, m = official(IN, "tau"), official(IN, "bank_m")
    params = torch.tensor([k, tau, -1, m], dtype=torch.float64)
    loss = nce_criterion(NCEFunction.apply(feature, y, memory, idx, params), 20)
    loss.backward()
    for r in ranks:
        assert r["z"].item() == pytest.approx(params[2].item(), rel=1e-5)  # Z of the global batch
        close_rel(r["bank"], memory, "bank")
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])
    loss_2p = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert loss_2p.item() == pytest.approx(loss.item(), rel=1e-5)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for n, p in model.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-4, atol=1e-5 * scale)
