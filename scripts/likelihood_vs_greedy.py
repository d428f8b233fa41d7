"""Likelihood scoring against greedy generation on a run's held-out prompts: agreement and time (docs/results.md).

    python scripts/likelihood_vs_greedy.py outputs/<run> --task signals --max-new-tokens 24 --sides base,tuned

Both answer every prompt in one process with the same batch size; agreement is the share of prompts where
greedy's parsed label equals the likeliest label.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import tasks
from finetune.eval.likelihood import likelihood_answers
from finetune.eval.suite import generate_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--task", default="signals")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--sides", default="tuned", help="base, tuned or base,tuned")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    base = json.loads((a.run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    samples = [json.loads(line) for line in (a.run / "data" / "test.jsonl").open()]
    task = tasks.get(a.task)
    for side in a.sides.split(","):
        model = AutoModelForCausalLM.from_pretrained(base)
        if side == "tuned":
            model = PeftModel.from_pretrained(model, a.run / "adapter")
        start = time.perf_counter()
        greedy = generate_answers(model, tokenizer, [s["messages"][:-1] for s in samples], a.max_new_tokens,
                                  a.batch_size, progress=False)
        greedy_seconds = time.perf_counter() - start
        start = time.perf_counter()
        likeliest = likelihood_answers(model, tokenizer, samples, task, list(task.labels), a.batch_size)
        likelihood_seconds = time.perf_counter() - start
        by_greedy = [task.parse(text)[0] for text in greedy["texts"]]
        by_likelihood = [task.parse(text)[0] for text in likeliest]
        agree = sum(g == lik for g, lik in zip(by_greedy, by_likelihood)) / len(samples)
        print(f"{side}: {len(samples)} prompts, greedy parsed {sum(g is not None for g in by_greedy)}, agreement "
              f"{agree:.3f}; greedy {greedy_seconds:.1f} s ({sum(greedy['tokens']) / len(samples):.1f} new tokens), "
              f"likelihood {likelihood_seconds:.1f} s ({greedy_seconds / likelihood_seconds:.1f}x)")


if __name__ == "__main__":
    main()
