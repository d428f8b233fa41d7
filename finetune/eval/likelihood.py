"""Scoring by likelihood: which label does the model find likeliest as its answer? No generation.

For a held-out sample each candidate label is swapped into the gold answer's layout (`{"signal": "SELL", ...`
for a gold BUY) and scored by the log-probability of the tokens from where the candidates differ through the
first token after the label (so "BUY" is not read as the start of "BUYER"). The prompt and the shared part of the
answer run through the model once per sample, in the same pass as the few tokens that differ, once per label:
an attention mask keeps each label's tokens from seeing the other labels'. The start every sample shares (the
system turn) runs once per call, and its KV cache is copied to each batch. The answer is the label with the highest
score, its confidence the softmax over the labels' scores, rendered as the task writes answers so the classification and backtest metrics read it as they read
generated ones:

    scores = label_scores(model, tokenizer, samples, tasks.get("signals"), ["BUY", "SELL", "HOLD"])
    # [{"BUY": -0.11, "SELL": -3.2, "HOLD": -2.5}, ...]
    likelihood_answers(model, tokenizer, samples, tasks.get("signals"), ["BUY", "SELL", "HOLD"])
    # ['{"signal": "BUY", "confidence": 0.9}', ...]

Used as an eval mode (`eval.scoring=likelihood`) and, on the validation split, to keep the checkpoint with the
best macro-F1 (finetune/eval/checkpoint.py). A sample without a gold answer that states its label is scored in
the layout `task.render` writes.
"""
import copy
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


def common_prefix(sequences: list[list[int]]) -> list[int]:
    """The longest token prefix all sequences share."""
    first = sequences[0]
    n = len(first)
    for other in sequences[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], other)) if a != b), min(n, len(other)))
    return first[:n]


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


def cache_keyword(model) -> str:
    """The keyword forward() takes a KV cache under: `cache` in newer transformers 5 releases, `past_key_values`
    before (5.23 still; the newer ones take the old name with a deprecation warning)."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prompt_learning(model) -> bool:
    """A prefix-, prompt- or p-tuning adapter: PEFT hands the model virtual tokens on every forward, so there is no
    cache to continue (likelihood scoring, the fast decoder) and no weights to merge."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def _batch_shared(model, pad: int, device, shared: list[list[int]], tails: list[list[list[int]]],
                  prefix: tuple | None = None) -> list[list[float]]:
    """Log-probabilities of each sample's tails in one pass: a row is the shared part followed by every label's tail
    (all but its last token, which is only scored), and an attention mask that lets each tail see the shared part
    and its own earlier tokens, not the other tails (each tail's positions continue from the shared part's). The
    scores are those of running each candidate whole, for the shared part's cost and a few tokens: no second pass
    on copies of a cache, which on CPU costs as much as a third of the first (a pass of 3 rows x 2 tokens through
    SmolLM2 is ~0.1 s beside ~0.25 s for a 120-token prompt). `prefix`: (k, the KV cache of the first k tokens every
    shared part starts with: `prefix_cache`), so that only the rest runs."""
    done, cache = prefix if prefix is not None else (0, None)
    shared = [p[done:] for p in shared]
    rows, spans = [], []  # spans: per sample, each tail's (first fed index, length fed) within the row
    for own, sample_tails in zip(shared, tails):
        row, where = list(own), []
        for tail in sample_tails:
            where.append((len(row), len(tail) - 1))
            row += tail[:-1]
        rows.append(row)
        spans.append(where)
    width = max(len(r) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)  # padding sees itself: no row of -inf
    for b, (own, row, where) in enumerate(zip(shared, rows, spans)):
        off = width - len(row)  # left-padded: every row ends at the last position
        ids[b, off:] = torch.tensor(row)
        k = len(own)
        positions[b, off:off + k] = torch.arange(done, done + k)
        allowed[b, off:off + k, off:off + k] = torch.ones(k, k, dtype=torch.bool).tril()
        for start, length in where:
            a = off + start
            positions[b, a:a + length] = torch.arange(done + k, done + k + length)
            allowed[b, a:a + length, off:off + k] = True
            allowed[b, a:a + length, a:a + length] = torch.ones(length, length, dtype=torch.bool).tril()
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    allowed = torch.cat([torch.ones(n, width, done, dtype=torch.bool), allowed], dim=-1)  # all see the prefix
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    keep = max(len(r) - len(p) + 1 for r, p in zip(rows, shared))  # the last shared position and every tail's
    extra = {}
    if cache is not None:
        extra[cache_keyword(model)] = cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(n)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=last(keep, device), **extra).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for b, (own, row, where, sample_tails) in enumerate(zip(shared, rows, spans, tails)):
        base = keep - (len(row) - len(own)) - 1  # the last shared position among the kept ones
        sample_scores = []
        for (start, length), tail in zip(where, sample_tails):
            at = base + 1 + start - len(own)  # the tail's first fed position among the kept ones
            score = logp[b, base, tail[0]].item()
            score += sum(logp[b, at + t, tail[t + 1]].item() for t in range(length))
            sample_scores.append(score)
        scores.append(sample_scores)
    return scores


@torch.no_grad()
def prefix_cache(model, device, shared: list[list[int]]) -> tuple | None:
    """(k, the KV cache of the first k tokens all of `shared` start with: the chat template's system turn and the
    opening of the user turn), leaving each at least one token of its own; None if they share none."""
    from transformers import DynamicCache
    k = min(len(common_prefix(shared)), min(len(s) for s in shared) - 1)
    if k <= 0:
        return None
    cache = DynamicCache()
    model(input_ids=torch.tensor([shared[0][:k]], device=device), use_cache=True, logits_to_keep=1,
          **{cache_keyword(model): cache})
    return k, cache


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
    rows = [label_tails(tokenizer, s, task, labels) for s in samples]
    whole = prompt_learning(model)  # virtual tokens on every forward: no cache to continue
    # the start several samples share is the template's; one sample alone would cache nearly all of its own
    prefix = None if whole or len(rows) < 2 else prefix_cache(model, device, [r[0] for r in rows])
    result = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        shared, tails = [r[0] for r in batch], [r[1] for r in batch]
        scores = (_batch_whole(model, pad, device, shared, tails) if whole else
                  _batch_shared(model, pad, device, shared, tails, prefix))
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
