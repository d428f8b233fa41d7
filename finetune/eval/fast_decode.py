"""Constrained greedy answers, fast: the answers `generate_answers(..., grammar=...)` gives, with fewer and shorter
forward passes. It is the latency path of a trading loop (one snapshot, one signal now) and of batches of them.

Three things make it fast:
- a prompt prefix cache: every signal prompt starts with the same tokens (the chat template's system turn and the
  opening of the user turn). Their KV cache is computed once (`PrefixDecoder(..., probes)`), and each request
  runs only its own remaining tokens on a copy of it;
- grammar fast-forward: where the grammar leaves no choice (`{"signal": "`, `", "confidence": `), llguidance's
  `compute_ff_tokens()` proposes the forced tokens and they run through the model in one pass together with the
  token before them, instead of one pass each;
- drafts from earlier answers: where the grammar leaves a choice, the commonest way earlier answers went on from the
  same tokens is tried in the same pass (`draft`). A signal answer of 16 tokens takes 6 passes with forced tokens
  alone, and 1-3 once the decoder has seen a few answers.

The answer stays the one greedy constrained decoding gives, token for token: every proposed token, forced or
drafted, is checked against the masked argmax of the logits at its position (the same pass gives those logits, as in
speculative decoding). A forced byte string can be cut into tokens in several ways the grammar all allows (`{"` +
`signal` or `{` + `"signal`), and llguidance proposes its canonical one. At the first proposed token greedy decoding
would not have chosen, the chosen token is taken instead and the rest of the proposal is masked out of the cache.
Once the grammar is complete, only a stop token can follow, so the answer ends there without a pass. `answers` runs
a batch together, one pass a step for the rows still answering; `answer` is a batch of one.

    decoder = PrefixDecoder(model, tokenizer, grammar, probes=[chat_a, chat_b])
    decoder.answer(chat, max_new_tokens=32)   # -> {"text": '{"signal": "BUY", "confidence": 0.72}', "tokens": 16,
                                              #     "stopped": True, "prompt_tokens": 57, "passes": 2}
    decoder.answers([chat_a, chat_b], 32)     # -> [{...}, {...}]
"""
import copy
from collections import Counter, deque

import torch

from finetune.eval.constrained import ll_tokenizer
from finetune.eval.likelihood import cache_keyword, common_prefix, last
from finetune.eval.suite import stop_ids


