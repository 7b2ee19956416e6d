"""The learning benchmark's plot: a PNG from results.json, skipped without matplotlib."""

import json
import os
import struct
import sys
from types import SimpleNamespace

import bench_learning as B
import pytest

ROWS = [  # knn_curve: [epoch, kNN top-1], the first one the random-init (step 0) record
    {"row": "simclr_v1", "knn_curve": [[0.0, 33.9], [1.0, 41.7], [1.5, 44.0]], "error": None},
    {"row": "byol", "knn_curve": [[0.0, 35.4], [1.0, 37.7], [2.0, 40.5]], "error": None},
    {"row": "cpc", "knn_curve": [], "error": "cpc: exit 1: failed"},
]


def png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_only_draws_png_from_results_json(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install matplotlib)")
    src = tmp_path / "results.json"
    src.write_text(json.dumps({"command": "python", "profile": "cpu-smoke", "rows": ROWS}))
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "--plot-only", str(src)])
    with pytest.raises(SystemExit) as e:
        B.main()
    assert e.value.code == 0
    assert png_size(tmp_path / "knn.png") == (960, 600)  # 8 x 5 in at 120 dpi, beside the JSON
    assert "knn.png" in capsys.readouterr().out


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    assert B.plot(ROWS, "kNN top-1 per epoch, cpu-smoke", str(tmp_path / "knn.png")) is False
    out = capsys.readouterr().out.strip()
    assert "plot skipped" in out and "pip install" in out and "\n" not in out
    assert not (tmp_path / "knn.png").exists()


def test_finetune_runs_start_from_the_rows_checkpoint_or_random_init(tmp_path):
    """--finetune: 4 runs per row, each parsed as the method file parses it (the last flag wins):
    1% and 10% of the labels, from the training run's checkpoint (--resume) or at --epochs 0,
    each in its own folder, no kNN or linear evaluation; the training run is left alone."""
    import common as C
    import simclr

    a = SimpleNamespace(profile="cpu-smoke", minutes=3.0, extra="", out=str(tmp_path / "b"))
    a.data_dir = str(tmp_path)
    runs = B.ft_commands("simclr_v1", a)
    train = C.parse_args(simclr.Args, B.commands("simclr_v1", a)[0][1:])
    ckpt = os.path.join(B.rel(str(tmp_path / "b" / "simclr_v1")), "ckpt.pth")
    assert [(f, k) for f, k, _ in runs] == [
        (f, k) for f in (0.01, 0.1) for k in ("trained", "init")
    ]
    dirs = set()
    for f, kind, cmd in runs:
        assert cmd[0] == "simclr.py"
        args = C.parse_args(simclr.Args, cmd[1:])
        assert args.finetune_fraction == f and args.linear_epochs == 0 and args.knn_every == 0
        assert (args.resume, args.epochs) == (
            (ckpt, train.epochs) if kind == "trained" else ("auto", 0)
        )
        assert args.max_steps == train.max_steps and args.batch_size == train.batch_size
        assert os.path.dirname(args.out_dir.rstrip("/")) in (train.out_dir, train.out_dir + "/init")
        dirs.add(args.out_dir)
    assert len(dirs) == 4 and train.out_dir not in dirs


def test_finetune_table_one_line_per_row():
    ft = {
        f"{f} {k}": {"top1": v, "top5": None, "images": None, "wall_s": 10.0}
        for f, k, v in [
            (0.01, "init", 41.16),
            (0.01, "trained", 42.66),
            (0.1, "init", 56.02),
            (0.1, "trained", 55.76),
        ]
    }
    rows = [
        {"row": "simclr_v1", "finetune": {**ft, "recipe": "simclr_v1, batch 256", "error": None}}
    ]
    lines = B.finetune_table(rows)
    assert lines[2].startswith("| row | recipe | 1% init | 1% trained | 10% init | 10% trained |")
    assert lines[-1] == "| simclr_v1 | simclr_v1, batch 256 | 41.2 | 42.7 | 56.0 | 55.8 | 40 s |"
    rows[0]["finetune"]["error"] = "x/ft1: exit 2: error | bad"
    assert B.finetune_table(rows)[-1].endswith("40 s failed: x/ft1: exit 2: error / bad |")
