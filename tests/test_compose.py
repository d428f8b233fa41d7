"""Every recipe composes and passes the config checks; typos stop the run before any model loads."""
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, recipes
from finetune.config import check_method, check_model, check_training, resolve


def test_recipes_exist():
    assert len(recipes()) >= 7, recipes()


@pytest.mark.parametrize("name", recipes())
def test_recipe_composes_and_checks(name, tmp_path):
    cfg = compose(f"recipe={name}")
    config = resolve(cfg)
    check_training(config["training"])
    check_method(config["method"], config["training"])
    check_model(config["model"])
    assert config["dataset"]["builder"]["_target_"].startswith("finetune.data.")
    assert cfg.dataset.path == cfg.dataset.builder.path


@pytest.mark.parametrize("name", recipes())
def test_recipe_runs_with_tiny_model_config(name, tmp_path):
    """`recipe=X model=tiny` (what the tests and the docs run) composes too."""
    config = resolve(compose(f"recipe={name}", "model=tiny"))
    assert config["model"]["tiny"] is not None


def test_defaults_compose_to_the_documented_run():
    cfg = compose()
    assert cfg.model.name == "tiny" and cfg.method._target_ == "peft.LoraConfig" and cfg.method.r == 16
    assert OmegaConf.select(cfg, "quantization") is None


TYPOS = [
    ("training.learnin_rate=1", ["training.learnin_rate", "learning_rate"]),
    ("+training.learnin_rate=1", ["training.learnin_rate", "learning_rate"]),
    ("method=lorra", ["method/lorra", "lora", "qlora", "prefix", "dora"]),
    ("training.learning_rate=abc", ["training.learning_rate", "expected float"]),
    ("model.dtype=float33", ["model.dtype=float33", "bfloat16"]),
    ("recipe=no_such_recipe", ["recipe=no_such_recipe", "lora_qwen_signals"]),
]
# Each typo runs `python -m finetune TYPO hydra.run.dir=DIR` in a child forked from one process that imported
# trl and the training stack once: a fresh interpreter spent ~7 s of each case on that import (the training.*
# checks need trl.SFTConfig). In the children load_model raises, so a check that came after the model loads fails
# its case instead of passing.
FORKED = """
import json, os, sys, time, traceback
from trl import SFTConfig  # noqa: F401  what a training.* check imports
import finetune.train.model, finetune.train.recipe  # noqa: F401  what the runner imports before the other checks
from finetune.runner import main
def load_model(*args, **kwargs):
    raise RuntimeError("the model loaded before the typo was found")
finetune.train.model.load_model = load_model
results = []
for override, run_dir in json.loads(sys.argv[1]):
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        stderr = os.path.join(os.path.dirname(run_dir), "stderr.txt")
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = ["finetune", override, f"hydra.run.dir={run_dir}"]
        try:
            main()
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    status = os.waitpid(pid, 0)[1]
    results.append((os.waitstatus_to_exitcode(status), time.perf_counter() - start))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def typo_runs(tmp_path_factory) -> dict:
    """{override: (exit code, stderr, seconds, run dir)} for every case of TYPOS."""
    run_dirs = [tmp_path_factory.mktemp("typo") / "run" for _ in TYPOS]
    cases = [(override, str(run_dir)) for (override, _), run_dir in zip(TYPOS, run_dirs)]
    out = subprocess.run([sys.executable, "-c", FORKED, json.dumps(cases)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.splitlines()[-1])
    return {override: (code, (run_dir.parent / "stderr.txt").read_text(), seconds, run_dir)
            for (override, _), (code, seconds), run_dir in zip(TYPOS, results, run_dirs)}


@pytest.mark.parametrize("override, says", TYPOS)
def test_typo_fails_before_model_loads(override, says, typo_runs):
    returncode, stderr, seconds, run_dir = typo_runs[override]
    assert returncode != 0
    for text in says:
        assert text in stderr, stderr[-2000:]
    assert seconds < 30
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    if (run_dir / "status.json").exists():
        assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
