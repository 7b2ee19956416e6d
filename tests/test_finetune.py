"""Semi-supervised fine-tuning (common.finetune, every method) and SimCLR v2's self-distillation:
the labelled subset, the batch stream, what is copied and trained, the pretrained model and its
checkpoint left untouched, resume, two processes == one."""

import copy
import hashlib
import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import VARIANTS, assert_same_tree, built_by_main, one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from PIL import Image
from test_ddp import spawn

import byol
import common as C
import simclr

RUN = ["--subset", 60, "--batch-size", 16, "--finetune-fraction", 0.5]  # 3 of the 6 per class
# two fine-tuning epochs of 3 steps (batch 10 of 30 images), lrs that learn at this scale
FT = ["--ft-epochs", 2, 2, "--ft-batch-size", 10]


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def sha(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ==== the labelled subset and the batches ====================================================
def test_labelled_subset_is_class_balanced_seeded_and_the_same_for_every_method(tmp_path):
    """Per class round(fraction x its count) images, drawn from --seed alone: the same positions
    for every method (another method's Args, another normalisation), others for another seed."""
    picks = []
    for module, seed in ((simclr, 0), (byol, 0), (simclr, 1)):
        args = tiny_args(module, tmp_path, "--subset", 200, "--batch-size", 16)
        args.finetune_fraction = 0.1
        args.seed = seed
        C.setup_ddp(args)
        ms = C.dataset_mean_std(args) if module is byol else None
        data = C.build_data(args, C.eval_transform(16, ms), ms)
        ds = data.train_linear
        picks.append(C.labelled_subset(ds, args))
        y = ds.dataset.tensors[1][ds.indices]
        chosen = y[picks[-1]]
        for c in range(10):
            assert (chosen == c).sum() == round(0.1 * int((y == c).sum()))
        assert len(set(picks[-1])) == len(picks[-1])
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_labelled_subset_from_an_image_list(tmp_path):
    """--finetune-list: exactly the named files (by file name, as SimCLR's imagenet_subsets);
    a name not in the training set stops the run in one line."""
    for cls in ("n01", "n02"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / f"{cls}_{i}.JPEG")
    ds = C.Indexed(C.ImageFiles(str(tmp_path / "train")), lambda img: img)
    (listed := tmp_path / "1percent.txt").write_text("n02_1.JPEG\nn01_2.JPEG\n")
    args = SimpleNamespace(finetune_list=str(listed), finetune_fraction=0.01, seed=0)
    names = [os.path.basename(ds.dataset.samples[i][0]) for i in C.labelled_subset(ds, args)]
    assert sorted(names) == ["n01_2.JPEG", "n02_1.JPEG"]
    listed.write_text("n02_1.JPEG\nn03_7.JPEG\n")
    with pytest.raises(SystemExit, match="1 of its 2 files are not in the training set"):
        C.labelled_subset(ds, args)


def test_stream_batches_split_one_process_batches_over_ranks_and_resume():
    """Global batches of an endless stream of epochs (each a permutation seeded by (seed,
    epoch)): rank r of W takes the r-th part of one process's batch; a start step continues."""
    n, B, total = 10, 4, 8  # 3.2 epochs
    rank = lambda r, w: SimpleNamespace(rank=r, world_size=w, seed=3)
    one = list(C.StreamBatches(n, B, 0, total, rank(0, 1)))
    two = [list(C.StreamBatches(n, B, 0, total, rank(r, 2))) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one and len(one) == total
    keys = [k for batch in one for k in batch]
    assert [e for _, e in keys] == [p // n for p in range(total * B)]
    epochs = [[i for i, e in keys if e == k] for k in range(3)]
    assert all(sorted(ids) == list(range(n)) for ids in epochs)  # every image once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert list(C.StreamBatches(n, B, 5, total, rank(0, 1))) == one[5:]


# ==== the fine-tuned network ================================================================
@pytest.mark.parametrize("name", ["simclr_v2", "instdisc", "dino", "cpc", "moco_v2"])
def test_finetune_net_trains_exactly_what_features_reads(tmp_path, monkeypatch, name):
    """The copy's trainable parameters are those the features (SimCLR v2: and the first projector
    layer) get gradients through, found independently by autograd on a copy; every other tensor
    (momentum/teacher nets, banks, heads) is the model's own object, shared, not copied. Its BNs
    are the recipe's (global), whatever the model's (MoCo's split BN in one process); the probe
    leaves the model in its mode with its BN statistics."""
    module = importlib.import_module(VARIANTS[name][0])
    model, _, args, data = built_by_main(module, monkeypatch, tmp_path, *VARIANTS[name][1], *RUN)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    net = C.finetune_net(module.features, model, data, args)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    x = torch.stack([data.test[i][0] for i in range(4)])
    ref = copy.deepcopy(model).eval().requires_grad_(True)
    feats = C.projector_layers(ref, args.ft_proj_layers if name == "simclr_v2" else 0)
    feats(module.features(ref, x)).square().sum().backward()
    used = {n for n, p in ref.named_parameters() if p.grad is not None and p.grad.any()}
    trained = {id(p) for p in net.parts.parameters()}
    copied = {n for n, p in net.copy.named_parameters() if id(p) in trained}
    assert used and copied == used
    if name == "simclr_v2":
        assert {n.split(".")[0] for n in used} == {"backbone", "projector"}
        assert net.head.in_features == model.feat_dim  # the hidden layer's width
    owners = {n.rpartition(".")[0] for n in used}  # the modules that the features run
    mine = [*used, *(n for n, _ in model.named_buffers() if n.rpartition(".")[0] in owners)]
    copy_tensors = dict([*net.copy.named_parameters(), *net.copy.named_buffers()])
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert (copy_tensors[n] is t) == (n not in mine), n
    assert all(p.requires_grad for p in net.parameters())
    bns = [m for m in net.parts.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert (bns or name == "cpc") and all(type(m) is C.GlobalBatchNorm and m.sync for m in bns)


def test_finetune_leaves_model_and_checkpoint_untouched_and_learns(tmp_path, monkeypatch):
    """After a pretraining epoch: fine-tuning (SimCLR v1's recipe) trains its copy, not the model
    (every tensor equal after) nor ckpt.pth (same bytes); backbone.pth is the model's encoder;
    the fine-tuned classifier beats chance (10%) by far on the synthetic classes."""
    seen, real = {}, C.finetune

    def spy(fn, model, data, args):
        before = sha(tmp_path / "ckpt.pth"), copy.deepcopy(model.state_dict())
        seen["res"] = res = real(fn, model, data, args)
        assert sha(tmp_path / "ckpt.pth") == before[0]
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before[1].items())
        tuned = C.load_checkpoint(tmp_path / "finetune.pth")["net"]
        assert not torch.equal(tuned["parts.0.0.weight"], after["backbone.0.weight"])
        return res

    monkeypatch.setattr(C, "finetune", spy)
    lr = ["--ft-lr", 4, 4, "--ft-head-lr", 4, 4]  # x 10/256
    simclr.main(tiny_args(simclr, tmp_path, *RUN, "--epochs", 1, *FT, "--ft-epochs", 10, 10, *lr))
    res = records(tmp_path)[-1]
    assert res["finetune_top1"] > 50 and res["finetune_images"] == 30
    assert res["finetune_top1"] == seen["res"]["finetune_top1"]
    exported = torch.load(tmp_path / "backbone.pth")
    ckpt = C.load_checkpoint(tmp_path / "ckpt.pth")["model"]
    assert all(torch.equal(v, ckpt[f"backbone.{k}"]) for k, v in exported.items())


def test_fewer_labelled_images_than_one_batch_make_one_batch(tmp_path, capsys):
    """30 labelled images at --ft-batch-size 64: the batch is the 30 (a warning says so; the
    stream would repeat images within a batch), so the run equals one at --ft-batch-size 30."""
    flags = [*RUN, "--epochs", 0, "--ft-epochs", 2, 2]
    simclr.main(tiny_args(simclr, tmp_path / "a", *flags, "--ft-batch-size", 30))
    capsys.readouterr()
    simclr.main(tiny_args(simclr, tmp_path / "b", *flags, "--ft-batch-size", 64))
    assert "warning: 30 labelled images < --ft-batch-size 64: batch 30" in capsys.readouterr().err
    a, b = (C.load_checkpoint(tmp_path / o / "finetune.pth") for o in "ab")
    assert a["step"] == b["step"] == 2
    assert_same_tree(a["net"], b["net"], "net")
    a, b = (records(tmp_path / o)[-1] for o in "ab")  # but the flags that made them
    assert a.pop("flags")["ft_batch_size"] == 30 and {**a, "flags": b["flags"]} == b


# SwAV's protocol [ref: swav eval_semisup.py], as swav.py's Args set it
SWAV_FT = ["--ft-optimizer", "sgd", "--ft-lr-scaling", "linear", "--ft-milestones", 12, 16]
SWAV_FT += ["--ft-decay", 0.2, "--ft-epoch-lr", "--ft-head-init", "torch", "--ft-best"]
# Barlow Twins' [ref: barlowtwins evaluate.py]: BN per process
BARLOW_FT = ["--ft-optimizer", "sgd", "--ft-lr-scaling", "linear", "--ft-epoch-lr"]
BARLOW_FT += ["--no-ft-sync-bn", "--ft-head-init", "normal", "--ft-best"]


@pytest.mark.parametrize("recipe", ["simclr_v2", "swav"])
def test_finetune_resumes_exactly(tmp_path, monkeypatch, recipe):
    """2 epochs straight == 1 epoch, killed after its finetune.pth, + a rerun: the same network,
    optimizer state, per-epoch test accuracies (SwAV reports the best epoch) and record. From
    the random init (--epochs 0: the baseline row)."""
    flags = [*RUN, "--epochs", 0, *FT, "--version", "v2", *(SWAV_FT if recipe == "swav" else [])]
    simclr.main(tiny_args(simclr, tmp_path / "a", *flags))
    save = C.save_checkpoint

    def killed_after_one_epoch(path, state):
        save(path, state)
        if str(path).endswith("finetune.pth"):
            raise KeyboardInterrupt  # the run dies here

    monkeypatch.setattr(C, "save_checkpoint", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        simclr.main(tiny_args(simclr, tmp_path / "b", *flags))
    assert C.load_checkpoint(tmp_path / "b" / "finetune.pth")["step"] == 3  # one epoch of two
    monkeypatch.setattr(C, "save_checkpoint", save)
    simclr.main(tiny_args(simclr, tmp_path / "b", *flags))
    a, b = (C.load_checkpoint(tmp_path / o / "finetune.pth") for o in "ab")
    assert a["step"] == b["step"] == 6 and a["history"] == b["history"]
    assert len(a["history"]) == (2 if recipe == "swav" else 0)
    for part in ("net", "optimizer", "scaler"):
        assert_same_tree(a[part], b[part], part)
    assert records(tmp_path / "a")[-1] == records(tmp_path / "b")[-1]


# ==== two processes ==========================================================================
def _finetune_on_ranks(out, flags):
    """simclr.main on this rank (gloo, CPU), its fine-tuning result and the saved network."""
    got, real = {}, C.finetune

    def spy(*a):
        got["res"] = real(*a)
        return got["res"]

    C.finetune = spy
    try:
        simclr.main(tiny_args(simclr, out, *flags))
    finally:
        C.finetune = real
    if dist.is_initialized():
        dist.barrier()
    res = {"res": got["res"], "net": C.load_checkpoint(os.path.join(out, "finetune.pth"))["net"]}
    try:  # an odd fine-tuning batch on 2 processes stops the run at its start
        C.setup_ddp(tiny_args(simclr, out, *flags, "--ft-batch-size", 9))
    except SystemExit as e:
        res["odd"] = str(e)
    return res


def test_finetune_two_processes_equal_one(tmp_path):
    """SimCLR v2 (LARS, BN over the global batch, the projector's first layer): 2 gloo processes
    == 1 process on the same global batches: loss, weights and BN statistics. Barlow Twins' recipe
    (BN per process): both ranks evaluate one network, rank 0's."""
    flags = [*RUN, "--epochs", 0, *FT, "--version", "v2"]
    ranks = spawn(_finetune_on_ranks, 2, tmp_path, str(tmp_path / "two"), flags)
    ref = _finetune_on_ranks(str(tmp_path / "one"), flags)
    loss = ref["res"]["finetune_loss"]
    for r in ranks:  # the last step's loss: each rank's is over its half of the batch
        assert r["net"].keys() == ref["net"].keys()
        assert "--ft-batch-size 9 is not divisible by world size 2" in r["odd"]
    assert "odd" not in ref
    assert sum(r["res"]["finetune_loss"] for r in ranks) / 2 == pytest.approx(loss, rel=1e-5)
    scale = max(v.abs().max().item() for v in ref["net"].values() if v.is_floating_point())
    for k, v in ref["net"].items():
        torch.testing.assert_close(ranks[0]["net"][k], v, rtol=1e-4, atol=1e-5 * scale, msg=k)
    local = [*flags, *BARLOW_FT]
    ranks = spawn(_finetune_on_ranks, 2, tmp_path, str(tmp_path / "local"), local)
    acc = lambda r: (r["res"]["finetune_top1"], r["res"]["finetune_top5"])
    assert acc(ranks[0]) == acc(ranks[1])
    ref = _finetune_on_ranks(str(tmp_path / "local_one"), local)["net"]
    moved = [k for k, v in ref.items() if not torch.allclose(ranks[0]["net"][k], v, rtol=1e-3)]
    assert any(k.endswith("running_var") for k in moved)  # statistics of half batches


# ==== SimCLR v2's self-distillation ===========================================================
def test_distill_loss_is_the_tempered_cross_entropy():
    """Eq. 2 x tau^2: minus the mean of sum_y p_T(y) log p_S(y) at temperature tau; minus the
    teacher's entropy it is tau^2 KL(p_T || p_S) >= 0, zero at the teacher's logits."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    for tau in (1.0, 2.0):
        p, q = (torch.softmax(v / tau, 1) for v in (t, s))
        ref = -(p * q.log()).sum(1).mean() * tau**2
        torch.testing.assert_close(simclr.distill_loss(s, t, tau), ref)
        kl = (p * (p.log() - q.log())).sum(1).mean() * tau**2
        gap = simclr.distill_loss(s, t, tau) - simclr.distill_loss(t, t, tau)
        torch.testing.assert_close(gap, kl)
        assert kl > 0.1


def test_distillation_after_fine_tuning(tmp_path, monkeypatch):
    """--distill-epochs: a student trains on the fine-tuned teacher's soft labels (its loss falls)
    and its top-1/top-5 on the test split are logged."""
    losses, real = [], simclr.distill_loss

    def spy(s, t, tau):
        losses.append((loss := real(s, t, tau)).item())
        return loss

    monkeypatch.setattr(simclr, "distill_loss", spy)
    flags = [*RUN, "--epochs", 0, *FT, "--version", "v2", "--ft-lr", 0.3, 0.3]
    flags += ["--ft-head-lr", 0.3, 0.3, "--distill-epochs", 10, "--warmup-epochs", 0]
    simclr.main(tiny_args(simclr, tmp_path, *flags, "--lr", 0.5))
    rec = records(tmp_path)[-1]
    assert {"distill_top1", "distill_top5"} <= rec.keys() and rec["step"] == 0
    assert len(losses) == 38 and sum(losses[-5:]) / 5 < losses[0] - 0.05
    assert (tmp_path / "distill.pth").exists()
