"""Incremental training from an earlier run's adapter, and the new-samples gate."""
import json

import pytest

from conftest import compose
from finetune.runner import run

STEPS = ["training.max_steps=24", "training.eval_steps=12", "training.save_steps=12", "training.logging_steps=4",
         "eval.max_samples=8", "eval.checkpoint_metric=eval_loss"]  # the kept adapter is the last step's


def losses(result_dir):
    state = max((result_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [e["loss"] for e in json.loads((state / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("first")
    run(compose(*STEPS), run_dir)
    return run_dir


def test_incremental_run_continues_the_adapter_at_a_lower_rate(first_run, tmp_path):
    result = run(compose(*STEPS, f"incremental.adapter={first_run}"), tmp_path)
    before, after = losses(first_run), losses(tmp_path)
    # starts where the first run ended, not from scratch: much nearer its last loss than its first
    assert abs(after[0] - before[-1]) < abs(after[0] - before[0]) / 4, (before, after)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["training"]["learning_rate"] == pytest.approx(3e-3 * 0.5)
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def test_gate_skips_when_too_few_samples_are_new(first_run, tmp_path, caplog):
    result = run(compose(*STEPS, f"incremental.adapter={first_run}", "incremental.min_new_samples=500"), tmp_path)
    assert result.skipped and "only 0 new train samples" in result.skipped
    assert "not training" in caplog.text
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "skipped" and "min_new_samples=500" in status["error"]
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()
