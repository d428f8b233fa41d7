"""Single-signal latency of a run's SignalProvider, path by path, on the run's held-out prompts.

    python scripts/signal_latency.py outputs/<run> --n 20 --threads 1
    python scripts/signal_latency.py outputs/<run> --n 0 --paths constrained,fast,fast_merged   # every prompt

One process, one prompt per call, every path on the same prompts in turn, after one warm-up call each:
- free:         today's default get_signal (unconstrained greedy generate());
- constrained:  generate() under the signal grammar (constrained=True, fast=False);
- fast:         the fast decoder (constrained=True: cached prompt prefix + grammar fast-forward), adapter unmerged;
- fast_merged:  the same with the adapter merged into the base (merge=True).
Prints one JSON line per path (p50 / p90 / mean milliseconds per signal) and whether the constrained paths gave
the same answers as `constrained`.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--n", type=int, default=20, help="held-out prompts (RUN/data/test.jsonl); 0: all")
    parser.add_argument("--paths", default="free,constrained,fast,fast_merged", help="which paths, in this order")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    chats = [s["messages"][:-1] for s in read_jsonl(a.run / "data" / "test.jsonl")[:a.n or None]]
    unmerged = SignalProvider.from_run(a.run, constrained=True)
    merged = SignalProvider.from_run(a.run, constrained=True, merge=True)
    slow = SignalProvider(unmerged.model, unmerged.tokenizer, system_prompt=unmerged.system_prompt,
                          max_new_tokens=unmerged.max_new_tokens, constrained=True, fast=False)
    paths = {"free": lambda c: unmerged.generate([c])[0],
             "constrained": lambda c: slow.generate_constrained([c])[0],
             "fast": lambda c: unmerged.generate_constrained([c])[0],
             "fast_merged": lambda c: merged.generate_constrained([c])[0]}
    reference = None
    for name in a.paths.split(","):
        answer = paths[name]
        seconds, texts = timed(answer, chats)
        ms = sorted(1000 * s for s in seconds)
        row = {"path": name, "prompts": len(chats), "threads": a.threads, "p50_ms": round(statistics.median(ms), 1),
               "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1), "mean_ms": round(statistics.fmean(ms), 1)}
        if name == "constrained":
            reference = texts
        elif reference is not None:
            row["same_answers_as_constrained"] = f"{sum(t == r for t, r in zip(texts, reference))}/{len(texts)}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
