"""`python -m MODULE ARGS` without a fresh interpreter's ~7 s import of the training stack: each command runs in a
child forked from one process (the launcher) that imported it once, with the test's environment, folder and
arguments, and its stdout and stderr in files. The child runs the module as `python -m` does (runpy, `__main__`),
then the exit handlers, and exits with the command's code; a signal kills it as it would kill `python -m`.

    child = launcher().start("finetune", ["training.max_steps=30"], cwd=ROOT)
    child.poll()            # None while it runs, else its exit code (-9: killed by SIGKILL)
    os.kill(child.pid, signal.SIGKILL); child.wait()
    out = launcher().run("finetune", ["dry_run=true"], cwd=ROOT)   # a subprocess.CompletedProcess

One command at a time (the suite runs one test at a time): starting one finishes the one before, killing it if it
still runs. Tests that need a fresh interpreter (torchrun, `unshare -n`, an installed wheel, a server) start one.
"""
import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCHER = r"""
import atexit, json, os, runpy, sys, traceback
said = os.fdopen(os.dup(1), "w", buffering=1)  # to the tests: pids and exit codes; what libraries print, to stderr
os.dup2(2, 1)
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTConfig, SFTTrainer  # noqa: F401  the imports it saves
import datasets, peft, transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import finetune.runner, finetune.train.model, finetune.train.recipe  # noqa: F401

def kib(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

def peak(path, before):
    with open(path, "w") as f:
        f.write(str((before + kib("VmHWM")) / 1024))

def load_model(*args, **kwargs):
    raise RuntimeError("a model loaded")

for line in sys.stdin:
    job = json.loads(line)
    resident = kib("VmRSS")
    pid = os.fork()
    if pid == 0:  # the child: the command, then exit as `python -m` does
        said.close()
        # peak memory: the launcher's resident set at the fork plus the child's own growth
        atexit.register(peak, job["peak"], resident - kib("VmRSS"))
        if job["no_model"]:
            finetune.train.model.load_model = load_model
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        err = out if job["err"] == job["out"] else os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.argv = [job["module"], *job["args"]]
        sys.path[0] = job["cwd"]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:  # sys.exit(2), sys.exit("message"): as the interpreter ends on them
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), file=said)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), file=said)
"""


class Child:
    """A command the launcher runs: its pid, exit code and output files (Popen's names where they mean the same)."""

    def __init__(self, launcher: "Launcher", args: list[str], pid: int, out: Path, err: Path):
        self.launcher, self.args, self.pid, self.out, self.err = launcher, args, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.code(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.launcher.code(timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def peak_mib(self) -> float:
        return float(self.out.with_suffix(".peak").read_text())

    def stdout(self) -> str:
        """What it printed, with text mode's line ends (a progress bar's \\r is one), as subprocess.run(text=True)."""
        return text_mode(self.out)

    def stderr(self) -> str:
        return text_mode(self.err)


def text_mode(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


class Launcher:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pending = b""  # what the launcher said past the last line read (read unbuffered: select sees the rest)
        self.folder = Path(tempfile.mkdtemp(prefix="launcher-"))
        self.child: Child | None = None
        self.count = 0

    def start(self, module: str, args: list[str], cwd=None, env: dict | None = None, merge: bool = False,
              no_model: bool = False) -> Child:
        """Run `python -m module *args` in `cwd` with `env` (default: this process's) and return at once.
        `no_model`: loading a model raises (for commands that must stop before one loads). The child's peak
        memory (MiB) is in `child.peak_mib()` once it exits: what a fresh process doing the same would peak at."""
        if self.child is not None and self.child.returncode is None:  # the one before, left running by a failure
            self.child.kill()
            self.child.wait()
        self.count += 1
        out = self.folder / f"{self.count}.out"
        err = out if merge else self.folder / f"{self.count}.err"
        out.touch()
        err.touch()
        job = {"module": module, "args": [str(a) for a in args], "cwd": str(cwd or os.getcwd()),
               "env": dict(os.environ if env is None else env), "out": str(out), "err": str(err),
               "peak": str(out.with_suffix(".peak")), "no_model": no_model}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.child = Child(self, [sys.executable, "-m", module, *job["args"]], self.said(None)["pid"], out, err)
        return self.child

    def run(self, module: str, args: list[str], cwd=None, env: dict | None = None, merge: bool = False,
            timeout: float = 600, no_model: bool = False) -> subprocess.CompletedProcess:
        """subprocess.run(text=True)'s result for `python -m module *args`, stdout and stderr captured (`merge`:
        stderr into stdout)."""
        child = self.start(module, args, cwd, env, merge, no_model)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        return subprocess.CompletedProcess(child.args, code, child.stdout(), None if merge else child.stderr())

    def code(self, timeout: float | None) -> int | None:
        """The running child's exit code, waiting up to `timeout` seconds (None: as long as it takes)."""
        said = self.said(timeout)
        return None if said is None else said["code"]

    def said(self, timeout: float | None) -> dict | None:
        """The launcher's next line, waiting up to `timeout` seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the launcher died (exit {self.proc.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self.child is not None and self.child.returncode is None:
            self.child.kill()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


_launcher: Launcher | None = None


def launcher() -> Launcher:
    """The session's launcher, started at the first command (after conftest set the environment it inherits)."""
    global _launcher
    if _launcher is None or _launcher.proc.poll() is not None:
        _launcher = Launcher()
        atexit.register(_launcher.close)
    return _launcher
