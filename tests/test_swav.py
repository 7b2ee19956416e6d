"""SwAV: Sinkhorn and loss vs naive references, LARC, prototypes, queue, DDP, resume, CLI."""

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY,
    assert_resume_exact,
    assert_same_tree,
    error_lines,
    python,
    tiny_args,
    torchrun,
)
from test_ddp import GLOBAL_B, assert_parity, single, spawn

import common as C
import swav

SMALL = ["--hidden-dim", "64", "--n-prototypes", "32", "--dim", "16", "--n-local", "2"]


def naive_sinkhorn(scores, eps, n_iters):
    """The official distributed_sinkhorn in one process, float64 python loops: Q = exp(s/eps)^T
    [K, N], total 1, then n times: prototype rows -> 1/K, sample columns -> 1/N; Q * N."""
    s = scores.double().tolist()
    N, K = len(s), len(s[0])
    q = [[math.exp(s[b][k] / eps) for b in range(N)] for k in range(K)]
    tot = sum(map(sum, q))
    q = [[x / tot for x in row] for row in q]
    for _ in range(n_iters):
        q = [[x / sum(row) / K for x in row] for row in q]
        col = [sum(q[k][b] for k in range(K)) for b in range(N)]
        q = [[q[k][b] / col[b] / N for b in range(N)] for k in range(K)]
    return torch.tensor([[q[k][b] * N for k in range(K)] for b in range(N)], dtype=torch.float64)


def naive_swav(scores, q, tau):
    total = 0.0
    for i, qi in enumerate(q):
        sub = 0.0
        for v, s in enumerate(scores):
            if v == i:
                continue
            for b in range(len(s)):
                row = [x / tau for x in s[b].tolist()]
                lse = math.log(sum(math.exp(x - max(row)) for x in row)) + max(row)
                sub -= sum(qk * (x - lse) for qk, x in zip(qi[b].tolist(), row)) / len(s)
        total += sub / (len(scores) - 1)
    return total / len(q)


def cos_scores(n, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, c = F.normalize(torch.randn(n, d, generator=g), dim=1), torch.randn(k, d, generator=g)
    return z @ F.normalize(c, dim=1).T  # [N, K] in [-1, 1], as z . prototypes


# ==== Sinkhorn and the loss =================================================================
@pytest.mark.parametrize("n,k,eps,iters", [(12, 5, 0.05, 3), (7, 9, 0.1, 1), (16, 4, 0.05, 10)])
def test_sinkhorn_matches_naive_reference(n, k, eps, iters):
    s = cos_scores(n, k, seed=n)
    got = swav.sinkhorn(s, eps, iters)
    assert got.shape == (n, k) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_sinkhorn(s, eps, iters), rtol=1e-4, atol=1e-6)


def test_sinkhorn_marginals_and_no_gradient():
    s = cos_scores(48, 6, seed=3).requires_grad_()
    q = swav.sinkhorn(s, 0.05, 3)
    assert not q.requires_grad and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(48))  # each sample: a distribution
    q = swav.sinkhorn(s, 0.05, 300)  # converged: each prototype gets N/K samples
    torch.testing.assert_close(q.sum(0), torch.full((6,), 48 / 6), rtol=1e-3, atol=0)
    sharper = swav.sinkhorn(s, 0.01, 300)  # lower eps: harder assignments
    assert sharper.max(1).values.mean() > q.max(1).values.mean()


def test_sinkhorn_and_loss_finite_on_extreme_half_precision_scores():
    s = torch.randn(16, 32) * 1e4  # exp(s / eps) overflows any dtype without care
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            q = swav.sinkhorn(s.to(dtype), 0.05, 3)
            assert q.dtype == torch.float32 and torch.isfinite(q).all()
            loss = swav.swav_loss([s.to(dtype), (-s).to(dtype), s.to(dtype)], [q, q], 0.1)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # ordinary scores: fp32 maths inside
        s = cos_scores(10, 7)
        torch.testing.assert_close(
            swav.sinkhorn(s.bfloat16(), 0.05, 3), swav.sinkhorn(s.bfloat16().float(), 0.05, 3)
        )


