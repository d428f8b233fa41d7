"""trade_signals builder: the trades-signals join and filters, both label rules, confidence, and named errors."""
import json
import logging
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.trade_signals import build
from finetune.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "trades.db"
TRADES = ("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, entry_price REAL, "
          "exit_price REAL, pnl_percent REAL, action_taken TEXT, position_size REAL, leverage REAL, status TEXT, "
          "note TEXT)")
SIGNALS = ("CREATE TABLE signals (id INTEGER PRIMARY KEY, timestamp TEXT, market_data TEXT, ai_signal TEXT, "
           "signal_confidence REAL, provider TEXT)")


def make_db(path, trades=(), signals=(), schema=(TRADES, SIGNALS)):
    """trades: (timestamp, symbol, entry, exit, pnl, action, status); signals: (timestamp, market_data, ai, conf)."""
    con = sqlite3.connect(path)
    for statement in schema:
        con.execute(statement)
    con.executemany("INSERT INTO trades (timestamp, symbol, entry_price, exit_price, pnl_percent, action_taken, "
                    "position_size, leverage, status, note) VALUES (?, ?, ?, ?, ?, ?, 100, 2, ?, 'x')", trades)
    con.executemany("INSERT INTO signals (timestamp, market_data, ai_signal, signal_confidence, provider) "
                    "VALUES (?, ?, ?, ?, 'deepseek')", signals)
    con.commit()
    con.close()
    return path


def snap(rsi=50.0, trend="neutral", strength=0.3, **extra):
    """Nested market_data (indicators under "technical")."""
    return json.dumps({"symbol": "BTC/USDT", "price": 50000, "change_percent": 2.5,
                       "technical": {"rsi": rsi, "macd_state": "golden_cross", "trend_direction": trend,
                                     "trend_strength": strength, "atr_percent": 2.5, "bb_position": 50}, **extra},
                      ensure_ascii=False)


def test_join_filters_and_one_sample(tmp_path):
    db = make_db(tmp_path / "trades.db", [
        ("2024-03-05 09:00:00", "BTC/USDT", 50000, 53050, 6.1, "BUY", "closed"),
        ("2024-03-05 10:00:00", "BTC/USDT", 50000, None, None, "BUY", "open"),       # open: SQL filters it
        ("2024-03-05 11:00:00", "BTC/USDT", 50000, 50100, None, "BUY", "closed"),    # never settled
        ("2024-03-05 12:00:00", "ETH/USDT", 3000, 2800, 6.6, "做空", "CLOSED"),        # no signal row
        ("2024-03-05 13:00:00", "ETH/USDT", 3000, 2800, 6.6, "做空", "CLOSED"),
    ], [
        ("2024-03-05 09:00:00", snap(28.4, "bullish", 0.65, volume_ratio=1.4), "BUY", 72),
        ("2024-03-05 10:00:00", snap(), "HOLD", 55),
        ("2024-03-05 13:00:00", json.dumps({"rsi": "71.2", "trend": "下跌", "trend_strength": 0.2}), None, None),
        ("2024-03-05 14:00:00", snap(), "HOLD", 55),                                # a signal with no trade
    ])
    built = build(db)
    assert built.dropped == {"not_closed": 1, "null_pnl": 1, "no_signal": 1}
    first, second = built.samples
    assert first["messages"] == [
        {"role": "system", "content": "You are a crypto trading assistant. Answer with a JSON signal and confidence."},
        {"role": "user", "content": "Symbol: BTC/USDT\nPrice: 50000\nChange 24h: 2.5\nRSI: 28.4\nMACD: golden_cross\n"
                                    "Trend: bullish\nTrend strength: 0.65\nATR%: 2.5\nBB position: 50\n"
                                    "Volume ratio: 1.4"},
        {"role": "assistant", "content": '{"signal": "BUY", "confidence": 0.72}'}]
    assert first["label"] == "BUY" and first["timestamp"] == "2024-03-05T09:00:00"
    assert first["meta"] == {"trade_id": 1, "symbol": "BTC/USDT", "pnl_percent": 6.1, "entry_price": 50000.0,
                             "exit_price": 53050.0, "action_taken": "BUY", "direction": "long",
                             "return_percent": 6.1}
    # a flat snapshot with Chinese trend words; a profitable short is a SELL; the long-side return flips
    assert second["messages"][1]["content"] == "Symbol: ETH/USDT\nRSI: 71.2\nTrend: bearish\nTrend strength: 0.2"
    assert second["label"] == "SELL"
    assert second["meta"]["direction"] == "short" and second["meta"]["return_percent"] == -6.6
    # no ai_signal/confidence: the indicator rule says SELL (RSI 71.2 > 65, bearish): 0.6 + 6.2 / 100
    assert json.loads(second["messages"][2]["content"]) == {"signal": "SELL", "confidence": 0.66}
    assert second["meta"].keys() == first["meta"].keys()


