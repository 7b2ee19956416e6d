"""Image folders as they come: without class folders (flat, nested, mixed) every image trains,
unlabelled; --eval-dir gives evaluation and fine-tuning their labelled images; neighbours.png
shows 16 images, each before its 8 nearest training images."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)
from PIL import Image

import common as C
import simclr

N = 20  # images a folder, and one file that is no image
LAYOUTS = {  # where image i goes
    "flat": lambda i: f"{i:02d}.png",
    "nested": lambda i: f"{i % 2}/{'deep/' * (i % 3)}{i:02d}.png",  # 1 to 3 levels down
    "mixed": lambda i: f"{i:02d}.jpg" if i % 2 else f"s{i % 4}/{i:02d}.png",  # top and 1 down
}
FLAGS = ["--dataset", "folder", "--batch-size", 7, "--epochs", 1, "--knn-every", 1]
NEED = "train/ and val/ of class folders"


def image_tree(root, layout: str, broken: bool = True) -> list[str]:
    """N 20 px images (PNG, JPEG) where LAYOUTS says, + a broken JPEG -> every file, sorted."""
    for i, (img, _) in enumerate(C.synthetic_images(N, 20, seed=0)):
        path = root / LAYOUTS[layout](i)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95)
    if broken:
        (root / "broken.jpg").write_bytes(b"no image")
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def class_tree(root, n: int = 16):
    """train/ and val/ of n 16 px images each, in class folders c0, c1."""
    for split, seed in (("train", 1), ("val", 2)):
        for i, (img, y) in enumerate(C.synthetic_images(n, 16, seed, num_classes=2)):
            (root / split / f"c{y}").mkdir(parents=True, exist_ok=True)
            img.save(root / split / f"c{y}" / f"{i:02d}.png")
    return root


def tiles(path, size: int) -> torch.Tensor:
    """A save_image grid (padding 2) -> its images [rows, cols, 3, size, size] uint8."""
    g = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[:, 2:, 2:]
    rows, cols = g.shape[1] // (size + 2), g.shape[2] // (size + 2)
    g = g.reshape(3, rows, size + 2, cols, size + 2)[:, :, :size, :, :size]
    return g.permute(1, 3, 0, 2, 4)


def read(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_a_folder_without_class_folders_trains_on_every_image(tmp_path, capsys, layout, pipeline):
    """Every image file at any depth is a training image (label -1), the broken one too (counted
    and replaced); one note says how to evaluate; neighbours.png: 16 rows of 1 + 8 images."""
    files = image_tree(tmp_path / "img", layout)
    flags = [*FLAGS, "--data-dir", tmp_path / "img", "--pipeline", pipeline]
    args = tiny_args(simclr, tmp_path / "run", *flags)
    args.batch_size_per_gpu, args.amp = 7, "off"
    data = C.build_data(args, C.MultiView([C.simclr_augment(16)]), None)
    assert data.train.dataset.samples == [(f, -1) for f in files] and data.test is None
    capsys.readouterr()
    simclr.main(tiny_args(simclr, tmp_path / "run", *flags))
    recs, err = read(tmp_path / "run"), capsys.readouterr().err
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]  # 21 files, batch 7
    skipped = [r for r in recs if "skipped_files" in r][-1]
    assert skipped["skipped_files"] == 1 and skipped["first"] == [str(tmp_path / "img/broken.jpg")]
    why = f"{tmp_path / 'img'} has no class folders (labels): no kNN monitor or linear probe"
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {why}; pass --eval-dir DIR with {NEED}"]
    assert not [r for r in recs if "knn_top1" in r]
    assert Image.open(tmp_path / "run" / "neighbours.png").size == (9 * 18 + 2, 16 * 18 + 2)


def test_eval_dir_gives_knn_linear_probe_and_fine_tuning(tmp_path, capsys):
    """Pretraining on an unlabelled folder, evaluation on --eval-dir's classes: the kNN monitor,
    the linear probe and fine-tuning all run; neighbours.png's queries are its val/ images."""
    image_tree(tmp_path / "img", "flat", broken=False)
    flags = [*FLAGS, "--data-dir", tmp_path / "img", "--eval-dir", class_tree(tmp_path / "ev")]
    flags += ["--linear-epochs", 1, "--finetune-fraction", 0.5, "--ft-epochs", 1, 1]
    simclr.main(tiny_args(simclr, tmp_path / "run", *flags, "--ft-batch-size", 8))
    recs = read(tmp_path / "run")
    assert [r["step"] for r in recs if "knn_top1" in r] == [0, 2]  # 20 images, batch 7
    assert [r["step"] for r in recs if "linear_top1" in r] == [2]
    assert [r["finetune_images"] for r in recs if "finetune_top1" in r] == [8]  # half of 16
    assert "note: " not in capsys.readouterr().err
    grid = tiles(tmp_path / "run" / "neighbours.png", 16)
    val = {tuple(np.asarray(Image.open(p)).ravel()) for p in (tmp_path / "ev/val").rglob("*.png")}
    queries = {tuple(t.permute(1, 2, 0).numpy().ravel()) for t in grid[:, 0]}
    assert grid.shape[:2] == (16, 9) and queries == val  # all 16 val/ images, one a row


