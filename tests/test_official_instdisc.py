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
from helpers import built_by_main

import instdisc

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
    official = main_py_lr if preset == "imagenet" else cifar_py_lr
    assert args.epochs == 200 and len(args.sched["lr"]) == 200 * SPE
    want = [official(0.03, s // SPE) for s in range(200 * SPE)]  # set once per epoch
    assert args.sched["lr"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "preset,flags",
    [("imagenet", ["--nce-k", str(K)]), ("cifar", [])],  # main.py NCE; cifar.py --nce-k 0
    ids=["main.py-NCEAverage", "cifar.py-LinearAverage"],
)
def test_training_steps_match_the_official_loop(tmp_path, monkeypatch, preset, flags):
    model, opt, args = built(tmp_path, monkeypatch, "--preset", preset, *flags)
    official_lr = main_py_lr if preset == "imagenet" else cifar_py_lr
    nce = args.nce_k > 0
    assert (args.wd, args.tau, args.bank_m) == ((1e-4, 0.07, 0.5) if nce else (5e-4, 0.1, 0.5))
    # shared: the initialised networks (deep copies) and the initial memory
    backbone, fc = copy.deepcopy(model.backbone), copy.deepcopy(model.projector)
    memory = model.bank.clone()  # NCEAverage / LinearAverage register_buffer('memory')
    initial_memory = memory.clone()
    params = torch.tensor([K, args.tau, -1, args.bank_m] if nce else [args.tau, args.bank_m])
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
        lr = official_lr(0.03, step // SPE)
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
        sgd_step(ref_params, bufs, lr, args.wd)

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
    bank = official_knn(net, model.bank.t(), labels, data.test, 20, args.tau)
    loader = torch.utils.data.DataLoader(data.train_eval, batch_size=100)
    with torch.no_grad():
        recomputed = torch.cat([net(x) for x, _, _ in loader]).t()
    embed = official_knn(net, recomputed, labels, data.test, 20, args.tau)
    assert got["bank_knn_top1"] == pytest.approx(bank * 100, rel=1e-9)
    assert got["embed_knn_top1"] == pytest.approx(embed * 100, rel=1e-9)
    assert (got["k"], got["t"]) == (20, 0.07)
