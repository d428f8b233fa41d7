"""Scoring by likelihood: which label does the model find likeliest as its answer? No generation.

For a held-out sample each candidate label is swapped into the gold answer's layout (`{"signal": "SELL", ...`
for a gold BUY) and scored by the log-probability of the tokens from where the candidates differ through the
first token after the label (so "BUY" is not read as the start of "BUYER"). The prompt and the shared part of the
answer run through the model once per sample; only the few tokens that differ run once per label, on a copy
of that KV cache. The answer is the label with the highest score, its confidence the softmax over the labels'
scores, rendered as the task writes answers so the classification and backtest metrics read it as they read
generated ones:

    scores = label_scores(model, tokenizer, samples, tasks.get("signals"), ["BUY", "SELL", "HOLD"])
    # [{"BUY": -0.11, "SELL": -3.2, "HOLD": -2.5}, ...]
    likelihood_answers(model, tokenizer, samples, tasks.get("signals"), ["BUY", "SELL", "HOLD"])
    # ['{"signal": "BUY", "confidence": 0.9}', ...]

Used as an eval mode (`eval.scoring=likelihood`) and, on the validation split, to keep the checkpoint with the
best macro-F1 (finetune/eval/checkpoint.py). A sample without a gold answer that states its label is scored in
the layout `task.render` writes.
"""
import math

import torch


def _surface(label: str, gold_text: str) -> str:
    """`label` in the case the gold answer writes its own label (BUY / buy / Buy)."""
    if gold_text.isupper():
        return label.upper()
    if gold_text.islower():
        return label.lower()
    if gold_text[:1].isupper():
        return label[:1].upper() + label[1:].lower()
    return label


def candidates(sample: dict, task, labels: list[str]) -> list[tuple[str, int]]:
    """The sample's gold answer with each label in its place, and where each candidate's label ends."""
    answer, gold = sample["messages"][-1]["content"], sample.get("label")
    span = task.span(answer, str(gold)) if gold is not None and isinstance(answer, str) else None
    if span is None:  # no gold answer stating its label: the task's own layout
        answer = task.render(labels[0])
        span = task.span(answer, labels[0])
    start, end = span
    out = []
    for label in labels:
        surface = _surface(label, answer[start:end])
        out.append((answer[:start] + surface + answer[end:], start + len(surface)))
    return out


def label_tails(tokenizer, sample: dict, task, labels: list[str]) -> tuple[list[int], list[list[int]]]:
    """(the token ids every candidate shares, each candidate's ids after them through the token after its label)."""
    prompt = tokenizer.apply_chat_template(sample["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = []
    for text, label_end in candidates(sample, task, labels):
        enc = tokenizer(prompt + text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        stop = len(prompt) + label_end
        last = next((i for i, (s, _) in enumerate(offsets) if s >= stop and i > 0), len(ids) - 1)
        full.append(ids[:last + 1])
    shared = 0
    while all(len(ids) > shared + 1 for ids in full) and len({ids[shared] for ids in full}) == 1:
        shared += 1
    return full[0][:shared], [ids[shared:] for ids in full]


def last(keep: int, device) -> torch.Tensor:
    """The last `keep` positions as an index tensor, for `logits_to_keep`. An int there slices the hidden states
    into a view that, for more than one row and a frozen lm head, torch's matmul does not fold into one matrix
    product: it expands the head to (rows, hidden, vocab) and copies it (a second of a 16-row pass of SmolLM2 on
    CPU, ~40 % of it). Indexing copies the few kept positions instead; the logits are the same. Negative, so one
    index serves passes of any length (generate()'s prompt pass and its one-token steps alike)."""
    return torch.arange(-keep, 0, device=device)


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch (ids, attention mask), so every row ends at the last position."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end of sequence (only masked positions get it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding gets 0 too)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prompt_learning(model) -> bool:
    """A prefix-, prompt- or p-tuning adapter: PEFT hands the model virtual tokens on every forward, so there is no
    cache to continue (likelihood scoring, the fast decoder) and no weights to merge."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def _batch_cached(model, pad: int, device, shared: list[list[int]], tails: list[list[list[int]]]) -> list[list[float]]:
    """Log-probabilities of each sample's tails: the shared part once, then every tail on a copy of its cache."""
    n_labels = len(tails[0])
    ids, mask = left_pad(shared, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=left_positions(mask), use_cache=True,
                logits_to_keep=last(1, device))  # an index, not 1: no copy of the head (`last`)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = [[first[b, tail[0]].item() for tail in sample_tails] for b, sample_tails in enumerate(tails)]
    rest = [tail[:-1] for sample_tails in tails for tail in sample_tails]  # fed to score tail[1:]
    width = max(len(r) for r in rest)
    if width == 0:
        return scores
    key = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # transformers >= 5.2x: cache
    cache = getattr(out, key)
    cache.batch_repeat_interleave(n_labels)
    tail_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rest], device=device)
    tail_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rest], device=device)
    lengths = mask.sum(-1).repeat_interleave(n_labels)
    positions = lengths[:, None] + torch.arange(width, device=device)[None, :]
    logits = model(input_ids=tail_ids, attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0), tail_mask], -1),
                   position_ids=positions, use_cache=True, **{key: cache}).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    flat = [tail for sample_tails in tails for tail in sample_tails]
    for row, tail in enumerate(flat):
        extra = sum(logp[row, t, tail[t + 1]].item() for t in range(len(tail) - 1))
        scores[row // n_labels][row % n_labels] += extra
    return scores


@torch.no_grad()
def _batch_whole(model, pad: int, device, shared: list[list[int]], tails: list[list[list[int]]]) -> list[list[float]]:
    """The same scores with every candidate run whole (prefix / prompt tuning)."""
    rows = [s + tail for s, sample_tails in zip(shared, tails) for tail in sample_tails]
    ids, mask = left_pad(rows, pad, device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    width, n_labels = ids.shape[1], len(tails[0])
    scores = [[0.0] * n_labels for _ in tails]
    for row, tail in enumerate(tail for sample_tails in tails for tail in sample_tails):
        start = width - len(tail)  # left-padded: the tail ends the row; token t is predicted at t - 1
        scores[row // n_labels][row % n_labels] = sum(logp[row, start + t - 1, tail[t]].item()
                                                      for t in range(len(tail)))
    return scores


def label_scores(model, tokenizer, samples: list[dict], task, labels: list[str], batch_size: int = 16) -> list[dict]:
    """Each sample's {label: log-probability of the model answering it}, in the gold answer's layout."""
    model.eval()
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    score_batch = _batch_whole if prompt_learning(model) else _batch_cached
    result = []
    for start in range(0, len(samples), batch_size):
        rows = [label_tails(tokenizer, s, task, labels) for s in samples[start:start + batch_size]]
        scores = score_batch(model, pad, device, [r[0] for r in rows], [r[1] for r in rows])
        result += [dict(zip(labels, row)) for row in scores]
    return result


def likelihood_answers(model, tokenizer, samples: list[dict], task, labels: list[str],
                       batch_size: int = 16) -> list[str]:
    """Each sample's likeliest label, with the softmax over the labels' scores as its confidence, as an answer."""
    answers = []
    for scores in label_scores(model, tokenizer, samples, task, labels, batch_size):
        best = max(scores, key=scores.get)
        total = sum(math.exp(v - scores[best]) for v in scores.values())
        answers.append(task.render(best, 1 / total))
    return answers
