"""Real 2-process gloo runs vs one process on the same global batch: loss, gradients, state."""

import atexit
import importlib
import os
import queue
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ROOT, TINY, VARIANTS

import common as C
import moco
import simclr

GLOBAL_B = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank, port, jobs, done):
    """One of the two gloo processes: joins the group once, then runs each job it is given."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    while (job := jobs.get()) is not None:
        fn, out, extra = job
        mods = [
            m
            for m in list(sys.modules.values())
            if (getattr(m, "__file__", "") or "").startswith(ROOT)
        ]
        saved = [(m, dict(vars(m))) for m in mods]  # this project's modules and the tests'
        try:
            torch.save(fn(*extra), os.path.join(out, f"rank{rank}.pt"))
            done.put((rank, None))
        except BaseException:
            done.put((rank, traceback.format_exc()))
        finally:  # undo what the job replaced (`swav.fit = ...`), as pytest's monkeypatch would
            for m, names in saved:
                vars(m).update(names)
    dist.barrier()  # exit without destroying the group (on torch 2.4 that deadlocks when a gloo
    os._exit(0)  # worker thread still frees a collective's tensor)


class Pair:
    """Two gloo processes kept for the whole session: a new process spends seconds importing
    torch (twice that on older torch) before its first collective. A job that fails or hangs
    on either rank ends both; the next job starts a new pair."""

    def __init__(self):
        ctx = mp.get_context("spawn")
        self.jobs, self.done = [ctx.SimpleQueue() for _ in range(2)], ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, port, self.jobs[r], self.done), daemon=True)
            for r in range(2)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, out, extra, timeout=600):
        for q in self.jobs:
            q.put((fn, out, extra))
        end, done = time.time() + timeout, 0
        while done < 2:
            try:
                rank, err = self.done.get(timeout=1)
            except queue.Empty:
                if time.time() < end and all(p.is_alive() for p in self.procs):
                    continue
                rank, err = "?", f"{fn.__name__}: a rank died or ran past {timeout} s"
            if err:
                self.close(kill=True)
                raise RuntimeError(f"rank {rank}: {err}")
            done += 1

    def close(self, kill=False):
        for q, p in zip(self.jobs, self.procs):
            p.kill() if kill else q.put(None)
        for p in self.procs:
            p.join(10)
            p.kill()


_pair = []  # the session's Pair, started by the first spawn()


def spawn(fn, world, tmp_path, *extra) -> list:
    """fn(*extra) on both ranks of a 2-process gloo group; every rank's return value."""
    assert world == 2
    if not _pair:
        _pair.append(Pair())
        atexit.register(lambda: _pair and _pair.pop().close())
    try:
        _pair[0].run(fn, str(tmp_path), extra)
    except RuntimeError:
        _pair.clear()
        raise
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def one_step(name, flags, bn_splits=1, seed=5):
    """One train_step of `module` on this process's slice of a fixed, non-symmetric global
    batch; returns loss, the (DDP-averaged) gradients and the method state."""
    module = importlib.import_module(name)
    args = C.parse_args(
        module.Args, [*TINY, "--out-dir", "unused", "--batch-size", str(GLOBAL_B), *flags]
    )
    C.setup_ddp(args)
    args.img_size, args.sched = 16, {"lr": [0.1], "m": [0.9]}
    torch.manual_seed(0)
    if module is moco:
        model = moco.MoCo(args, bn_splits)
        model = C.convert_sync_bn(model) if args.version == "v3" else model
    else:
        model = C.convert_sync_bn(simclr.SimCLR(args))
    ddp = model
    if args.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (
        torch.rand(GLOBAL_B, 3, 16, 16, generator=g),
        torch.rand(GLOBAL_B, 3, 16, 16, generator=g),
    )
    x2[: GLOBAL_B // 2] *= 0.5  # ranks see differently distributed data
    b = args.batch_size_per_gpu
    mine = slice(args.rank * b, (args.rank + 1) * b)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(seed)  # the shuffle-BN permutation is drawn on rank 0 from this state
    stats = module.train_step(ddp, ([x1[mine], x2[mine]], None, None), opt, scaler, 0, args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: b.clone() for n, b in model.named_buffers() if n.startswith("queue")}
    return {"loss": stats["loss"], "grads": grads, "state": state}


def single(fn, *extra):
    """The same function in this process, torch.distributed not initialised."""
    assert not dist.is_initialized()
    return fn(*extra)


def assert_parity(ranks, ref, rtol=1e-5):
    """Mean loss over ranks == the one-process loss, every rank's gradients == the one-process
    gradients. Relative tolerances (fp32 sums in another order, on another CPU or thread count,
    differ by a few 1e-7 of the magnitude): the loss to rtol of itself, a gradient entry to 10 x
    rtol of itself plus rtol of the largest gradient entry of the model."""
    loss = torch.stack([r["loss"] for r in ranks]).mean()
    assert loss.item() == pytest.approx(ref["loss"].item(), rel=rtol, abs=1e-7)
    assert ref["grads"].keys() == ranks[0]["grads"].keys() and ref["grads"]
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    for name, g in ref["grads"].items():
        for r in ranks:
            torch.testing.assert_close(
                r["grads"][name], g, rtol=10 * rtol, atol=rtol * scale, msg=name
            )


def test_simclr_two_processes_equal_one(tmp_path):
    ranks = spawn(one_step, 2, tmp_path, "simclr", [])
    assert_parity(ranks, single(one_step, "simclr", []))


def test_moco_v3_two_processes_equal_one(tmp_path):
    ranks = spawn(one_step, 2, tmp_path, "moco", ["--version", "v3"])
    assert_parity(ranks, single(one_step, "moco", ["--version", "v3"]))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_moco_shuffle_bn_two_processes_equal_split_bn(tmp_path, version):
    """2 processes with shuffle-BN == 1 process with split BN over 2 groups and the same key
    permutation: same loss and gradients, and identical queues on every rank."""
    flags = ["--version", version, "--queue-size", "32"]
    ranks = spawn(one_step, 2, tmp_path, "moco", flags, 1)
    ref = single(one_step, "moco", flags, 2)
    assert_parity(ranks, ref)
    for r in ranks:
        assert torch.equal(r["state"]["queue_ptr"], ref["state"]["queue_ptr"])
        torch.testing.assert_close(r["state"]["queue"], ref["state"]["queue"], atol=1e-6, rtol=0)
    assert torch.equal(ranks[0]["state"]["queue"], ranks[1]["state"]["queue"])
    assert ranks[0]["state"]["queue_ptr"].item() == GLOBAL_B  # keys of BOTH ranks enqueued


def _gather_roundtrip():
    r, w = C.get_rank(), C.get_world_size()
    x = (torch.arange(6.0).view(3, 2) + 10 * r).t().contiguous().t().requires_grad_()
    y = C.gather_with_grad(x)  # [w*3, 2]
    (y * torch.arange(1.0, 1 + y.numel()).view_as(y)).sum().backward()
    k = C.gather_no_grad(torch.full((2,), float(r)))
    return {"y": y.detach(), "grad": x.grad, "k": k, "w": w}


def test_gathers_across_processes(tmp_path):
    ranks = spawn(_gather_roundtrip, 2, tmp_path)
    for r, out in enumerate(ranks):
        assert torch.equal(out["y"], ranks[0]["y"]) and out["y"].shape == (6, 2)
        assert torch.equal(out["k"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
        # d/dx_r of sum over BOTH ranks' losses (each rank weights the gathered tensor)
        weights = torch.arange(1.0, 13.0).view(6, 2)[3 * r : 3 * r + 3]
        assert torch.equal(out["grad"], 2 * weights)


# ==== every method: one model on every rank ==================================================
# flags that make each method CPU-sized (small heads, small queues/banks); per-GPU BN methods
# keep rank-local BN statistics while training and take rank 0's at every checkpoint
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_BN = torch.nn.modules.batchnorm._BatchNorm
PER_GPU_BN = {"moco_v1", "moco_v2", "instdisc", "invaspread", "cmc"}


def _states(out):
    """main() of every variant for 3 steps on this rank; the model's state just before and just
    after the checkpoint's buffer sync (the state every rank then evaluates and exports)."""
    seen, sync = {}, C.sync_buffers

    def spy(model):
        state = lambda: {k: v.clone() for k, v in C.unwrap(model).state_dict().items()}
        seen["before"] = state()
        sync(model)
        seen["after"], seen["per_rank"] = state(), tuple(getattr(C.unwrap(model), "per_rank", ()))
        synced = (torch.nn.SyncBatchNorm, C.GlobalBatchNorm)
        mods = C.unwrap(model).named_modules()
        local = [n for n, m in mods if isinstance(m, _BN) and not isinstance(m, synced)]
        seen["local_bn"] = tuple(f"{n}.{s}" for n in local for s in BN_STATS)

    C.sync_buffers, res = spy, {}
    try:
        for name, (module, flags) in VARIANTS.items():
            m = importlib.import_module(module)
            flags = [*TINY, "--subset", 64, "--batch-size", 16, "--epochs", 1, "--max-steps", 3]
            args = C.parse_args(m.Args, [*map(str, flags), *VARIANTS[name][1]])
            args.out_dir = os.path.join(out, name)
            seen.clear()
            m.main(args)
            res[name] = dict(seen)
    finally:
        C.sync_buffers = sync
    return res


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory):
    return spawn(_states, 2, tmp_path_factory.mktemp("states"), str(tmp_path_factory.mktemp("o")))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_rank_holds_one_model(rank_states, name):
    """After 3 steps on 2 processes: every parameter and every method state (queues, banks,
    centres, prototypes, target networks, SyncBN statistics) is identical on both ranks; per-GPU
    BN statistics may drift while training, and every checkpoint (hence every evaluation and the
    export) first gives every rank rank 0's. Per-rank state (SwAV's local queue) stays per rank."""
    per_gpu_bn = PER_GPU_BN  # as in the official code
    assert bool(rank_states[0][name]["local_bn"]) == (name in per_gpu_bn)
    r0, r1 = (r[name] for r in rank_states)
    assert r0 and r1, "no checkpoint was written"
    own, local = set(r0["per_rank"]), set(r0["local_bn"])
    for k, v in r0["before"].items():
        if k not in own | local:
            assert torch.equal(v, r1["before"][k]), f"{k} differs between ranks while training"
        assert torch.equal(v, r0["after"][k]), f"the sync changed rank 0's {k}"
    for k, v in r0["after"].items():
        if k not in own:
            assert torch.equal(v, r1["after"][k]), f"{k} differs between ranks at the checkpoint"
        else:
            assert not torch.equal(v, r1["after"][k]), f"{k} should hold each rank's own entries"
