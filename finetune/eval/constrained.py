"""Constrained decoding: answers that parse by construction, for tasks whose answer has a fixed shape.

A grammar (here a regular expression in llguidance's syntax) masks, at every generated token, the tokens
that cannot continue a valid answer; the end-of-turn token is allowed once the answer is complete. The model
still chooses among what is valid: a constrained answer is the model's most likely *well-formed* answer.

llguidance was chosen over xgrammar and outlines: a 3 MB wheel that installs no other package, regex / JSON
schema / Lark grammars, a token mask per row computed in Rust, and it is a guided-decoding backend of vLLM,
SGLang and llama.cpp, so a grammar written here carries over to them.

Which grammar a task's answer follows is the task's own (finetune/tasks/: `task.grammar()`, None for a task whose
answer has no fixed shape); this module holds the grammar to its rows during generate().
"""
import torch
from transformers import LogitsProcessor

_tokenizers: dict = {}  # id(tokenizer) -> (tokenizer, llguidance tokenizer): building one takes ~1 s


def ll_tokenizer(tokenizer, n_vocab: int, stops: list[int]):
    import llguidance.hf
    key = (id(tokenizer), n_vocab, tuple(stops))
    if key not in _tokenizers:
        _tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=stops))
    return _tokenizers[key][1]


class GrammarLogits(LogitsProcessor):
    """For one generate() call on a left-padded batch whose answers start at column `width`: each row's answer
    follows `grammar` (llguidance's: a task's `grammar()`, or LLMatcher.grammar_from_json_schema / _regex / _lark).
    A complete answer may only be followed by a stop id; rows that have stopped are left unmasked (generate()
    pads them anyway)."""

    def __init__(self, tokenizer, grammar: str, rows: int, width: int, stops: list[int]):
        self.tokenizer, self.grammar, self.rows, self.width, self.stops = tokenizer, grammar, rows, width, stops
        self.matchers = None

    def start(self, n_vocab: int) -> None:
        import llguidance
        import llguidance.torch as llt
        lltok = ll_tokenizer(self.tokenizer, n_vocab, self.stops)
        self.matchers = [llguidance.LLMatcher(lltok, self.grammar) for _ in range(self.rows)]
        error = self.matchers[0].get_error()
        if error:
            raise ValueError(f"grammar {self.grammar[:200]!r}: {error}")
        self.mask = llt.allocate_token_bitmask(self.rows, n_vocab)  # int32 words, bit i of word w: token 32 w + i
        self.ended = [False] * self.rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import llguidance.torch as llt
        if self.matchers is None:
            self.start(scores.shape[-1])
        elif input_ids.shape[1] > self.width:  # the token each row chose last step
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self.ended[row]:
                    continue
                if token in self.stops:
                    self.ended[row] = True
                elif not self.matchers[row].is_stopped():
                    self.matchers[row].consume_token(token)
        for row, matcher in enumerate(self.matchers):
            if self.ended[row]:
                self.mask[row] = -1  # every token allowed: generate() pads an ended row anyway
            elif matcher.is_stopped() or matcher.is_error():
                self.mask[row] = 0  # the answer is complete: only a stop token may follow
                for stop in self.stops:
                    bit = 1 << (stop % 32)
                    self.mask[row, stop // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words
            else:
                llt.fill_next_token_bitmask(matcher, self.mask, row)
        llt.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        return scores
