"""The collapse monitor: at log steps, the effective rank (RankMe) and the view-retrieval top-1
of the batch embeddings beside z_std, over the global batch; a warning when a run collapses."""

import importlib
import json
import math

import pytest
import torch
import torch.nn as nn
from helpers import VARIANTS, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from test_ddp import spawn

import common as C

METHODS = ["simclr_v1", "moco_v2", "instdisc", "invaspread", "cmc", "cpc", "swav", "byol"]
METHODS += ["simsiam", "barlow_twins", "dino"]  # a variant of every method file
ONE_VIEW = {"instdisc", "cpc"}


def test_rank_is_the_number_of_equal_singular_values():
    """k orthogonal directions of equal weight: rank k, whichever side of the matrix is smaller;
    any scale; singular values 2, 1: exp of the entropy of (2/3, 1/3); identical rows: rank 1 and
    z_std 0."""
    torch.manual_seed(0)
    for b, d in [(64, 32), (16, 48)]:
        for k in (1, 3, min(b, d)):
            u, v = torch.linalg.qr(torch.randn(b, k))[0], torch.linalg.qr(torch.randn(d, k))[0]
            rank = C.embedding_stats(u @ v.T * 7)["rank"].item()
            assert rank == pytest.approx(k, rel=1e-3), (b, d, k)
    two = C.embedding_stats(torch.diag(torch.tensor([2.0, 1.0, 0.0])))["rank"].item()
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert two == pytest.approx(math.exp(h), rel=1e-5)  # the + 1e-7 of each p: ~1e-6
    same = C.embedding_stats(torch.randn(1, 32).expand(64, 32) * 3)
    assert same["rank"].item() == pytest.approx(1, abs=1e-3) and same["z_std"].item() < 1e-7


def test_z_std_and_view_top1():
    """z_std ~ 1/sqrt(D) for isotropic embeddings; view_top1 1 when each image's other view is
    itself, 0 when it is another image's, ~1/B for independent views; none for one view."""
    torch.manual_seed(0)
    z = torch.randn(256, 128)
    s = C.embedding_stats(z, z.clone())
    assert s["z_std"].item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    assert s["view_top1"].item() == 1
    assert C.embedding_stats(z, z.roll(1, 0))["view_top1"].item() == 0
    chance = [C.embedding_stats(z, torch.randn_like(z))["view_top1"].item() for _ in range(8)]
    assert 0 < sum(chance) / 8 < 3 / 256  # mean of 8 draws, 1/256 expected
    assert set(C.embedding_stats(z)) == {"z_std", "rank"}


def _stats(z1, z2):
    """This rank's half of the global batch in, the statistics of the global batch out."""
    b = len(z1) // C.get_world_size()
    mine = slice(C.get_rank() * b, (C.get_rank() + 1) * b)
    return C.embedding_stats(z1[mine], z2[mine])


def test_two_processes_measure_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 12, generator=g)
    z2 = z1 + 0.9 * torch.randn(16, 12, generator=g)  # some other views retrieved, some not
    ranks = spawn(_stats, 2, tmp_path, z1, z2)
    ref = C.embedding_stats(z1, z2)
    for r in ranks:
        for k, v in ref.items():
            torch.testing.assert_close(r[k], v, rtol=1e-6, atol=1e-9, msg=k)
    half = C.embedding_stats(z1[:8], z2[:8])  # what one process alone would say
    assert all(half[k] != ref[k] for k in ref)


class Constant(nn.Module):
    """A backbone whose output is the same vector for every image (an unused parameter keeps
    the optimizers' groups non-empty): every embedding after it is identical too."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("c", torch.randn(dim))
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.c.expand(len(x), -1)


def train(name, tmp_path, capsys, diverges=False) -> tuple[list[dict], list[str]]:
    """A 4-step run logged at every step: (its train records, its warning lines). diverges: it
    may end at the epoch end's check of the weights (a collapsed BYOL's normalised constant
    prediction has huge gradients), after its log steps."""
    module_name, flags = VARIANTS[name]
    module = importlib.import_module(module_name)
    args = tiny_args(module, tmp_path, "--subset", 64, "--batch-size", 16, "--epochs", 1, *flags)
    try:
        module.main(args)
    except SystemExit:
        if not diverges:
            raise
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    return records, [w for w in capsys.readouterr().err.splitlines() if "warning: collapse" in w]


@pytest.mark.parametrize("name", METHODS)
def test_a_collapsed_run_is_warned_once_and_a_healthy_one_not(tmp_path, monkeypatch, capsys, name):
    healthy, warned = train(name, tmp_path / "healthy", capsys)
    assert len(healthy) == 4 and not warned
    two_views = name not in ONE_VIEW
    assert all({"z_std", "rank"} <= r.keys() and ("view_top1" in r) == two_views for r in healthy)
    assert all(r["z_std"] > 0 and r["rank"] > 2 for r in healthy)
    build = C.build_backbone

    def constant(*a, **kw):
        dim = build(*a, **kw)[1]
        return Constant(dim), dim

    monkeypatch.setattr(C, "build_backbone", constant)
    collapsed, warned = train(name, tmp_path / "collapsed", capsys, diverges=True)
    assert len(collapsed) == 4 and all(r["z_std"] == 0 and r["rank"] < 1.001 for r in collapsed)
    assert len(warned) == 1 and warned[0].startswith("warning: collapse at step 2? z_std 0 <")
