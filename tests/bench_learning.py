"""Learning benchmark: every method through its own command line, with one shared protocol.

Each selected row runs as `python <method>.py <flags>` from the repo root, the code path users
run: one training run (kNN at init, every --knn-every epochs and at the end, then the method's
own linear-eval protocol) and one run of the same command with `--epochs 0` for the linear
top-1 of the random-init encoder (its kNN top-1 is the step-0 record of the training run).

Shared protocol: CIFAR-10 (`--dataset cifar10-npz`, the JPEG copy in ../shared/data), each
method's CIFAR preset except for the flags below. kNN top-1 on the 10,000 test images: weighted,
k=200, T=0.1, cosine on the backbone output, bank = the 50,000 training images. Linear eval: the
method's own protocol (optimizer, epochs, batch) on cached un-augmented features
(`--linear-cached`, a deviation from the papers' augmented linear training).

Profiles:
  cpu-smoke    `smallcnn` at 16 px, batch 256, 1 warm-up epoch, 20 linear epochs, CPU, fp32,
               2 loader workers, kNN after every epoch. Every row gets a fixed training budget
               on 2 CPU cores, --minutes (default 3) or a multiple of it (SMOKE: CPC x2, SwAV x2,
               DINO x3, with the flags that fit their schedules into it): steps = budget /
               seconds per step (ROWS, measured with --calibrate), passed as --max-steps, with
               --epochs = ceil(steps / steps per epoch) so that the schedules span the budget
               (they would end at most one epoch after it). Evaluation is not in the budget.
               Step-decay linear protocols keep their decays at the same fractions of the 20
               epochs (MoCo's 60, 80 of 100 -> 12, 16); cosine ones span them by themselves.
  cifar10-200  ResNet-18 with the CIFAR stem, batch 512, 200 epochs, kNN every 10 epochs, the
               rest of each method's CIFAR preset (optimizer, lr schedule, temperatures,
               momentum), on the default device (CUDA): the protocol of the lightly benchmark
               table, so the numbers are comparable in kind.
  cifar10-800  the same for 800 epochs, kNN every 50 epochs.

--finetune: then each row's semi-supervised fine-tuning (--finetune-fraction) at 1% and 10% of
the training labels (class-balanced from the seed), from its checkpoint (the training command
with --resume <row>/ckpt.pth, in <row>/ft1, ft10) and from the random init (the --epochs 0
command, in <row>/init/ft1, ft10), each with the method's fine-tuning recipe; top-1 on the test
images in a second table of results.md.

Run from the repo root (--extra adds flags to every run, last, so they win):
  python tests/bench_learning.py --profile cpu-smoke
  python tests/bench_learning.py --profile cifar10-200 --methods simclr_v1,moco_v2,byol,swav,dino
  python tests/bench_learning.py --profile cifar10-800 --extra="--workers 14"
  python tests/bench_learning.py --profile cpu-smoke --calibrate   # re-measure the seconds per step
  python tests/bench_learning.py --profile cpu-smoke --plot-only   # redraw knn.png, run nothing
  python tests/bench_learning.py --profile cpu-smoke --finetune    # + 1% / 10% fine-tuning
Outputs in --out (default runs/bench_<profile>): <row>/ (the run's metrics.jsonl, logs and
checkpoint; <row>/init/ the --epochs 0 run), results.json, results.md and knn.png (kNN top-1 per
epoch; needs matplotlib, the `bench` extra of pyproject.toml: without it the plot is skipped).
A run whose metrics.jsonl already holds the final linear record is not run again (--force re-runs
it): running again with a longer --methods list trains only the rows not finished yet and
rebuilds the table from all of them; an interrupted run resumes from its checkpoint. The exit
status is 1 when a row failed or a row's final kNN top-1 is not above its random-init kNN top-1.
--plot-only [RESULTS_JSON] redraws the plot from a results file (default: --out's results.json)
into --png (default: knn.png beside it), e.g. the one in tests/results:
  python tests/bench_learning.py --plot-only tests/results/cpu-smoke.json \\
    --png tests/results/knn_cpu-smoke.png
"""

import argparse
import importlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the method files and common.py, for their presets
import common as C  # noqa: E402

