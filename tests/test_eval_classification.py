"""Classification metrics on six fixed answers, every headline number worked out by hand."""
import pytest

from finetune.errors import DataError
from finetune.eval.classification import Classification


def sample(label, pnl=None):
    return {"messages": [{"role": "user", "content": "RSI: 30"}, {"role": "assistant", "content": "x"}],
            "label": label, "timestamp": None, "meta": {"pnl_percent": pnl}}


GOLD = [("BUY", 6.0), ("BUY", -1.0), ("BUY", 2.0), ("SELL", -4.0), ("HOLD", -0.5), ("HOLD", 0.0)]
OUTPUTS = ['{"signal": "BUY", "confidence": 0.9}',    # right
           '{"signal": "BUY", "confidence": 0.8}',    # right
           "no idea",                                  # unparsed -> wrong
           '{"signal": "SELL", "confidence": 0.7}',   # right
           "信号：SELL，置信度：60%",                     # wrong (gold HOLD)
           '{"signal": "HOLD", "confidence": 0.5}']   # right
SAMPLES = [sample(label, pnl) for label, pnl in GOLD]


def test_signals_by_hand():
    m = Classification(task="signals")(samples=SAMPLES, outputs=OUTPUTS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["parse_rate"] == pytest.approx(5 / 6)
    # BUY: tp 2, predicted 2, support 3 -> P 1, R 2/3, F1 2*(2/3)/(5/3) = 0.8
    # SELL: tp 1, predicted 2, support 1 -> P 1/2, R 1, F1 2*(1/2)/(3/2) = 2/3
    # HOLD: tp 1, predicted 1, support 2 -> P 1, R 1/2, F1 2/3
    # macro F1 = (0.8 + 2/3 + 2/3) / 3 = 0.71111
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert m["per_class"]["BUY"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["SELL"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_class"]["HOLD"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["confusion_matrix"] == {"labels": ["BUY", "SELL", "HOLD"],
                                     "columns": ["BUY", "SELL", "HOLD", "unparsed"],
                                     "matrix": [[2, 0, 0, 1], [0, 1, 0, 0], [0, 1, 1, 0]]}
    assert m["majority_label"] == "BUY"
    assert m["majority_baseline"] == pytest.approx(3 / 6)
    # confidences 0.9 0.8 0.7 0.6 0.5: mean 0.7, population std sqrt((.04+.01+0+.01+.04)/5) = sqrt(0.02)
    assert m["confidence_mean"] == pytest.approx(0.7)
    assert m["confidence_std"] == pytest.approx(0.02 ** 0.5)
    # 10 bins, one answer each: |1-.9| + |1-.8| + |1-.7| + |0-.6| + |1-.5| = 1.7, / 5 answers = 0.34
    assert m["ece"] == pytest.approx(0.34)
    assert [b["count"] for b in m["calibration"]] == [1, 1, 1, 1, 1]
    bin1 = m["calibration"][1]
    assert bin1["bin"] == pytest.approx([0.6, 0.7]) and bin1["count"] == 1
    assert (bin1["accuracy"], bin1["confidence"]) == pytest.approx((0.0, 0.6))
    # directional answers: BUY +6 yes, BUY -1 no, SELL -4 yes, SELL -0.5 yes -> 3/4
    assert m["profitable_ratio"] == pytest.approx(0.75)
    assert m["n_directional"] == 4
    assert m["n_answers"] == 6


def test_ece_two_bins():
    # bins [0, .5) and [.5, 1]: all five in the upper one; accuracy 4/5, mean confidence 0.7 -> |0.8-0.7| = 0.1
    m = Classification(task="signals", bins=2)(samples=SAMPLES, outputs=OUTPUTS)
    assert m["ece"] == pytest.approx(0.1)
    (only,) = m["calibration"]
    assert only["bin"] == pytest.approx([0.5, 1.0]) and only["count"] == 5
    assert (only["accuracy"], only["confidence"]) == pytest.approx((0.8, 0.7))


def test_all_unparsed_and_no_returns():
    samples = [{**s, "meta": {}} for s in SAMPLES]
    m = Classification(task="signals")(samples=samples, outputs=["?"] * 6)
    assert (m["accuracy"], m["macro_f1"], m["parse_rate"]) == (0.0, 0.0, 0.0)
    assert m["confidence_mean"] is None and m["ece"] is None and m["calibration"] == []
    assert m["profitable_ratio"] is None and m["n_directional"] == 0
    assert [row[-1] for row in m["confusion_matrix"]["matrix"]] == [3, 1, 2]


def test_sentiment():
    samples = [sample(label) for label in ["positive", "negative", "neutral", "neutral"]]
    outputs = ["Positive", "negative", "positive", "the headline is neutral"]
    m = Classification(task="sentiment")(samples=samples, outputs=outputs)
    # right: 1, 2, 4 -> 3/4. positive: P 1/2 R 1 F1 2/3; negative: F1 1; neutral: P 1 R 1/2 F1 2/3
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["confidence_mean"] is None and "profitable_ratio" not in m


def test_action_json_and_unknown_action():
    samples = [sample(label) for label in ["BUY", "CLOSE", "HOLD"]]
    outputs = ['```json\n{"action": "buy", "symbol": "BTC", "confidence": 0.8}\n```',
               '{"action": "CLOSE", "confidence": 70}',
               '{"action": "open_long"}']                    # not one of the labels -> unparsed
    m = Classification(task="action")(samples=samples, outputs=outputs)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["parse_rate"] == pytest.approx(2 / 3)
    assert m["confidence_mean"] == pytest.approx(0.75)      # (0.8 + 0.70) / 2
    assert m["confusion_matrix"]["labels"] == ["BUY", "SELL", "HOLD", "CLOSE"]


def test_gold_label_outside_the_list_gets_a_row():
    m = Classification(task="signals")(samples=[sample("BUY"), sample("WAIT")], outputs=["BUY", "HOLD"])
    assert m["confusion_matrix"]["labels"] == ["BUY", "SELL", "HOLD", "WAIT"]
    assert m["confusion_matrix"]["matrix"][3] == [0, 0, 1, 0, 0]


def test_bad_inputs():
    with pytest.raises(DataError, match="held-out sample 2: 'label' is None"):
        Classification()(samples=[sample("BUY"), sample(None)], outputs=["BUY", "BUY"])
    with pytest.raises(ValueError, match="2 samples but 1 outputs"):
        Classification()(samples=[sample("BUY"), sample("BUY")], outputs=["BUY"])
    with pytest.raises(DataError, match="empty"):
        Classification()(samples=[], outputs=[])
    with pytest.raises(ValueError, match="task='signal'"):
        Classification(task="signal")