@pytest.mark.parametrize("v,a,b,k", [(2, 2, 5, 4), (4, 2, 3, 6), (3, 1, 4, 3)])
def test_swav_loss_matches_naive_reference(v, a, b, k):
    torch.manual_seed(v * 10 + a)
    scores = [torch.randn(b, k) for _ in range(v)]
    q = [torch.softmax(torch.randn(b, k), 1) for _ in range(a)]
    got = swav.swav_loss(scores, q, 0.1)
    assert got.item() == pytest.approx(naive_swav(scores, q, 0.1), rel=1e-5)


def test_swav_loss_gradient_only_into_scores_and_swapped():
    scores = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    q = [torch.softmax(torch.randn(4, 5), 1).requires_grad_() for _ in range(2)]
    swav.swav_loss(scores, q, 0.1).backward()
    assert all(s.grad.abs().sum() > 0 for s in scores) and all(x.grad is None for x in q)
    # swapped: crop 0's own code never scores crop 0 -> changing q[0] leaves d/ds0 unchanged
    s0 = scores[0].detach().requires_grad_()
    g = [
        torch.autograd.grad(swav.swav_loss([s0, *scores[1:]], [x, q[1]], 0.1), s0)[0]
        for x in (q[0], torch.softmax(torch.randn(4, 5), 1))
    ]
    torch.testing.assert_close(g[0], g[1])


# ==== model, optimizer, state ===============================================================
def tiny_model(tmp_path, *extra):
    args = tiny_args(swav, tmp_path, *SMALL, *extra)
    C.setup_ddp(args)
    torch.manual_seed(0)
    return swav.SwAV(args), args


def crops(b=4, n_local=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.rand(b, 3, 8, 8, generator=g) for _ in range(n_local)
    ]


def test_heads_queue_buffer_and_presets(tmp_path):
    model, _ = tiny_model(tmp_path, "--queue-length", 64, "--batch-size", 16)
    p = model.projector
    assert [type(m).__name__ for m in p] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert p[0].bias is not None and p[3].bias is not None  # [ref: projection_head]
    assert model.prototypes.bias is None and model.prototypes.weight.shape == (32, 16)
    assert model.queue.shape == (2, 64, 16) and "queue" in model.state_dict()
    assert swav.SwAV.per_rank == ("queue",)
    cifar, imnet = C.parse_args(swav.Args, []), C.parse_args(swav.Args, ["--preset", "imagenet"])
    assert (imnet.arch, imnet.batch_size, imnet.epochs, imnet.lr, imnet.final_lr) == (
        "resnet50",
        4096,
        800,
        4.8,
        0.0048,
    )
    assert (imnet.warmup_epochs, imnet.start_warmup, imnet.wd, imnet.queue_length) == (
        10,
        0.3,
        1e-6,
        0,
    )
    assert (imnet.tau, imnet.eps, imnet.sinkhorn_iters, imnet.n_prototypes, imnet.dim) == (
        0.1,
        0.05,
        3,
        3000,
        128,
    )
    assert (imnet.freeze_prototypes_niters, imnet.n_local, imnet.global_scale) == (
        313,
        6,
        (0.14, 1.0),
    )
    assert imnet.local_scale == (0.05, 0.14) and imnet.blur
    lin = (imnet.linear_epochs, imnet.linear_lr, imnet.linear_wd, imnet.linear_batch_size)
    assert lin == (100, 0.3, 1e-6, 256) and not imnet.linear_nesterov
    # eval_linear.py: CosineAnnealingLR stepped per epoch, best_acc, N(0, 0.01) classifier
    assert imnet.linear_epoch_lr and imnet.linear_best and not imnet.linear_zero_init
    assert imnet.linear_milestones == () and imnet.linear_decay == 0.1  # --gamma
    assert (cifar.arch, cifar.batch_size, cifar.lr, cifar.queue_length) == (
        "resnet18",
        256,
        0.6,
        3840,
    )
    assert (cifar.epoch_queue_starts, cifar.freeze_prototypes_niters, cifar.blur) == (
        50,
        390,
        False,
    )