# Row -> (method file and version flag, cpu-smoke seconds per training step). Seconds: batch 256
# (CPC: 64) at 16 px, 2 loader workers, 2 CPU cores, real CIFAR-10, measured by --calibrate
# (steps 11-40, the median of three 10-step logs). Multi-crop SwAV and DINO (2 + 6 and 2 + 8
# crops) take 3-6x SimCLR's time per step; CPC (a grid of 7 x 7 patches per image, SMOKE
# flags) 6x SimCLR's time per image.
ROWS = {
    "simclr_v1": ("simclr.py --version v1", 0.215),
    "simclr_v2": ("simclr.py --version v2", 0.273),
    "moco_v1": ("moco.py --version v1", 0.247),
    "moco_v2": ("moco.py --version v2", 0.263),
    "moco_v3": ("moco.py --version v3", 0.400),
    "instdisc": ("instdisc.py", 0.150),
    "invaspread": ("invaspread.py", 0.270),
    "cmc": ("cmc.py", 0.161),
    "cpc": ("cpc.py", 0.323),
    "swav": ("swav.py", 0.687),
    "byol": ("byol.py", 0.408),
    "simsiam": ("simsiam.py", 0.397),
    "barlow_twins": ("barlow_twins.py", 0.466),
    "dino": ("dino.py", 1.247),
}
# cpu-smoke only: rows whose preset cannot show learning in a few minutes get a larger budget
# (x --minutes) and flags that fit their schedules into it; each is printed in the command.
SMOKE = {
    # the preset's own batch (64: the loss over all patches of the batch is quadratic in it) and
    # constant lr (no warm-up); Adam 1e-3 instead of the 1000-epoch preset's 4e-5, under which
    # the encoder barely moves in a few minutes; context width 64 for smallcnn's 256-d patch
    # features (the 4 context networks at width 256 cost 3x the encoder)
    "cpc": (2, "--batch-size 64 --warmup-epochs 0 --lr 1e-3 --context-dim 64"),
    # prototypes frozen for the profile's warm-up epoch instead of the preset's 2 of 1000 epochs
    "swav": (2, "--freeze-prototypes-niters 195"),
    # the teacher is what is evaluated: the paper's EMA 0.996 instead of the 1000-epoch preset's
    # 0.9995, under which the teacher stays near its random init for a few hundred steps
    "dino": (3, "--m 0.996"),
    # SimSiam starts slowly: after 3 minutes its kNN gains 5 points but its linear probe (SGD
    # lr 30, tuned for ResNet-50 features) ranked the features at the random init's (38.9 vs 39.0)
    "simsiam": (2, ""),
}
# cifar10-200/800 only (batch 512): the official code cuts SwAV's queue to a multiple of the
# global batch [ref: swav main_swav.py queue_length -= queue_length % (batch * world)]: 3840 -> 3584
FULL = {"swav": "--queue-length 3584"}
SHARED = "--preset cifar --dataset cifar10-npz --knn-k 200 --knn-t 0.1 --linear-cached"
PROFILES = {
    "cpu-smoke": "--arch smallcnn --img-size 16 --batch-size 256 --warmup-epochs 1 "
    "--linear-epochs 20 --device cpu --amp off --workers 2 --knn-every 1",
    "cifar10-200": "--arch resnet18 --batch-size 512 --epochs 200 --knn-every 10",
    "cifar10-800": "--arch resnet18 --batch-size 512 --epochs 800 --knn-every 50",
}


# ==== commands ==============================================================================
def rel(path: str) -> str:
    """A path as the commands show it: relative to the repo root unless outside its parent."""
    r = os.path.relpath(path, REPO)
    return path if r.startswith(os.path.join(os.pardir, os.pardir)) else r


def base_flags(row: str, a) -> list[str]:
    """The method file, its version, the shared protocol and the profile's flags."""
    data = ["--data-dir", rel(a.data_dir)]
    flags = [*ROWS[row][0].split(), *SHARED.split(), *data, *PROFILES[a.profile].split()]
    if a.profile != "cpu-smoke":
        return flags + FULL.get(row, "").split()
    return flags + SMOKE.get(row, (1, ""))[1].split() + linear_milestones(row, flags)


def linear_milestones(row: str, flags: list[str]) -> list[str]:
    """A step-decay linear protocol cut to fewer epochs keeps its decays at the same fractions
    of the schedule (MoCo's 60, 80 of 100 -> 12, 16 of 20), as a cosine one does by itself."""
    module = importlib.import_module(flags[0].removesuffix(".py"))
    preset = C.parse_args(module.Args, ["--preset", "cifar", *ROWS[row][0].split()[1:]])
    short = C.parse_args(module.Args, flags[1:])
    if not preset.linear_milestones or short.linear_epochs == preset.linear_epochs:
        return []
    scale = short.linear_epochs / preset.linear_epochs
    return ["--linear-milestones", *(str(round(m * scale)) for m in preset.linear_milestones)]