@pytest.mark.parametrize("labelled", [True, False])
def test_neighbours_are_the_nearest_other_training_images(tmp_path, labelled):
    """Each row: a query (a test image; without labels a training image), then the 8 training
    images of the highest cosine similarity of fn's features, best first, never the query."""
    flags = ["--subset", 64] if labelled else ["--dataset", "folder", "--data-dir", tmp_path / "i"]
    if not labelled:
        image_tree(tmp_path / "i", "mixed", broken=False)
    args = tiny_args(simclr, tmp_path, *flags, "--batch-size", 8)
    args.amp, args.batch_size_per_gpu = "off", 8
    data = C.build_data(args, C.MultiView([C.simclr_augment(16)]), None)
    C.neighbours(lambda x: x.flatten(1), data, args)  # features: the pixels
    grid = tiles(tmp_path / "neighbours.png", 16)
    assert grid.shape[:2] == (16, 9)
    q = data.test if labelled else data.train_eval
    shown = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])  # as the test transform
    x, bank = shown(q), shown(data.train_eval)
    as_png = lambda t: t.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    where = lambda t, imgs: int((as_png(imgs) == t).flatten(1).all(1).nonzero())  # the one match
    sim = torch.nn.functional.normalize(x.flatten(1), dim=1)
    sim = sim @ torch.nn.functional.normalize(bank.flatten(1), dim=1).T
    rows = set()
    for row in grid:
        i = where(row[0], x)
        if not labelled:
            sim[i, i] = -2.0  # itself: not a neighbour
        near = [where(t, bank) for t in row[1:]]
        assert near == sim[i].topk(8).indices.tolist()
        if not labelled:
            assert i not in near
        rows.add(i)
    assert len(rows) == 16  # 16 distinct queries


def test_fine_tuning_without_labels_is_refused_before_training(tmp_path):
    image_tree(tmp_path / "img", "flat")
    flags = [*FLAGS, "--data-dir", tmp_path / "img", "--finetune-fraction", 0.1]
    with pytest.raises(SystemExit) as e:
        simclr.main(tiny_args(simclr, tmp_path / "run", *flags))
    why = f"{tmp_path / 'img'} has no class folders (labels); pass --eval-dir DIR with {NEED}"
    assert e.value.code == 2 and str(e.value) == (
        f"error: --finetune-fraction 0.1: {why} or drop --finetune-fraction"
    )
    assert not (tmp_path / "run" / "ckpt.pth").exists()


@pytest.mark.parametrize("broken", ["no val", "flat train", "other classes", "empty", "none"])
def test_an_eval_dir_without_labelled_train_and_val_is_one_line(tmp_path, broken):
    ev = class_tree(tmp_path / "ev")
    if broken == "no val":
        shutil.rmtree(ev / "val")
    elif broken == "flat train":
        image_tree(ev / "train", "flat", broken=False)
    elif broken == "other classes":
        (ev / "val" / "c1").rename(ev / "val" / "c2")
    elif broken == "empty":  # a class folder without images
        shutil.rmtree(ev / "val" / "c1")
        (ev / "val" / "c1").mkdir()
    else:
        ev = tmp_path / "none"
    args = tiny_args(simclr, tmp_path / "run", "--subset", 64, "--batch-size", 8, "--eval-dir", ev)
    with pytest.raises(SystemExit) as e:
        C.build_data(args, C.MultiView([C.simclr_augment(16)]), None)
    fix = f"--eval-dir {ev}: needs {NEED}, the same in both; pass such a folder"
    if broken == "empty":
        fix = "; pass --eval-dir to a folder of images (or of classes)"
    elif broken == "none":
        fix = f"no image folder at {ev / 'train'}; pass --eval-dir to a folder with train/ [val/]"
    line = str(e.value)
    assert e.value.code == 2 and line.startswith("error: ") and line.endswith(fix), line
    assert "\n" not in line
