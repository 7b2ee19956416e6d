"""GPU check: one prepared command that finds what is broken on CUDA and measures what matters.

Phases, each with its own share of --budget seconds; every phase rewrites the report in --out
as soon as it has a new figure, so a run killed at its limit still returns what it measured:
  smoke   every row (SimCLR v1/v2, MoCo v1/v2/v3 and the nine other files) through its own
          command line for --smoke-steps steps: ResNet-18 with the CIFAR stem at 32 px, the
          CIFAR preset's batch, `--pipeline device`, bf16 (channels_last: on by itself on CUDA),
          synthetic images; from the first log step on, every step and what runs between two
          steps raises on a host synchronisation (torch.cuda.set_sync_debug_mode("error"), off
          only for log steps and epoch ends, which read values and save). Extra rows: --compile
          for SimCLR and DINO; --amp fp16 for BYOL (no sync check: torch's GradScaler reads its
          inf flag on the host); a checkpoint, a resume and one more step for MoCo v2 and SwAV
          (its queue is per rank); CPC (no batched twin) on the CPU pipeline with 15 workers.
          Per row: pass/fail with the error line, images/s, peak memory. Rows run --jobs at a
          time, so their images/s are indicative; the speed phase measures alone.
  speed   tests/bench_speed.py's method run and raw bound: profile r18-32 (real CIFAR-10) for
          every row, r50-224 for SimCLR and MoCo v2, vit-224 for DINO.
  folder  --folder-images JPEGs of ImageNet-like sizes and aspect ratios written on the spot,
          plus a grayscale JPEG, a CMYK JPEG, an RGBA PNG, a 16-bit PNG, a BMP, a truncated
          JPEG and an empty file: each odd file decoded on the device vs PIL (mean abs diff),
          then SimCLR ResNet-50 at 224 px with `--dataset folder`: device pipeline (nvJPEG +
          batched augmentation) vs the CPU pipeline with 15 workers, images/s, skipped files.
  learn   the rest of the budget: bench_learning.py's cifar10-200 protocol for the next row
          without a GPU result in --results (SimCLR v1 first, then MoCo v2, BYOL, SwAV, DINO,
          ...) for as many epochs as fit (the schedule spans them); kNN curve, final kNN and
          linear top-1, wall time.
The report: <out>/<date>-<gpu>.md and .json (and .log: the error output of failed runs).
Runs from a fresh checkout on any torch >= 2.4 with torchvision, einops, tqdm (matplotlib not
needed); the CIFAR-10 npz comes from --data-dir. Run from the repo root:
  python tests/gpu_check.py --data-dir gpu_data --out /tmp/out      # about --budget seconds
  python tests/gpu_check.py --dry-run --out /tmp/out                 # every phase, tiny, CPU
"""

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# row -> (method file and flags, speed row in bench_speed.py)
ROWS = {
    "simclr_v1": ("simclr.py --version v1", "simclr"),
    "simclr_v2": ("simclr.py --version v2", "simclr"),
    "moco_v1": ("moco.py --version v1", "moco_v2"),
    "moco_v2": ("moco.py --version v2", "moco_v2"),
    "moco_v3": ("moco.py --version v3", "moco_v3"),
    "instdisc": ("instdisc.py", "instdisc"),
    "invaspread": ("invaspread.py", "invaspread"),
    "cmc": ("cmc.py", "cmc"),
    "cpc": ("cpc.py --pipeline cpu --workers 15", "cpc"),  # the CPU-pipeline row
    "swav": ("swav.py", "swav"),
    "byol": ("byol.py", "byol"),
    "simsiam": ("simsiam.py", "simsiam"),
    "barlow_twins": ("barlow_twins.py", "barlow_twins"),
    "dino": ("dino.py", "dino"),
}
# extra smoke rows: name -> (row, flags, what it proves); cuda: needs a GPU (skipped on the CPU)
EXTRA = {
    "simclr_v1 compile": ("simclr_v1", "--compile", "torch.compile of the backbone"),
    "dino compile": ("dino", "--compile", "torch.compile of the backbone"),
    "byol fp16": ("byol", "--amp fp16", "fp16 autocast + GradScaler"),
    "moco_v2 resume": ("moco_v2", "", "checkpoint mid-epoch, resume, one more step"),
    "swav resume": ("swav", "", "checkpoint mid-epoch, resume, one more step"),
}
CUDA_ONLY = ("simclr_v1 compile", "dino compile", "byol fp16")
LEARN_ORDER = ["simclr_v1", "moco_v2", "byol", "swav", "dino", "simclr_v2", "moco_v3"]
LEARN_ORDER += [r for r in ROWS if r not in LEARN_ORDER]
SHARES = {"smoke": 0.3, "speed": 0.3, "folder": 0.12}  # of --budget; learn: what is left
ODD_FILES = ("gray.jpg", "cmyk.jpg", "rgba.png", "deep.png", "plain.bmp", "cut.jpg", "empty.jpg")


