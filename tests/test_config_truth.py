"""The config a run saves is the config that trained: a fit is composed (not patched in at run time), so
.hydra/config.yaml, `--cfg job`, manifest.json, compose() + run() and the Trainer's own arguments agree. The two
values a run sets on purpose over `training` are recorded as what trained: a preference stage's
objective.training and an incremental run's learning-rate scale."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import cli, compose
from finetune.config import check_config
from finetune.runner import run

RECIPE = """# @package _global_
defaults:
  - override /method: dora
method:
  r: 4
training:
  learning_rate: 5.0e-5
  num_train_epochs: 2
  per_device_train_batch_size: 4
  max_steps: 3
  eval_steps: 3
  save_steps: 3
"""
ARGS = ["model=tiny", "training=cpu", "eval=perplexity", "eval.max_samples=4"]
KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_steps", "lr_scheduler_type",
        "max_length", "warmup_steps", "gradient_accumulation_steps")


def resolved(config) -> dict:
    return OmegaConf.to_container(config, resolve=True)


def trainer_args(run_dir) -> dict:
    """What the Trainer used: the TrainingArguments it pickled into the last checkpoint."""
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1]
    args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    return {key: getattr(args, key) for key in KEYS}


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A user's recipe (lr, epochs, batch) with `model=tiny training=cpu`, whose fit sets lr, epochs, batch too."""
    root = tmp_path_factory.mktemp("truth")
    (root / "mine" / "recipe").mkdir(parents=True)
    (root / "mine" / "recipe" / "mine.yaml").write_text(RECIPE)
    head = ["--config-dir", str(root / "mine"), "recipe=mine", *ARGS]
    out = cli(*head, f"hydra.run.dir={root / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    job = cli(*head[:2], "--cfg", "job", *head[2:])
    assert job.returncode == 0, job.stderr[-3000:]
    return root / "run", resolved(OmegaConf.create(job.stdout)), out.stdout


def test_saved_printed_recorded_and_trained_configs_agree(user_run):
    run_dir, job, stdout = user_run
    saved = resolved(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))["training"]
    recorded = json.loads((run_dir / "manifest.json").read_text())["config"]["training"]
    trained = trainer_args(run_dir)
    assert saved == job["training"] == recorded
    assert {key: saved[key] for key in KEYS} == trained
    # the user's recipe won over the fit; the fit's other values (its schedule) are what trained
    assert (trained["learning_rate"], trained["num_train_epochs"], trained["per_device_train_batch_size"]) == (
        5e-5, 2, 4)
    assert trained["max_length"] == 512 and trained["lr_scheduler_type"] == "cosine"
    assert "fit tiny_cpu (conf/fit/tiny_cpu.yaml" in stdout and "learning_rate=5e-05" in stdout, stdout
    # the recipe's other groups and values trained too (Hydra's layout: --config-dir DIR, DIR/recipe/NAME.yaml)
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_dora"] is True


def test_compose_and_run_from_python_train_with_the_composed_values(tmp_path):
    """A method's own learning rate (prompt tuning: 3e-2) comes after the fit (tiny_cpu: 3e-3): composing from
    Python, where no run-time step could patch it, gives the same value the command line does."""
    cfg = compose("method=prompt", *ARGS, "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2")
    assert cfg.training.learning_rate == 3e-2 and cfg.training.max_length == 512  # method's, fit's
    run(cfg, tmp_path)
    assert trainer_args(tmp_path)["learning_rate"] == 3e-2
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["training"]["learning_rate"] == 3e-2


def test_a_shipped_recipe_on_cpu_runs_the_fit_not_its_7b_schedule():
    """training=cpu replaces a shipped recipe's GPU preset whole: no 7B value is left for a run to patch."""
    for recipe in ("lora_qwen_signals", "qlora_style", "lora_qwen_decisions"):
        gpu, cpu = compose(f"recipe={recipe}"), compose(f"recipe={recipe}", "model=smollm2_135m", "training=cpu")
        assert gpu.training.use_cpu is False and gpu.training.max_length >= 1024
        assert (cpu.training.learning_rate, cpu.training.max_steps, cpu.training.per_device_train_batch_size,
                cpu.training.use_cpu, cpu.training.max_length) == (1e-3, 40, 8, True, 512), recipe


def test_preference_stage_records_objective_training_as_what_trained():
    """objective.training is this stage's values over `training`: the arguments the DPO trainer gets, and the
    config check returns (manifest.json's), carry them; .hydra keeps both blocks, as composed."""
    cfg = compose("recipe=dpo_qwen_signals", "model=tiny", "training=cpu")
    config, args = check_config(cfg, None)
    assert config["training"]["learning_rate"] == cfg.objective.training.learning_rate == 2e-5
    assert config["training"]["num_train_epochs"] == 2 and cfg.training.learning_rate == 3e-3


def test_incremental_run_records_its_scaled_learning_rate(user_run, tmp_path):
    run_dir, _, _ = user_run
    cfg = compose(*ARGS, f"incremental.adapter={run_dir}", "training.max_steps=2", "training.eval_steps=2",
                  "training.save_steps=2")
    run(cfg, tmp_path)
    scaled = cfg.training.learning_rate * cfg.incremental.learning_rate_scale
    assert trainer_args(tmp_path)["learning_rate"] == pytest.approx(scaled)
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["training"]["learning_rate"] == \
        pytest.approx(scaled)