def test_multicrop_forward_one_backbone_pass_per_resolution(tmp_path):
    model, _ = tiny_model(tmp_path)
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    views = crops(b=4, n_local=3)
    z, scores = model(views)
    assert calls == [(8, 3, 16, 16), (12, 3, 8, 8)]  # 2 x global, 3 x local, batched
    assert z.shape == (20, 16) and scores.shape == (20, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(20))
    model.eval()  # fixed BN statistics: crop-major rows equal the crops run one by one
    z, scores = model(views)
    for v, x in enumerate(views):
        zv = F.normalize(model.projector(model.backbone(x)), dim=1)
        torch.testing.assert_close(z[4 * v : 4 * v + 4], zv)
        torch.testing.assert_close(scores[4 * v : 4 * v + 4], model.prototypes(zv))


def test_larc_matches_apex_formula():
    """One step per apex LARC (clip False) + SGD momentum, on EVERY param incl. 1-D ones;
    a zero-norm param gets its raw gradient (no decay)."""
    torch.manual_seed(0)
    params = [torch.randn(3, 4), torch.randn(5), torch.zeros(2)]
    params = [p.requires_grad_() for p in params]
    opt = swav.LARC(params, lr=0.5, weight_decay=0.01)
    ref = [p.detach().double().clone() for p in params]
    buf = [torch.zeros_like(r) for r in ref]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g, pn = g.double(), ref[i].norm().item()
            gn = g.norm().item()
            if pn > 0 and gn > 0:
                g = (g + 0.01 * ref[i]) * (0.001 * pn / (gn + 0.01 * pn + 1e-8))
            buf[i] = 0.9 * buf[i] + g
            ref[i] = ref[i] - 0.5 * buf[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)
    assert not torch.equal(params[1], params[1].detach().clone().zero_())


def step_args(args, b, steps_per_epoch=1):
    args.sched, args.steps_per_epoch, args.batch_size_per_gpu = (
        {"lr": [0.5] * 10},
        steps_per_epoch,
        b,
    )
    return args


