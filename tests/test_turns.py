"""Which tokens carry loss: every assistant turn of a multi-turn chat (or the last), weight 0 turns none, text
segments as flagged; the same mask through SFTTrainer as finetune/data/tokens.py builds, and perplexity on it."""
import pytest
from omegaconf import OmegaConf

from conftest import compose
from finetune.data.tokens import tokenize, trainable
from finetune.errors import DataError
from finetune.model import load_tokenizer
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
    """The mask survives TRL: the labels of the trainer's dataset are -100 everywhere but the answers."""
    from finetune.model import load_model
    from finetune.runner import make_trainer
    from finetune.config import sft_config
    tokenizer = load_tokenizer(compose().model)
    full, expected = tokenize({"messages": FOUR_TURNS}, tokenizer), tokenize({"messages": FOUR_TURNS[:3]}, tokenizer)
    cut = full["assistant_masks"].index(1) + 8  # inside the first answer, so the 4-turn chat is cut
    assert len(expected["input_ids"]) < cut + 20 < len(full["input_ids"])
    cfg = compose(f"training.max_length={cut + 20}")
    args = sft_config(OmegaConf.to_container(cfg.training, resolve=True), tmp_path)
    sample = {"messages": FOUR_TURNS}
    short = {"messages": FOUR_TURNS[:3]}
    model = load_model(cfg.model, None, use_cpu=True)
    from hydra.utils import instantiate
    trainer = make_trainer(cfg, args, model, None, instantiate(cfg.method, _convert_="all"),
                           {"train": [sample, short], "validation": [short]}, tokenizer)
    rows, n = trainer.train_dataset, cut + 20
    # the 4-turn chat is longer than max_length but its first answer starts inside it: kept, cut to max_length
    assert len(rows) == 2 and len(rows[0]["input_ids"]) == n
    assert rows[0]["labels"] == [i if m else -100 for i, m in zip(full["input_ids"][:n], full["assistant_masks"][:n])]
    assert rows[1]["labels"] == [i if m else -100 for i, m in zip(expected["input_ids"], expected["assistant_masks"])]


def test_rows_whose_answers_start_past_max_length_are_left_out():
    tokenizer = tokenizer_of("tiny")
    rows = [tokenize({"messages": FOUR_TURNS}, tokenizer), tokenize({"messages": FOUR_TURNS[:3]}, tokenizer)]
    first_answer = rows[0]["assistant_masks"].index(1)
    assert trainable(rows, first_answer + 1) == rows
    assert trainable(rows, first_answer) == []  # both start their first answer at the same token
    assert trainable(rows, None) == rows


def test_perplexity_scores_the_trained_turns():
    from finetune.eval.perplexity import Perplexity
    from finetune.model import load_model
    cfg = compose()
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, None, use_cpu=True)
    every = Perplexity(turns="all")(samples=[{"messages": FOUR_TURNS}], model=model, tokenizer=tokenizer)
    last = Perplexity(turns="last")(samples=[{"messages": FOUR_TURNS}], model=model, tokenizer=tokenizer)
    assert every["perplexity_tokens"] == sum(tokenize({"messages": FOUR_TURNS}, tokenizer)["assistant_masks"])
    assert last["perplexity_tokens"] == sum(tokenize({"messages": FOUR_TURNS}, tokenizer, "last")["assistant_masks"])
    assert (every["perplexity_turns"], last["perplexity_turns"]) == ("all", "last")
    assert every["perplexity_tokens"] > last["perplexity_tokens"] > 0