@pytest.mark.parametrize("pnl, action, entry, exit_, loss_label, label", [
    (6.0, "open_long", 100, 106, "opposite", "BUY"),
    (6.0, "short", 100, 94, "opposite", "SELL"),
    (-4.0, "BUY", 100, 96, "opposite", "SELL"),   # a losing long: the short side made the money
    (-4.0, "卖出", 100, 104, "opposite", "BUY"),
    (-4.0, "BUY", 100, 96, "HOLD", "HOLD"),
    (4.9, "BUY", 100, 104.9, "opposite", "HOLD"),  # too small a move for the risk
    (-2.9, "SELL", 100, 102.9, "opposite", "HOLD"),
    (8.0, "观察", 100, 92, "opposite", "SELL"),     # unknown action: price fell and it made money -> a short
    (8.0, None, 100, 108, "opposite", "BUY"),
])
def test_pnl_label_rule(tmp_path, pnl, action, entry, exit_, loss_label, label):
    db = make_db(tmp_path / "t.db", [("2024-01-01T00:00:00", "BTC", entry, exit_, pnl, action, "closed")],
                 [("2024-01-01T00:00:00", snap(), None, None)])
    assert [s["label"] for s in build(db, loss_label=loss_label).samples] == [label]


def test_unknown_direction_names_row_and_column(tmp_path):
    db = make_db(tmp_path / "t.db", [("2024-01-01", "BTC", None, None, 6.0, "观察", "closed"),
                                     ("2024-01-02", "BTC", 100, 106, 6.0, "BUY", "closed")],
                 [("2024-01-01", snap(), None, None), ("2024-01-02", snap(), None, None)])
    with pytest.raises(DataError) as e:
        build(db)
    assert str(e.value).startswith("t.db: table 'trades' row id 1, column 'action_taken': '观察' is neither")
    built = build(db, skip_bad_rows=True)
    assert built.dropped == {"unknown_direction": 1} and len(built.samples) == 1
    # the indicator rule needs no direction
    assert [s["meta"]["direction"] for s in build(db, label_rule="indicators").samples] == [None, "long"]


@pytest.mark.parametrize("rsi, trend, strength, label, confidence", [
    (30, "bullish", 0.2, "BUY", 0.65),
    (70, "bearish", 0.2, "SELL", 0.65),
    (50, "up", 0.8, "BUY", 0.7),        # strong trend: 0.5 + 0.8 / 4
    (50, "bearish", 0.8, "SELL", 0.7),
    (30, "bearish", 0.5, "HOLD", 0.55),
    (50, "neutral", 0.9, "HOLD", 0.55),
])
def test_indicator_rule(tmp_path, rsi, trend, strength, label, confidence):
    db = make_db(tmp_path / "t.db", [("2024-01-01", "BTC", 100, 90, -10.0, "BUY", "closed")],
                 [("2024-01-01", snap(rsi, trend, strength), None, None)])
    sample = build(db, label_rule="indicators").samples[0]
    assert sample["label"] == label
    assert json.loads(sample["messages"][2]["content"]) == {"signal": label, "confidence": confidence}


