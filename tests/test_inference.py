"""SignalProvider and `python -m finetune.predict` on a tiny trade-signals run: training's prompts, batch ==
one by one, the fallback, the threshold, the vote, and the CLI giving the Python API's answers."""
import json
import sqlite3

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose, single_torch_thread
from finetune.data.pipeline import read_jsonl
from finetune.errors import DataError
from finetune.tasks.signals import SIGNALS, parse_signal
from finetune.serving.inference import FALLBACK, Ensemble, SignalProvider, training_system_prompt, vote
from finetune.predict import main as predict_main, read_answer, read_inputs
from finetune.runner import run

# ~12 s on one CPU thread: enough for the tiny model to answer in the trained JSON form, with signals that
# differ between prompts (so the equality tests below compare real, varied answers). No evaluation or
# checkpoints during training: nothing here reads them.
TINY_RUN = ["dataset=trade_signals", "eval=perplexity", "training.max_steps=80", "training.learning_rate=8e-3",
            "training.per_device_train_batch_size=8", "training.eval_strategy=no", "training.save_strategy=no",
            "training.load_best_model_at_end=false", "eval.max_samples=4"]

# Snapshot shapes a trading loop sends: nested "technical", flat keys, Chinese trend words, no symbol.
SNAPSHOTS = [
    {"symbol": "BTC/USDT", "price": 52000, "change_percent": 2.5,
     "technical": {"rsi": 55, "trend_direction": "bullish", "trend_strength": 0.7, "atr_percent": 2.5}},
    {"symbol": "BTC/USDT", "price": 48000, "change_percent": -3.5,
     "technical": {"rsi": 28, "trend_direction": "bullish", "trend_strength": 0.4, "atr_percent": 3.5}},
    {"symbol": "ETH/USDT", "price": 3100.5, "rsi": 71.2, "macd_state": "death_cross", "trend": "下跌",
     "trend_strength": 0.8},
    {"price": 58000, "technical": {"rsi": 68, "trend_direction": "neutral", "trend_strength": 0.3, "bb_position": 88}},
]


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def tiny_signal_run(cache_dir):
    """One tiny trade-signals run per test session, shared by the inference, serve, A/B and merge tests."""
    run_dir = cache_dir / "signal-run"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        cfg = compose(*TINY_RUN)
        run(cfg, run_dir)
        (run_dir / ".hydra").mkdir(exist_ok=True)  # what `python -m finetune` writes; run() alone does not
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(cache_dir):
    return tiny_signal_run(cache_dir)


@pytest.fixture(scope="module")
def provider(run_dir):
    return SignalProvider.from_run(run_dir)


def stub(provider, answers, **options):
    """A provider on the same model whose generation answers `answers` (the parsing rules under test)."""
    fake = SignalProvider(provider.model, provider.tokenizer, **options)
    fake.generate = lambda chats, max_new_tokens=None: answers[:len(chats)]
    return fake


def held_out(run_dir, n: int) -> list[tuple[dict, str, dict]]:
    """(raw market_data, symbol, sample) of the first n held-out samples, read back from data/trades.db."""
    con = sqlite3.connect(f"file:{ROOT / 'data' / 'trades.db'}?mode=ro", uri=True)
    found = []
    for sample in read_jsonl(run_dir / "data" / "test.jsonl")[:n]:
        symbol, market_data = con.execute(
            "SELECT t.symbol, s.market_data FROM trades t JOIN signals s ON t.timestamp = s.timestamp "
            "WHERE t.id = ? ORDER BY s.id LIMIT 1", (sample["meta"]["trade_id"],)).fetchone()
        found.append((json.loads(market_data), symbol, sample))
    con.close()
    return found


def test_get_signal_gives_a_signal_and_a_confidence(run_dir, provider):
    before = provider.fallbacks
    cases = held_out(run_dir, 8)
    for market_data, symbol, _ in cases:
        text = provider.generate([provider.signal_prompt(market_data, symbol)])[0]
        signal, confidence = provider.get_signal(market_data, symbol)
        assert signal in SIGNALS and 0.0 <= confidence <= 1.0
        parsed = parse_signal(text)
        assert (signal, confidence) == (FALLBACK if None in parsed else parsed)
        before += None in parsed
    assert provider.fallbacks == before
    assert provider.fallbacks < len(cases) / 2  # the tiny model has learned the answer format on its prompts


def test_prompts_are_the_training_prompts(run_dir, provider):
    """The held-out samples' prompts, rebuilt from the raw market_data in data/trades.db."""
    for market_data, symbol, sample in held_out(run_dir, 5):
        assert provider.signal_prompt(market_data, symbol) == sample["messages"][:-1]
    assert provider.system_prompt == "You are a crypto trading assistant. Answer with a JSON signal and confidence."


