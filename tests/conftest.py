"""Shared fixtures: no network, a fresh cache per test session, and Hydra composition like the CLI's."""
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from finetune.paths import CONF_DIR, RECIPES_DIR  # noqa: E402
from finetune.config.registration import register  # noqa: E402
from launcher import launcher  # noqa: E402

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
    the session: tests/test_cli.py reads its files, tests/test_console.py its console. A fresh interpreter, not
    `cli`'s launcher: what the imports print is the console's too."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    out = subprocess.run([sys.executable, "-m", "finetune", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert out.returncode == 0, out.stdout.decode()[-3000:]
    return run_dir, out.stdout.decode()


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def cli(*args: str, cwd=ROOT, env: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS`, as tests/launcher.py runs it (a fork of one interpreter that imported the training
    stack once: ~7 s less a command)."""
    return launcher().run("finetune", list(args), cwd=cwd, env=env, timeout=timeout)


class Forked(NamedTuple):
    returncode: int
    stderr: str
    seconds: float
    peak_mib: float


def forked_cli(*commands: list[str], timeout=600) -> list[Forked]:
    """Each command's exit code, stderr, seconds and peak memory (MiB), run as `cli` runs it, for commands that
    must stop before a model loads (loading one raises)."""
    results = []
    for args in commands:
        start = time.perf_counter()
        child = launcher().start("finetune", args, cwd=ROOT, no_model=True)
        code = child.wait(timeout)
        results.append(Forked(code, child.stderr(), time.perf_counter() - start, child.peak_mib()))
    return results


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