# ==== settings: the real check and its tiny CPU twin ========================================
def settings(a) -> SimpleNamespace:
    if not a.dry_run:
        return SimpleNamespace(
            smoke="--preset cifar --arch resnet18 --img-size 32 --dataset synthetic "
            "--subset 25600 --pipeline device --amp bf16 --knn-every 0 --linear-epochs 0",
            steps=a.smoke_steps,
            log_every=10,
            speed=[("r18-32", list(dict.fromkeys(s for _, s in ROWS.values())))]
            + [("r50-224", ["simclr", "moco_v2"]), ("vit-224", ["dino"])],
            speed_steps=40,
            speed_log=10,
            folder_n=a.folder_images,
            folder="--preset imagenet --arch resnet50 --img-size 224 --batch-size 256 "
            "--epochs 3 --max-steps 30 --log-every 10",
            folder_workers=15,
            learn_profile="cifar10-200",
            learn_extra="",
            epoch_images=50_000,
        )
    tiny = "--arch smallcnn --img-size 16 --dataset synthetic --device cpu --amp off"
    return SimpleNamespace(
        smoke=f"--preset cifar {tiny} --subset 256 --batch-size 32 --workers 0 "
        "--pipeline device --knn-every 0 --linear-epochs 0 --epochs 1",
        steps=4,
        log_every=2,
        speed=[("cpu", ["simclr"])],
        speed_steps=6,
        speed_log=2,
        folder_n=40,
        folder=f"{tiny.replace('--dataset synthetic ', '')} --batch-size 8 --epochs 1 "
        "--max-steps 4 --log-every 2",
        folder_workers=2,
        learn_profile="cifar10-200",
        learn_extra=f"{tiny} --subset 512 --batch-size 64 --linear-epochs 2 --workers 0",
        epoch_images=512,
    )


# ==== one method run, optionally watched for host synchronisations ==========================
def watch_syncs(module):
    """torch.cuda.set_sync_debug_mode("error") from the first log step on, "default" for the
    log steps and epoch ends (they read values, checkpoint and evaluate)."""
    import torch

    train_step = module.train_step

    def watched(model, batch, optimizer, scaler, step, args):
        end = min(args.max_steps or args.total_steps, args.total_steps)
        if step >= args.log_every:
            torch.cuda.set_sync_debug_mode("error")
        out = train_step(model, batch, optimizer, scaler, step, args)
        s = step + 1
        if s % args.log_every == 0 or s == end or s % args.steps_per_epoch == 0:
            torch.cuda.set_sync_debug_mode("default")
        return out

    module.train_step = watched


def run_method(argv: list[str]):
    """`gpu_check.py --run <method.py> <flags>`: the method's main() on these flags; with
    GPU_CHECK_SYNC=1 on CUDA, its hot loop watched by watch_syncs."""
    import torch

    import common as C

    module = importlib.import_module(argv[0].removesuffix(".py"))
    args = C.parse_args(module.Args, argv[1:])
    if os.environ.get("GPU_CHECK_SYNC") == "1" and torch.cuda.is_available():
        watch_syncs(module)
    module.main(args)


