"""Latency of answers: seconds per answer alone (mean, p50, p99) and answers per second in batches.

Greedy generation with the suite's token budget, on the first `n` held-out prompts, after one warm-up call
so that one-off start-up costs (kernel selection, caches) are not counted:
- latency_seconds, latency_p50_seconds, latency_p99_seconds, answers_per_second: free generate(), the answers the
  suite scores;
- with `task` set to a task with an answer grammar (signals, action), the same four as fast_*: the constrained
  answers of the path a trading loop serves (finetune/eval/fast_decode.py: the prompts' shared start cached once,
  the tokens the grammar forces and drafts from earlier answers checked in one pass, batches run together), on the
  same prompts, one by one and then in batches.
"""
import statistics
import time

from finetune.eval.suite import generate


def timings(answer_one, answer_all, prompts: list, prefix: str) -> dict:
    answer_one(prompts[0])  # warm-up
    seconds = []
    for prompt in prompts:
        start = time.perf_counter()
        answer_one(prompt)
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    answer_all(prompts)
    batched = len(prompts) / (time.perf_counter() - start)
    ordered = sorted(seconds)
    return {f"{prefix}latency_seconds": statistics.fmean(seconds),
            f"{prefix}latency_p50_seconds": statistics.median(seconds),
            f"{prefix}latency_p99_seconds": ordered[int(0.99 * (len(ordered) - 1))],
            f"{prefix}answers_per_second": batched}


class Latency:
    needs_generation = False

    def __init__(self, n: int = 16, batch_size: int = 16, max_new_tokens: int = 24, task: str | None = None):
        self.n, self.batch_size, self.max_new_tokens, self.task = n, batch_size, max_new_tokens, task

    def __call__(self, *, samples, outputs=None, model, tokenizer) -> dict:
        prompts = samples[: self.n]
        out = timings(lambda s: generate(model, tokenizer, [s], self.max_new_tokens, 1, progress=False),
                      lambda ss: generate(model, tokenizer, ss, self.max_new_tokens, self.batch_size, progress=False),
                      prompts, "")
        grammar = self.grammar(model)
        if grammar is not None and len(prompts) >= 2:
            out |= self.fast(prompts, model, tokenizer, grammar)[0]
        return out

    def fast(self, prompts: list, model, tokenizer, grammar: str, prefix: str = "fast_") -> tuple[dict, list[str]]:
        """The fast constrained path's four figures (named `prefix`...), and its batched answers' texts."""
        from finetune.eval.fast_decode import PrefixDecoder
        chats = [s["messages"][:-1] for s in prompts]
        decoder = PrefixDecoder(model, tokenizer, grammar, probes=chats[:2])  # their shared start is cached
        texts = []

        def answer_all(cs):
            texts[:] = [a["text"] for i in range(0, len(cs), self.batch_size)
                        for a in decoder.answers(cs[i:i + self.batch_size], self.max_new_tokens)]
        return timings(lambda c: decoder.answer(c, self.max_new_tokens), answer_all, chats, prefix), texts

    def grammar(self, model) -> str | None:
        """The task's answer grammar, where the fast path can answer on this model (not prompt-learning)."""
        from finetune import tasks
        from finetune.eval.likelihood import prompt_learning
        if self.task is None or prompt_learning(model):
            return None
        return tasks.get(self.task).grammar()
