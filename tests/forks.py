"""`python ARGS` for the tests, as a fork of one interpreter that has already imported torch,
torchvision, common and every method file: a new interpreter spends seconds on those imports
(twice that on older torch), a fork none. The child is a new process in its own session with its
own argv, cwd, environment, stdin (/dev/null), stdout and stderr (files); it runs the script,
`-c` code or `-m` module as `__main__` and exits through the interpreter's normal shutdown
(atexit, threads), as `python ARGS` does. torchrun's launcher runs so; its workers are real
interpreters.

Protocol (the server's stdin / stdout, one JSON line each way): the client sends
{argv, cwd, env, out, err}; the server answers {"pid"} at once and {"rc"} when the child ends."""

import json
import os
import runpy
import sys


def serve():
    import importlib

    import torch  # noqa: F401  (imports only: no op runs here, so no thread pool is forked)
    import torchvision  # noqa: F401
    from test_skeleton import FILES

    for name in ["common", *FILES]:
        importlib.import_module(name)
    requests, replies = sys.stdin, sys.stdout
    for line in requests:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(**job)  # does not return: the interpreter exits
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def child(argv, cwd, env, out, err):
    import torch

    os.setsid()  # its own process group: a timeout kills it with whatever it started
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, out, os.O_WRONLY),
        (2, err, os.O_WRONLY),
    ):
        os.dup2(os.open(path, flags | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644), fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count())))  # read at startup
    if argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        code = compile(argv[1], "<string>", "exec")
        main = {"__name__": "__main__", "__builtins__": __builtins__}
        sys.exit(exec(code, main))
    if argv[0] == "-m":  # torchrun's launcher: `python -m torch.distributed.run ...`
        sys.argv, sys.path[0] = argv[1:], cwd
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        sys.exit(0)
    path = os.path.abspath(argv[0])
    sys.argv, sys.path[0] = [argv[0], *argv[1:]], os.path.dirname(path)
    runpy.run_path(path, run_name="__main__")
    sys.exit(0)


class Client:
    """The server process, started on first use; `run` blocks until the child ends."""

    def __init__(self, env):
        import subprocess

        code = "import forks; forks.serve()"
        here = os.path.dirname(os.path.abspath(__file__))
        env = {**env, "PYTHONPATH": os.pathsep.join([env.get("PYTHONPATH", ""), here])}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )

    def run(self, argv, cwd, env, out, err, timeout):
        import signal
        import subprocess
        import threading

        self.proc.stdin.write(
            json.dumps(dict(argv=argv, cwd=cwd, env=env, out=out, err=err)) + "\n"
        )
        pid = json.loads(self.proc.stdout.readline())["pid"]
        reply = []
        wait = threading.Thread(target=lambda: reply.append(self.proc.stdout.readline()))
        wait.start()
        wait.join(timeout)
        if wait.is_alive():
            os.killpg(pid, signal.SIGKILL)
            wait.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        return json.loads(reply[0])["rc"]
