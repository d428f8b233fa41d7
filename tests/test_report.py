"""report.md: the verdict line on the run's main metric, the change column, counts apart from quality."""
import pytest

from finetune.rundir.report import counts_table, method_name, quality_table, verdict, write_report

CLASSIFICATION = {"base": {"accuracy": 0.0, "majority_baseline": 0.357, "perplexity": 25.0, "n_answers": 28,
                           "generation_seconds": 1.5},
                  "tuned": {"accuracy": 0.804, "majority_baseline": 0.357, "perplexity": 3.1, "n_answers": 28,
                            "generation_seconds": 1.2}}


def sides(base: dict, tuned: dict) -> dict:
    return {"base": base, "tuned": tuned}


def test_verdict_max_metric_helped_states_base_and_majority_baseline():
    line = verdict(CLASSIFICATION, "accuracy", "max")
    assert line == ("**Verdict: tuning helped.** accuracy 0.804 tuned vs 0.000 base and 0.357 majority baseline "
                    "(+80.4 points vs base, +44.7 points vs the majority baseline).")


@pytest.mark.parametrize("tuned", [0.3, 0.0])  # beats the base but not the majority baseline; ties the base
def test_verdict_max_metric_not_helped(tuned):
    line = verdict(sides({"accuracy": 0.0, "majority_baseline": 0.357},
                         {"accuracy": tuned, "majority_baseline": 0.357}), "accuracy", "max")
    assert line.startswith("**Verdict: tuning did not help.** accuracy ")
    assert "0.357 majority baseline" in line


def test_verdict_min_metric():
    helped = verdict(sides({"perplexity": 20.0}, {"perplexity": 5.0}), "perplexity", "min")
    assert helped == ("**Verdict: tuning helped.** perplexity 5 tuned vs 20 base (-75.0% vs base, "
                      "lower is better).")
    worse = verdict(sides({"perplexity": 5.0}, {"perplexity": 6.0}), "perplexity", "min")
    assert worse.startswith("**Verdict: tuning did not help.** perplexity 6 tuned vs 5 base (+20.0%")


def test_verdict_falls_back_to_perplexity_when_the_metric_is_missing():
    line = verdict(sides({"perplexity": 20.0}, {"perplexity": 5.0}), "accuracy", "max")
    assert line.startswith("**Verdict: tuning helped.** perplexity 5 tuned vs 20 base")
    assert "accuracy was not measured" in line
    assert verdict(sides({}, {"n_answers": 3}), "accuracy", "max").startswith("**Verdict: unknown.**")


def test_a_classification_run_is_judged_on_its_answers_not_on_perplexity():
    line = verdict(CLASSIFICATION, "perplexity", "min")
    assert line.startswith("**Verdict: tuning helped.** accuracy 0.804 tuned vs 0.000 base and 0.357 majority baseline")


@pytest.mark.parametrize("tuned, base, majority, majority_f1, f1, missed", [
    # a news run that answered "flat" to all 50 held-out items: above the base, below the majority baseline
    (0.300, 0.04, 0.320, 0.17, 0.077, "majority baseline on accuracy, majority baseline on macro_f1"),
    # a run that answered nothing right: no better than the base or the majority
    (0.000, 0.000, 0.333, 0.167, 0.0, "base on accuracy, majority baseline on accuracy"),
])
def test_a_run_below_a_baseline_did_not_help_and_says_which(tuned, base, majority, majority_f1, f1, missed):
    sides_ = sides({"accuracy": base, "macro_f1": base, "majority_baseline": majority, "majority_macro_f1": majority_f1},
                   {"accuracy": tuned, "macro_f1": f1, "majority_baseline": majority, "majority_macro_f1": majority_f1,
                    "perplexity": 1.5})
    line = verdict({**sides_, "base": {**sides_["base"], "perplexity": 900.0}}, "accuracy", "max")
    assert line.startswith("**Verdict: tuning did not help.** accuracy ")
    assert f"Not beaten: {missed}" in line


def test_a_run_must_beat_the_simple_model_on_accuracy_and_macro_f1():
    metrics = {"base": {"accuracy": 0.1, "macro_f1": 0.1}, "tuned": {"accuracy": 0.75, "macro_f1": 0.6,
               "majority_baseline": 0.645, "majority_macro_f1": 0.26, "total_return": 4.0, "always_long_return": 1.0},
               "simple_model": {"model": "gradient boosting on 7 fields", "accuracy": 0.71, "macro_f1": 0.65,
                                "total_return": 2.0}}
    line = verdict(metrics, "accuracy", "max")
    assert line.startswith("**Verdict: tuning did not help.** accuracy 0.750 tuned vs 0.100 base, 0.645 majority "
                           "baseline and 0.710 simple model (")
    assert line.endswith("Not beaten: simple model on macro_f1. Backtest: total_return 4 tuned vs 1 always-long "
                         "baseline and 2 simple model (+3 vs the always-long baseline, +2 vs the simple model).")
    metrics["tuned"]["macro_f1"] = 0.66
    assert verdict(metrics, "accuracy", "max").startswith("**Verdict: tuning helped.**")


