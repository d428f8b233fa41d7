"""Samples -> what SFTTrainer trains on: token ids and a loss mask (`assistant_masks`), tokenized once.

Chat samples are rendered with the model's chat template. Every assistant turn carries loss by default
(`turns="all"`, as LLaMA-Factory and axolotl do); `turns="last"` trains the final answer only; a turn with
`"weight": 0` (OpenAI's per-turn weight) never does. System, user and tool turns never carry loss.

A turn's tokens are found without template markup of our own: the conversation up to turn i rendered with
`add_generation_prompt=True` is the text before the answer, the conversation up to and including turn i
is the text to its end (the template's end-of-turn token, EOS, included: the model learns to stop). Both
must be prefixes of the whole rendering; a template for which they are not (one that rewrites earlier
turns, e.g. drops past reasoning) is named in the error. The whole text is tokenized once and each token
whose last character lies inside an answer is trained: the same ids and mask TRL builds for a prompt/completion
pair, for any number of turns.

Text samples (`segments`) are tokenized as plain text with the tokenizer's special tokens and EOS at the
end; a segment with `"train": false` carries no loss.
"""
from finetune.errors import DataError

TURNS = ("all", "last")


def render(tokenizer, messages: list[dict], tools: list | None = None, **options) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **options)


def answer_spans(tokenizer, messages: list[dict], tools: list | None, turns: str) -> tuple[str, list[tuple]]:
    """The rendered conversation and the (start, end) character span of each assistant turn that trains."""
    if turns not in TURNS:
        raise DataError(f"dataset.train_turns={turns}: choose {' or '.join(TURNS)}")
    text = render(tokenizer, messages, tools)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistant[-1:] if turns == "last" else assistant
    spans = []
    for i in trained:
        if messages[i].get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = render(tokenizer, messages[:i + 1], tools)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(f"the chat template renders turn {i + 1} differently inside the whole conversation, so "
                            "its answer tokens cannot be found; set model.chat_template to a template that renders "
                            "each turn the same way (finetune/assets/templates: chatml, alpaca)")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize(sample: dict, tokenizer, turns: str = "all") -> dict:
    """{"input_ids": [...], "assistant_masks": [0/1 per token]} for one chat or text sample."""
    if "segments" in sample:
        text, spans, position = "", [], 0
        for segment in sample["segments"]:
            if segment["train"]:
                spans.append((position, position + len(segment["text"])))
            text += segment["text"]
            position = len(text)
        encoded = tokenizer(text, return_offsets_mapping=True)  # with the model's BOS, as TRL does for text
    else:
        text, spans = answer_spans(tokenizer, sample["messages"], sample.get("tools"), turns)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template has them
    ids, mask = list(encoded["input_ids"]), []
    for start, end in encoded["offset_mapping"]:
        mask.append(int(end > start and any(a < end <= b for a, b in spans)))  # its last character trains
    if "segments" in sample and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids.append(tokenizer.eos_token_id)
        mask.append(int(sample["segments"][-1]["train"]))
    return {"input_ids": ids, "assistant_masks": mask}


def trainable(rows: list[dict], max_length: int | None) -> list[dict]:
    """The rows that keep a trained token within `max_length` (TRL cuts each row to it, keeping the start); a row
    whose answers all start later would train on nothing, so it is left out here (the dry run counts them)."""
    return [row for row in rows if 1 in row["assistant_masks"][:max_length]]
