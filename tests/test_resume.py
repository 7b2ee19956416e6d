"""Resume with the kNN monitor on: evaluation in its own random streams."""

import importlib
import json
import random

import pytest
import torch
from helpers import assert_same_tree, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import VARIANTS

import common as C
import simclr

# an epoch of 2 steps; the monitor after every epoch: the straight run evaluates right after the
# checkpoint at step 2 that the stopped run resumes from
MONITOR = ["--subset", 32, "--batch-size", 16, "--epochs", 2, "--knn-every", 1, "--knn-subset", 32]


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run(module, out, *flags):
    module.main(tiny_args(module, out, *MONITOR, *flags))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_is_exact_with_the_knn_monitor(tmp_path, name):
    """4 steps straight (kNN at steps 0, 2, 4) == 2 steps + resume + 2 steps: every tensor of the
    checkpoint and every rank's RNG. Evaluation draws from its own streams, so the training
    streams (e.g. MoCo's key permutation, InstDisc's noise) are those a run without the monitor
    would see."""
    module, flags = importlib.import_module(VARIANTS[name][0]), VARIANTS[name][1]
    for out, steps in (("a", 4), ("b", 2), ("b", 4)):
        run(module, tmp_path / out, *flags, "--max-steps", steps)
    a, b = (torch.load(tmp_path / o / "ckpt.pth", weights_only=False) for o in "ab")
    assert a["step"] == b["step"] == 4
    for key in ("model", "optimizer", "scaler", "ranks"):
        assert_same_tree(a[key], b[key], key)
    ra = records(tmp_path / "a")
    assert [r["step"] for r in ra if "knn_top1" in r] == [0, 2, 4]  # after the checkpoint at 2


def test_eval_rng_restores_the_training_streams_and_is_seeded(tmp_path):
    """Inside: torch and Python draws fixed by --seed, whatever the outer state; after: the outer
    streams continue as if the block had not run."""
    args = tiny_args(simclr, tmp_path, "--seed", 3)
    draw = lambda: (torch.rand(3), random.random())
    inside = []
    for outer in (0, 1):
        torch.manual_seed(outer), random.seed(outer)
        expected = draw()
        torch.manual_seed(outer), random.seed(outer)
        with C.eval_rng(args):
            inside.append(draw())
        after = draw()
        assert torch.equal(after[0], expected[0]) and after[1] == expected[1]
    assert torch.equal(inside[0][0], inside[1][0]) and inside[0][1] == inside[1][1]
    torch.manual_seed(3), random.seed(3)
    seeded = draw()
    assert torch.equal(inside[0][0], seeded[0]) and inside[0][1] == seeded[1]
