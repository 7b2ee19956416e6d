"""Speed benchmark: training images/s and peak memory of every method, beside the raw bound.

Per row, three figures measured in one invocation on one device:
  device  `python <method>.py --pipeline device`: uint8 data on the device, batched augmentation
          (the default on CUDA); images/s = the median of the run's logged img_s (every
          --log-every steps, after the first log), peak memory = its logged mem_gb (CUDA) or
          the process's peak RSS (CPU);
  cpu     the same run with `--pipeline cpu`: DataLoader workers + torchvision augmentation;
  raw     a plain supervised step of the same backbone over the same views (random tensors
          already on the device, cross-entropy on a linear head, SGD): the bound no
          self-supervised method can beat, timed in this process; ratio = device / raw.
The views per image come from the run's config.json: 2 global views at --img-size (1 for
InstDisc, CMC and CPC), plus n_local views at local_size for SwAV and DINO. CMC's raw bound is
one full-width encoder (it trains two half-width ones), CPC's one image (it encodes a grid of
overlapping patches), so their ratios understate.

Profiles (--extra adds flags to every method run, last):
  cpu        smallcnn at 16 px, batch 128, synthetic data, 2 workers (this is what a laptop sees)
  r18-32     ResNet-18, CIFAR stem, 32 px, batch 512, CIFAR-10 (cifar10-npz), the CIFAR presets
  r50-224    ResNet-50 at 224 px, batch 128, synthetic data, the ImageNet presets
  vit-224    ViT-S/16 at 224 px, batch 128, synthetic data, the ImageNet presets
Run from the repo root:
  python tests/bench_speed.py --profile cpu
  python tests/bench_speed.py --profile r18-32 --extra="--workers 14"
Writes runs/speed_<profile>/results.md and results.json.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common as C  # noqa: E402

ROWS = {  # row -> (method file and version flags, global views per image)
    "simclr": ("simclr.py --version v2", 2),
    "moco_v2": ("moco.py --version v2", 2),
    "moco_v3": ("moco.py --version v3", 2),
    "instdisc": ("instdisc.py", 1),
    "invaspread": ("invaspread.py", 2),
    "cmc": ("cmc.py", 1),
    "cpc": ("cpc.py", 1),
    "swav": ("swav.py", 2),
    "byol": ("byol.py", 2),
    "simsiam": ("simsiam.py", 2),
    "barlow_twins": ("barlow_twins.py", 2),
    "dino": ("dino.py", 2),
}
PROFILES = {
    "cpu": "--preset cifar --arch smallcnn --img-size 16 --batch-size 128 --dataset synthetic "
    "--subset 2048 --device cpu --workers 2",
    "r18-32": "--preset cifar --arch resnet18 --batch-size 512 --dataset cifar10-npz",
    "r50-224": "--preset imagenet --arch resnet50 --img-size 224 --batch-size 128 "
    "--dataset synthetic --subset 5120",
    "vit-224": "--preset imagenet --arch vit_small --img-size 224 --batch-size 128 "
    "--dataset synthetic --subset 5120",
}
RUN = "--epochs 1 --warmup-epochs 0 --knn-every 0 --linear-epochs 0 --resume none"


def method_run(row: str, pipeline: str, a) -> dict:
    """One short training run; -> images/s, peak memory, config (or the error)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [*ROWS[row][0].split(), *PROFILES[a.profile].split(), *RUN.split()]
        cmd += ["--max-steps", str(a.steps), "--log-every", str(a.log_every)]
        cmd += ["--data-dir", a.data_dir, "--pipeline", pipeline, "--out-dir", out]
        cmd += shlex.split(a.extra)
        with open(f"{out}/stderr.log", "w") as e:
            p = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stderr=e, stdout=e)
            timer = threading.Timer(getattr(a, "timeout", None) or 1e9, p.kill)  # a time limit
            timer.start()
            status, usage = os.wait4(p.pid, 0)[1:]  # rusage: this run's peak RSS
            timer.cancel()
        recs, cfg = [], {}
        if os.path.isfile(f"{out}/metrics.jsonl"):
            with open(f"{out}/metrics.jsonl") as f:
                recs = [json.loads(s) for s in f if '"img_s"' in s]
        if os.path.isfile(f"{out}/config.json"):
            with open(f"{out}/config.json") as f:
                cfg = json.load(f)
        if os.waitstatus_to_exitcode(status) or len(recs) < 2:
            with open(f"{out}/stderr.log", errors="replace") as f:
                lines = [s.strip() for s in f.read().replace("\r", "\n").split("\n") if s.strip()]
            return {"error": lines[-1] if lines else "no output", "cmd": cmd}
        return {
            "img_s": statistics.median(r["img_s"] for r in recs[1:]),
            "mem_gb": max(r.get("mem_gb", 0.0) for r in recs) or None,
            "rss_gb": usage.ru_maxrss / 2**20,
            "config": cfg,
            "cmd": cmd,
        }


