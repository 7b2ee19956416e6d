"""The batched device augmentation (common.BatchAugment) against the torchvision reference path,
and the device-resident loader (common.DeviceLoader) against make_loader."""

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from helpers import assert_resume_exact, tiny_args
from PIL import Image

import byol
import cmc
import common as C
import cpc
import dino
import instdisc
import moco
import simclr
import swav

N = 4000  # samples for the distribution checks


def twin(**kw) -> C.BatchAugment:  # the batched twin of augmentation(32, **kw)
    return C.BatchAugment(C.augmentation(32, None, **kw))


def twins(data) -> list:  # the batched twins of a dataset's views, as train_loader builds them
    return [C.BatchAugment(t) for t in data.train.transform]


def images(b=8, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def sizes(b, h=32, w=32):
    return torch.full((b,), float(h)), torch.full((b,), float(w))


def ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (float64 both: equal values must compare equal)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    cdf = lambda s: np.searchsorted(s, grid, side="right") / len(s)
    return float(np.abs(cdf(a) - cdf(b)).max())


# ---- every op equals torchvision's at the same parameters -----------------------------------
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_colour_ops_equal_torchvision(op):
    x, f = images(), torch.linspace(0.2, 1.8, 8)
    ref = getattr(TF, f"adjust_{op}")
    want = torch.stack([ref(x[i], f[i].item()) for i in range(8)])
    p = {"jitter": torch.ones(8, 4), "order": torch.arange(4).repeat(8, 1)}
    p["jitter"][:, ["brightness", "contrast", "saturation"].index(op)] = f
    p["jitter"][:, 3] = 0.0
    assert torch.allclose(C.BatchAugment.jitter(x, p), want, atol=1e-6)


def test_additive_brightness_equals_the_cpu_op():
    """SimCLR v1's brightness x + d, clipped [ref: simclr data_util.py at the first release:
    tf.image.random_brightness then clip_by_value]: batched op = CPU op (tensor and PIL)."""
    x, d = images(), torch.linspace(-0.8, 0.8, 8)
    want = torch.stack([(x[i] + d[i]).clamp(0, 1) for i in range(8)])
    cpu = torch.stack([C.add_brightness(x[i], d[i].item()) for i in range(8)])
    p = {"jitter": torch.tensor([[0.0, 1.0, 1.0, 0.0]]).repeat(8, 1), "additive": True}
    p["jitter"][:, 0], p["order"] = d, torch.arange(4).repeat(8, 1)
    assert torch.equal(cpu, want) and torch.allclose(C.BatchAugment.jitter(x, p), want, atol=1e-6)
    pil = [TF.to_pil_image(x[i]) for i in range(8)]
    got = torch.stack([TF.to_tensor(C.add_brightness(pil[i], d[i].item())) for i in range(8)])
    want_u8 = torch.stack([(TF.to_tensor(pil[i]) + d[i]).clamp(0, 1) for i in range(8)])
    assert (got - want_u8).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding only
    torch.manual_seed(0)  # the CPU transform draws its order, then d ~ U(-0.8, 0.8)
    _, d0 = torch.randperm(4), torch.empty(1).uniform_(-0.8, 0.8).item()
    torch.manual_seed(0)
    assert torch.equal(C.AdditiveColorJitter(0.8)(x[0]), (x[0] + d0).clamp(0, 1))


def test_additive_brightness_offsets_are_uniform_on_both_paths(monkeypatch):
    aug = C.simclr_augment(32, None, 1.0, False, additive=True)
    jit = [t for t in aug.transforms if isinstance(t, T.RandomApply)][0].transforms[0]
    assert isinstance(jit, C.AdditiveColorJitter) and C.BatchAugment(aug).o.additive_brightness
    p = C.BatchAugment(aug).sample(*sizes(N), torch.Generator().manual_seed(0))
    on = p["jitter"][:, 1:3].ne(1).any(1)  # jitter applied (contrast/saturation moved)
    v = p["jitter"][on, 0]
    assert -0.8 <= v.min() < -0.79 and 0.79 < v.max() <= 0.8 and v.mean().abs() < 0.05
    assert p["jitter"][~on, 0].eq(0).all()  # identity offset 0 where jitter is off
    drawn = []
    monkeypatch.setattr(C, "add_brightness", lambda img, d: drawn.append(d) or img)
    torch.manual_seed(0)
    for _ in range(1000):
        jit(torch.full((3, 4, 4), 0.5))
    assert ks(drawn, v) < 0.1 and min(drawn) >= -0.8 and max(drawn) <= 0.8


def test_hue_and_grayscale_equal_torchvision():
    x, f = images(), torch.linspace(-0.5, 0.5, 8)
    want = torch.stack([TF.adjust_hue(x[i], f[i].item()) for i in range(8)])
    assert torch.allclose(C.adjust_hue(x, f), want, atol=1e-5)
    assert torch.equal(C.gray(x).expand_as(x), TF.rgb_to_grayscale(x, 3))


def test_jitter_applies_each_samples_own_order():
    x = images(1).expand(2, -1, -1, -1)
    f = torch.tensor([[1.5, 0.5, 1.3, 0.1]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    got = C.BatchAugment.jitter(x, {"jitter": f, "order": order})
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        want = x[i]
        for j in order[i].tolist():
            want = ops[j](want, f[i, j].item())
        assert torch.allclose(got[i], want, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 0.01  # the same image: the order matters


def test_blur_equals_torchvision_gaussian_blur():
    x, sigma = images(), torch.linspace(0.1, 2.0, 8)
    want = torch.stack([TF.gaussian_blur(x[i], 13, sigma[i].item()) for i in range(8)])
    assert torch.allclose(C.gaussian_blur_batch(x, sigma), want, atol=1e-5)


@pytest.mark.parametrize("bicubic", [False, True])
def test_crop_equals_crop_then_resize(bicubic):
    """Enlarging bilinear crops: the same samples as torchvision's crop + resize; bicubic ones
    (whose outer taps see past the box) and shrinking ones (box filter vs triangle) stay close."""
    x, mode = images(16), T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
    for scale, size in (((0.1, 0.5), 40), ((0.9, 1.0), 24)):
        box = C.rrc_boxes(*sizes(16), scale, g=torch.Generator().manual_seed(1))
        x0, y0, x1, y1 = box.long().T.tolist()
        crop = lambda i: (y0[i], x0[i], y1[i] - y0[i], x1[i] - x0[i], [size] * 2, mode)
        want = torch.stack(
            [TF.resized_crop(x[i], *crop(i), antialias=size < 32) for i in range(16)]
        )
        err = (C.crop_resize(x, box, size, bicubic) - want.clamp(0, 1)).abs()
        if size > 32 and not bicubic:
            assert err.max() < 1e-5
        else:
            assert err.mean() < 0.03, err.mean()


def test_identity_parameters_give_the_input_back():
    x = images()
    aug = twin(blur_p=0.5, solarize_p=0.2, gray_first=True)
    p = aug.sample(*sizes(8))
    p.update(box=torch.tensor([[0.0, 0.0, 32.0, 32.0]] * 8), flip=torch.zeros(8, dtype=bool))
    p.update(jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 8), gray=torch.zeros(8, dtype=bool))
    p.update(sigma=torch.zeros(8), solarize=torch.zeros(8, dtype=bool))
    hw = torch.stack(sizes(8), 1)
    assert torch.equal(aug.apply(x, p, hw), x)
    p["flip"][:] = True  # flip, solarize and grayscale as torchvision's
    p["solarize"][:], p["gray"][:] = True, True
    want = TF.hflip(TF.solarize(TF.rgb_to_grayscale(x, 3), 128 / 255))
    assert torch.allclose(aug.apply(x, p, hw), want, atol=1e-6)


# ---- the parameters follow torchvision's distributions --------------------------------------
@pytest.mark.parametrize("hw,scale", [((32, 32), (0.08, 1.0)), ((40, 64), (0.2, 1.0))])
def test_crop_scale_and_ratio_match_torchvision(hw, scale):
    h, w = hw
    box = C.rrc_boxes(*sizes(N, h, w), scale, g=torch.Generator().manual_seed(0)).double()
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert (box[:, :2] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(N)])
    rh, rw = ref[:, 2], ref[:, 3]
    assert ks((bw * bh / (h * w)).numpy(), rw * rh / (h * w)) < 0.04  # area fraction
    assert ks((bw / bh).log().numpy(), np.log(rw / rh)) < 0.04  # aspect ratio
    assert ks((box[:, 0] / (w - bw + 1)).numpy(), ref[:, 1] / (w - rw + 1)) < 0.04  # position


def test_crop_fallback_is_torchvisions_centre_crop():
    box = C.rrc_boxes(*sizes(64, 30, 90), (0.95, 1.0), ratio=(0.9, 1.1))  # nothing fits
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 30, 90), (0.95, 1.0), (0.9, 1.1))
    assert torch.equal(box, torch.tensor([[j, i, j + w, i + h]] * 64, dtype=torch.float))


