"""The learning benchmark's plot: a PNG from results.json, skipped without matplotlib."""

import json
import struct
import sys

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
