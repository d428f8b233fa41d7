"""Parsing generated answers: our JSON formats, free forms (prose, Chinese), and garbage (never raises)."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.eval.answers import to_confidence
from finetune.tasks.action import parse_action
from finetune.tasks.label import parse_label
from finetune.tasks.signals import parse_signal

SENTIMENT = ["positive", "neutral", "negative"]


@pytest.mark.parametrize("text, expected", [
    ('{"signal": "BUY", "confidence": 0.72}', ("BUY", 0.72)),                  # our training format
    ('Sure:\n```json\n{"signal": "sell", "confidence": "80%"}\n```', ("SELL", 0.8)),  # fenced, lower, "80%"
    ('{"signal": "HOLD", "confidence": 64}', ("HOLD", 0.64)),                   # 64 > 1 -> percent
    ("BUY - 上涨趋势 + RSI健康，建议买入", ("BUY", None)),                         # Chinese prose, no confidence
    ("建议 BUY，置信度 75%", ("BUY", 0.75)),                                      # Chinese, confidence in %
    ("信号：SELL，置信度：80%，建议操作：观察", ("SELL", 0.8)),                       # Chinese, labelled fields
    ("Signal: hold (confidence 0.6)", ("HOLD", 0.6)),
    ("建议：卖出", ("SELL", None)),                                               # Chinese signal word
    ("**HOLD** for now", ("HOLD", None)),                                       # leading word in markdown
    ("I think the market will go up, so buy.", ("BUY", None)),                  # the only signal word
    ("BUY confidence 150%", ("BUY", 1.0)),                                      # clipped to [0, 1]
    ("SELL, confidence: -5", ("SELL", 0.0)),
])
def test_parse_signal_forms(text, expected):
    signal, confidence = parse_signal(text)
    assert signal == expected[0]
    assert confidence == pytest.approx(expected[1]) if expected[1] is not None else confidence is None


@pytest.mark.parametrize("text", [
    "", "   ", "the market is hard to read", "a buyer is holding",        # 'buy'/'hold' inside words
    "maybe up: buy? maybe down: sell?",                                   # two signals, none labelled
    '{"signal": "LONG", "confidence": 0.9}', "{{{{", '{"signal": ', "\x00\xff\ud7ff",
    pytest.param("[" * 5000, id="brackets"),
    pytest.param('{"a": ' + "[" * 100_000, id="deep-nesting"),             # must not raise RecursionError
])
def test_parse_signal_garbage(text):
    assert parse_signal(text)[0] is None


def test_parse_non_strings():
    assert parse_signal(None) == (None, None)
    assert parse_signal(42) == (None, None)
    assert parse_label(None, SENTIMENT) is None
    assert parse_action(b"{}") is None


@pytest.mark.parametrize("value, expected", [
    (0.72, 0.72), (72, 0.72), ("72%", 0.72), ("0.5", 0.5), (1, 1.0), (0, 0.0),
    ("high", None), (None, None), (True, None), (float("nan"), None), (float("inf"), None),
])
def test_to_confidence(value, expected):
    assert to_confidence(value) == pytest.approx(expected) if expected is not None else to_confidence(value) is None


@pytest.mark.parametrize("text, expected", [
    ("positive", "positive"),
    ("Negative.", "negative"),
    ('{"sentiment": "Neutral"}', "neutral"),
    ("neutral - neither clearly positive nor negative", "neutral"),  # leading label wins
    ("I would call this headline positive for the stock", "positive"),
    ("positively surprising", None),                                 # not the word itself
    ("could be positive or negative", None),                         # two labels, nothing leads
    ("", None),
])
def test_parse_label(text, expected):
    assert parse_label(text, SENTIMENT) == expected


def test_parse_action_json_in_prose_and_fences():
    text = ('好的，决策如下：\n```json\n{"action": "buy", "symbol": "BTC", "size": 60.0, "leverage": 2, '
            '"stop_loss": 0.02, "take_profit": 0.05, "confidence": 0.75, "reasoning": "趋势向上"}\n```\n以上。')
    action = parse_action(text)
    assert action == {"action": "BUY", "symbol": "BTC", "size": 60.0, "leverage": 2, "stop_loss": 0.02,
                      "take_profit": 0.05, "confidence": 0.75, "reasoning": "趋势向上"}
    # the first object without "action" is skipped, a broken one before it too
    assert parse_action('{"note": 1} {"action": ' + ' {"action": "CLOSE"}')["action"] == "CLOSE"
    assert parse_action("HOLD") is None
    assert parse_action('{"action": "HOLD"') is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise(text):
    signal, confidence = parse_signal(text)
    assert signal in (None, "BUY", "SELL", "HOLD")
    assert confidence is None or 0.0 <= confidence <= 1.0
    assert parse_label(text, SENTIMENT) in (None, *SENTIMENT)
    assert parse_action(text) is None or isinstance(parse_action(text), dict)