def test_parameter_ranges_probabilities_and_order():
    kw = {"jitter": (0.4, 0.3, 0.2, 0.1), "jitter_p": 0.8, "gray_p": 0.2, "blur_p": 0.5}
    p = twin(solarize_p=0.2, **kw).sample(*sizes(N), torch.Generator())
    f, on = p["jitter"], (p["jitter"] != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        v = f[on, k]
        assert lo <= v.min() < lo + 0.01 and hi - 0.01 < v.max() <= hi  # U[lo, hi], all of it
    rate = lambda m, p: abs(m.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / N)
    assert rate(on, 0.8) and rate(p["gray"], 0.2) and rate(p["flip"], 0.5)
    assert rate(p["sigma"] > 0, 0.5) and rate(p["solarize"], 0.2)
    s = p["sigma"][p["sigma"] > 0]
    assert 0.1 <= s.min() < 0.12 and 1.98 < s.max() <= 2.0
    assert not twin(flip_p=0.0).sample(*sizes(N))["flip"].any()
    perms = {tuple(r) for r in p["order"].tolist()}
    counts = torch.unique(p["order"], dim=0, return_counts=True)[1].float()
    assert len(perms) == 24 and counts.std() / counts.mean() < 0.25  # all 24 orders, uniform


def test_samples_are_independent_and_seeded():
    aug, hw = twin(blur_p=0.5), sizes(N)
    p = aug.sample(*hw, torch.Generator().manual_seed(3))
    cols = torch.cat([p["jitter"], p["box"], p["sigma"][:, None], p["flip"][:, None]], 1).float()
    corr = torch.corrcoef(torch.cat([cols[:-1], cols[1:]], 1).T)  # each sample vs the next
    assert corr[:10, 10:].abs().max() < 0.08  # no parameter of one predicts the next's
    again = aug.sample(*hw, torch.Generator().manual_seed(3))
    other = aug.sample(*hw, torch.Generator().manual_seed(4))
    assert all(torch.equal(p[k], again[k]) for k in p if k != "additive")
    assert not torch.equal(p["box"], other["box"])


# ---- DeviceLoader ---------------------------------------------------------------------------
def loader_args(tmp_path, *flags):
    args = tiny_args(simclr, tmp_path, "--subset", 64, "--batch-size", 16, *flags)
    args.device, args.batch_size_per_gpu = "cpu", args.batch_size // args.world_size
    args.amp = "off"  # as setup_ddp resolves "auto" on the CPU
    return args


def build(args):
    ms = C.dataset_mean_std(args)
    return C.build_data(args, C.MultiView([C.moco_augment(16, ms, "v2", blur=True)] * 2), ms)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_device_loader_has_make_loaders_shards_and_order(tmp_path, world, rank):
    args = loader_args(tmp_path)
    data = build(args)
    args.world_size, args.rank, args.batch_size_per_gpu = world, rank, 16 // world
    dev, ref = C.DeviceLoader(data.train, twins(data), args, 8), C.make_loader(data.train, args, 8)
    assert len(dev) == len(ref)
    for epoch in (0, 1):
        dev.sampler.set_epoch(epoch), ref.sampler.set_epoch(epoch)
        for (views, y, i), (_, y_ref, i_ref) in zip(dev, ref, strict=True):
            assert torch.equal(i, i_ref) and torch.equal(y, y_ref)
            assert len(views) == 2 and views[0].shape == (8, 3, 16, 16)
            assert not torch.equal(views[0], views[1])  # two independent draws


def test_device_loader_resumes_mid_epoch_exactly(tmp_path):
    args = loader_args(tmp_path)
    data = build(args)
    dev = C.DeviceLoader(data.train, twins(data), args, 16)
    dev.sampler.set_epoch(1)
    full = list(dev)
    dev.sampler.set_epoch(1, skip=2 * 16)
    for a, b in zip(full[2:], list(dev), strict=True):
        assert all(torch.equal(u, v) for u, v in zip([*a[0], *a[1:]], [*b[0], *b[1:]]))
    dev.sampler.set_epoch(2)
    assert not torch.equal(list(dev)[0][0][0], full[0][0][0])  # new views every epoch


def test_device_loader_decodes_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(20, 30), (40, 24), (32, 32), (25, 50)] * 2):
        (tmp_path / "img" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"c{k % 2}" / f"{k}.jpg", quality=95)
    args = loader_args(tmp_path / "run", "--dataset", "folder", "--data-dir", tmp_path / "img")
    args.subset, args.batch_size, args.batch_size_per_gpu = 0, 4, 4
    data = build(args)
    dev = C.DeviceLoader(data.train, twins(data), args, 4)
    dev.sampler.set_epoch(0)
    batches = list(dev)
    assert len(batches) == 2 and batches[0][0][0].shape == (4, 3, 16, 16)
    paths = [data.train.dataset.samples[i] for i in range(8)]
    data_bytes = [C.read_bytes(p) for p, _ in paths]
    x, hw = C.to_canvas(C.decode(data_bytes, torch.device("cpu")), 32, torch.device("cpu"))
    sizes_true = [Image.open(p).size[::-1] for p, _ in paths]
    assert hw.tolist() == [list(map(float, s)) for s in sizes_true] and x.shape == (8, 3, 32, 32)
    pil = np.asarray(Image.open(paths[2][0]).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.abs(x[2].permute(1, 2, 0).numpy() * 255 - pil).mean() < 4  # same image


def test_train_loader_picks_the_pipeline(tmp_path, capsys):
    args = loader_args(tmp_path)
    data = build(args)
    assert isinstance(C.train_loader(data, args), torch.utils.data.DataLoader)  # auto on CPU
    args.pipeline = "device"
    assert isinstance(C.train_loader(data, args), C.DeviceLoader)
    data.train.transform = C.MultiView([T.ToTensor()])  # no batched twin
    with pytest.raises(SystemExit, match="--pipeline cpu"):
        C.train_loader(data, args)
    args.pipeline, args.device = "auto", "cuda:0"  # auto on CUDA: stays on the CPU, says so
    assert isinstance(C.train_loader(data, args), torch.utils.data.DataLoader)
    assert "CPU pipeline" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module,flags",
    [
        (simclr, []),
        (moco, ["--version", "v1"]),  # grayscale before jitter
        (byol, []),  # asymmetric views: blur, solarize
        (cmc, []),  # one view, no jitter, un-normalised
        (instdisc, []),  # CIFAR recipe: jitter always, no flip
        (swav, ["--n-local", "2"]),  # multi-crop
        (dino, ["--n-local", "2", "--out-dim", "64"]),
    ],
)
def test_device_pipeline_trains_and_resumes_exactly(tmp_path, module, flags):
    assert_resume_exact(module, tmp_path, "--pipeline", "device", *flags)