def test_indicator_rule_needs_its_indicators(tmp_path):
    db = make_db(tmp_path / "t.db", [("2024-01-01", "BTC", 100, 106, 6.0, "BUY", "closed")],
                 [("2024-01-01", json.dumps({"price": 100, "trend_direction": "bullish", "trend_strength": 0.9}),
                   None, None)])
    with pytest.raises(DataError, match=r"^t.db: table 'signals' row id 1 \(trade id 1\), column 'market_data': "
                                        r"no 'rsi', which label_rule=indicators needs"):
        build(db, label_rule="indicators")
    assert build(db).samples[0]["messages"][1]["content"] == \
        "Symbol: BTC\nPrice: 100\nTrend: bullish\nTrend strength: 0.9"


def test_confidence_sources(tmp_path):
    trades = [(f"2024-01-0{i}", "BTC", 100, 106, 6.0, "BUY", "closed") for i in range(1, 5)]
    db = make_db(tmp_path / "t.db", trades, [
        ("2024-01-01", snap(30, "bullish", 0.2), "BUY", 75),      # percent -> 0.75
        ("2024-01-02", snap(30, "bullish", 0.2), "buy", 0.81),    # already a fraction
        ("2024-01-03", snap(30, "bullish", 0.2), "SELL", 90),     # the AI said SELL: its confidence is not BUY's
        ("2024-01-04", snap(50, "neutral", 0.2), None, None),     # rule says HOLD, label BUY: weakly backed
    ])
    assert [json.loads(s["messages"][2]["content"])["confidence"] for s in build(db).samples] == \
        [0.75, 0.81, 0.65, 0.5]


def test_invalid_market_data_json_names_table_row_and_column(tmp_path):
    db = make_db(tmp_path / "trades.db",
                 [("2024-01-01", "BTC", 100, 106, 6.0, "BUY", "closed"),
                  ("2024-01-02", "BTC", 100, 106, 6.0, "BUY", "closed"),
                  ("2024-01-03", "BTC", 100, 106, 6.0, "BUY", "closed"),
                  ("2024-01-04", "BTC", 100, 106, 6.0, "BUY", "closed")],
                 [("2024-01-01", "{'rsi': 30,", None, None), ("2024-01-02", "[1, 2]", None, None),
                  ("2024-01-03", json.dumps({"rsi": "n/a"}), None, None), ("2024-01-04", snap(), None, None)])
    with pytest.raises(DataError) as e:
        build(db)
    assert str(e.value).startswith("trades.db: table 'signals' row id 1 (trade id 1), column 'market_data': "
                                   "invalid JSON (")
    assert str(e.value).endswith("set dataset.skip_bad_rows=true")
    built = build(db, skip_bad_rows=True)
    assert built.dropped == {"bad_market_data": 2, "bad_indicator": 1}
    assert [s["meta"]["trade_id"] for s in built.samples] == [4]


def test_bad_pnl_and_timestamp_are_named(tmp_path):
    db = make_db(tmp_path / "t.db", [("2024-01-01", "BTC", 100, 106, "six", "BUY", "closed"),
                                     ("yesterday", "BTC", 100, 106, 6.0, "BUY", "closed"),
                                     ("2024-01-03", "BTC", 100, 106, 6.0, "BUY", "closed")],
                 [("2024-01-01", snap(), None, None), ("yesterday", snap(), None, None),
                  ("2024-01-03", snap(), None, None)])
    with pytest.raises(DataError, match=r"row id 1, column 'pnl_percent': 'six' is not a number"):
        build(db)
    assert build(db, skip_bad_rows=True).dropped == {"bad_pnl": 1, "bad_timestamp": 1}


