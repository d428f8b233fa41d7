"""Which tokens carry loss: every assistant turn of a multi-turn chat (or the last), weight 0 turns none, text
segments as flagged; the same mask through SFTTrainer as finetune/data/tokens.py builds, and perplexity on it."""
import json

import pytest
from omegaconf import OmegaConf

from conftest import compose
from finetune.data.tokens import encode, encode_pieces, special_splitter, splits_at_lines, tokenize, trained_ranges
from finetune.errors import DataError
from finetune.train.model import load_tokenizer
from finetune.paths import CONF_DIR

FOUR_TURNS = [  # OpenAI's multi-turn fine-tuning example, shortened
    {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
    {"role": "user", "content": "What's the capital of France?"},
    {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."},
    {"role": "user", "content": "Who wrote 'Romeo and Juliet'?"},
    {"role": "assistant", "content": "Oh, just some guy named William Shakespeare."},
    {"role": "user", "content": "How far is the Moon from Earth?"},
    {"role": "assistant", "content": "Around 384,400 kilometers. Give or take."},
    {"role": "user", "content": "What's the boiling point of water?"},
    {"role": "assistant", "content": "100 degrees Celsius at sea level. Shocking."}]
ANSWERS = [m["content"] for m in FOUR_TURNS if m["role"] == "assistant"]


def tokenizer_of(preset):
    return load_tokenizer(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml"))


def trained_text(tokenizer, tokens) -> str:
    return tokenizer.decode([i for i, m in zip(tokens["input_ids"], tokens["assistant_masks"]) if m])


@pytest.mark.parametrize("preset", ["tiny", "smollm2_135m"])
def test_trained_token_ranges_are_the_tokens_whose_last_character_is_in_the_span(preset):
    """The Rust char_to_token shortcut gives the same tokens as the rule itself (a token trains when its last
    character lies in (start, end]), at spans starting and ending on words, trimmed spaces, digits, CJK and an
    emoji split over several byte tokens, and at the ends of the text."""
    from bisect import bisect_right
    tokenizer = tokenizer_of(preset)
    text = "<|im_start|>user\nBTC 43,123.45 涨了 🚀🚀 ok?<|im_end|>\n<|im_start|>assistant\n {\"signal\": \"BUY\"}<|im_end|>\n"
    encoding = encode(tokenizer, [text], False)[0]
    ends = [stop for _, stop in encoding.offsets]
    checked = 0
    for start in range(len(text) + 1):
        for end in range(start, len(text) + 1, 7):
            expected = (bisect_right(ends, start), bisect_right(ends, end))
            assert trained_ranges(encoding, len(text), [(start, end)]) == [expected], (start, end, text[start:end])
            checked += 1
    assert checked > 500


@pytest.mark.parametrize("preset", ["tiny", "smollm2_135m"])
def test_texts_encoded_by_lines_and_cached_pieces_are_the_whole_texts_encodings(preset):
    """A byte-level BPE's texts are cut at added tokens and lines and each piece encoded once across calls:
    ids, offsets and char_to_token are the whole text's, on random texts of words, blank lines, spaces before
    newlines, CRLF, digits, CJK and contractions."""
    import random
    backend = tokenizer_of(preset).backend_tokenizer
    assert splits_at_lines(backend)
    splitter = special_splitter(backend)
    alphabet = ["a", "Bc", " ", "\n", "\n\n", " \n", "\r\n", "\t", "1", "23", "4567", "é", "中文", "。", "'s", "'T",
                ":", "{", '"', "!!", "<|im_start|>", "<|im_end|>"]
    rnd = random.Random(0)
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40))) for _ in range(1500)]
    cache = {}
    for k in range(0, len(texts), 500):  # the second and third calls reuse the first's pieces
        for text, joined in zip(texts[k:k + 500], encode_pieces(backend, splitter, texts[k:k + 500], cache)):
            whole = backend.encode(text, add_special_tokens=False)
            assert (joined.ids, joined.offsets) == (whole.ids, whole.offsets), text
            assert [joined.char_to_token(i) for i in range(len(text))] == \
                [whole.char_to_token(i) for i in range(len(text))], text
    assert any("\n" in piece and piece.endswith("\n") for piece in cache)  # it did cut at lines