def test_a_recipe_without_batched_version_asks_for_the_cpu_pipeline(tmp_path):
    with pytest.raises(SystemExit, match="pass --pipeline cpu"):
        cpc.main(tiny_args(cpc, tmp_path, "--pipeline", "device", "--subset", 64))


def test_extract_on_device_equals_the_dataloader_path(tmp_path):
    args = loader_args(tmp_path)
    data = build(args)
    fn = lambda x: x.flatten(1)
    ref = C.extract(fn, data.test, args)
    args.pipeline = "device"
    got = C.extract(fn, data.test, args)
    assert torch.allclose(got[0], ref[0], atol=1e-5) and torch.equal(got[1], ref[1])
    for size in (12, 80):  # resized (and centre-cropped above 64 px): close to PIL's resize
        ds = C.Indexed(data.test.dataset, C.eval_transform(size, C.CIFAR_MEAN_STD))
        args.pipeline = "cpu"
        ref = C.extract(fn, ds, args)[0]
        args.pipeline = "device"
        got = C.extract(fn, ds, args)[0]
        assert got.shape == ref.shape and (got - ref).abs().mean() < 0.05


# ---- image folders as they come: odd formats and broken files -----------------------------
BROKEN = ("truncated.jpg", "empty.jpg", "text.jpg")