def error_line(text: str) -> str:
    """The line that says what failed: `error: ...` or an exception's last line."""
    lines = [s.strip() for s in text.replace("\r", "\n").split("\n") if s.strip()]
    hits = [
        s
        for s in lines
        if s.startswith("error: ") or re.match(r"^\w+(\.\w+)*(Error|Exception)\b", s)
    ]
    return (hits or lines or ["no output"])[-1][:300]


def launch(cmd: list[str], out_dir: str, timeout: float, sync: bool) -> dict:
    """One `python tests/gpu_check.py --run ...` in its own process group, killed at timeout."""
    env = {**os.environ, "GPU_CHECK_SYNC": "1" if sync else "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    argv = [sys.executable, os.path.abspath(__file__), "--run", *cmd, "--out-dir", out_dir]
    with tempfile.TemporaryFile("w+") as log:  # a file: no pipe to fill up
        p = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            code = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:  # the run and its loader workers
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            code = "timeout"
        log.seek(0)
        err = log.read()
    recs = read_metrics(out_dir)
    logs = [r for r in recs if "img_s" in r]
    res = {"cmd": shlex.join(["python", *cmd]), "wall_s": round(time.time() - t0, 1)}
    res.update(
        ok=code == 0 and bool(logs), code=code, steps=max((r["step"] for r in logs), default=0)
    )
    res["img_s"] = statistics.median(r["img_s"] for r in logs[1:]) if len(logs) > 1 else None
    res["mem_gb"] = max((r.get("mem_gb", 0.0) for r in logs), default=None)
    if not res["ok"]:
        res["error"] = "killed at the phase's time limit" if code == "timeout" else error_line(err)
        res["stderr_tail"] = err[-3000:]
    return res


def read_metrics(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip().startswith("{") and s.strip().endswith("}")]


# ==== phases =================================================================================
class Check:
    def __init__(self, a):
        self.a, self.s, self.t0 = a, settings(a), time.time()
        self.work = tempfile.mkdtemp(prefix="gpu_check_")
        self.report = {
            "machine": machine(),
            "command": shlex.join(["python", "tests/gpu_check.py", *sys.argv[1:]]),
        }
        self.report.update(
            dry_run=a.dry_run, budget_s=a.budget, smoke=[], speed=[], folder={}, learn={}
        )
        os.makedirs(a.out, exist_ok=True)
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.report["machine"]["gpu"]).strip("-").lower()
        self.stem = os.path.join(a.out, f"{datetime.date.today()}-{gpu}")

    def left(self, until: float) -> float:
        return until - time.time()

    def deadline(self, phase: str) -> float:
        spent = time.time() - self.t0
        if phase == "learn":
            return self.t0 + self.a.budget - 10
        return time.time() + min(SHARES[phase] * self.a.budget, self.a.budget - 10 - spent)

    # ---- smoke ----
    def smoke(self):
        until, s = self.deadline("smoke"), self.s
        jobs = []
        names = [*EXTRA, *ROWS]  # the slow compile rows first, while the others run
        for name in [n for n in names if not self.a.rows or n in self.a.rows.split(",")]:
            row, flags, why = EXTRA.get(name, (name, "", "the row"))
            if name in CUDA_ONLY and self.a.dry_run:
                self.add_smoke({"row": name, "ok": None, "error": "skipped: CUDA only", "why": why})
                continue
            jobs.append((name, row, flags, why))

        def one(job):
            name, row, flags, why = job
            out = os.path.join(self.work, "smoke", name.replace(" ", "_"))
            file, *own = ROWS[row][0].split()  # the row's own flags after the shared ones
            cmd = [file, *s.smoke.split(), *own, *flags.split()]
            cmd += ["--log-every", str(s.log_every), "--max-steps", str(s.steps)]
            if self.left(until) < 5:
                return {"row": name, "ok": None, "error": "skipped: smoke time used up", "why": why}
            sync = "fp16" not in name
            if "resume" in name:  # stop mid-epoch at a checkpoint, resume, one more step
                first = launch([*cmd[:-1], str(s.steps // 2 + 1)], out, self.left(until), sync)
                if not first["ok"]:
                    return {"row": name, "why": why, **first}
                cmd[-1] = str(s.steps // 2 + 2)
                res = launch(cmd, out, self.left(until), sync)
                res["ok"] = res["ok"] and res["steps"] == s.steps // 2 + 2
                res.setdefault("error", None if res["ok"] else "the resumed run did not go on")
                return {
                    "row": name,
                    "why": why,
                    **res,
                    "cmd": first["cmd"] + " ; then --max-steps " + cmd[-1],
                }
            return {
                "row": name,
                "why": why,
                "sync_check": sync,
                **launch(cmd, out, self.left(until), sync),
            }

        with ThreadPoolExecutor(self.a.jobs) as pool:
            for res in pool.map(one, jobs):
                self.add_smoke(res)

    def add_smoke(self, res: dict):
        self.report["smoke"].append(res)
        status = {True: "pass", False: "FAIL", None: "skipped"}[res["ok"]]
        print(f"smoke {res['row']}: {status} {res.get('error') or ''}".rstrip(), flush=True)
        self.write()

    # ---- speed ----
    def speed(self):
        import bench_speed

        until = self.deadline("speed")
        for profile, rows in self.s.speed:
            for row in rows:
                if self.left(until) < 10:
                    self.report["speed"].append(
                        {"profile": profile, "row": row, "error": "skipped: speed time used up"}
                    )
                    continue
                a = SimpleNamespace(
                    profile=profile, steps=self.s.speed_steps, log_every=self.s.speed_log
                )
                a.data_dir, a.extra, a.raw_steps = (
                    self.a.data_dir,
                    "",
                    10 if not self.a.dry_run else 2,
                )
                a.timeout = self.left(until)
                dev = bench_speed.method_run(row, "device", a)
                r = {
                    "profile": profile,
                    "row": row,
                    "cmd": shlex.join(["python", *dev.get("cmd", [])]),
                }
                r.update(img_s=dev.get("img_s"), mem_gb=dev.get("mem_gb"), error=dev.get("error"))
                if cfg := dev.get("config"):
                    r["raw_img_s"] = bench_speed.raw_bound(cfg, bench_speed.ROWS[row][1], a)
                    r["ratio"] = r["img_s"] / r["raw_img_s"] if r["img_s"] else None
                self.report["speed"].append(r)
                print(
                    f"speed {profile} {row}: {fmt(r.get('img_s'))} img/s, "
                    f"raw {fmt(r.get('raw_img_s'))} {r['error'] or ''}",
                    flush=True,
                )
                self.write()

    # ---- folder ----
    def folder(self):
        import numpy as np
        import torch
        from PIL import Image

        import common as C

        until, root = self.deadline("folder"), os.path.join(self.work, "folder")
        rng = np.random.default_rng(0)
        for k in range(self.s.folder_n):  # smooth random content, ImageNet-like sizes
            h = int(rng.integers(160, 500)) if not self.a.dry_run else int(rng.integers(24, 64))
            w = int(h * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))))
            img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize(
                (w, h), Image.BILINEAR
            )
            os.makedirs(d := os.path.join(root, f"c{k % 10}"), exist_ok=True)
            img.save(os.path.join(d, f"{k:05d}.jpg"), quality=90)
        odd = self.odd_files(os.path.join(root, "c0"), rng)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        diffs = {}
        for name, path in odd.items():  # the device path's decode vs PIL's
            got = C.decode([C.read_bytes(path)], device)[0]
            try:
                want = torch.from_numpy(np.array(C.open_rgb(path))).permute(2, 0, 1) / 255
            except Exception:
                want = None
            if got is None or want is None:
                diffs[name] = (
                    "undecodable (skipped)"
                    if got is None and want is None
                    else f"one path only: device {got is not None}, PIL {want is not None}"
                )
            else:
                diffs[name] = round(float((got.cpu() - want).abs().mean() * 255), 2)
        self.report["folder"] = {
            "images": self.s.folder_n + len(odd),
            "decode_vs_pil_mean_abs_u8": diffs,
            "runs": [],
        }
        self.write()
        for pipeline in ("device", "cpu"):
            if self.left(until) < 10:
                self.report["folder"]["runs"].append(
                    {"pipeline": pipeline, "error": "skipped: folder time used up"}
                )
                continue
            out = os.path.join(self.work, f"folder_{pipeline}")
            cmd = ["simclr.py", "--dataset", "folder", "--data-dir", root, *self.s.folder.split()]
            cmd += [
                "--pipeline",
                pipeline,
                "--workers",
                str(self.s.folder_workers),
                "--knn-every",
                "0",
                "--linear-epochs",
                "0",
            ]
            res = launch(cmd, out, self.left(until), sync=False)
            skipped = [r for r in read_metrics(out) if "skipped_files" in r]
            res["skipped_files"] = skipped[-1]["skipped_files"] if skipped else 0
            self.report["folder"]["runs"].append({"pipeline": pipeline, **res})
            print(
                f"folder {pipeline}: {fmt(res.get('img_s'))} img/s, "
                f"skipped {res['skipped_files']} {res.get('error') or ''}",
                flush=True,
            )
            self.write()

    @staticmethod
    def odd_files(d: str, rng) -> dict:
        import numpy as np
        from PIL import Image

        rgb = lambda h, w: Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize(
            (w, h), Image.BILINEAR
        )
        paths = {n: os.path.join(d, f"odd_{n}") for n in ODD_FILES}
        rgb(300, 200).convert("L").save(paths["gray.jpg"])
        rgb(240, 320).convert("CMYK").save(paths["cmyk.jpg"])
        rgb(200, 200).convert("RGBA").save(paths["rgba.png"])
        deep = np.asarray(rgb(180, 260).convert("L"), np.uint16) * 257
        Image.fromarray(deep).save(paths["deep.png"])
        rgb(160, 240).save(paths["plain.bmp"])
        rgb(300, 300).save(buf := os.path.join(d, "whole.tmp.jpg"))
        with open(buf, "rb") as f:
            data = f.read()
        os.remove(buf)
        with open(paths["cut.jpg"], "wb") as f:
            f.write(data[: len(data) // 2])
        open(paths["empty.jpg"], "wb").close()
        return paths

    # ---- learn ----
    def learn(self):
        import bench_learning

        until = self.deadline("learn")
        done = set()
        for path in self.previous_reports():
            with open(path) as f:
                rep = json.load(f)
            if rep.get("learn", {}).get("row") and not rep.get("dry_run"):
                done.add(rep["learn"]["row"])
        row = self.a.learn_row or next((r for r in LEARN_ORDER if r not in done), LEARN_ORDER[0])
        speed = [
            r["img_s"] for r in self.report["speed"] if r["row"] == ROWS[row][1] and r.get("img_s")
        ]
        img_s = speed[0] if speed else 5000.0
        epoch_s = self.s.epoch_images / img_s * 1.15  # + the epoch-end checkpoint
        evals = 60 if not self.a.dry_run else 5  # init kNN, final kNN + linear probe, startup
        epochs = max(1, int((self.left(until) - evals) / epoch_s)) if not self.a.dry_run else 2
        extra = f"{self.s.learn_extra} --epochs {epochs} --knn-every {max(1, epochs // 5)}"
        a = SimpleNamespace(
            profile=self.s.learn_profile, data_dir=self.a.data_dir, extra=extra.strip()
        )
        a.out = os.path.join(self.work, "learn")
        train, init = bench_learning.commands(row, a)
        full = self.resolved(
            bench_learning.commands(row, SimpleNamespace(**{**vars(a), "extra": ""}))[0]
        )
        if getattr(full, "warmup_epochs", 0):  # the warm-up keeps its share of the schedule
            w = round(full.warmup_epochs * epochs / full.epochs)
            a.extra += f" --warmup-epochs {w}"
            train, init = bench_learning.commands(row, a)
        out = os.path.join(a.out, row)
        res = self.launch_plain(train, out, until)
        recs = read_metrics(out)
        knn = [(round(r["epoch"], 2), r["knn_top1"]) for r in recs if "knn_top1" in r]
        final = next((r for r in reversed(recs) if "linear_top1" in r), {})
        lr = {
            "row": row,
            "epochs": epochs,
            "img_s_assumed": round(img_s),
            "cmd": shlex.join(["python", *train]),
        }
        lr.update(
            ok=res["ok"], wall_s=res["wall_s"], knn_curve=knn, knn_final=final.get("knn_top1")
        )
        lr.update(
            linear_top1=final.get("linear_top1"),
            linear_top5=final.get("linear_top5"),
            error=res.get("error"),
        )
        self.report["learn"] = lr
        self.write()
        if res["ok"] and self.left(until) > 10:  # the random-init linear number
            out0 = os.path.join(a.out, row, "init")
            res0 = self.launch_plain(init, out0, until)
            init_final = next((r for r in reversed(read_metrics(out0)) if "linear_top1" in r), {})
            lr.update(linear_init=init_final.get("linear_top1"), init_error=res0.get("error"))
            lr["init_cmd"] = shlex.join(["python", *init])
        print(
            f"learn {row}: {epochs} epochs, kNN {lr['knn_curve']}, "
            f"linear {lr.get('linear_top1')} {lr['error'] or ''}",
            flush=True,
        )
        self.write()

    @staticmethod
    def resolved(cmd: list[str]):
        """The Args a method command line resolves to (its --out-dir left out)."""
        import common as C

        i = cmd.index("--out-dir")
        module = importlib.import_module(cmd[0].removesuffix(".py"))
        return C.parse_args(module.Args, [*cmd[1:i], *cmd[i + 2 :]])

    def launch_plain(self, cmd: list[str], out: str, until: float) -> dict:
        """A bench_learning command (it names its own --out-dir) through --run, with a timeout."""
        i = cmd.index("--out-dir")
        return launch([*cmd[:i], *cmd[i + 2 :]], out, self.left(until), sync=False)

    def previous_reports(self) -> list[str]:
        folder = self.a.results
        return (
            [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]
            if os.path.isdir(folder)
            else []
        )

    # ---- report ----
    def write(self):
        self.report["wall_s"] = round(time.time() - self.t0, 1)
        with open(self.stem + ".json", "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        with open(self.stem + ".md", "w") as f:
            f.write(markdown(self.report))
        with open(self.stem + ".log", "w") as f:
            for r in [*self.report["smoke"], *self.report["folder"].get("runs", [])]:
                if r.get("stderr_tail"):
                    f.write(
                        f"==== {r.get('row', r.get('pipeline'))}: {r['cmd']}\n{r['stderr_tail']}\n"
                    )


def machine() -> dict:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else f"{v:{spec}}" if isinstance(v, (int, float)) else str(v)


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = [f"# GPU check: {m['gpu']}", "", "```bash", rep["command"], "```", ""]
    lines += [
        f"torch {m['torch']}, torchvision {m['torchvision']}, CUDA {m['cuda']}, cuDNN "
        f"{m['cudnn']}, Python {m['python']}, {m['cpus']} CPU cores; wall {rep['wall_s']} s of "
        f"a {rep['budget_s']} s budget"
        + (" (dry run: tiny settings on the CPU)" if rep["dry_run"] else "")
        + ".",
        "",
    ]
    lines += ["## Smoke (every row on CUDA; host-sync check from the first log step)", ""]
    lines += [
        "| row | what | result | steps | img/s | peak mem | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["smoke"]:
        status = {True: "pass", False: "FAIL", None: "skipped"}[r["ok"]]
        lines.append(
            f"| {r['row']} | {r.get('why', '')} | {status} | {fmt(r.get('steps'))} | "
            f"{fmt(r.get('img_s'))} | "
            f"{fmt(r.get('mem_gb'), '.2f')} GB | {(r.get('error') or '').replace('|', '/')} |"
        )
    cmds = [r["cmd"] for r in rep["smoke"] if r.get("cmd")]
    lines += [
        "",
        "Commands (through `python tests/gpu_check.py --run`, which adds the sync check):",
        "",
    ]
    lines += [f"    {c}" for c in cmds[:3]] + (["    ..."] if len(cmds) > 3 else [])
    lines += ["", "## Speed (tests/bench_speed.py, one run at a time)", ""]
    lines += [
        "| profile | row | img/s | raw bound img/s | ratio | peak mem | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["speed"]:
        lines.append(
            f"| {r['profile']} | {r['row']} | {fmt(r.get('img_s'))} | {fmt(r.get('raw_img_s'))} | "
            f"{fmt(r.get('ratio'), '.2f')} | {fmt(r.get('mem_gb'), '.2f')} GB | "
            f"{(r.get('error') or '').replace('|', '/')} |"
        )
    f = rep["folder"]
    if f:
        lines += ["", f"## Image folder ({f['images']} files written on the spot, SimCLR)", ""]
        lines += [
            "Device decode vs PIL, mean abs difference in uint8 steps: "
            + ", ".join(f"{k} {v}" for k, v in f["decode_vs_pil_mean_abs_u8"].items()),
            "",
        ]
        lines += [
            "| pipeline | img/s | peak mem | skipped files | error |",
            "|---|---|---|---|---|",
        ]
        for r in f["runs"]:
            lines.append(
                f"| {r['pipeline']} | {fmt(r.get('img_s'))} | {fmt(r.get('mem_gb'), '.2f')} GB | "
                f"{fmt(r.get('skipped_files'))} | {(r.get('error') or '').replace('|', '/')} |"
            )
    if f and f["runs"] and f["runs"][0].get("cmd"):
        lines += ["", "    " + f["runs"][0]["cmd"]]
    r = rep["learn"]
    if r:
        lines += [
            "",
            f"## Learning ({r['row']}, cifar10-200 protocol for {r['epochs']} epochs; "
            "the schedule spans them)",
            "",
        ]
        lines += ["```bash", r["cmd"], "```", ""]
        lines += [
            f"kNN top-1 by epoch: {', '.join(f'{e}: {v:.1f}' for e, v in r['knn_curve'])}",
            "",
        ]
        lines += [
            f"final kNN {fmt(r['knn_final'], '.1f')}, "
            f"linear top-1 {fmt(r.get('linear_top1'), '.1f')} "
            f"(random init {fmt(r.get('linear_init'), '.1f')}), wall {fmt(r['wall_s'])} s"
            + (f"; error: {r['error']}" if r.get("error") else "")
        ]
    return "\n".join(lines) + "\n"


def main():
    if sys.argv[1:2] == ["--run"]:
        return run_method(sys.argv[2:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-dir",
        default=os.path.join(REPO, "..", "shared", "data"),
        help="cifar10_jpeg.npz folder",
    )
    p.add_argument(
        "--out", default=os.path.join(REPO, "tests", "results", "gpu"), help="report folder"
    )
    p.add_argument(
        "--results",
        default=os.path.join(REPO, "tests", "results", "gpu"),
        help="earlier reports (which rows have learned)",
    )
    p.add_argument("--budget", type=float, default=450, help="seconds for all phases")
    p.add_argument("--phases", default="smoke,speed,folder,learn", help="comma list")
    p.add_argument("--jobs", type=int, default=3, help="smoke runs at a time")
    p.add_argument("--rows", default="", help="smoke rows, comma list (default: all)")
    p.add_argument("--smoke-steps", type=int, default=40)
    p.add_argument("--folder-images", type=int, default=3000)
    p.add_argument(
        "--learn-row", default="", choices=["", *ROWS], help="default: the next without a result"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="every phase with tiny settings on the CPU"
    )
    a = p.parse_args()
    a.data_dir, a.out = os.path.abspath(a.data_dir), os.path.abspath(a.out)
    check = Check(a)
    for phase in a.phases.split(","):
        try:
            getattr(check, phase)()
        except Exception as e:  # a broken phase must not cost the others
            check.report.setdefault("phase_errors", {})[phase] = f"{type(e).__name__}: {e}"
            print(f"phase {phase} failed: {type(e).__name__}: {e}", flush=True)
        check.write()
    print(f"wrote {check.stem}.md, .json, .log")
    failed = [r["row"] for r in check.report["smoke"] if r["ok"] is False]
    return 1 if failed or check.report.get("phase_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
