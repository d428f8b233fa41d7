"""objective=grpo on the tiny model: GRPO learns from the reward on the model's own answers (not from the labels),
the answer shares and the collapse warning, and the leakage check on rewards that read outcomes."""
import json
import logging
import re
import sys
import types

import pytest

from conftest import ROOT, compose
from launcher import launcher
from test_reliability import kill_when
from finetune.errors import ConfigError, DataError
from finetune.paths import SAMPLE_DATA_DIR
from finetune.rewards import answer_text, load
from finetune.runner import run
from finetune.tasks.signals import parse_signal
from finetune.train.grpo import COLLAPSE_WINDOW, check_leakage

COLLAPSE = 0.4  # of the last 64 answers: the SELL reward takes SELL past it by step ~12 of 20


def sell_only(completions, **_):
    """A user's reward (by _target_, _partial_: true): pays a SELL answer, whatever the trade did."""
    return [1.0 if parse_signal(answer_text(c))[0] == "SELL" else 0.0 for c in completions]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    from conftest import single_torch_thread
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def sell_run(tmp_path_factory):
    """A short SFT stage (so the tiny model answers in the signal format at all), then 20 GRPO steps from it with
    the reward that pays SELL only; the warnings it logged."""
    run_dir = tmp_path_factory.mktemp("grpo")
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("finetune").addHandler(handler)
    try:
        result = run(compose(
            "objective=grpo", "dataset=trade_signals", "eval=perplexity", "objective.start_from=sft",
            "training.max_steps=30", "training.eval_steps=100", "training.save_steps=100", "eval.max_samples=8",
            "early_stopping.patience=null", "objective.rewards.pnl=null", "objective.rewards.format=null",
            "+objective.rewards.sell={_target_: test_grpo.sell_only, _partial_: true, weight: 1.0}",
            f"objective.collapse_share={COLLAPSE}", "objective.max_completion_length=24",
            "+objective.training.max_steps=20", "+objective.training.eval_steps=100",
            "+objective.training.save_steps=100", "+objective.training.learning_rate=3e-3"), run_dir)
    finally:
        logging.getLogger("finetune").removeHandler(handler)
    steps = [e for e in result.trainer.state.log_history if "answers/SELL" in e]
    return run_dir, result, steps, warnings


def test_a_reward_that_pays_sell_moves_the_answers_to_sell(sell_run):
    """The SFT model answers SELL rarely (few SELL labels in the trade log); the reward alone moves it there."""
    run_dir, result, steps, _ = sell_run
    assert [e["step"] for e in steps] == list(range(1, 21))  # one row of answer shares per step
    sell = [e["answers/SELL"] for e in steps]
    first, last = sum(sell[:5]) / 5, sum(sell[-5:]) / 5
    assert last > first + 0.2, sell
    assert all(abs(sum(e[f"answers/{k}"] for k in ("BUY", "SELL", "HOLD", "unparsed")) - 1) < 1e-6 for e in steps)
    rewards = [e["rewards/sell/mean"] for e in steps]  # TRL logs each reward under its config key
    assert sum(rewards[-5:]) > sum(rewards[:5]) and all("rewards/sell/std" in e for e in steps)
    assert steps[-1]["kl"] > 0  # beta > 0: the policy's distance to the SFT model it started from
    labels = json.loads((run_dir / "data" / "stats.json").read_text())["splits"]["train"]["labels"]
    assert last > labels["SELL"] / sum(labels.values())  # more SELL than the labels hold: the reward, not them


def test_the_collapse_warning_fires_when_one_answer_passes_the_share(sell_run):
    """The guard pools the last COLLAPSE_WINDOW answers (4 steps of 16 here): the first step where one answer's share
    of them reaches the share is warned of, once, and report.md says so."""
    run_dir, result, steps, warnings = sell_run
    args = result.trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps  # answers a step (16 here)
    window = COLLAPSE_WINDOW // per_step
    counts = [{k: round(e[f"answers/{k}"] * per_step) for k in ("BUY", "SELL", "HOLD")} for e in steps]
    pooled = [{k: sum(c[k] for c in counts[i - window + 1:i + 1]) / COLLAPSE_WINDOW for k in ("BUY", "SELL", "HOLD")}
              for i in range(window - 1, len(counts))]
    first = next(i for i, shares in enumerate(pooled) if max(shares.values()) >= COLLAPSE)
    answer = max(pooled[first], key=pooled[first].get)
    step = steps[first + window - 1]["step"]
    said = [w for w in warnings if w.startswith("grpo: collapse")]
    assert said and said[0].startswith(f"grpo: collapse at step {step}: ") and answer in said[0], said
    assert "dataset.balance=oversample" in said[0]  # what to do about it
    assert result.trainer.collapsed == {"step": step, "answer": answer, "share": pooled[first][answer]}
    report = (run_dir / "report.md").read_text()
    assert f"collapse at step {step}: " in report


