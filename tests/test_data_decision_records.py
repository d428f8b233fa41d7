"""decision_records builder: a full record, outcome filtering, action names, and named errors."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.decision_records import build
from finetune.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "decisions.jsonl"


def record(label="excellent_decision", action="open_long", **output):
    """A full decision record, with a position and a history."""
    out = {"action": action, "symbol": "BTC", "size_usd": 60.0, "leverage": 2, "stop_loss_pct": 0.02,
           "take_profit_pct": 0.05, "reasoning": "上涨趋势，RSI健康", "confidence": 0.75}
    out.update(output)
    return {"conversation_id": "d-1", "timestamp": "2025-10-31T10:00:00Z",
            "input": {"market_data": {"BTC": {"price": 68500.0, "change_24h": 0.025, "trend": "bullish",
                                              "rsi": 62.5, "macd_signal": "positive"},
                                      "market_regime": "normal"},
                      "account_state": {"balance": 600.0, "positions": [], "permission_level": "L2"},
                      "recent_history": []},
            "output": out, "result": {"profitable": True, "pnl": 2.5, "duration_hours": 6}, "label": label,
            "reviewer": "extra keys are ignored"}


def write(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_full_record_becomes_one_sample(tmp_path):
    rec = record(confidence=75)
    rec["input"]["account_state"]["positions"] = [{"symbol": "ETH", "side": "short", "size_usd": 40}]
    rec["input"]["recent_history"] = [{"action": f"hold{i}"} for i in range(5)]
    built = build(write(tmp_path / "d.jsonl", rec))
    (sample,) = built.samples
    assert sample["messages"] == [
        {"role": "system", "content": "You are a crypto trading AI. Reply with one JSON decision."},
        {"role": "user", "content": "BTC: price 68500, change_24h 0.025, trend bullish, rsi 62.5, "
                                    "macd_signal positive\n"
                                    "market_regime: normal\n"
                                    'Account: balance 600, positions [{"symbol":"ETH","side":"short","size_usd":40}], '
                                    "permission_level L2\n"
                                    "History: action hold2 | action hold3 | action hold4"},
        {"role": "assistant", "content": '{"action":"BUY","symbol":"BTC","size":60,"leverage":2,'
                                         '"stop_loss":0.02,"take_profit":0.05,"confidence":0.75,'
                                         '"reasoning":"上涨趋势，RSI健康"}'}]
    assert sample["label"] == "BUY" and sample["timestamp"] == "2025-10-31T10:00:00"
    features = sample["meta"].pop("features")  # the record's plain fields, for the simple-model baseline
    assert sample["meta"] == {"line": 1, "conversation_id": "d-1", "symbol": "BTC", "outcome": "excellent",
                              "pnl": 2.5, "known_at": "2025-10-31T16:00:00"}  # the timestamp + duration_hours 6
    assert features == {"market.price": 68500, "market.change_24h": 0.025, "market.trend": "bullish",
                        "market.rsi": 62.5, "market.macd_signal": "positive", "market_regime": "normal",
                        "account.balance": 600, "account.permission_level": "L2", "positions": 1,
                        "position_side": "short"}
    assert built.dropped == {}


def test_train_outcomes_select_records(tmp_path):
    path = write(tmp_path / "d.jsonl", record("excellent_decision"), record("good"), record("acceptable_loss"),
                 record("bad_decision"), record("pending"), "", {"label": "bad_decision"})  # not checked further
    built = build(path)
    assert [s["meta"]["outcome"] for s in built.samples] == ["excellent", "good"]
    assert built.dropped == {"outcome_acceptable_loss": 1, "outcome_bad": 2, "outcome_pending": 1}
    assert [s["meta"]["line"] for s in build(path, train_outcomes=["acceptable_loss_decision", "good"]).samples] \
        == [2, 3]
    with pytest.raises(ConfigError, match=r"train_outcomes=\['great'\]: choose from excellent, good,"):
        build(path, train_outcomes=["great"])
    with pytest.raises(DataError, match=r"^d.jsonl: no samples left from 6 records \(dropped: .*'outcome_bad': 2"):
        build(path, train_outcomes="neutral")


def test_undesirable_outcomes_become_samples_marked_undesirable(tmp_path):
    """objective=kto's data from the JSONL alone: excellent / good desirable, bad undesirable, the rest left out."""
    path = write(tmp_path / "d.jsonl", record("excellent_decision"), record("good"), record("acceptable_loss"),
                 record("bad_decision", action="hold"), record("pending"))
    built = build(path, undesirable_outcomes=["bad"])
    assert [(s["meta"]["outcome"], s["label"], s["desirable"]) for s in built.samples] == [
        ("excellent", "BUY", True), ("good", "BUY", True), ("bad", "HOLD", False)]
    assert built.dropped == {"outcome_acceptable_loss": 1, "outcome_pending": 1}
    loss_is_bad = build(path, undesirable_outcomes=["bad", "acceptable_loss_decision"]).samples
    assert [s["desirable"] for s in loss_is_bad] == [True, True, False, False]
    assert all("desirable" not in s for s in build(path).samples)  # SFT data as before
    with pytest.raises(ConfigError, match=r"good is in both train_outcomes and undesirable_outcomes"):
        build(path, undesirable_outcomes=["good"])
    with pytest.raises(ConfigError, match=r"undesirable_outcomes=\['awful'\]: choose from excellent"):
        build(path, undesirable_outcomes=["awful"])