def test_prototypes_normalised_and_frozen_then_trained(tmp_path):
    model, args = tiny_model(tmp_path, "--freeze-prototypes-niters", 2)
    step_args(args, 4)
    opt = swav.LARC(list(model.parameters()), lr=0.5, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    w0 = F.normalize(model.prototypes.weight.detach(), dim=1)
    norms = []
    model.prototypes.register_forward_pre_hook(lambda m, i: norms.append(m.weight.norm(dim=1)))
    proto, head = model.prototypes.weight, model.projector[0].weight
    for step in range(3):
        h0 = head.detach().clone()
        stats = swav.train_step(model, (crops(), None, None), opt, scaler, step, args)
        assert torch.isfinite(stats["loss"]) and not torch.equal(head, h0)  # the rest trains
        torch.testing.assert_close(norms[-1], torch.ones(32))  # unit rows in every forward
        if step < 2:  # frozen: no gradient, no momentum, no weight decay
            torch.testing.assert_close(proto.detach(), w0, atol=1e-7, rtol=1e-6)  # re-normalised
            assert proto.grad is None and proto not in opt.state
    assert proto in opt.state and (proto - w0).abs().max() > 1e-6  # trained from step 2
    assert set(stats) == {"loss", "lr", "wd", "grad_norm", "z", "queue"}
    swav.normalize_prototypes(model)
    torch.testing.assert_close(proto.norm(dim=1), torch.ones(32))


def test_enqueue_is_fifo():
    queue = torch.zeros(2, 6, 3)
    a, b = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    swav.enqueue(queue, a)
    swav.enqueue(queue, b)
    assert torch.equal(queue[:, :2], b) and torch.equal(queue[:, 2:4], a)
    assert not queue[:, 4:].any()


def test_queue_starts_fills_then_is_used(tmp_path, monkeypatch):
    """Queue of 2 batches from epoch 1 (1 step per epoch): step 0 not touched, steps 1-2 fill
    it (codes from the batch alone), step 3 prepends the queue's scores with the current
    prototypes, keeps the batch rows of Sinkhorn's output, then shifts the queue."""
    B = 4
    model, args = tiny_model(
        tmp_path,
        "--queue-length",
        2 * B,
        "--batch-size",
        B,
        "--epoch-queue-starts",
        1,
        "--freeze-prototypes-niters",
        0,
    )
    step_args(args, B)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    calls, outs = [], []
    real = swav.sinkhorn

    def spy(s, eps, n):
        calls.append((s.clone(), model.queue.clone(), model.prototypes.weight.detach().clone()))
        return real(s, eps, n)

    monkeypatch.setattr(swav, "sinkhorn", spy)
    model.register_forward_hook(lambda m, i, o: outs.append((o[0].detach(), o[1].detach())))
    seen = []
    for step in range(4):
        calls.clear()
        stats = swav.train_step(model, (crops(B, seed=step), None, None), opt, scaler, step, args)
        z, scores = outs[-1]
        seen.append(z[: 2 * B].view(2, B, -1))
        if step == 0:
            assert not model.queue.any() and stats["queue"] == 0.0
        if step in (1, 2):  # filling: not used yet, newest first
            assert [c[0].shape[0] for c in calls] == [B, B] and stats["queue"] == 0.0
            torch.testing.assert_close(model.queue[:, :B], seen[step])
        if step == 2:
            torch.testing.assert_close(model.queue[:, B:], seen[1])
        if step == 3:
            assert [c[0].shape[0] for c in calls] == [3 * B, 3 * B] and stats["queue"] == 1.0
            q = []
            for i, (s, queue, w) in enumerate(calls):
                torch.testing.assert_close(s[: 2 * B], queue[i] @ w.T)  # current prototypes
                assert torch.equal(queue[i], torch.cat([seen[2][i], seen[1][i]]))  # not yet shifted
                torch.testing.assert_close(s[2 * B :], scores[i * B : (i + 1) * B])
                q.append(real(s, args.eps, args.sinkhorn_iters)[-B:])
            ref = swav.swav_loss(list(scores.split(B)), q, args.tau)
            torch.testing.assert_close(stats["loss"], ref)
            torch.testing.assert_close(model.queue[:, :B], seen[3])  # shifted after the codes
            torch.testing.assert_close(model.queue[:, B:], seen[2])


# ==== distributed, resume, end to end =======================================================
def sinkhorn_rank(scores):
    n = len(scores) // C.get_world_size()
    return swav.sinkhorn(scores[C.get_rank() * n : (C.get_rank() + 1) * n], 0.05, 3)


def test_sinkhorn_two_processes_equal_one(tmp_path):
    s = cos_scores(2 * GLOBAL_B, 5, seed=7)
    s[:GLOBAL_B] += 0.3  # the two ranks' halves are distributed differently
    ranks = spawn(sinkhorn_rank, 2, tmp_path, s)
    ref = single(sinkhorn_rank, s)
    torch.testing.assert_close(torch.cat(ranks), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref.double(), naive_sinkhorn(s, 0.05, 3), rtol=1e-4, atol=1e-6)


def swav_step(name, flags):
    """One train_step on this process's half of a fixed global multi-crop batch (no queue)."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.sched, args.steps_per_epoch = {"lr": [0.1]}, 1
    torch.manual_seed(0)
    model = C.convert_sync_bn(module.SwAV(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    views = crops(GLOBAL_B, 2, seed=3)
    views[1][: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    b = args.batch_size_per_gpu
    mine = [v[args.rank * b : (args.rank + 1) * b] for v in views]
    opt = module.LARC(list(model.parameters()), lr=0.1, weight_decay=1e-6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = module.train_step(ddp, (mine, None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": stats["loss"], "grads": grads, "proto": model.prototypes.weight.detach()}


def test_two_processes_equal_one(tmp_path):
    flags = [*SMALL, "--freeze-prototypes-niters", "0"]
    ranks = spawn(swav_step, 2, tmp_path, "swav", flags)
    ref = single(swav_step, "swav", flags)
    assert_parity(ranks, ref)
    assert "prototypes.weight" in ref["grads"]
    for r in ranks:
        torch.testing.assert_close(r["proto"], ref["proto"], atol=1e-6, rtol=1e-5)


QUEUE = ["--queue-length", 32, "--epoch-queue-starts", 0, "--freeze-prototypes-niters", 1]


def test_two_steps_resume_two_steps_equals_four_with_queue(tmp_path):
    a = assert_resume_exact(swav, tmp_path, *SMALL, *QUEUE)
    queue = a["ranks"][0]["buffers"]["queue"]
    assert queue.shape == (2, 32, 16) and queue.norm(dim=2).gt(0.99).all()  # full of unit z


def test_python_end_to_end_with_knn(tmp_path):
    flags = [*TINY, "--knn-every", 1, *SMALL]  # the last value of a flag wins
    r = python(
        "swav.py", *flags, "--subset", 64, "--batch-size", 32, "--epochs", 1, "--out-dir", tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "metrics.jsonl").read_text()
    assert '"knn_top1"' in text and '"z_std"' in text and '"queue"' in text
    assert (tmp_path / "backbone.pth").exists()


def test_torchrun_two_processes_end_to_end_and_per_rank_queue_resume(tmp_path, monkeypatch):
    """torchrun 2 processes: 4 steps straight == 2 steps + resume + 2 steps, including each
    rank's own queue (the two differ), restored per rank. Then one process resumes the
    2-process checkpoint: the model and optimizer as saved, the queue from zeros in this world
    size's shape (32 rows, not 16), and it trains on."""
    flags = [*TINY, *SMALL, *QUEUE, "--subset", 64, "--batch-size", 16, "--epochs", 2]
    runs = (("a", 4, ["--knn-every", 1]), ("b", 2, []), ("b", 4, []))
    for out, steps, extra in runs:
        r = torchrun(
            2, "swav.py", *flags, *extra, "--max-steps", steps, "--out-dir", tmp_path / out
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / o / "ckpt.pth", weights_only=False) for o in "ab")
    assert a["args"]["world_size"] == 2 and a["step"] == b["step"] == 4
    assert '"knn_top1"' in (tmp_path / "a" / "metrics.jsonl").read_text()
    for key in ("model", "optimizer", "scaler"):
        assert_same_tree(a[key], b[key], key)
    qa = [a["ranks"][r]["buffers"]["queue"] for r in range(2)]
    qb = [b["ranks"][r]["buffers"]["queue"] for r in range(2)]
    assert qa[0].shape == (2, 16, 16) and not torch.equal(qa[0], qa[1])
    assert all(torch.equal(x, y) for x, y in zip(qa, qb))
    assert all(q.norm(dim=2).gt(0.99).all() for q in qa)
    seen, step_fn = [], swav.train_step

    def first_step(model, batch, optimizer, *rest):
        state = {k: v.clone() for k, v in C.unwrap(model).state_dict().items()}
        seen.append((state, copy.deepcopy(optimizer.state_dict())))
        return step_fn(model, batch, optimizer, *rest)

    monkeypatch.setattr(swav, "train_step", first_step)
    one = [*map(str, flags), "--max-steps", "6", "--out-dir", str(tmp_path / "b")]
    swav.main(C.parse_args(swav.Args, one))
    c = torch.load(tmp_path / "b" / "ckpt.pth", weights_only=False)
    assert c["step"] == 6 and len(c["ranks"]) == 1 and c["model"]["queue"].shape == (2, 32, 16)
    model, opt = seen[0]
    assert torch.equal(model.pop("queue"), torch.zeros(2, 32, 16))
    assert_same_tree(model, {k: v for k, v in b["model"].items() if k != "queue"})
    assert_same_tree(opt, b["optimizer"])


def test_queue_not_a_multiple_of_the_batch_one_line_error():
    r = python("swav.py", *TINY, "--batch-size", "16", "--queue-length", "40")
    errors = error_lines(r.stderr)
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-1000:]
    assert "--queue-length 40" in errors[0] and "32" in errors[0]
    assert "Traceback" not in r.stderr
