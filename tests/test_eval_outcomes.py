"""The outcome metric (finetune/eval/outcomes.py) and which held-out samples each metric of a suite sees."""
import json

import pytest

from finetune.eval.classification import Classification
from finetune.eval.outcomes import Outcomes
from finetune.eval.suite import call


def decision(action, desirable=None):
    sample = {"messages": [{"role": "user", "content": "BTC ..."},
                           {"role": "assistant", "content": json.dumps({"action": action})}], "label": action}
    if desirable is not None:
        sample["desirable"] = desirable
    return sample


def answer(action):
    return json.dumps({"action": action, "confidence": 0.7})


def test_rates_of_repeating_good_and_bad_decisions_by_hand():
    samples = [decision("BUY", True), decision("HOLD", True), decision("SELL", True), decision("CLOSE", True),
               decision("BUY", False), decision("HOLD", False)]
    outputs = [answer("BUY"), answer("HOLD"), "not json", answer("BUY"),  # repeats 2 of the 4 good ones
               answer("SELL"), answer("HOLD")]                           # and 1 of the 2 bad ones
    assert Outcomes("action")(samples=samples, outputs=outputs) == {
        "desirable_rate": 0.5, "undesirable_rate": 0.5, "outcome_margin": 0.0, "n_desirable": 4, "n_undesirable": 2}
    only_good = Outcomes("action")(samples=samples[:2], outputs=outputs[:2])
    assert only_good["desirable_rate"] == 1.0 and only_good["undesirable_rate"] is None
    assert only_good["outcome_margin"] is None
    assert Outcomes("action")(samples=[decision("BUY")], outputs=[answer("BUY")]) == {}  # no sample is marked
    with pytest.raises(ValueError, match=r"task='text' is not a labelled task"):
        Outcomes("text")


def test_an_undesirable_decision_is_no_gold_answer_for_the_other_metrics():
    """Classification scores the samples whose answer is wanted; the outcome metric sees them all."""
    samples = [decision("BUY", True), decision("HOLD", False), decision("SELL")]
    outputs = [answer("BUY"), answer("HOLD"), answer("SELL")]
    scores = call(Classification("action"), samples, outputs, None, None)
    assert scores["n_answers"] == 2 and scores["accuracy"] == 1.0
    assert call(Outcomes("action"), samples, outputs, None, None)["n_undesirable"] == 1