def test_batch_gives_the_same_answers_as_one_by_one(provider):
    chats = [provider.signal_prompt(m) for m in SNAPSHOTS]  # prompts of different lengths: left padding
    one_by_one = [provider.generate([c])[0] for c in chats]
    assert provider.generate(chats) == one_by_one
    assert provider.get_signals(SNAPSHOTS) == [provider.read_signal(t) for t in one_by_one]
    with provider.model.disable_adapter():  # the base answers differ between prompts: padding changes none
        base = provider.generate(chats)
        assert base == [provider.generate([c])[0] for c in chats] and len(set(base)) > 1


def test_unparsable_answers_give_the_counted_fallback(provider):
    fake = stub(provider, ["the market is hard to read", '{"signal": "BUY", "confidence": 0.9}', "BUY, no number",
                           '```json\n{"signal": "sell", "confidence": "80%"}\n```'])
    assert fake.get_signals(SNAPSHOTS) == [FALLBACK, ("BUY", 0.9), FALLBACK, ("SELL", 0.8)]
    assert fake.fallbacks == 2
    # the real generation path: one new token cannot hold a signal and a confidence
    short = SignalProvider(provider.model, provider.tokenizer, max_new_tokens=1)
    assert short.get_signal(SNAPSHOTS[0]) == FALLBACK and short.fallbacks == 1


def test_confidence_threshold_turns_weak_signals_into_hold(provider):
    fake = stub(provider, ['{"signal": "BUY", "confidence": 0.65}', '{"signal": "SELL", "confidence": 0.8}',
                           '{"signal": "HOLD", "confidence": 0.3}', '{"signal": "SELL", "confidence": 0.7}'],
                confidence_threshold=0.7)
    assert fake.get_signals(SNAPSHOTS) == [("HOLD", 0.65), ("SELL", 0.8), ("HOLD", 0.3), ("SELL", 0.7)]
    assert fake.held == 1 and fake.fallbacks == 0


def test_confidence_weighted_vote():
    assert vote([("BUY", 0.8), ("SELL", 0.3), ("BUY", 0.5)]) == ("BUY", pytest.approx(1.3 / 1.6))
    assert vote([("BUY", 0.5), ("SELL", 0.5), ("HOLD", 0.5)]) == ("HOLD", pytest.approx(1 / 3))  # a tie -> HOLD
    assert vote([("BUY", 0.5), ("SELL", 0.5), ("HOLD", 0.2)]) == ("HOLD", pytest.approx(0.2 / 1.2))
    assert vote([("BUY", 0.4), ("BUY", 0.1), ("SELL", 0.5)]) == ("HOLD", 0.0)  # no decision: HOLD weighs 0
    assert vote([FALLBACK, FALLBACK]) == FALLBACK and vote([]) == FALLBACK  # fallbacks cast no vote
    with pytest.raises(ValueError, match="LONG"):
        vote([("LONG", 0.9)])


def test_ensemble_votes_over_providers(provider):
    a = stub(provider, ['{"signal": "BUY", "confidence": 0.9}', '{"signal": "SELL", "confidence": 0.6}'])
    b = stub(provider, ['{"signal": "BUY", "confidence": 0.5}', '{"signal": "BUY", "confidence": 0.3}'])
    c = stub(provider, ["garbage", '{"signal": "SELL", "confidence": 0.5}'])
    # snapshot 1: BUY 0.9 + 0.5, the garbage weighs 0 -> BUY 1.4 / 1.4 = 1.0
    # snapshot 2: SELL 0.6 + 0.5 = 1.1 against BUY 0.3 -> SELL 1.1 / 1.4 = 0.786, under the threshold 0.8 -> HOLD
    assert Ensemble([a, b, c], confidence_threshold=0.8).get_signals(SNAPSHOTS[:2]) == [
        ("BUY", 1.0), ("HOLD", pytest.approx(1.1 / 1.4))]
    assert c.fallbacks == 1


def test_training_system_prompt_follows_the_run_config():
    def cfg(builder):
        return OmegaConf.create({"dataset": {"builder": builder}})
    signals = "finetune.data.trade_signals.build"
    assert training_system_prompt(cfg({"_target_": signals, "system_prompt": "Be brief."})) == "Be brief."
    assert training_system_prompt(cfg({"_target_": signals, "system_prompt": None})) is None
    # not in the config: the builder's own default, which is what training wrote
    assert training_system_prompt(cfg({"_target_": "finetune.data.sentiment.build"})) \
        == "You classify the sentiment of financial news headlines."
    assert training_system_prompt(cfg({"_target_": "finetune.data.generic.build"})) is None