def render(tokenizer, chat: list[dict]) -> list[int]:
    """The prompt's token ids exactly as generate_answers tokenizes them."""
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PrefixDecoder:
    """Constrained greedy answers, one prompt at a time, for a model in eval mode (a PeftModel with LoRA-style
    adapters, merged or not, or a plain model; not prefix- or prompt-tuning, whose virtual tokens live in the cache).
    `probes`: two or more prompt chats whose shared start is the prefix to cache (e.g. two market prompts); none:
    no prefix cache. Not thread-safe: the caller serialises requests (SignalProvider holds its lock)."""

    def __init__(self, model, tokenizer, grammar: str, probes: list[list[dict]] = (), seen: int = 256):
        self.model, self.tokenizer, self.grammar = model, tokenizer, grammar
        self.stops = stop_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.cache_key = cache_keyword(model)  # `cache` or `past_key_values`, as this transformers names it
        self.prefix, self.cache = [], None
        self.seen: deque = deque(maxlen=seen)  # the last whole answers, token ids: `draft` guesses from them
        if len(probes) >= 2:
            self.prefix = common_prefix([render(tokenizer, chat) for chat in probes])
        if self.prefix:
            from transformers import DynamicCache
            self.cache = DynamicCache()
            with torch.no_grad():
                self.model(input_ids=torch.tensor([self.prefix], device=self.device), use_cache=True,
                           logits_to_keep=1, **{self.cache_key: self.cache})

    def propose(self, matcher) -> list[int]:
        """The tokens to try ahead of the model: llguidance's canonical tokens for the bytes the grammar forces."""
        return matcher.compute_ff_tokens()

    def draft(self, answer: list[int]) -> list[int]:
        """Tokens to try after `answer` (the answer so far, forced tokens included) where the grammar leaves a
        choice: the commonest way earlier answers that began the same way went on. A trading loop's answers repeat
        (the same label, a confidence among a few), so one pass often checks a whole answer; a wrong guess costs
        a few more positions in a pass the model runs anyway."""
        n = len(answer)
        tails = Counter(tuple(past[n:]) for past in self.seen if len(past) > n and past[:n] == answer)
        return list(tails.most_common(1)[0][0]) if tails else []

    def remember(self, answer: list[int], stopped: bool) -> None:
        if stopped:  # only whole answers: a draft from a cut one would stop short
            self.seen.append(answer)

    def choose(self, logits: torch.Tensor, matcher, mask) -> int:
        """The masked argmax, as GrammarLogits masks a row: a complete (or failed) answer allows only stop ids."""
        import llguidance.torch as llt
        if matcher.is_stopped() or matcher.is_error():
            allowed = torch.full_like(logits, float("-inf"))
            allowed[self.stops] = logits[self.stops]
            return int(allowed.argmax())
        llt.fill_next_token_bitmask(matcher, mask, 0)
        row = logits.clone().unsqueeze(0)
        llt.apply_token_bitmask_inplace(row, mask.to(row.device))
        return int(row[0].argmax())

    def answer(self, chat: list[dict], max_new_tokens: int) -> dict:
        """{"text", "tokens", "stopped", "prompt_tokens"} as generate_answers gives them for this one chat, and
        "passes": the forward passes it took (the prefix's not counted)."""
        return self.answers([chat], max_new_tokens)[0]

    @torch.no_grad()
    def answers(self, chats: list[list[dict]], max_new_tokens: int) -> list[dict]:
        """`answer`'s dict for each chat, in order, the chats run together: one pass per step for the rows not done.

        Each row runs its own tokens after the prefix it shares with the cache, then per step the token chosen last,
        the tokens its grammar forces and a draft, and takes the masked argmax at each of their positions. Rows feed
        different numbers of tokens per step, so each step's feeds are left-padded to one width, and a row's padding
        and the proposed tokens greedy did not take stay in the cache masked out of its attention (a batched cache
        cannot be cut row by row). Each row's positions count only its own tokens, so its answer is the one it gets
        alone."""
        import llguidance
        import llguidance.torch as llt
        n_vocab = self.model.get_output_embeddings().weight.shape[0]
        tokenizer = ll_tokenizer(self.tokenizer, n_vocab, self.stops)
        matchers = [llguidance.LLMatcher(tokenizer, self.grammar) for _ in chats]
        if matchers[0].get_error():
            raise ValueError(f"grammar {self.grammar[:200]!r}: {matchers[0].get_error()}")
        mask = llt.allocate_token_bitmask(1, n_vocab)
        ids = [render(self.tokenizer, chat) for chat in chats]
        shared = 0
        if self.cache is not None:  # the prefix every row shares with the cache, and one id of each row left to run
            shared = min(min(len(common_prefix([self.prefix, row])) for row in ids), min(len(r) for r in ids) - 1)
        from transformers import DynamicCache
        cache = DynamicCache()
        if shared:
            cache = copy.deepcopy(self.cache)
            cut(cache, shared)
            cache.batch_repeat_interleave(len(chats))
        seen = torch.ones(len(chats), shared, dtype=torch.long, device=self.device)  # what each row attends to
        feeds = [row[shared:] for row in ids]
        answers = [[] for _ in chats]
        done = [False] * len(chats)
        stopped = [False] * len(chats)
        live = list(range(len(chats)))  # the rows in the cache's batch, in its order
        passes = 0
        while True:
            for r in live:
                matcher = matchers[r]
                if len(answers[r]) >= max_new_tokens:
                    done[r] = True
                elif matcher.is_stopped() or matcher.is_error():
                    done[r] = stopped[r] = True
            active = [r for r in live if not done[r]]
            if not active:
                break
            if len(active) < len(live):  # finished rows leave the batch: later passes run only the rows still going
                rows_left = torch.tensor([live.index(r) for r in active], device=self.device)
                cache.batch_select_indices(rows_left)
                seen, live = seen[rows_left], active
            proposals = [self.propose(matchers[r]) for r in live]
            proposals = [(p + self.draft(answers[r] + p))[:max_new_tokens - len(answers[r]) - 1]
                         for r, p in zip(live, proposals)]
            rows = [feeds[r] + p for r, p in zip(live, proposals)]
            width = max(len(row) for row in rows)
            keep = max(len(p) + 1 for p in proposals)
            step = torch.zeros(len(live), width, dtype=torch.long, device=self.device)
            for j, row in enumerate(rows):
                step[j, width - len(row):] = 1
            logits, cache = self.forward_batch(rows, width, seen, step, cache, keep)
            seen = torch.cat([seen, step], dim=1)
            passes += 1
            for j, (r, proposal) in enumerate(zip(live, proposals)):
                start = seen.shape[1] - len(proposal)  # where the proposal lies
                for i, row in enumerate(logits[j, keep - len(proposal) - 1:]):
                    token = self.choose(row, matchers[r], mask)
                    if token in self.stops:
                        done[r] = stopped[r] = True
                        break
                    answers[r].append(token)
                    matchers[r].consume_token(token)
                    if i < len(proposal) and token != proposal[i]:
                        seen[j, start + i:] = 0  # greedy leaves the proposal here: its later tokens are masked out
                        break
                feeds[r] = answers[r][-1:]
        for answer, stop in zip(answers, stopped):
            self.remember(answer, stop)
        return [{"text": self.tokenizer.decode(answer, skip_special_tokens=True).strip(), "tokens": len(answer),
                 "stopped": stop, "prompt_tokens": len(row), "passes": passes}
                for answer, stop, row in zip(answers, stopped, ids)]

    def forward_batch(self, rows: list[list[int]], width: int, seen: torch.Tensor, step: torch.Tensor, cache,
                      keep: int):
        """One pass of left-padded `rows` on `cache`: (float32 logits of the last `keep` positions, the cache)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=self.device)
        # each row's positions continue its own count of tokens: padding and masked-out proposals do not count
        positions = seen.sum(-1, keepdim=True) + (step.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=torch.cat([seen, step], dim=1), position_ids=positions,
                         use_cache=True, logits_to_keep=last(keep, self.device), **{self.cache_key: cache})
        return out.logits[:, -keep:].float(), cache


def cut(cache, length: int) -> None:
    """Keep the first `length` positions of `cache` (transformers 5's crop() takes how many to drop, negated)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)