def raw_bound(cfg: dict, global_views: int, a) -> float:
    """Images/s of a supervised step of the same backbone over the same views."""
    device = torch.device(cfg["device"])
    net, dim = C.build_backbone(cfg["arch"], cfg["img_size"])
    head = torch.nn.Linear(dim, 10)
    model = torch.nn.Sequential(net, head).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile"):
        net.compile()
    opt = torch.optim.SGD(
        model.parameters(), 0.01, momentum=0.9, **({"fused": True} if cuda else {})
    )
    B = cfg["batch_size"] // cfg.get("world_size", 1)
    sizes = [cfg["img_size"]] * global_views + [cfg.get("local_size", 0)] * cfg.get("n_local", 0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    views = [torch.randn(B, 3, s, s, device=device).to(memory_format=fmt) for s in sizes]
    y = torch.randint(0, 10, (B,), device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=cuda and cfg["amp"] != "off")

    def step():
        with amp:
            loss = sum(torch.nn.functional.cross_entropy(model(v), y) for v in views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.raw_steps):
        step()
    sync()
    return B * a.raw_steps / (time.perf_counter() - t0)


def fmt(v, spec=".0f") -> str:
    return "-" if v is None else f"{v:{spec}}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="cpu", choices=PROFILES)
    p.add_argument("--methods", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    p.add_argument("--steps", type=int, default=60, help="training steps per method run")
    p.add_argument("--log-every", type=int, default=10, help="steps per img/s measurement")
    p.add_argument("--raw-steps", type=int, default=20, help="timed steps of the raw bound")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data"))
    p.add_argument("--out", default="", help="output folder (default: runs/speed_<profile>)")
    p.add_argument("--extra", default="", help='flags for every run, e.g. --extra="--compile"')
    p.add_argument("--no-cpu-pipeline", action="store_true", help="skip the --pipeline cpu runs")
    a = p.parse_args()
    a.data_dir = os.path.abspath(a.data_dir)
    a.out = os.path.abspath(a.out or os.path.join(REPO, "runs", f"speed_{a.profile}"))
    rows = [r.strip() for r in a.methods.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    os.makedirs(a.out, exist_ok=True)
    results = []
    for row in rows:
        dev = method_run(row, "device", a)
        cpu = {} if a.no_cpu_pipeline else method_run(row, "cpu", a)
        r = {"row": row, "device": dev, "cpu": cpu, "raw_img_s": None, "ratio": None}
        if cfg := dev.get("config") or cpu.get("config"):  # CPC has no device pipeline
            r["raw_img_s"] = raw_bound(cfg, ROWS[row][1], a)
            r["ratio"] = dev["img_s"] / r["raw_img_s"] if "img_s" in dev else None
        results.append(r)
        print(
            f"{row}: device {fmt(dev.get('img_s'))} img/s, cpu {fmt(cpu.get('img_s'))}, "
            f"raw {fmt(r['raw_img_s'])}, ratio {fmt(r['ratio'], '.2f')}"
            + "".join(
                f"; {k} FAILED: {v['error']}"
                for k, v in (("device", dev), ("cpu", cpu))
                if "error" in v
            ),
            flush=True,
        )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    cmdline = shlex.join(["python", "tests/bench_speed.py", *sys.argv[1:]])
    lines = [
        "```bash",
        cmdline,
        "```",
        "",
        f"Machine: torch {torch.__version__}, {os.cpu_count()} CPU cores, {gpu}.",
        "",
    ]
    lines += [
        "| method | batch | views | device pipeline img/s | raw bound img/s | ratio | peak mem "
        "| CPU pipeline img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, c = r["device"], r["cpu"]
        cfg = d.get("config") or c.get("config") or {}
        views = f"{ROWS[r['row']][1]}x{cfg.get('img_size', '-')}" + (
            f" + {cfg['n_local']}x{cfg['local_size']}" if cfg.get("n_local") else ""
        )
        m = d if "img_s" in d else c  # peak memory of the device run (CPC: of the CPU run)
        mem = f"{m['mem_gb']:.2f} GB" if m.get("mem_gb") else f"{m.get('rss_gb', 0):.2f} GB RSS"
        lines.append(
            f"| {r['row']} | {cfg.get('batch_size', '-')} | {views} | {fmt(d.get('img_s'))} | "
            f"{fmt(r['raw_img_s'])} | "
            f"{fmt(r['ratio'], '.2f')} | {mem} | {fmt(c.get('img_s'))} |"
        )
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(
            {"command": cmdline, "profile": a.profile, "rows": results}, f, indent=1, default=str
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