def test_tables_split_quality_from_counts_with_a_change_column():
    quality, counts = quality_table(CLASSIFICATION), counts_table(CLASSIFICATION)
    assert "| accuracy | 0 | 0.804 | +0.804 |" in quality
    assert "| perplexity | 25 | 3.1 | -21.9 (-87.6%) |" in quality
    assert "n_answers" not in quality and "generation_seconds" not in quality
    assert "| n_answers | 28 | 28 | +0 |" in counts and "| generation_seconds |" in counts
    assert counts_table(sides({"accuracy": 0.5}, {"accuracy": 0.6})) is None


@pytest.mark.parametrize("method, quantized, choice, name", [
    ({"_target_": "peft.LoraConfig"}, False, None, "lora"),
    ({"_target_": "peft.LoraConfig", "use_dora": True}, False, None, "dora"),
    ({"_target_": "peft.LoraConfig"}, True, None, "qlora"),
    ({"_target_": "peft.PrefixTuningConfig"}, False, None, "prefix"),
    ({"_target_": "peft.PromptTuningConfig"}, False, None, "prompt"),
    ({"_target_": "peft.IA3Config"}, False, None, "ia3"),
    ({"_target_": "peft.LoraConfig"}, True, "qlora", "qlora"),
])
def test_method_name(method, quantized, choice, name):
    assert method_name(method, quantized, choice) == name


def test_report_opens_with_the_verdict(tmp_path):
    summary = {"recipe": "default", "model": "tiny", "method": "lora", "parameters": 4_718_592}
    stats = {"splits": {"test": {"count": 28, "labels": {"BUY": 10}, "tokens": {"p50": 40, "p99": 60}}}}
    write_report(tmp_path, summary, CLASSIFICATION, stats, [], "accuracy", "max")
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0] == "# Run report: default" and lines[1] == ""
    assert lines[2].startswith("**Verdict: tuning helped.** accuracy 0.804 tuned")
    text = "\n".join(lines)
    assert "| parameters | 4,718,592 |" in text and "### Counts and timings" in text


def test_results_table_bolds_the_tuned_value_only_where_it_is_better(tmp_path):
    import json
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "scripts"))
    from results_table import row
    (tmp_path / "manifest.json").write_text(json.dumps({"argv": ["finetune", "recipe=x"], "seconds": 120}))
    (tmp_path / "metrics.json").write_text(json.dumps({
        "base": {"accuracy": 0.5, "majority_baseline": 0.4, "perplexity": 3.0, "style_distance": 0.2},
        "tuned": {"accuracy": 0.4, "majority_baseline": 0.4, "perplexity": 2.0, "style_distance": 0.3}}))
    line = row(tmp_path)
    assert "0.500 → 0.400 (majority" in line       # worse accuracy: not bold
    assert "3.00 → **2.00**" in line               # lower perplexity: bold
    assert "0.200 → 0.300 |" in line               # a larger style distance is worse: not bold


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept instead of saved."""
    from finetune.rundir import report
    made = []
    monkeypatch.setattr(report, "save", lambda fig, path: made.append(fig))
    return made


def test_label_balance_follows_the_confusion_matrix_order_with_the_legend_beside_the_bars(figures, tmp_path):
    from finetune.rundir.report import plot_labels
    stats = {"splits": {"train": {"count": 9, "labels": {"BUY": 3, "HOLD": 3, "SELL": 3}},
                        "test": {"count": 3, "labels": {"BUY": 1, "HOLD": 1, "SELL": 1}}}}
    assert plot_labels(stats, tmp_path / "labels.png", ["BUY", "SELL", "HOLD"])
    [fig] = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["BUY", "SELL", "HOLD"]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # covers no bar


def test_equity_has_a_unit_and_a_preference_run_plots_its_rewards(figures, tmp_path):
    from finetune.rundir.report import plot_equity, plot_loss
    plot_equity({"tuned": {"equity_curve": [1.0, 1.05, 1.1]}}, tmp_path / "equity.png")
    assert "1.1 = +10 %" in figures[0].axes[0].get_ylabel()
    history = [{"step": s, "loss": 0.7 - s / 100, "rewards/chosen": s / 10, "rewards/rejected": -s / 10}
               for s in (1, 2, 3)]
    plot_loss(history, tmp_path / "loss.png")
    rewards = figures[1].axes[1]
    assert [line.get_label() for line in rewards.get_lines()] == ["chosen", "rejected"]


def test_unlabelled_data_shows_no_label_counts(tmp_path):
    stats = {"splits": {"train": {"count": 68, "labels": {"null": 68}, "tokens": {"p50": 40, "p99": 60}}}}
    write_report(tmp_path, {"recipe": "default"}, {"base": {"perplexity": 3.0}, "tuned": {"perplexity": 2.0}},
                 stats, [], "perplexity", "min")
    assert "| train | 68 | – | 40 / 60 |" in (tmp_path / "report.md").read_text()


def test_the_ab_sheet_asks_the_question_it_is_given(tmp_path):
    from finetune.rundir.report import write_ab_sheet
    samples = [{"messages": [{"role": "user", "content": "News: X"}, {"role": "assistant", "content": "up"}]}]
    write_ab_sheet(tmp_path, samples, ["down"], ["up"], 0, "which answer is the better answer to the prompt?")
    sheet = (tmp_path / "ab_sheet.md").read_text()
    assert "which answer is the better answer to the prompt?" in sheet and "author" not in sheet