def messy_folder(root) -> dict:
    """One class folder per kind: every mode and format ImageFolder lists, and three files no
    decoder reads (a truncated JPEG, a zero-byte file, a text file named .jpg). -> name: path."""
    rng, paths = np.random.default_rng(0), {}
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    kinds = {
        "gray.jpg": Image.fromarray(rgb(30, 40)[..., 0]),
        "palette.png": Image.fromarray(rgb(36, 24)).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb(28, 28), rgb(28, 28)[..., 0]])),
        "deep.png": Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16)),
        "cmyk.jpg": Image.fromarray(rgb(26, 34)).convert("CMYK"),
        "plain.bmp": Image.fromarray(rgb(22, 30)),
        "plain.tif": Image.fromarray(rgb(32, 20)),
        "plain.jpg": Image.fromarray(rgb(40, 30)),
    }
    for k, (name, img) in enumerate(kinds.items()):
        (d := root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        img.save(paths.setdefault(name, d / f"{k:02d}_{name}"))
    good = paths["plain.jpg"].read_bytes()
    for k, (name, data) in enumerate(zip(BROKEN, (good[: len(good) // 2], b"", b"no image"))):
        (paths.setdefault(name, root / f"c{k % 2}" / f"{k:02d}x_{name}")).write_bytes(data)
    return paths


def test_every_decodable_file_reads_the_same_on_both_paths(tmp_path):
    """The device path's decoders (torchvision's, then PIL) give the image the CPU pipeline's
    PIL path gives, for every kind; the broken files give None there and raise in PIL."""
    paths = messy_folder(tmp_path)
    for name, path in paths.items():
        got = C.decode([C.read_bytes(str(path))], torch.device("cpu"))[0]
        if name in BROKEN:
            assert got is None
            with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises
                C.open_rgb(path)
            continue
        want = TF.to_tensor(C.open_rgb(path))
        tol = 3 / 255 if name.endswith(".jpg") else 0.5 / 255 + 1e-6  # JPEG: IDCT rounding
        assert got.shape == want.shape and (got - want).abs().mean() <= tol, name
    deep = np.asarray(Image.open(paths["deep.png"]), np.float64) / 65535
    assert np.abs(TF.to_tensor(C.open_rgb(paths["deep.png"]))[0].numpy() - deep).max() < 0.003


@pytest.mark.parametrize("pipeline,workers", [("cpu", 2), ("device", 2), ("device", 0)])
def test_broken_files_are_skipped_counted_and_replaced(tmp_path, pipeline, workers):
    """An epoch over the folder: full batches, every broken file marked once (by the loader's
    worker processes too) and replaced by the next file of the folder, nothing else marked."""
    paths = messy_folder(tmp_path / "img")
    flags = ("--dataset", "folder", "--data-dir", tmp_path / "img", "--workers", workers)
    args = loader_args(tmp_path / "run", *flags)
    args.subset, args.batch_size, args.batch_size_per_gpu = 0, 4, 4
    data = build(args)
    base = data.train.dataset
    assert isinstance(base, C.ImageFiles) and len(base) == 11
    if pipeline == "device":
        loader = C.DeviceLoader(data.train, twins(data), args, 4)
    else:
        loader = C.make_loader(data.train, args, 4)
    loader.sampler.set_epoch(0)
    seen = {}
    for views, y, i in loader:
        assert views[0].shape == (4, 3, 16, 16) and torch.isfinite(views[0]).all()
        seen.update(zip(i.tolist(), y.tolist()))
    assert len(seen) == 8  # 11 files, batches of 4, drop_last
    broken = sorted(str(paths[n]) for n in BROKEN)
    marked = sorted(C.skipped_files(data))
    assert set(marked) <= set(broken) and len(marked) == sum(p in marked for p in broken)
    files = [p for p, _ in base.samples]
    for i, y in seen.items():  # a broken file's sample is the next decodable file's
        j = i
        while files[j] in broken:
            j = (j + 1) % len(files)
        assert y == base.samples[j][1]
    sampled = {files[data.train.indices[i]] for i in seen}
    assert set(marked) == {p for p in broken if p in sampled}  # exactly the broken ones read


def test_a_run_on_a_messy_folder_logs_its_skipped_files(tmp_path, capsys):
    paths = messy_folder(tmp_path / "img" / "train")
    for c in ("c0", "c1"):  # a test split of good files: kNN reads all the training files
        (tmp_path / "img" / "val" / c).mkdir(parents=True)
        Image.new("RGB", (20, 20), "red" if c == "c0" else "blue").save(
            tmp_path / "img" / "val" / c / "a.png"
        )
    flags = ["--dataset", "folder", "--data-dir", tmp_path / "img", "--batch-size", 4]
    flags += ["--epochs", 1, "--pipeline", "device", "--subset", 0, "--knn-every", 1]
    simclr.main(tiny_args(simclr, tmp_path / "run", *flags))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    skips = [r for r in recs if "skipped_files" in r]
    assert skips and skips[-1]["skipped_files"] == 3  # the kNN monitor reads every file
    assert sorted(skips[-1]["first"]) == sorted(str(paths[n]) for n in BROKEN)
    assert "3 undecodable image files skipped" in capsys.readouterr().err


def test_a_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "img" / "c0").mkdir(parents=True)
    (tmp_path / "img" / "c0" / "notes.txt").write_text("no image")
    args = loader_args(tmp_path / "run", "--dataset", "folder", "--data-dir", tmp_path / "img")
    with pytest.raises(SystemExit, match="^error: .*pass --data-dir"):
        build(args)
