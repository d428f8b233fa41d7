"""Shared fixtures: no network, a fresh cache per test session, and Hydra composition like the CLI's."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from finetune.paths import CONF_DIR, RECIPES_DIR  # noqa: E402
from finetune.config.registration import register  # noqa: E402

register()  # the recipes source and the resolvers, as the CLI registers them

ROOT = Path(__file__).resolve().parents[1]
FAST = ["training.max_steps=12", "training.eval_steps=6", "training.save_steps=6", "eval.max_samples=24"]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    """Tiny models and built datasets go to a cache of this session's own (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["FINETUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def default_run(cache_dir, tmp_path_factory) -> tuple[Path, str]:
    """`python -m finetune` as the Quick start types it (the full default run): its run dir and its console,
    stdout and stderr together (bytes decoded: text mode would turn the bars' \\r into line ends). One run for
    the session: tests/test_cli.py reads its files, tests/test_console.py its console."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    out = subprocess.run([sys.executable, "-m", "finetune", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert out.returncode == 0, out.stdout.decode()[-3000:]
    return run_dir, out.stdout.decode()


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def cli(*args: str, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# Each command as `python -m finetune ARGS` runs it, in a child forked from one process that imported trl and the
# training stack once: a fresh interpreter spends ~7 s on that import, most of the time of a command that stops
# before training. load_model raises in the children: only for commands that must stop before a model loads.
# A child's peak memory is the parent's resident set at the fork plus the child's own growth (its VmHWM less its
# VmRSS at the start): what one fresh process doing the same would have peaked at.
FORKED = """
import atexit, json, os, sys, time, traceback
from trl import SFTConfig  # noqa: F401  what a training.* check imports
import finetune.train.model, finetune.train.recipe  # noqa: F401  what the runner imports before its other checks
from finetune.runner import main

def load_model(*args, **kwargs):
    raise RuntimeError("a model loaded")
finetune.train.model.load_model = load_model

def kib(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

def peak(path, before):
    with open(path, "w") as f:
        f.write(str((before + kib("VmHWM")) / 1024))

out, results = sys.argv[1], []
for i, args in enumerate(json.loads(sys.argv[2])):
    sys.stdout.flush()
    sys.stderr.flush()
    resident, start = kib("VmRSS"), time.perf_counter()
    if os.fork() == 0:  # the child: the command, then exit as `python -m finetune` does
        atexit.register(peak, os.path.join(out, f"{i}.peak"), resident - kib("VmRSS"))
        os.dup2(os.open(os.path.join(out, f"{i}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = ["finetune", *args]
        try:
            main()
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else int(err.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # the exit handlers, without tearing down the interpreter (~1 s with torch)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    status = os.wait()[1]
    results.append((os.waitstatus_to_exitcode(status), time.perf_counter() - start))
print(json.dumps(results))
"""


class Forked(NamedTuple):
    returncode: int
    stderr: str
    seconds: float
    peak_mib: float


def forked_cli(*commands: list[str], timeout=600) -> list[Forked]:
    """Each command's exit code, stderr, seconds and peak memory (MiB), run as FORKED says."""
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "-c", FORKED, out, json.dumps(commands)], cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads(run.stdout.splitlines()[-1])
        return [Forked(code, (Path(out) / f"{i}.err").read_text(), seconds,
                       float((Path(out) / f"{i}.peak").read_text()))
                for i, (code, seconds) in enumerate(results)]


def recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def single_torch_thread():
    """Body of a module's autouse `one_thread` fixture: toy models gain nothing from a second thread, and on a busy
    2-core machine two OpenMP threads waiting on each other made such files several times slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