def data_size(row: str, a) -> tuple[int, int]:
    """(training images, batch) of a row's runs; --extra may change them."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar10-npz")
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    e = p.parse_known_args(base_flags(row, a) + shlex.split(a.extra))[0]
    return e.subset or (512 if e.dataset == "synthetic" else 50_000), e.batch_size


def cpu_budget(row: str, a) -> tuple[int, int]:
    """cpu-smoke: (steps, epochs) for the row's budget (--minutes x its SMOKE factor)."""
    n, batch = data_size(row, a)
    steps = max(1, round(a.minutes * SMOKE.get(row, (1, ""))[0] * 60 / ROWS[row][1]))
    return steps, math.ceil(steps / max(1, n // batch))


def commands(row: str, a) -> tuple[list[str], list[str]]:
    """(training run, --epochs 0 run) for one row, as argv lists without the interpreter."""
    flags = base_flags(row, a)
    if a.profile == "cpu-smoke":
        steps, epochs = cpu_budget(row, a)
        flags += ["--epochs", str(epochs), "--max-steps", str(steps)]
    out, extra = os.path.join(a.out, row), shlex.split(a.extra)
    train = [*flags, "--out-dir", rel(out), *extra]
    init = [*flags, "--out-dir", rel(os.path.join(out, "init")), *extra, "--epochs", "0"]
    return train, init


FRACTIONS = (0.01, 0.1)  # --finetune: the papers' 1% and 10% of the labels


def ft_commands(row: str, a) -> list[tuple[str, str, list[str]]]:
    """--finetune: (fraction, "trained" / "init", argv) of the 4 fine-tuning runs of a row: the
    training command continued from the row's checkpoint (--resume, in its own --out-dir) or
    at --epochs 0, with no kNN or linear evaluation, then --finetune-fraction."""
    train, init = commands(row, a)
    ckpt = os.path.join(rel(os.path.join(a.out, row)), "ckpt.pth")
    runs = []
    for f in FRACTIONS:
        sub = f"ft{round(f * 100)}"
        for kind, cmd in (("trained", train), ("init", init)):
            i = cmd.index("--out-dir") + 1
            c = [*cmd[:i], os.path.join(cmd[i], sub), *cmd[i + 1 :]]
            c += ["--resume", ckpt] if kind == "trained" else []
            c += ["--knn-every", "0", "--linear-epochs", "0", "--finetune-fraction", str(f)]
            runs.append((f, kind, c))
    return runs


def out_dir(cmd: list[str]) -> str:
    return os.path.join(REPO, cmd[cmd.index("--out-dir") + 1])


# ==== running ===============================================================================
def read_metrics(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(cmd: list[str], folder: str, a, last: str = "linear_top1") -> dict:
    """Run `python <cmd>` (cwd: the repo root, output to folder/*.log) unless folder already
    holds a finished run (a record with `last`); returns the exit status, wall time, peak RSS."""
    done = any(last in r for r in read_metrics(folder))
    info_path = os.path.join(folder, "bench.json")
    if done and not a.force:
        print(f"  done before, not re-run: {rel(folder)}")
        if os.path.isfile(info_path):
            with open(info_path) as f:
                return json.load(f)
        return {"returncode": 0, "wall_s": None, "peak_rss_gb": None, "resumed": False}
    if a.force:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    resumed = os.path.isfile(os.path.join(folder, "ckpt.pth"))
    t0 = time.time()
    out, err = (os.path.join(folder, f"{s}.log") for s in ("stdout", "stderr"))
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stdout=o, stderr=e)
        _, status, usage = os.wait4(p.pid, 0)  # rusage of this run (largest process)
        p.returncode = os.waitstatus_to_exitcode(status)
    info = {"returncode": p.returncode, "wall_s": time.time() - t0, "resumed": resumed}
    info["peak_rss_gb"] = usage.ru_maxrss / 2**20  # kB on Linux
    with open(info_path, "w") as f:
        json.dump(info, f)
    return info


def last_error(folder: str) -> str:
    with open(os.path.join(folder, "stderr.log"), errors="replace") as f:
        lines = [s.strip() for s in f.read().replace("\r", "\n").split("\n") if s.strip()]
    return lines[-1] if lines else "no output"


def summarize(row: str, cmds: tuple, infos: tuple, a) -> dict:
    """One row of the table from the two runs' metrics.jsonl."""
    folder = os.path.join(a.out, row)
    recs, init_recs = read_metrics(folder), read_metrics(os.path.join(folder, "init"))
    knn = {r["step"]: (r["epoch"], r["knn_top1"]) for r in recs if "knn_top1" in r}  # last wins
    logs = [r for r in recs if "loss" in r]
    final = next((r for r in reversed(recs) if "linear_top1" in r), {})
    init = next((r for r in reversed(init_recs) if "linear_top1" in r), {})
    res = {
        "row": row,
        "commands": [shlex.join(["python", *c]) for c in cmds],
        "knn_init": knn[0][1] if 0 in knn else None,
        "knn_final": final.get("knn_top1"),
        "linear_init": init.get("linear_top1"),
        "linear_final": final.get("linear_top1"),
        "steps": final.get("step"),
        "epochs": final.get("epoch"),
        "wall_s": infos[0]["wall_s"],
        "resumed": infos[0]["resumed"],
        "img_s": statistics.median(r["img_s"] for r in logs[1:]) if logs[1:] else None,
        "peak_gpu_gb": max((r.get("mem_gb", 0.0) for r in logs), default=0.0) or None,
        "peak_rss_gb": infos[0]["peak_rss_gb"],
        "loss_start": logs[0]["loss"] if logs else None,
        "loss_end": logs[-1]["loss"] if logs else None,
        "knn_curve": [list(knn[s]) for s in sorted(knn)],
        "error": None,
    }
    for info, sub in zip(infos, (folder, os.path.join(folder, "init"))):
        if info["returncode"] != 0:
            res["error"] = f"{rel(sub)}: exit {info['returncode']}: {last_error(sub)}"
            break
    else:
        if not final or not init:
            res["error"] = "finished without the final linear_top1 record"
    return res


def finetune(row: str, a) -> dict:
    """--finetune: the row's 4 fine-tuning runs, their top-1/top-5, wall and commands."""
    res = {"commands": [], "recipe": "-", "error": None}
    for f, kind, cmd in ft_commands(row, a):
        info = run(cmd, out_dir(cmd), a, last="finetune_top1")
        rec = next((r for r in read_metrics(out_dir(cmd)) if "finetune_top1" in r), {})
        res["commands"].append(shlex.join(["python", *cmd]))
        if rec:  # the recipe as run, e.g. "simclr_v1, batch 256"
            res["recipe"] = f"{rec['finetune_optimizer']}, batch {rec['finetune_batch']}"
        res[f"{f} {kind}"] = {k: rec.get(f"finetune_{k}") for k in ("top1", "top5", "images")}
        res[f"{f} {kind}"]["wall_s"] = info["wall_s"]
        if info["returncode"] and not res["error"]:
            res["error"] = f"{rel(out_dir(cmd))}: exit {info['returncode']}: "
            res["error"] += last_error(out_dir(cmd))
    return res


def calibrate(rows: list[str], a):
    """Time 40 training steps (no evaluation) per row with the cpu-smoke flags."""
    for row in rows:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [*base_flags(row, a), "--subset", "10240", "--epochs", "1", "--max-steps", "40"]
            cmd += ["--log-every", "10", "--knn-every", "0", "--linear-epochs", "0"]
            cmd += ["--resume", "none", "--out-dir", tmp, *shlex.split(a.extra)]
            info = run(cmd, tmp, a)
            img_s = [r["img_s"] for r in read_metrics(tmp) if "img_s" in r][1:]
            if info["returncode"] or not img_s:
                print(f"{row}: failed: {last_error(tmp)}")
                continue
            batch = data_size(row, a)[1]
            print(f"{row}: {batch / statistics.median(img_s):.3f} s/step", flush=True)


# ==== report: markdown, JSON and a line chart (matplotlib, optional) ========================
def fmt(v, spec=".1f", unit="") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {gpu}"


def write_markdown(results: list[dict], cmdline: str, path: str):
    lines = [
        "```bash",
        cmdline,
        "```",
        "",
        f"Machine: {machine()}. kNN: weighted, k=200, T=0.1, cosine; linear: each method's "
        "protocol on cached features; init: the same encoder at random initialisation.",
        "",
        "| row | kNN init | kNN final | linear init | linear final | steps (epochs) | wall | "
        "img/s | peak mem | loss start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["error"]:
            lines.append(f"| {r['row']} | failed: {r['error'].replace('|', '/')} |" + " |" * 8)
            continue
        mem = fmt(r["peak_gpu_gb"], ".2f", " GB") if r["peak_gpu_gb"] else None
        mem = mem or fmt(r["peak_rss_gb"], ".2f", " GB RSS")
        wall = fmt(r["wall_s"], ".0f", " s") + (" (resumed)" if r["resumed"] else "")
        cells = [r["knn_init"], r["knn_final"], r["linear_init"], r["linear_final"]]
        lines.append(
            f"| {r['row']} | {' | '.join(fmt(v) for v in cells)} | "
            f"{r['steps']} ({fmt(r['epochs'], '.2f')}) | {wall} | {fmt(r['img_s'], '.0f')} | "
            f"{mem} | {fmt(r['loss_start'], '.3f')} -> {fmt(r['loss_end'], '.3f')} |"
        )
    lines += ["", "Commands (the second of each row: the random-init linear number):", ""]
    lines += [f"    {c}" for r in results for c in r["commands"]]
    if ft := [r for r in results if r.get("finetune")]:
        lines += ["", *finetune_table(ft), "", "Fine-tuning commands:", ""]
        lines += [f"    {c}" for r in ft for c in r["finetune"]["commands"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def finetune_table(results: list[dict]) -> list[str]:
    """--finetune: top-1 after fine-tuning on 1% / 10% of the labels, random init vs trained."""
    head = " | ".join(f"{round(f * 100)}% {k}" for f in FRACTIONS for k in ("init", "trained"))
    lines = [
        "Fine-tuning: the encoder and a new linear head on 1% / 10% of the training labels "
        "(class-balanced from the seed), each method's --ft-* protocol; top-1 on the test images.",
        "",
        f"| row | recipe | {head} | wall (4 runs) |",
        "|---|---|" + "---|" * (2 * len(FRACTIONS) + 1),
    ]
    for r in results:
        ft = r["finetune"]
        cells = [fmt(ft[f"{f} {k}"]["top1"]) for f in FRACTIONS for k in ("init", "trained")]
        wall = sum(ft[f"{f} {k}"]["wall_s"] or 0 for f in FRACTIONS for k in ("init", "trained"))
        err = f" failed: {ft['error'].replace('|', '/')}" if ft["error"] else ""
        lines.append(f"| {r['row']} | {ft['recipe']} | {' | '.join(cells)} | {wall:.0f} s{err} |")
    return lines


def plot(results: list[dict], title: str, path: str) -> bool:
    """kNN top-1 against epochs, one line per row from its random-init point (the step-0 record,
    epoch 0) on, legend on the right. Without matplotlib: one line printed and False."""
    curves = [(r["row"], r["knn_curve"]) for r in results if r.get("knn_curve")]
    if not curves:
        print("plot skipped: no row has a kNN curve")
        return False
    try:  # the Figure class directly: no pyplot state, no backend to select
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, (row, curve) in enumerate(curves):  # 10 colours, then the next line style
        epochs, top1 = zip(*curve)
        style = ("-", "--", ":")[i // 10 % 3]
        ax.plot(epochs, top1, style, marker="o", markersize=3, linewidth=1.5, label=row)
    ax.set(title=title, xlabel="epoch", ylabel="kNN top-1 (%)")
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(steps=[1, 2, 5, 10], integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.savefig(path)
    return True


def beats_init(r: dict) -> bool:
    """The final kNN top-1 is above the random-init one (both measured)."""
    return None not in (r["knn_init"], r["knn_final"]) and r["knn_final"] > r["knn_init"]


# ==== main ==================================================================================
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="cpu-smoke", choices=PROFILES)
    p.add_argument("--methods", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    p.add_argument("--minutes", type=float, default=3.0, help="cpu-smoke: training budget per row")
    p.add_argument(
        "--data-dir",
        default=os.path.join(REPO, "..", "shared", "data"),
        help="cifar10_jpeg.npz folder",
    )
    p.add_argument("--out", default="", help="output folder (default: runs/bench_<profile>)")
    p.add_argument("--extra", default="", help='flags for every run, e.g. --extra="--workers 4"')
    p.add_argument("--force", action="store_true", help="re-run rows that finished before")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--calibrate", action="store_true", help="measure the seconds per step in ROWS")
    p.add_argument(
        "--finetune",
        action="store_true",
        help="then fine-tune each row at 1%% and 10%% of the labels, trained and random init",
    )
    p.add_argument(
        "--plot-only",
        nargs="?",
        const="",
        metavar="RESULTS_JSON",
        help="run nothing, redraw the plot from a results.json (default: the one in --out)",
    )
    p.add_argument("--png", default="", help="the plot's path (default: knn.png beside the JSON)")
    a = p.parse_args()
    a.data_dir = os.path.abspath(a.data_dir)
    a.out = os.path.abspath(a.out or os.path.join(REPO, "runs", f"bench_{a.profile}"))
    if a.plot_only is not None:
        src = a.plot_only or os.path.join(a.out, "results.json")
        if not os.path.isfile(src):
            p.error(f"--plot-only: no {rel(os.path.abspath(src))}")
        with open(src) as f:
            res = json.load(f)
        png = a.png or os.path.join(os.path.dirname(os.path.abspath(src)), "knn.png")
        drew = plot(res["rows"], f"kNN top-1 per epoch, {res['profile']}", png)
        if drew:
            print(f"wrote {rel(os.path.abspath(png))}")
        sys.exit(0 if drew else 1)
    rows = [r.strip() for r in a.methods.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if a.calibrate and a.profile != "cpu-smoke":
        p.error("--calibrate measures the cpu-smoke profile; pass --profile cpu-smoke")
    if a.calibrate:
        return calibrate(rows, a)
    cmdline = shlex.join(["python", "tests/bench_learning.py", *sys.argv[1:]])
    if a.dry_run:
        for row in rows:
            cmds = [*commands(row, a), *(c for *_, c in ft_commands(row, a) if a.finetune)]
            for cmd in cmds:
                print(shlex.join(["python", *cmd]))
        return
    results = []
    for i, row in enumerate(rows):
        cmds = commands(row, a)
        print(f"[{i + 1}/{len(rows)}] {row}: {shlex.join(['python', *cmds[0]])}", flush=True)
        infos = [run(cmds[0], os.path.join(a.out, row), a)]
        if infos[0]["returncode"] == 0:  # then the random-init linear number
            infos.append(run(cmds[1], os.path.join(a.out, row, "init"), a))
        r = summarize(row, cmds, infos, a)
        results.append(r)
        knn, lin = f"{fmt(r['knn_init'])} -> {fmt(r['knn_final'])}", fmt(r["linear_final"])
        lin = f"{fmt(r['linear_init'])} -> {lin}"
        err = f"; FAILED: {r['error']}" if r["error"] else ""
        print(f"  kNN {knn}, linear {lin}, wall {fmt(r['wall_s'], '.0f', ' s')}{err}", flush=True)
        if a.finetune and not r["error"]:
            ft = r["finetune"] = finetune(row, a)
            top1 = [
                f"{round(f * 100)}% {fmt(ft[f'{f} init']['top1'])} -> "
                + fmt(ft[f"{f} trained"]["top1"])
                for f in FRACTIONS
            ]
            print(
                f"  fine-tuned {', '.join(top1)}"
                + (f"; FAILED: {ft['error']}" if ft["error"] else ""),
                flush=True,
            )
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": cmdline, "profile": a.profile, "rows": results}, f, indent=1)
    write_markdown(results, cmdline, os.path.join(a.out, "results.md"))
    png = os.path.abspath(a.png or os.path.join(a.out, "knn.png"))
    drew = plot(results, f"kNN top-1 per epoch, {a.profile}", png)
    print(f"wrote {rel(a.out)}/results.md, results.json" + (f", {rel(png)}" if drew else ""))
    bad = [f"FAILED {r['row']}: {r['error']}" for r in results if r["error"]]
    bad += [
        f"FAILED {r['row']}: {r['finetune']['error']}"
        for r in results
        if r.get("finetune", {}).get("error")
    ]
    bad += [
        f"NOT LEARNING {r['row']}: kNN {fmt(r['knn_init'])} at init -> {fmt(r['knn_final'])}"
        for r in results
        if not r["error"] and not beats_init(r)
    ]
    print("\n".join(bad) or "every row beats its random-init kNN")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
