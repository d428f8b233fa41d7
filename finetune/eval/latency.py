"""Latency of answers: seconds for one answer (batch of 1), and answers per second in batches.

Greedy generation with the suite's token budget, on the first `n` held-out prompts, after one warm-up call
so that one-off start-up costs (kernel selection, caches) are not counted.
"""
import time

from finetune.eval.suite import generate


class Latency:
    needs_generation = False

    def __init__(self, n: int = 16, batch_size: int = 16, max_new_tokens: int = 24):
        self.n, self.batch_size, self.max_new_tokens = n, batch_size, max_new_tokens

    def __call__(self, *, samples, outputs=None, model, tokenizer) -> dict:
        prompts = samples[: self.n]
        generate(model, tokenizer, prompts[:1], self.max_new_tokens, 1, progress=False)  # warm-up
        start = time.perf_counter()
        for sample in prompts:
            generate(model, tokenizer, [sample], self.max_new_tokens, 1, progress=False)
        single = (time.perf_counter() - start) / len(prompts)
        start = time.perf_counter()
        generate(model, tokenizer, prompts, self.max_new_tokens, self.batch_size, progress=False)
        batched = len(prompts) / (time.perf_counter() - start)
        return {"latency_seconds": single, "answers_per_second": batched}
