"""Official-loop parity for invaspread.py.

The InvaSpread training step is restated here in plain PyTorch from the official code,
mangye16/Unsupervised_Embedding_Learning (demo_seen.py, BatchAverage.py BatchCriterion,
models/resnet_cifar.py, models/normalize.py), and run beside the project's real `train_step`
(with the optimizer and `args.sched` exactly as `invaspread.main` builds them) for a few CPU
steps from the same weights on the same inputs. Nothing below calls the project's loss,
optimizer or schedule; only the initial modules (deep copies) and the inputs are shared.
"""

import copy

import pytest
import torch
from helpers import built_by_main

import invaspread

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


# ---- the tests -------------------------------------------------------------------------------
def test_schedule_is_the_official_adjust_learning_rate(tmp_path, monkeypatch):
    _, _, args = built(tmp_path, monkeypatch)
    assert args.epochs == 301 and len(args.sched["lr"]) == 301 * SPE  # range(0, 0 + 301)
    want = [official_lr(0.03, s // SPE) for s in range(301 * SPE)]  # set once per epoch
    assert args.sched["lr"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("start_epoch", [160, 200])
def test_training_steps_match_the_official_loop(tmp_path, monkeypatch, start_epoch):
    model, opt, args = built(tmp_path, monkeypatch)
    assert (args.wd, args.tau, args.lr, args.batch_size) == (5e-4, 0.1, 0.03, B)
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
        lr = official_lr(0.03, step // SPE)
        for p in ref_params:
            p.grad = None
        features = official_net(backbone, linear, torch.cat((x1, x2), 0))
        loss = batch_criterion(features, 1, 0.1)  # --batch-m 1, --batch-t 0.1
        loss.backward()
        sgd_step(ref_params, bufs, lr, 5e-4)

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
