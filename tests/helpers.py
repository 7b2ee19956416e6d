"""Small shared helpers for the tests (not collected: no test_ prefix)."""

import os
import signal
import subprocess
import sys

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--arch", "smallcnn", "--img-size", "16", "--workers", "0"]
TINY += ["--knn-every", "0", "--linear-epochs", "0", "--log-every", "1", "--device", "cpu"]


def tiny_args(module, out_dir, *extra):
    """Args for a seconds-long CPU run: synthetic 16px images, the small CNN, no evaluation."""
    return C.parse_args(module.Args, [*TINY, "--out-dir", str(out_dir), *map(str, extra)])


def run(cmd, timeout=240, cwd=ROOT):
    """Run a command (own process group: a hung torchrun is killed with all its workers)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def python(*args, **kw):
    return run([sys.executable, *map(str, args)], **kw)


def torchrun(nproc, *args, **kw):
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            *map(str, args),
        ],
        **kw,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]