def test_a_sentencepiece_style_tokenizer_is_not_cut_at_lines():
    """Metaspace pre-tokenization merges across newlines: those texts are cut at added tokens only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(["Trend: bullish\nRSI: 30\n"] * 20, BpeTrainer(special_tokens=["<unk>", "<s>"]))
    assert not splits_at_lines(backend)
    assert special_splitter(backend)("a\nb<s>c") == ["a\nb", "<s>", "c"]


@pytest.mark.parametrize("preset, end", [("tiny", "<|im_end|>"), ("smollm2_135m", "<|im_end|>\n")])
def test_every_assistant_turn_carries_loss_and_nothing_else(preset, end):
    tokenizer = tokenizer_of(preset)
    tokens = tokenize({"messages": FOUR_TURNS}, tokenizer)
    # the answers and their end-of-turn token, in order: no system, user or role-header token
    assert trained_text(tokenizer, tokens) == "".join(answer + end for answer in ANSWERS)
    per_answer = [len(tokenizer(a + end, add_special_tokens=False)["input_ids"]) for a in ANSWERS]
    assert sum(tokens["assistant_masks"]) == sum(per_answer)
    last = tokenize({"messages": FOUR_TURNS}, tokenizer, turns="last")
    assert last["input_ids"] == tokens["input_ids"] and trained_text(tokenizer, last) == ANSWERS[-1] + end
    weighted = [dict(m, weight=0) if m["content"] == ANSWERS[1] else m for m in FOUR_TURNS]
    assert trained_text(tokenizer, tokenize({"messages": weighted}, tokenizer)) == \
        "".join(a + end for a in ANSWERS if a != ANSWERS[1])


def test_text_segments_train_as_flagged():
    tokenizer = tokenizer_of("tiny")
    tokens = tokenize({"segments": [{"text": "Question: 2+2? ", "train": False},
                                    {"text": "Answer: 4.", "train": True}]}, tokenizer)
    assert tokens["input_ids"][-1] == tokenizer.eos_token_id and tokens["assistant_masks"][-1] == 1
    assert trained_text(tokenizer, tokens).replace(tokenizer.eos_token, "").strip() == "Answer: 4."


def test_a_template_that_rewrites_earlier_turns_is_named():
    tokenizer = tokenizer_of("tiny")
    # a template that shows only the last user turn: turn 3 is rendered differently inside the whole chat
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role != 'user' or loop.revindex <= 2 %}"
                               "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"turn 3 .*model\.chat_template"):
        tokenize({"messages": FOUR_TURNS}, tokenizer)


def test_sft_trainer_trains_exactly_the_mask(tmp_path):
    """Through the pipeline and SFTTrainer: the labels of the trainer's dataset are -100 everywhere but the
    answers, a row longer than max_length is cut, one whose answers all start past it is left out."""
    from hydra.utils import instantiate
    from finetune.config import sft_config
    from finetune.data.pipeline import prepare
    from finetune.train.model import load_model
    from finetune.train.trainers import build as make_trainer
    tokenizer = load_tokenizer(compose().model)
    long_system = [{"role": "system", "content": "Marv " * 200}] + FOUR_TURNS[1:3]
    chats = [FOUR_TURNS] + [FOUR_TURNS[:3]] + [long_system] + [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(7)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in chats))
    full = tokenize({"messages": FOUR_TURNS}, tokenizer)
    n = full["assistant_masks"].index(1) + 28  # inside the 4-turn chat, past its first answer's start
    assert tokenize({"messages": long_system}, tokenizer)["assistant_masks"].index(1) > n
    cfg = compose("dataset=generic", f"dataset.path={path}", "dataset.val_size=0.1", "dataset.test_size=0.1",
                  "dataset.split=random", f"training.max_length={n}")
    splits, stats = prepare(cfg.dataset, tokenizer, None, seed=0, max_length=n)
    train = [s["messages"] for s in splits["train"]]
    assert FOUR_TURNS in train and long_system in train, "the seed puts both in train: pick another if not"
    assert stats["splits"]["train"]["untrainable"] == 1 and stats["splits"]["train"]["over_max_length"] >= 2
    args = sft_config(OmegaConf.to_container(cfg.training, resolve=True), tmp_path / "checkpoints")
    trainer = make_trainer(cfg, args, load_model(cfg.model, None, use_cpu=True), None,
                           instantiate(cfg.method, _convert_="all"), splits, stats, tokenizer)
    rows = trainer.train_dataset
    assert len(rows) == len(train) - 1  # the long-system chat trains on nothing within max_length: left out
    expected = [tokenize({"messages": m}, tokenizer) for m in train if m != long_system]
    assert [row["labels"] for row in rows] == [
        [i if m else -100 for i, m in zip(e["input_ids"][:n], e["assistant_masks"][:n])] for e in expected]
    four = next(row for row in rows if len(row["input_ids"]) == n)
    assert sum(label != -100 for label in four["labels"]) == sum(full["assistant_masks"][:n])


def test_perplexity_scores_the_trained_turns():
    from finetune.eval.perplexity import Perplexity
    from finetune.train.model import load_model
    cfg = compose()
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, None, use_cpu=True)
    every = Perplexity(turns="all")(samples=[{"messages": FOUR_TURNS}], model=model, tokenizer=tokenizer)
    last = Perplexity(turns="last")(samples=[{"messages": FOUR_TURNS}], model=model, tokenizer=tokenizer)
    assert every["perplexity_tokens"] == sum(tokenize({"messages": FOUR_TURNS}, tokenizer)["assistant_masks"])
    assert last["perplexity_tokens"] == sum(tokenize({"messages": FOUR_TURNS}, tokenizer, "last")["assistant_masks"])
    assert (every["perplexity_turns"], last["perplexity_turns"]) == ("all", "last")
    assert every["perplexity_tokens"] > last["perplexity_tokens"] > 0


def test_text_and_multi_turn_data_train_end_to_end(tmp_path):
    """A folder's plain text (axolotl segments) and a multi-turn chat file each train on the tiny model and
    their held-out perplexity falls; the chat run's perplexity scores every assistant turn."""
    from conftest import FAST
    from finetune.runner import run
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"segments": [{"label": False, "text": f"Note {i}: "},
                                                     {"label": True, "text": "buy the dip, sell the rip. " * 3}]})
                            + "\n" for i in range(40)))
    result = run(compose("dataset=generic", f"dataset.path={text}", "eval=perplexity", *FAST), tmp_path / "text")
    assert result.stats["kind"] == "text"
    assert result.metrics["tuned"]["perplexity"] < 0.5 * result.metrics["base"]["perplexity"], result.metrics
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": FOUR_TURNS[:1] + [
        dict(m, content=f"{m['content']} ({i})") if m["role"] == "user" else m for m in FOUR_TURNS[1:]]}) + "\n"
        for i in range(40)))
    result = run(compose("dataset=generic", f"dataset.path={chats}", "eval=perplexity", *FAST), tmp_path / "chat")
    tuned, base = result.metrics["tuned"], result.metrics["base"]
    assert tuned["perplexity"] < 0.5 * base["perplexity"] and tuned["perplexity_turns"] == "all", result.metrics
    answer_tokens = sum(tokenize(json.loads(line), result.tokenizer)["assistant_masks"].count(1)
                        for line in (tmp_path / "chat" / "data" / "test.jsonl").read_text().splitlines())
    assert tuned["perplexity_tokens"] == answer_tokens


def test_generation_metrics_refuse_text_samples(tmp_path):
    from finetune.errors import ConfigError
    from finetune.runner import run
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match="eval.metrics classification.* text samples .* eval=perplexity"):
        run(compose("dataset=generic", f"dataset.path={text}", "dry_run=true"), tmp_path / "run")
