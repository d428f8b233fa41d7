"""Every recipe composes and passes the config checks; typos stop the run before any model loads."""
import json

import pytest
from omegaconf import OmegaConf

from conftest import compose, forked_cli, recipes
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


@pytest.fixture(scope="module")
def typo_runs(tmp_path_factory) -> dict:
    """{override: (its command's result, its run dir)} for every case of TYPOS, each command in a forked child
    (conftest.forked_cli: one import of the training stack for all, and no model can load)."""
    run_dirs = [tmp_path_factory.mktemp("typo") / "run" for _ in TYPOS]
    results = forked_cli(*([override, f"hydra.run.dir={run_dir}"] for (override, _), run_dir in zip(TYPOS, run_dirs)))
    return {override: (result, run_dir) for (override, _), result, run_dir in zip(TYPOS, results, run_dirs)}


@pytest.mark.parametrize("override, says", TYPOS)
def test_typo_fails_before_model_loads(override, says, typo_runs):
    out, run_dir = typo_runs[override]
    assert out.returncode != 0
    for text in says:
        assert text in out.stderr, out.stderr[-2000:]
    assert out.seconds < 30
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    if (run_dir / "status.json").exists():
        assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
