"""Bad input stops the run before training: non-zero exit, one line naming the place, status.json failed,
no adapter and no metrics. One case goes through the command line; the rest call run() directly."""
import json
import shutil
import sqlite3

import pytest

from conftest import ROOT, cli, compose
from finetune.errors import DataError
from finetune.runner import run

DATA = ROOT / "data"


def assert_nothing_written(run_dir):
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("DataError")
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_missing_file_exits_with_one_line(tmp_path):
    out = cli("dataset=trade_signals", f"dataset.path={tmp_path}/nope.db", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope.db" in errors[0] and "no such file" in errors[0]
    assert "Traceback" not in out.stderr
    assert_nothing_written(tmp_path / "run")


def empty_db(tmp_path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    return path


def wide_news_schema(tmp_path):
    """A common mistake: impacts stored wide (ret_post_15m), not long (window_min, ret)."""
    path = tmp_path / "wide.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE events (event_id TEXT, ts TEXT, content TEXT)")
    con.execute("CREATE TABLE event_impacts (event_id TEXT, ticker TEXT, ret_post_15m REAL)")
    con.execute("INSERT INTO events VALUES ('e1', '2024-01-01T09:30:00', 'Fed holds rates')")
    con.commit()
    con.close()
    return path


def bad_market_data(tmp_path):
    path = tmp_path / "trades.db"
    shutil.copy(DATA / "trades.db", path)
    con = sqlite3.connect(path)
    row = con.execute("SELECT s.rowid FROM trades t JOIN signals s ON t.timestamp = s.timestamp "
                      "WHERE t.status = 'closed' AND t.pnl_percent IS NOT NULL ORDER BY s.rowid LIMIT 1").fetchone()[0]
    con.execute("UPDATE signals SET market_data = '{\"rsi\": 28.4,' WHERE rowid = ?", (row,))
    con.commit()
    con.close()
    return path


def only_open_trades(tmp_path):
    path = tmp_path / "open.db"
    shutil.copy(DATA / "trades.db", path)
    con = sqlite3.connect(path)
    con.execute("UPDATE trades SET status = 'open'")
    con.commit()
    con.close()
    return path


def malformed_jsonl(tmp_path):
    path = tmp_path / "decisions.jsonl"
    lines = (DATA / "decisions.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    lines[2] = lines[2][:40]  # cut mid-record
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def missing_field(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [json.loads(line) for line in (DATA / "demo_signals.jsonl").read_text().splitlines()[:30]]
    del rows[3]["messages"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CASES = {  # name -> (dataset, make the input, words the error must hold)
    "empty database": ("trade_signals", empty_db, ["empty.db", "trades"]),
    "wrong news schema": ("finance_news", wide_news_schema, ["wide.db", "window_min", "ret_post_15m"]),
    "invalid JSON in a column": ("trade_signals", bad_market_data, ["trades.db", "market_data", "row"]),
    "no samples left": ("trade_signals", only_open_trades, ["open.db", "no samples"]),
    "malformed JSON line": ("decision_records", malformed_jsonl, ["decisions.jsonl", "line 3"]),
    "record missing a field": ("generic", missing_field, ["chats.jsonl", "line 4", "messages"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_and_nothing_is_written(case, tmp_path):
    dataset, make, words = CASES[case]
    source = make(tmp_path)
    with pytest.raises(DataError) as err:
        run(compose(f"dataset={dataset}", f"dataset.path={source}"), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert_nothing_written(tmp_path / "run")


def sharegpt_file(tmp_path):
    """A user's own ShareGPT chats: answers, no labels, no meta."""
    rows = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("suite, message", [
    ("demo_signals", r"held-out sample 1: 'label' is None.*use eval=perplexity"),
    ("signals", r"held-out sample 1: 'label' is None.*use eval=perplexity"),
])
def test_the_dry_run_checks_what_the_eval_suite_needs(tmp_path, suite, message):
    # label-less chats with a classifying suite: the dry run stops (the real run used to stop after the base
    # model had loaded and generated)
    path = sharegpt_file(tmp_path)
    with pytest.raises(DataError, match=message):
        run(compose("dataset=generic", f"dataset.path={path}", f"eval={suite}", "dry_run=true"), tmp_path / "run")
    run(compose("dataset=generic", f"dataset.path={path}", "eval=perplexity", "dry_run=true"), tmp_path / "ok")


def test_the_dry_run_checks_the_backtests_returns(tmp_path):
    # labelled signals without realised returns: the backtest's meta key is missing, said before any weight loads
    with pytest.raises(DataError, match=r"meta 'return_percent' is None.*eval=demo_signals"):
        run(compose("eval=signals", "dry_run=true"), tmp_path / "run")


def test_model_path_at_an_empty_folder_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = cli("model=local", f"model.path={empty}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = [line for line in out.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: model.path={empty}: no config.json, no tokenizer (") and "no weights (" in line


def test_the_columns_error_shows_an_override_that_works(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"What is {i} + {i}?,{2 * i}\n" for i in range(30)))
    with pytest.raises(DataError, match="cannot tell the format") as err:
        run(compose("dataset=generic", f"dataset.path={path}", "eval=perplexity", "dry_run=true"), tmp_path / "a")
    said = str(err.value).split("e.g. ")[1].replace("<column>", "question", 1).replace("<column>", "answer", 1)
    run(compose("dataset=generic", f"dataset.path={path}", "eval=perplexity", "dry_run=true", *said.split()),
        tmp_path / "b")  # as the message says it, the file builds


def test_an_unknown_recipe_gets_the_near_names_and_every_recipe(tmp_path):
    out = cli("recipe=dora_demo", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "did you mean recipe=examples/dora_demo?" in out.stderr
    assert "examples/dora_demo, lora_qwen_decisions" in out.stderr and "sweeps/optuna_tiny" in out.stderr
    assert "did you mean recipe=lora_qwen_signals" in cli("recipe=lora_qwen_signal").stderr