def decisions(tmp_path, hours: float) -> str:
    """The sample decision records with every outcome known `hours` after its decision."""
    rows = [json.loads(line) for line in (SAMPLE_DATA_DIR / "decisions.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["result"] = {**(row.get("result") or {}), "duration_hours": hours}
    path = tmp_path / "decisions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_reward_that_reads_an_outcome_known_after_the_test_window_starts_is_refused(tmp_path, monkeypatch):
    """A train decision whose outcome closed after the first test decision: the outcome reward would learn from a
    price of the test period. Refused before any weight loads."""
    monkeypatch.setattr("finetune.train.recipe.load_base", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"objective\.rewards\.outcome reads the outcome of train sample line \d+, "
                                        r".*outcome known at .*after the test window starts .*objective\.leakage=drop"):
        run(compose("objective=grpo", "dataset=decision_records", f"dataset.path={decisions(tmp_path, 24 * 365)}",
                    "dataset.builder.undesirable_outcomes=[bad]", "eval=perplexity", "objective.rewards.pnl=null",
                    "+objective.rewards.outcome={_target_: finetune.rewards.outcome.Outcome, weight: 1.0}"),
            tmp_path / "run")


def test_a_trade_that_closed_after_the_test_window_starts_is_refused_to_the_pnl_reward(tmp_path, monkeypatch):
    """The trade log's exit time (dataset.builder.columns.exit_timestamp) says when each move was realised: trades
    held for 400 days closed inside the test window, and the pnl reward would read their moves."""
    import shutil
    import sqlite3
    db = tmp_path / "trades.db"
    shutil.copy(SAMPLE_DATA_DIR / "trades.db", db)
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE trades ADD COLUMN closed_at TEXT")
        con.execute("UPDATE trades SET closed_at = datetime(timestamp, '+400 days')")
    monkeypatch.setattr("finetune.train.recipe.load_base", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"objective\.rewards\.pnl reads the outcome of train sample trade_id \d+ "):
        run(compose("objective=grpo", "dataset=trade_signals", f"dataset.path={db}", "eval=perplexity",
                    "dataset.builder.columns.exit_timestamp=closed_at"), tmp_path / "run")


def test_grpo_keys_are_checked_against_grpoconfig_before_data_or_weights(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.num_generatons: not a trl\.GRPOConfig field; did you mean "
                                          r"num_generations"):
        run(compose("objective=grpo", "+objective.num_generatons=4"), tmp_path / "typo")
    with pytest.raises(ConfigError, match=r"^training: The global eval batch size \(32 \* 1\) must be "
                                          r"divisible by the number of generations used for evaluation \(3\)"):
        run(compose("objective=grpo", "objective.num_generations=3"), tmp_path / "groups")
    with pytest.raises(ConfigError, match=r"^objective\.rewards\.pnl\.cost_percent=-1: a number >= 0"):
        run(compose("objective=grpo", "objective.rewards.pnl.cost_percent=-1"), tmp_path / "reward")
    assert not (tmp_path / "typo" / "data").exists() and not (tmp_path / "groups" / "data").exists()


def test_a_reward_that_reads_a_column_the_data_lacks_stops_before_the_model_loads(tmp_path, monkeypatch):
    """The default rewards on the demo signals, which record no realised move: pnl has nothing to read."""
    monkeypatch.setattr("finetune.train.recipe.load_base", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"objective\.rewards\.pnl reads 'return_percent', which the train samples "
                                        r"do not carry .*dataset=trade_signals.*objective\.rewards\.pnl=null"):
        run(compose("objective=grpo", "eval=perplexity"), tmp_path)


def test_the_leakage_check_reads_known_at_and_spares_rewards_that_read_no_outcome():
    train = [{"timestamp": f"2025-01-0{d}T00:00:00", "meta": {"line": d, "known_at": f"2025-01-0{d + 3}T00:00:00"}}
             for d in range(1, 6)]
    test = [{"timestamp": "2025-01-06T00:00:00", "meta": {}}]
    outcome = load({"outcome": {"_target_": "finetune.rewards.outcome.Outcome"}})[2]
    assert outcome == {"outcome": ("outcome",)}
    assert check_leakage(train, test, {"format": ()}, "refuse") == train  # the answer alone: nothing leaks
    assert [s["meta"]["line"] for s in check_leakage(train, test, outcome, "drop")] == [1, 2, 3]  # known by the 6th
    with pytest.raises(DataError, match=r"train sample line 4 .*known at 2025-01-07T00:00:00.*2 such train samples"):
        check_leakage(train, test, {"mine": None}, "refuse")  # a user's function without `reads`: every column


def test_the_rewards_score_answers_as_their_files_say():
    funcs, weights, _ = load({"pnl": {"_target_": "finetune.rewards.pnl.Pnl", "weight": 2, "hold_cost": 0.5,
                                      "clip": 5.0},
                              "format": {"_target_": "finetune.rewards.format.Format", "task": "signals"},
                              "outcome": None})
    pnl, fmt = funcs
    answers = [[{"role": "assistant", "content": f'{{"signal": "{s}", "confidence": 0.7}}'}]
               for s in ("BUY", "SELL", "HOLD", "BUY")] + [[{"role": "assistant", "content": "no idea"}]]
    assert [pnl.__name__, fmt.__name__] == ["pnl", "format"] and weights == [2.0, 1.0]
    assert pnl(answers, return_percent=[3.0, 3.0, 3.0, 40.0, 3.0]) == [2.9, -3.1, -0.5, 5.0, -3.1]  # unreadable:
    assert pnl(answers, return_percent=[None] * 5) == [None] * 5                  # the worst answer's; no move: None
    assert fmt(answers) == [1.0, 1.0, 1.0, 1.0, 0.0]
    action = [[{"role": "assistant", "content": json.dumps({"action": a})}] for a in ("BUY", "SELL", "BUY", "SELL")]
    outcome = load({"o": {"_target_": "finetune.rewards.outcome.Outcome"}})[0][0]
    assert outcome(action, label=["BUY", "BUY", "BUY", "BUY"], outcome=["good", "good", "bad", "bad"]) == \
        [1.0, -1.0, -1.0, 1.0]
    assert outcome(answers[-1:] * 2, label=["BUY", "BUY"], outcome=["good", "bad"]) == [-1.0, -1.0]  # as a wrong one
    with pytest.raises(ConfigError, match=r"objective\.rewards\.pnl: the samples carry no return_percent"):
        pnl(answers)
    with pytest.raises(ConfigError, match=r"objective\.rewards: no reward"):
        load({"pnl": None})
    with pytest.raises(ConfigError, match=r"objective\.rewards\.mine: .*not a callable; a plain function needs "
                                          r"`_partial_: true`"):
        load({"mine": {"_target_": "builtins.len", "_args_": [[1]]}})


def test_the_readme_reward_example_runs_as_written(monkeypatch):
    [code] = [block for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "my_rewards.py" in block]
    module = types.ModuleType("my_rewards")
    exec(code, module.__dict__)
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines() if "+objective.rewards.trend=" in line]
    spec = re.search(r"\{_target_: (\S+), _partial_: true, weight: ([\d.]+)\}", line)
    funcs, weights, reads = load({"trend": {"_target_": spec[1], "_partial_": True, "weight": float(spec[2])}})
    answers = [[{"role": "assistant", "content": f'{{"signal": "{s}", "confidence": 0.7}}'}] for s in ("HOLD", "BUY")]
    assert funcs[0](answers, return_percent=[5.0, 5.0], label=["BUY", "BUY"]) == [-1.0, 0.0]
    assert weights == [0.5] and reads == {"trend": ("return_percent",)}


# a GRPO run from the tiny base in a few seconds a step: short answers, perplexity only, a checkpoint every 2 steps
GRPO = ["objective=grpo", "dataset=trade_signals", "eval=perplexity", "eval.max_samples=4", "cpu_threads=1",
        "early_stopping.patience=null", "objective.max_completion_length=8", "training.save_steps=2",
        "training.eval_steps=2", "training.load_best_model_at_end=false"]


def test_grpo_resumes_after_kill_9_to_the_last_step(tmp_path, caplog):
    """Killed (SIGKILL) once its step-2 checkpoint is on disk, the same command run again goes on from it: steps 3
    and 4 train, each logs its answer shares, and the run completes with its adapter."""
    killed = tmp_path / "killed"
    proc = launcher().start("finetune", [*GRPO, "training.max_steps=4", f"hydra.run.dir={killed}"], cwd=ROOT)
    kill_when(proc, lambda: (killed / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file())
    assert json.loads((killed / "status.json").read_text())["status"] == "running"
    assert not (killed / "adapter").exists()
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = run(compose(*GRPO, "training.max_steps=4"), killed)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert len(resumed) == 1 and resumed[0].endswith("checkpoint-2"), resumed
    assert json.loads((killed / "status.json").read_text())["status"] == "completed"
    assert result.trainer.state.global_step == 4 and (killed / "adapter" / "adapter_model.safetensors").is_file()
    steps = sorted({e["step"] for e in result.trainer.state.log_history if "answers/HOLD" in e})
    assert steps == [1, 2, 3, 4], steps
    assert "### Rewards and answers (GRPO)" in (killed / "report.md").read_text()


def test_grpo_walks_forward_fold_by_fold(tmp_path):
    """eval.walk_forward.folds=2 with objective=grpo: each fold a GRPO run on its past, tested on the next window."""
    result = run(compose(*GRPO, "eval.walk_forward.folds=2", "training.max_steps=2"), tmp_path)
    folds = result.metrics["folds"]
    assert [f["fold"] for f in folds] == [1, 2] and folds[0]["test_from"] <= folds[1]["train_to"]
    assert all(f["train_to"] < f["test_from"] for f in folds)
    for k in (1, 2):
        report = (tmp_path / f"fold-{k}" / "report.md").read_text()
        assert "| objective | GRPO (beta 0.04" in report and "| reward pnl (mean) |" in report
