"""No host synchronisation in the hot loop, proven on the CPU: every method trains a few steps
with the device pipeline (the path `--pipeline auto` takes on CUDA) while a TorchFunctionMode
records each call of this project's code that would make the host wait for the GPU there:
reading a tensor's value on the host (bool / float / int / index / item / tolist / numpy /
printing) or an op whose output size depends on the values (nonzero, masked_select, unique,
boolean-mask indexing). Only calls made from the repository's files count (torch's own
optimizers keep their step counters on the CPU by design). The first step may read one-time
values (InstDisc's and CMC's NCE normaliser Z, estimated once); steps after it must not."""

import contextlib
import importlib
import os
import sys

import pytest
import torch
from helpers import VARIANTS, tiny_args
from torch.overrides import TorchFunctionMode

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNCING = {"__bool__", "__float__", "__int__", "__index__", "__contains__", "__format__"}
SYNCING |= {"__repr__", "item", "tolist", "numpy", "nonzero", "argwhere", "masked_select"}
SYNCING |= {"unique", "unique_consecutive", "repeat_interleave", "bincount"}


class HostReads(TorchFunctionMode):
    """Records (function, file:line) of every syncing call made from a repository file."""

    def __init__(self, counts=lambda f: os.path.dirname(f) == ROOT):
        super().__init__()
        self.calls, self.counts = [], counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.ndim > 0
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        if name in SYNCING or mask:
            f = sys._getframe(1)
            if self.counts(f.f_code.co_filename):
                where = f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"
                self.calls.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


class AuditedLoader:
    """A loader whose batches (augmentation included) are produced under the audit."""

    def __init__(self, loader, audit):
        self.loader, self.audit = loader, audit
        self.sampler, self.batch_size = loader.sampler, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with self.audit():
                batch = next(it, None)
            if batch is None:
                return
            yield batch


@pytest.mark.parametrize("name", VARIANTS)
def test_no_host_sync_between_log_steps(tmp_path, monkeypatch, name):
    module_name, flags = VARIANTS[name]
    module = importlib.import_module(module_name)
    reads, steps = HostReads(), []

    def audit():  # from the second step on
        return reads if steps else contextlib.nullcontext()

    train_step = module.train_step

    def audited_step(*a, **kw):
        with audit():
            out = train_step(*a, **kw)
        steps.append(1)
        return out

    monkeypatch.setattr(module, "train_step", audited_step)
    device_pipeline = module_name != "cpc"  # CPC's patch grid has no batched twin
    if device_pipeline:  # the CPU pipeline's workers read on the host by design
        make = C.train_loader
        monkeypatch.setattr(C, "train_loader", lambda *a: AuditedLoader(make(*a), audit))
    flags = [*flags, "--pipeline", "device" if device_pipeline else "cpu", "--log-every", 100]
    module.main(
        tiny_args(module, tmp_path, "--subset", 48, "--batch-size", 8, "--epochs", 1, *flags)
    )
    assert len(steps) == 6  # one epoch: the first step, then five audited ones
    assert not reads.calls, f"host reads in the hot loop: {sorted(set(reads.calls))}"


def test_the_audit_sees_a_host_read():
    """The guard itself: reads of values are caught, value-independent ops are not."""
    reads, x = HostReads(lambda f: f == __file__), torch.arange(4.0)
    with reads:
        y = (x * 2).clamp(min=1.0)[torch.tensor([0, 2])]  # no read
        if y.sum() > 0:
            x.max().item(), x[x > 0], float(x[1])
    assert [c.split(" at ")[0] for c in reads.calls] == [
        "__bool__",
        "item",
        "__getitem__",
        "__float__",
    ]
