"""Signal latency of a run's SignalProvider, path by path, on the run's held-out prompts: one prompt per call
(p50 / p99 milliseconds) and whole batches (signals per second).

    python scripts/signal_latency.py outputs/<run> --n 20 --threads 2
    python scripts/signal_latency.py outputs/<run> --n 0 --paths constrained,fast_merged_bf16 --batched   # all

One process, every path on the same prompts in turn, after one warm-up call each:
- free:         unconstrained greedy generate() (get_signal without `constrained`);
- constrained:  generate() under the signal grammar (constrained=True, fast=False), the reference answers;
- fast:         the fast decoder (constrained=True: cached prompt prefix + grammar fast-forward), adapter unmerged;
- fast_merged:  the same with the adapter merged into the base (merge=True);
- fast_merged_bf16: merged, then cast to bfloat16 (dtype="bfloat16");
- fast_merged_bf16_nodraft: the same without drafts from earlier answers (forced tokens only);
- static_merged_bf16: merged, bf16, through generate() on a static KV cache (static=True, warmed first; its decode
  step compiled only on CUDA).
With --batched, each path also answers all prompts in batches of --batch-size (one get_signals call per batch).
Prints one JSON line per path and mode, with how many answers equal the constrained path's.
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from finetune.data.pipeline import read_jsonl
from finetune.serving.inference import SignalProvider


def timed(answer, chats: list) -> tuple[list[float], list[str]]:
    answer(chats[0])  # warm-up: the grammar's tokenizer, the prefix cache
    seconds, texts = [], []
    for chat in chats:
        start = time.perf_counter()
        texts.append(answer(chat))
        seconds.append(time.perf_counter() - start)
    return seconds, texts


def undrafted(provider: SignalProvider) -> SignalProvider:
    """The provider with a fast decoder that keeps no earlier answers, so never drafts."""
    provider._decoder = provider.prefix_decoder(provider.grammar, seen=0)
    return provider


def warmed(provider: SignalProvider) -> SignalProvider:
    print(json.dumps({"warm_seconds": round(provider.warm(), 1)}), flush=True)
    return provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=20, help="held-out prompts (RUN/data/test.jsonl); 0: all")
    parser.add_argument("--paths", default="free,constrained,fast,fast_merged,fast_merged_bf16",
                        help="which paths, in this order")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batched", action="store_true", help="also time whole batches")
    parser.add_argument("--batch-size", type=int, default=16)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    chats = [s["messages"][:-1] for s in read_jsonl(a.run / "data" / "test.jsonl")[:a.n or None]]
    options = {"constrained": True, "batch_size": a.batch_size}
    unmerged = SignalProvider.from_run(a.run, **options)
    providers = {
        "free": SignalProvider(unmerged.model, unmerged.tokenizer, system_prompt=unmerged.system_prompt,
                               max_new_tokens=unmerged.max_new_tokens, batch_size=a.batch_size),
        "constrained": SignalProvider(unmerged.model, unmerged.tokenizer, system_prompt=unmerged.system_prompt,
                                      max_new_tokens=unmerged.max_new_tokens, fast=False, **options),
        "fast": unmerged,
        "fast_merged": lambda: SignalProvider.from_run(a.run, merge=True, **options),
        "fast_merged_bf16": lambda: SignalProvider.from_run(a.run, merge=True, dtype="bfloat16", **options),
        "fast_merged_bf16_nodraft": lambda: undrafted(SignalProvider.from_run(a.run, merge=True, dtype="bfloat16",
                                                                               **options)),
        "static_merged_bf16": lambda: warmed(SignalProvider.from_run(a.run, merge=True, dtype="bfloat16", static=True,
                                                                     **options))}
    reference = None
    for name in a.paths.split(","):
        provider = providers[name]() if callable(providers[name]) else providers[name]
        answer = provider.generate if name == "free" else provider.generate_constrained
        seconds, texts = timed(lambda c: answer([c])[0], chats)
        ms = sorted(1000 * s for s in seconds)
        row = {"path": name, "mode": "single", "prompts": len(chats), "threads": a.threads,
               "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
               "mean_ms": round(statistics.fmean(ms), 1)}
        if name == "constrained":
            reference = texts
        rows = [row]
        if a.batched:
            answer(chats[:a.batch_size])  # warm-up
            start = time.perf_counter()
            batched = answer(chats)
            seconds = time.perf_counter() - start
            rows.append({"path": name, "mode": "batched", "prompts": len(chats), "threads": a.threads,
                         "batch_size": a.batch_size, "signals_per_s": round(len(chats) / seconds, 2)})
            rows[-1]["batched_equal_single"] = f"{sum(b == t for b, t in zip(batched, texts))}/{len(texts)}"
        for row, got in zip(rows, (texts, batched if a.batched else None)):
            if reference is not None and name != "free":
                row["same_answers_as_constrained"] = f"{sum(t == r for t, r in zip(got, reference))}/{len(got)}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
