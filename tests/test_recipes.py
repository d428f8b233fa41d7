"""Each shipped recipe runs end to end with the tiny model on CPU, on its own sample data, and reports its suite."""
import json

import pytest
from omegaconf import OmegaConf

from conftest import compose
from finetune.runner import run

SHORT = ["model=tiny", "training=cpu", "training.max_steps=8", "training.eval_steps=4", "training.save_steps=4",
         "eval.max_samples=6", "eval.max_new_tokens=12", "early_stopping.patience=null"]
EXPECTED = {  # recipe -> metric keys its eval suite must report for base and tuned, plots in its report
    "lora_qwen_signals": ({"perplexity", "accuracy", "macro_f1", "parse_rate", "majority_baseline", "profitable_ratio",
                           "total_return", "sharpe", "max_drawdown", "win_rate", "latency_seconds",
                           "latency_p99_seconds", "answers_per_second", "fast_latency_p50_seconds",
                           "fast_answers_per_second"}, {"loss.png", "labels.png", "confusion.png", "equity.png"}),
    "dpo_qwen_signals": ({"perplexity", "accuracy", "parse_rate", "profitable_ratio", "total_return"},
                         {"loss.png", "equity.png"}),
    "sft_dpo_qwen_signals": ({"perplexity", "accuracy", "parse_rate", "profitable_ratio", "total_return"},
                             {"loss.png", "equity.png", "sft/report.md", "sft/adapter/adapter_model.safetensors"}),
    "sft_kto_qwen_decisions": ({"perplexity", "accuracy", "parse_rate", "desirable_rate", "undesirable_rate",
                                "outcome_margin"}, {"loss.png", "sft/report.md"}),
    "sft_grpo_qwen_signals": ({"perplexity", "accuracy", "parse_rate", "profitable_ratio", "total_return"},
                              {"loss.png", "answers.png", "equity.png", "sft/report.md"}),
    "sft_grpo_qwen_decisions": ({"perplexity", "accuracy", "parse_rate", "desirable_rate", "undesirable_rate",
                                 "outcome_margin"}, {"loss.png", "answers.png", "sft/report.md"}),
    "qlora_deepseek_news": ({"perplexity"}, {"loss.png", "labels.png"}),
    "lora_qwen_decisions": ({"perplexity", "accuracy", "macro_f1", "parse_rate"}, {"loss.png", "confusion.png"}),
    "qlora_style": ({"perplexity", "style_distance", "sentence_length_js", "word_freq_js"},
                    {"loss.png", "sentence_lengths.png", "ab_sheet.md", "ab_key.json"}),
    "prefix_sentiment": ({"perplexity", "accuracy", "macro_f1"}, {"loss.png", "labels.png", "confusion.png"}),
    "lora_sentiment": ({"perplexity", "accuracy", "macro_f1"}, {"loss.png", "labels.png", "confusion.png"}),
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_seed_recipe_runs_on_cpu_with_the_tiny_model(recipe, tmp_path):
    extra = ["training.learning_rate=3e-2"] if recipe == "prefix_sentiment" else []  # virtual tokens learn slower
    if "dpo" in recipe or "kto" in recipe or "grpo" in recipe:  # the stage's own lr, which a fit leaves: the tiny
        extra = ["objective.training.learning_rate=3e-3"]                 # model's
    if recipe.startswith("sft_"):  # and its steps, over the SFT stage's
        extra += ["+objective.training.max_steps=8", "+objective.training.eval_steps=4"]
    if recipe == "sft_dpo_qwen_signals":  # balanced pairs hinge on the snapshot, which 8 steps of the random-init
        extra.append("dataset.builder.move_rejects=opposite")  # model cannot read: the pairs it can learn
    result = run(compose(f"recipe={recipe}", *SHORT, *extra), tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    for split in ("train", "validation", "test"):
        assert stats["splits"][split]["count"] > 0 and stats["splits"][split]["labels"]
    keys, files = EXPECTED[recipe]
    for side in ("base", "tuned"):
        assert keys <= set(result.metrics[side]), keys - set(result.metrics[side])
    if "grpo" in recipe:  # it learns from rewards on its own answers: each reward, the answer shares and the KL
        check_grpo(tmp_path, result, "outcome" if "decisions" in recipe else "pnl")
    elif "dpo" in recipe or "kto" in recipe:  # the likelihood of the answers may fall: it learns the preference
        state = json.loads(max((tmp_path / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                               key=lambda p: int(p.parent.name.split("-")[1])).read_text())
        if "dpo" in recipe:  # held-out pairs: the chosen answer gains on the rejected one
            evals = [e["eval_rewards/accuracies"] for e in state["log_history"] if "eval_rewards/accuracies" in e]
            assert evals[-1] > 0.5, evals
        else:  # KTO's loss is >= 0.5 where the policy is its reference (every reward 0, KL >= 0)
            evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
            assert evals[-1] < 0.5, evals
        objective = "DPO" if "dpo" in recipe else "KTO"
        assert f"| objective | {objective} (beta 0.1" in (tmp_path / "report.md").read_text()
    else:
        assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    for name in files:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    if recipe.startswith("sft_"):
        (tmp_path / ".hydra").mkdir()  # what `python -m finetune` writes; run() alone does not
        OmegaConf.save(compose(f"recipe={recipe}", *SHORT, *extra), tmp_path / ".hydra" / "config.yaml")
        check_stages(tmp_path, result.metrics, next(o for o in ("dpo", "kto", "grpo") if o in recipe))


def check_grpo(run_dir, result, reward):
    """Every step logged each reward's mean and spread, the share of each answer and the KL; report.md has them."""
    steps = [e for e in result.trainer.state.log_history if "reward" in e]
    assert [e["step"] for e in steps] == list(range(1, 9))
    for entry in steps:
        assert {f"rewards/{reward}/mean", "rewards/format/mean", "rewards/format/std", "kl", "answers/HOLD",
                "answers/unparsed"} <= set(entry), sorted(entry)
    evals = [e for e in result.trainer.state.log_history if any(key.startswith("eval_") for key in e)]
    assert [e["step"] for e in evals] == [4, 8]  # validation scored by the task's metric, TRL's sampled eval skipped
    assert all("eval_macro_f1" in e and "eval_reward" not in e for e in evals), evals
    report = (run_dir / "report.md").read_text()
    assert "| objective | GRPO (beta 0.04, 4 answers a prompt; rewards format x0.2" in report
    assert f"| reward {reward} (mean) |" in report and "| answers HOLD (share) |" in report
    assert "| groups scored alike (no gradient) |" in report and "| first 4 steps (mean) |" in report


def check_stages(run_dir, metrics, objective):
    """SFT ran whole in run_dir/sft; the preference stage started from its adapter (its "base" scores are the SFT
    model's on the same held-out samples), saved only its own adapter (not TRL's frozen reference copy), and the
    report shows the three models."""
    sft = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert json.loads((run_dir / "sft" / "status.json").read_text())["status"] == "completed"
    assert "| objective | SFT" in (run_dir / "sft" / "report.md").read_text()
    assert metrics["base"]["perplexity"] == pytest.approx(sft["tuned"]["perplexity"], rel=1e-4)
    assert metrics["base"]["perplexity"] < sft["base"]["perplexity"]  # the SFT stage trained
    assert metrics["stages"] == {"base": sft["base"], "sft": sft["tuned"], objective: metrics["tuned"]}
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                       "adapter_model.safetensors"]
    assert (run_dir / "sft" / "data" / "test.jsonl").read_text() == (run_dir / "data" / "test.jsonl").read_text()
    assert f"| metric | base model | after SFT | after SFT + {objective.upper()} |" in (run_dir / "report.md").read_text()
    from finetune.serving.inference import SignalProvider  # the run dir serves as any: the final adapter on its base
    first = json.loads((run_dir / "answers.jsonl").read_text().splitlines()[0])
    assert SignalProvider.from_run(run_dir, system_prompt=None).generate([first["prompt"]]) == [first["tuned"]]


def test_walk_forward_trains_each_fold_on_the_past_only_and_reports_every_fold(tmp_path):
    """4 folds on the sample trade log: fold-k runs whole, report.md shows each fold, the mean and the
    always-long / always-HOLD baselines, and no fold trained or validated on a timestamp at or after its test
    window (read back from each fold's own split files)."""
    summary = run(compose("recipe=lora_qwen_signals", *SHORT, "training.max_steps=4", "eval.walk_forward.folds=4"),
                  tmp_path).metrics
    assert [row["fold"] for row in summary["folds"]] == [1, 2, 3, 4]
    previous = None
    for k in range(1, 5):
        fold = tmp_path / f"fold-{k}"
        assert json.loads((fold / "status.json").read_text())["status"] == "completed"
        read = {name: [json.loads(line)["timestamp"] for line in (fold / "data" / f"{name}.jsonl").read_text().splitlines()]
                for name in ("train", "validation", "test")}
        assert max(read["train"] + read["validation"]) < min(read["test"])
        assert previous is None or min(read["test"]) > max(previous)  # the windows roll forward
        previous = read["test"]
    report = (tmp_path / "report.md").read_text()
    assert "| fold | train window | test window | train / test samples | accuracy |" in report
    assert report.count("\n| ") == 6 and "| mean |" in report and "always long | always HOLD |" in report
    assert set(summary["tuned"]) >= {"accuracy", "total_return", "always_long_return"}
    assert summary["tuned"]["accuracy"] == sum(row["tuned"]["accuracy"] for row in summary["folds"]) / 4