def test_predict_reads_every_input_form_and_names_bad_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "t1", "market_data": SNAPSHOTS[0]}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "RSI: 30"},
                                               {"role": "assistant", "content": "BUY"}]}) + "\n"
                    + json.dumps({"prompt": "Headline: Fed holds rates"}) + "\n", encoding="utf-8")
    records = read_inputs(path, "SYS")
    assert [(r["line"], r["id"], r["kind"], r["expected"]) for r in records] == [
        (1, "t1", "market_data", None), (3, None, "messages", "BUY"), (4, None, "prompt", None)]
    assert records[1]["chat"] == [{"role": "user", "content": "RSI: 30"}]
    assert records[2]["chat"] == [{"role": "system", "content": "SYS"},
                                  {"role": "user", "content": "Headline: Fed holds rates"}]
    assert records[0]["chat"][0] == {"role": "system", "content": "SYS"}
    for line, message in [('{"market_data": {"rsi": 30}}\n{"prompt": "x"', "in.jsonl: line 2: invalid JSON"),
                          ('{"text": "hi"}',
                           "line 1: needs one of 'market_data', 'messages' or 'prompt' \\(found: text\\)"),
                          ('{"market_data": {"colour": "red"}}', "line 1, field 'market_data': .*no known indicator"),
                          ('{"market_data": [1, 2]}', "line 1, field 'market_data': expected a JSON object"),
                          ('{"messages": [{"role": "user"}]}', "line 1, field 'messages', item 0"),
                          ('[1, 2]', "line 1: expected a JSON object")]:
        path.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=message):
            read_inputs(path, None)


def test_predict_reads_answers_by_task(provider):
    fake = stub(provider, [], task="sentiment")
    assert read_answer(fake, "auto", "prompt", "Negative.") == {"label": "negative"}
    assert read_answer(fake, "auto", "market_data", '{"signal": "SELL", "confidence": 0.7}') == {
        "signal": "SELL", "confidence": 0.7, "fallback": False}  # market data is always read as a signal
    assert read_answer(fake, "signals", "prompt", "no idea") == {"signal": "HOLD", "confidence": 0.0, "fallback": True}
    assert read_answer(fake, "generate", "market_data", "BUY") == {}
    fake.task = "action"
    assert read_answer(fake, "auto", "messages", '{"action": "buy", "size": 60}') == {
        "action": {"action": "BUY", "size": 60}}
    fake.task = "text"
    assert read_answer(fake, "auto", "prompt", "An essay.") == {}


def test_predict_cli_gives_the_python_api_answers(run_dir, provider, tmp_path, capsys):
    held_out = read_jsonl(run_dir / "data" / "test.jsonl")[0]
    lines = [{"id": f"s{i}", "market_data": m} for i, m in enumerate(SNAPSHOTS)]
    prompt = "Symbol: BTC/USDT\nRSI: 28"
    lines += [{"id": "gold", "messages": held_out["messages"]}, {"prompt": prompt}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                       encoding="utf-8")
    # in-process: the CLI's own code path, without a second interpreter importing torch and peft again
    predict_main([str(run_dir), "--input", str(tmp_path / "in.jsonl"),
                  "--output", str(tmp_path / "out" / "answers.jsonl"), "--batch-size", "3"])
    assert "6 answers written to" in capsys.readouterr().out
    rows = read_jsonl(tmp_path / "out" / "answers.jsonl")
    assert [(r["line"], r["id"]) for r in rows] == [(1, "s0"), (2, "s1"), (3, "s2"), (4, "s3"), (5, "gold"), (6, None)]
    assert [(r["signal"], r["confidence"]) for r in rows[:4]] == provider.get_signals(SNAPSHOTS)
    chats = [provider.signal_prompt(m) for m in SNAPSHOTS] + [
        held_out["messages"][:-1],
        [{"role": "system", "content": provider.system_prompt}, {"role": "user", "content": prompt}]]
    assert [r["answer"] for r in rows] == provider.generate(chats)
    # the run's task is signals: messages and prompts are read as signals too; the gold answer comes back
    assert rows[4]["expected"] == held_out["messages"][-1]["content"] and rows[5]["signal"] in SIGNALS
    assert all(r["fallback"] == (None in parse_signal(r["answer"])) for r in rows)
    with pytest.raises(SystemExit) as exit_:
        predict_main([str(run_dir), "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "x.jsonl")])
    assert exit_.value.code == 1 and "none.jsonl: file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