@pytest.mark.parametrize("raw, action", [("open_long", "BUY"), ("BUY", "BUY"), ("做多", "BUY"),
                                         ("open_short", "SELL"), ("Sell", "SELL"), ("hold", "HOLD"),
                                         ("观望", "HOLD"), ("close_long", "CLOSE"), ("平仓", "CLOSE")])
def test_action_names(tmp_path, raw, action):
    (sample,) = build(write(tmp_path / "d.jsonl", record(action=raw))).samples
    assert sample["label"] == action
    assert json.loads(sample["messages"][2]["content"])["action"] == action


def test_hold_answer_leaves_out_empty_fields_and_reasoning_is_cut(tmp_path):
    rec = record(action="hold", symbol=None, size_usd=None, leverage=None, stop_loss_pct=None,
                 take_profit_pct=None, confidence=0.6, reasoning="no clear edge " * 30)
    (sample,) = build(write(tmp_path / "d.jsonl", rec), max_reasoning_chars=20).samples
    assert json.loads(sample["messages"][2]["content"]) == {"action": "HOLD", "confidence": 0.6,
                                                            "reasoning": "no clear edge no cl…"}
    assert sample["meta"]["symbol"] is None


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "decisions.jsonl", record(), record(), '{"label": "good", "input": {', "[1, 2]",
                 record())
    with pytest.raises(DataError) as e:
        build(path)
    assert str(e.value).startswith("decisions.jsonl: line 3, malformed JSON (")
    assert str(e.value).endswith("set dataset.skip_bad_rows=true")
    built = build(path, skip_bad_rows=True)
    assert built.dropped == {"malformed_json": 2} and [s["meta"]["line"] for s in built.samples] == [1, 2, 5]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["output"].pop("action"), "line 1, field 'output.action' is missing"),
    (lambda r: r["input"].pop("market_data"), "line 1, field 'input.market_data' is missing"),
    (lambda r: r.pop("timestamp"), "line 1, field 'timestamp' is missing"),
    (lambda r: r.pop("label"), "line 1, field 'label' is missing"),
    (lambda r: r["output"].pop("symbol"), "line 1, field 'output.symbol' is missing, which a BUY decision needs"),
    (lambda r: r["output"].pop("size_usd"), "line 1, field 'output.size_usd' is missing, which a BUY decision"),
    (lambda r: r["output"].update(size_usd="lots"), "line 1, field 'output.size_usd': 'lots' is not a number"),
    (lambda r: r["output"].update(action="yolo"), "line 1, field 'output.action': unknown action 'yolo'"),
    (lambda r: r.update(label="great_decision"), "line 1, field 'label': unknown outcome 'great_decision'"),
    (lambda r: r.update(timestamp="soon"), "line 1, field 'timestamp': 'soon' is not a date-time"),
    (lambda r: r["input"].update(account_state="L2"), "line 1, field 'input.account_state' must be a JSON object"),
])
def test_bad_records_name_line_and_field(tmp_path, change, message):
    bad = record()
    change(bad)
    path = write(tmp_path / "d.jsonl", bad, record())
    with pytest.raises(DataError) as e:
        build(path)
    assert str(e.value).startswith(f"d.jsonl: {message}")
    built = build(path, skip_bad_rows=True)
    assert [s["meta"]["line"] for s in built.samples] == [2] and sum(built.dropped.values()) == 1


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"^nope.jsonl: file not found"):
        build(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"^empty.jsonl: no samples left from 0 records \(dropped: none, the file"):
        build(tmp_path / "empty.jsonl")
    (tmp_path / "gbk.jsonl").write_bytes(json.dumps(record(), ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match=r"^gbk.jsonl: not utf-8-sig text"):
        build(tmp_path / "gbk.jsonl")
    assert len(build(tmp_path / "gbk.jsonl", encoding="gbk").samples) == 1


def rule(user):
    """The sample generator's good decision, read back from the prompt."""
    market = re.search(r"trend (\w+), rsi ([\d.]+), macd (\w+)", user)
    trend, rsi, macd = market[1], float(market[2]), market[3]
    side = re.search(r'"side":"(\w+)"', user)
    if side:
        return "CLOSE" if (side[1], trend) in (("long", "bearish"), ("short", "bullish")) else "HOLD"
    if trend == "bullish" and macd == "up" and rsi < 70:
        return "BUY"
    if trend == "bearish" and macd == "down" and rsi > 30:
        return "SELL"
    return "HOLD"


def test_sample_data_is_learnable_and_balanced():
    built = build(SAMPLE)
    labels = Counter(s["label"] for s in built.samples)
    assert len(built.samples) > 200 and set(labels) == {"BUY", "SELL", "HOLD", "CLOSE"}
    assert min(labels.values()) > 0.2 * len(built.samples)
    assert all(rule(s["messages"][1]["content"]) == s["label"] for s in built.samples)
    assert {"outcome_bad", "outcome_acceptable_loss"} <= set(built.dropped)
    # the records left out are mostly the ones that broke the rule
    everything = build(SAMPLE, train_outcomes=["bad"]).samples
    assert sum(rule(s["messages"][1]["content"]) != s["label"] for s in everything) > 0.9 * len(everything)
    assert len({tuple(s["meta"]) for s in built.samples}) == 1
