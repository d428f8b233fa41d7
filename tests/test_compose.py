"""Every recipe composes and passes the config checks; typos stop the run before any model loads."""
import json
import time

import pytest
from omegaconf import OmegaConf

from conftest import cli, compose, recipes
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


@pytest.mark.parametrize("override, says", [
    ("training.learnin_rate=1", ["training.learnin_rate", "learning_rate"]),
    ("+training.learnin_rate=1", ["training.learnin_rate", "learning_rate"]),
    ("method=lorra", ["method/lorra", "lora", "qlora", "prefix", "dora"]),
    ("training.learning_rate=abc", ["training.learning_rate", "expected float"]),
    ("model.dtype=float33", ["model.dtype=float33", "bfloat16"]),
    ("recipe=no_such_recipe", ["recipe=no_such_recipe", "lora_qwen_signals"]),
])
def test_typo_fails_before_model_loads(override, says, tmp_path):
    start = time.perf_counter()
    out = cli(override, f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    for text in says:
        assert text in out.stderr, out.stderr[-2000:]
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
    if (tmp_path / "status.json").exists():
        assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