def test_missing_column_names_what_was_found_and_columns_maps_it(tmp_path):
    schema = (TRADES.replace("pnl_percent", "pnl"), SIGNALS)
    con = sqlite3.connect(tmp_path / "t.db")
    for statement in schema:
        con.execute(statement)
    con.execute("INSERT INTO trades (timestamp, symbol, pnl, action_taken, status) "
                "VALUES ('2024-01-01', 'BTC', 6.0, 'BUY', 'closed')")
    con.execute("INSERT INTO signals (timestamp, market_data) VALUES ('2024-01-01', ?)", (snap(),))
    con.commit()
    con.close()
    with pytest.raises(DataError) as e:
        build(tmp_path / "t.db")
    assert str(e.value).startswith("t.db: table 'trades' has no column 'pnl_percent' (found: id, timestamp, "
                                   "symbol, entry_price, exit_price, pnl, action_taken,")
    built = build(tmp_path / "t.db", columns={"pnl_percent": "pnl", "entry_price": None, "signal_confidence": None})
    assert built.samples[0]["label"] == "BUY" and built.samples[0]["meta"]["entry_price"] is None


def test_names_from_config_are_validated_before_sql(tmp_path):
    db = make_db(tmp_path / "t.db")
    with pytest.raises(ConfigError, match="not a valid table or column name"):
        build(db, columns={"pnl_percent": 'pnl_percent" FROM trades; --'})
    with pytest.raises(ConfigError, match="not a valid table or column name"):
        build(db, trades_table="trades t")
    with pytest.raises(ConfigError, match=r"unknown key 'pnl' \(choices: timestamp, symbol,"):
        build(db, columns={"pnl": "pnl"})
    with pytest.raises(ConfigError, match=r"columns.market_data is required"):
        build(db, columns={"market_data": None})
    with pytest.raises(ConfigError, match="label_rule='rsi': choose pnl or indicators"):
        build(db, label_rule="rsi")
    with pytest.raises(DataError, match=r"^t.db: no table 'orders' \(found: signals, trades\)"):
        build(db, trades_table="orders")


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"^nope.db: file not found"):
        build(tmp_path / "nope.db")
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(DataError, match=r"^empty.db: no table 'trades' \(found: none: the database is empty\)"):
        build(tmp_path / "empty.db")
    (tmp_path / "text.db").write_text("timestamp,symbol\n" * 200)
    with pytest.raises(DataError, match=r"^text.db: cannot read the database \(file is not a database\)"):
        build(tmp_path / "text.db")
    with pytest.raises(DataError, match=r"^t.db: table 'trades' is empty"):
        build(make_db(tmp_path / "t.db"))
    db = make_db(tmp_path / "open.db", [("2024-01-01", "BTC", 100, None, None, "BUY", "open")],
                 [("2024-01-01", snap(), None, None)])
    with pytest.raises(DataError, match=r"^open.db: no samples left from 1 trades in 'trades' \(dropped: "
                                        r"\{'not_closed': 1\}\); check closed_status='closed'"):
        build(db)


def test_limit_keeps_the_most_recent_and_duplicate_signal_rows_use_the_first(tmp_path, caplog):
    trades = [(f"2024-01-0{i}", "BTC", 100, 106, 6.0, "BUY", "closed") for i in (3, 1, 2)]
    db = make_db(tmp_path / "t.db", trades, [("2024-01-01", snap(30, "bullish"), None, 80),
                                             ("2024-01-01", snap(80, "bearish"), None, 10),
                                             ("2024-01-02", snap(), None, 80), ("2024-01-03", snap(), None, 80)])
    with caplog.at_level(logging.WARNING):
        built = build(db)
    assert "1 trades matched more than one 'signals' row" in caplog.text
    assert [s["timestamp"][:10] for s in built.samples] == ["2024-01-01", "2024-01-02", "2024-01-03"]
    assert "RSI: 30" in built.samples[0]["messages"][1]["content"]
    assert [s["timestamp"][:10] for s in build(db, limit=2).samples] == ["2024-01-02", "2024-01-03"]


