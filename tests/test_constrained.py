"""Constrained decoding: every answer of even a random-init model follows the task's grammar and parses."""
import json
import re

import pytest

from conftest import FAST, compose
from finetune.errors import ConfigError
from finetune import tasks
from finetune.tasks.signals import ANSWER, parse_signal
from finetune.eval.suite import generate_answers
from finetune.train.model import load_model, load_tokenizer

CHATS = [[{"role": "user", "content": "BTC/USDT RSI 28.4, trend bullish"}],
         [{"role": "user", "content": "ETH/USDT RSI 71.0"}],
         [{"role": "user", "content": "SOL/USDT"}]]


def test_random_model_answers_follow_the_signal_grammar_in_a_batch():
    cfg = compose()
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, None, use_cpu=True)
    free = generate_answers(model, tokenizer, CHATS, 24, 3, progress=False)
    assert not any(parse_signal(text)[0] for text in free["texts"])  # unconstrained, a random model writes noise
    grammar = tasks.get("signals").grammar()
    answers = generate_answers(model, tokenizer, CHATS, 24, 3, progress=False, grammar=grammar)
    for text, stopped in zip(answers["texts"], answers["stopped"]):
        assert re.fullmatch(ANSWER, text), text
        signal, confidence = parse_signal(text)
        assert signal in ("BUY", "SELL", "HOLD") and 0 <= confidence <= 1 and stopped
        assert set(json.loads(text)) == {"signal", "confidence"}
    # one at a time gives the same answers: the mask is per row
    assert [generate_answers(model, tokenizer, [c], 24, 1, progress=False, grammar=grammar)["texts"][0]
            for c in CHATS] == answers["texts"]


def test_constrained_scores_sit_beside_the_free_ones(tmp_path):
    from finetune.runner import run
    result = run(compose("eval.constrained=true", *FAST), tmp_path)
    for side in ("base", "tuned"):
        scores = result.metrics[side]
        assert scores["constrained_parse_rate"] == 1.0 and "parse_rate" in scores
        assert "constrained_accuracy" in scores and "accuracy" in scores
    assert result.metrics["base"]["parse_rate"] == 0.0  # the random base never writes it freely
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["base"]["constrained_parse_rate"] == 1.0


def test_constrained_on_a_task_without_grammar_fails_before_data(tmp_path):
    from finetune.runner import run
    with pytest.raises(ConfigError, match="dataset.task=text has no answer grammar"):
        run(compose("recipe=qlora_style", "model=tiny", "training=cpu", "eval.constrained=true"), tmp_path)
    assert not (tmp_path / "data").exists()
