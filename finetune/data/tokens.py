"""Samples -> what SFTTrainer trains on: token ids and a loss mask (`assistant_masks`), tokenized once.

Chat samples are rendered with the model's chat template (with the sample's `tools`). Every assistant turn
carries loss by default (`turns="all"`, as LLaMA-Factory and axolotl do); `turns="last"` trains the final
answer only; a turn with `"weight": 0` (OpenAI's per-turn weight) never does. System, user and tool turns
never carry loss.

A turn's tokens are found without template markup of our own: the conversation up to turn i rendered with
`add_generation_prompt=True` is the text before the answer, the conversation up to and including turn i
is the text to its end (the template's end-of-turn token, EOS, included: the model learns to stop). Both
must be prefixes of the whole rendering; a template for which they are not (one that rewrites earlier
turns, e.g. drops past reasoning) is named in the error. The whole text is tokenized once and each token
whose last character lies inside an answer is trained: the same ids and mask TRL builds for a
prompt/completion pair, for any number of turns.

Text samples (`segments`) are tokenized as plain text with the tokenizer's special tokens and EOS at the
end; a segment with `"train": false` carries no loss.
"""
from bisect import bisect_right

from finetune.errors import DataError

TURNS = ("all", "last")


def template_name(tokenizer) -> str:
    return f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


def render(tokenizer, messages: list[dict], tools: list | None = None, **options) -> str:
    """apply_chat_template(tokenize=False); a template that cannot render the messages or tools is a DataError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **options)
    except Exception as e:  # jinja2's TemplateError, or what the template's raise_exception() raises
        what = "tools" if tools else "tool calls" if any(m.get("tool_calls") for m in messages) else "messages"
        raise DataError(f"{template_name(tokenizer)} cannot render these {what} ({' '.join(str(e).split())[:160]}); "
                        "set model.chat_template to a template that can (model.chat_template=chatml_tools for a "
                        "ChatML tokenizer with tool calls)") from None


def check_tools_rendered(tokenizer, text: str, messages: list[dict], tools: list | None) -> None:
    """A template that silently leaves tool calls or tools out would train on answers without them."""
    names = [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    names += [t["function"]["name"] for t in tools or []]
    missing = [name for name in names if name not in text]
    if missing:
        raise DataError(f"{template_name(tokenizer)} does not render tool calls or tools (the rendered sample "
                        f"lacks {missing[0]!r}), so they would not train; set model.chat_template to a template "
                        "that does (model.chat_template=chatml_tools for a ChatML tokenizer)")


def answer_spans(tokenizer, messages: list[dict], tools: list | None, turns: str) -> tuple[str, list[tuple]]:
    """The rendered conversation and the (start, end) character span of each assistant turn that trains."""
    if turns not in TURNS:
        raise DataError(f"dataset.train_turns={turns}: choose {' or '.join(TURNS)}")
    text = render(tokenizer, messages, tools)
    if tools or any(m.get("tool_calls") for m in messages):
        check_tools_rendered(tokenizer, text, messages, tools)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in assistant[-1:] if turns == "last" else assistant:
        if messages[i].get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        through = text if i == len(messages) - 1 else render(tokenizer, messages[:i + 1], tools)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(f"{template_name(tokenizer)} renders turn {i + 1} differently inside the whole "
                            "conversation, so its answer tokens cannot be found; set model.chat_template to a "
                            "template that renders each turn the same way (finetune/assets/templates: chatml, "
                            "alpaca)")
        spans.append((len(before), len(through)))
    return text, spans


def segment_spans(segments: list[dict]) -> tuple[str, list[tuple]]:
    text, spans = "", []
    for segment in segments:
        if segment["train"]:
            spans.append((len(text), len(text) + len(segment["text"])))
        text += segment["text"]
    return text, spans


def tokenize_many(samples: list[dict], tokenizer, turns: str = "all") -> list[dict]:
    """[{"input_ids", "assistant_masks"}] per sample, the texts tokenized in one batched call per kind."""
    out = [None] * len(samples)
    for plain_text in (False, True):
        picked = [i for i, s in enumerate(samples) if ("segments" in s) == plain_text]
        if not picked:
            continue
        prepared = [segment_spans(samples[i]["segments"]) if plain_text else
                    answer_spans(tokenizer, samples[i]["messages"], samples[i].get("tools"), turns) for i in picked]
        # a chat template writes its own special tokens; plain text gets the model's BOS, as TRL gives it
        encoded = tokenizer([text for text, _ in prepared], add_special_tokens=plain_text,
                            return_offsets_mapping=True)
        for i, (_, spans), ids, offsets in zip(picked, prepared, encoded["input_ids"], encoded["offset_mapping"]):
            ends, mask = [end for _, end in offsets], [0] * len(ids)
            for start, end in spans:  # the tokens whose last character is in (start, end]
                low, high = bisect_right(ends, start), bisect_right(ends, end)
                mask[low:high] = [1] * (high - low)
            ids = list(ids)
            if plain_text and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
                ids.append(tokenizer.eos_token_id)
                mask.append(int(samples[i]["segments"][-1]["train"]))
            out[i] = {"input_ids": ids, "assistant_masks": mask}
    return out


def tokenize(sample: dict, tokenizer, turns: str = "all") -> dict:
    """{"input_ids": [...], "assistant_masks": [0/1 per token]} for one chat or text sample."""
    return tokenize_many([sample], tokenizer, turns)[0]


def trainable(rows: list[dict], max_length: int | None) -> list[dict]:
    """The rows that keep a trained token within `max_length` (TRL cuts each row to it, keeping the start); a row
    whose answers all start later would train on nothing, so it is left out here (the dry run counts them)."""
    return [row for row in rows if 1 in row["assistant_masks"][:max_length]]