def test_sample_data_is_balanced_and_both_rules_agree():
    before = SAMPLE.read_bytes()
    by_pnl, by_rule = build(SAMPLE), build(SAMPLE, label_rule="indicators")
    assert SAMPLE.read_bytes() == before  # opened read-only
    counts = Counter(s["label"] for s in by_pnl.samples)
    assert len(by_pnl.samples) > 500 and min(counts.values()) > 0.3 * len(by_pnl.samples)
    assert [s["label"] for s in by_pnl.samples] == [s["label"] for s in by_rule.samples]
    assert {"not_closed", "null_pnl", "no_signal"} <= set(by_pnl.dropped)
    assert len({tuple(s["meta"]) for s in by_pnl.samples}) == 1
    directions = Counter(s["meta"]["direction"] for s in by_pnl.samples)
    assert directions["long"] > 100 and directions["short"] > 100
    # the long-side return agrees with BUY and SELL labels: what the backtest scores
    assert all(s["meta"]["return_percent"] > 3 for s in by_pnl.samples if s["label"] == "BUY")
    assert all(s["meta"]["return_percent"] < -3 for s in by_pnl.samples if s["label"] == "SELL")


@pytest.mark.parametrize("pnl, action, loss_label, chosen, rejected", [
    (6.0, "BUY", "opposite", "BUY", "SELL"),     # the move paid: the other side is punished
    (6.0, "SELL", "opposite", "SELL", "BUY"),
    (-4.0, "BUY", "opposite", "SELL", "BUY"),    # a losing long: the long it took is punished
    (-4.0, "BUY", "HOLD", "HOLD", "BUY"),
    (1.0, "SELL", "opposite", "HOLD", "SELL"),   # within the thresholds: trading it did not pay
])
def test_preference_pairs_reject_the_signal_the_outcome_punished(tmp_path, pnl, action, loss_label, chosen, rejected):
    db = make_db(tmp_path / "t.db", [("2024-03-05 09:00:00", "BTC/USDT", 100, 101, pnl, action, "closed")],
                 [("2024-03-05 09:00:00", snap(), None, 70)])
    [sample] = build(db, preference=True, loss_label=loss_label).samples
    assert json.loads(sample["messages"][-1]["content"]) == {"signal": chosen, "confidence": 0.7}
    assert json.loads(sample["rejected"]) == {"signal": rejected, "confidence": 0.7}
    assert "rejected" not in build(db, loss_label=loss_label).samples[0]
    [held] = build(db, preference=True, loss_label=loss_label, move_rejects="hold").samples
    assert json.loads(held["rejected"])["signal"] == ("HOLD" if chosen != "HOLD" else rejected)
    [balanced] = build(db, preference=True, loss_label=loss_label, move_rejects="balanced").samples  # trade id 1: odd
    assert balanced["rejected"] == held["rejected"]
    with pytest.raises(ConfigError, match="move_rejects='some': choose opposite, hold or balanced"):
        build(db, preference=True, move_rejects="some")
    with pytest.raises(ConfigError, match="preference=true .* needs label_rule=pnl"):
        build(db, preference=True, label_rule="indicators")


@pytest.mark.parametrize("pnl, action, signal, desirable", [
    (6.0, "BUY", "BUY", True),      # the long paid
    (0.5, "SELL", "SELL", True),    # a small win still beats 0.1 % of costs
    (0.05, "BUY", "BUY", False),    # a win the costs ate
    (-4.0, "SELL", "SELL", False),  # a losing short
])
def test_desirability_judges_the_signal_the_trade_took_after_costs(tmp_path, pnl, action, signal, desirable):
    db = make_db(tmp_path / "t.db", [("2024-03-05 09:00:00", "BTC/USDT", 100, 101, pnl, action, "closed")],
                 [("2024-03-05 09:00:00", snap(), None, 70)])
    [sample] = build(db, desirability=True).samples
    assert json.loads(sample["messages"][-1]["content"])["signal"] == signal == sample["label"]
    assert sample["desirable"] is desirable
    assert "desirable" not in build(db).samples[0]
    assert build(db, desirability=True, cost_percent=10.0).samples[0]["desirable"] is False
    with pytest.raises(ConfigError, match="desirability=true .* needs label_rule=pnl and preference=false"):
        build(db, desirability=True, preference=True)
    with pytest.raises(ConfigError, match=r"cost_percent=-1: a round-trip cost in percent"):
        build(db, desirability=True, cost_percent=-1)
