"""tests/gpu_check.py's dry run: every phase with tiny settings on the CPU, so the script that
the GPU machine runs first never rots. The suite runs it with three smoke rows (a run stopped
at a checkpoint and resumed, the CPU pipeline, a CUDA-only row); `pytest -m gpu_check` runs
every row."""

import glob
import json

import gpu_check
import pytest
from helpers import python


def dry_run(tmp_path, *flags) -> dict:
    out = tmp_path / "out"
    r = python(
        "tests/gpu_check.py", "--dry-run", "--out", out, "--results", tmp_path, *flags, timeout=900
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (report,) = glob.glob(str(out / "*-cpu.json"))
    md = open(report.removesuffix(".json") + ".md").read()
    for section in ("## Smoke", "## Speed", "## Image folder", "## Learning"):
        assert section in md
    with open(report) as f:
        return json.load(f)


def check_report(rep: dict, rows: set):
    assert {r["row"] for r in rep["smoke"]} == rows
    for r in rep["smoke"]:
        if r["row"] in gpu_check.CUDA_ONLY:
            assert r["ok"] is None and "CUDA only" in r["error"]
        else:
            assert r["ok"] and r["steps"] >= 4 and r["img_s"] > 0, r
    assert rep["speed"] and all(r["img_s"] > 0 and r["raw_img_s"] > 0 for r in rep["speed"])
    diffs = rep["folder"]["decode_vs_pil_mean_abs_u8"]
    assert set(diffs) == set(gpu_check.ODD_FILES)
    for name, d in diffs.items():  # the odd files: decoded like PIL, or skipped by both
        broken = name in ("cut.jpg", "empty.jpg")
        assert d == "undecodable (skipped)" if broken else isinstance(d, float) and d < 1.0, name
    runs = rep["folder"]["runs"]
    assert [r["pipeline"] for r in runs] == ["device", "cpu"] and all(r["ok"] for r in runs)
    learn = rep["learn"]
    assert learn["ok"] and learn["epochs"] == 2 and learn["linear_top1"] is not None
    assert [e for e, _ in learn["knn_curve"]] == [0.0, 1.0, 2.0]  # init, each epoch
    assert learn["linear_init"] is not None


def test_dry_run_of_every_phase(tmp_path):
    rows = {"moco_v2 resume", "cpc", "byol fp16"}  # a run, then its resume; cpc; CUDA only
    check_report(dry_run(tmp_path, "--rows", ",".join(rows), "--jobs", "2"), rows)


@pytest.mark.gpu_check
def test_dry_run_of_every_row(tmp_path):
    check_report(dry_run(tmp_path, "--jobs", "2"), {*gpu_check.ROWS, *gpu_check.EXTRA})


def test_the_error_line_is_the_message_or_the_exception():
    tb = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: boom\n"
    assert gpu_check.error_line(tb) == "RuntimeError: CUDA error: boom"
    assert gpu_check.error_line("noise\nerror: --lr -1: negative; pass >= 0\n").startswith(
        "error: --lr -1"
    )
    assert gpu_check.error_line("") == "no output"
