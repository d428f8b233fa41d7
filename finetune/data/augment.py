"""Optional train-split augmentation (from the crypto trade-log signals use case) and class rebalancing.
Applied after the split, never to validation or test, so no augmented copy of a held-out row can train.

- instruction variants: a copy of the sample whose user turn ends with one of a few request styles
  ("Be brief.", "Focus on the technical indicators.", ...), answer unchanged;
- numeric noise: every number in the user turn scaled by a factor in [1 - noise, 1 + noise] (e.g. 0.1),
  answer unchanged — teaches robustness to small input changes, so keep it below the label rule's margins;
- rebalance: `oversample` repeats minority-class samples, `undersample` drops majority-class ones, until
  every label has as many samples as the largest (smallest) class.
"""
import copy
import random
import re
from collections import defaultdict

VARIANTS = ("Be brief.", "Explain the main reason in one line.", "Focus on the technical indicators.",
            "Mention the main risk.", "Answer as a cautious trader.")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def jitter_numbers(text: str, noise: float, rng: random.Random) -> str:
    def scale(match: re.Match) -> str:
        raw = match.group(0)
        decimals = len(raw.split(".")[1]) if "." in raw else 0
        value = float(raw) * rng.uniform(1 - noise, 1 + noise)
        return f"{value:.{decimals}f}" if decimals else str(round(value))
    return NUMBER.sub(scale, text)


def augment(samples: list[dict], copies: int, variants: bool, noise: float, seed: int) -> list[dict]:
    if copies <= 0:
        return samples
    rng = random.Random(seed)
    out = list(samples)
    for sample in samples:
        for _ in range(copies):
            new = copy.deepcopy(sample)
            user = next(m for m in reversed(new["messages"]) if m["role"] == "user")
            if noise > 0:
                user["content"] = jitter_numbers(user["content"], noise, rng)
            if variants:
                user["content"] += "\n" + rng.choice(VARIANTS)
            new["meta"] = {**new.get("meta", {}), "augmented": True}
            out.append(new)
    return out


def rebalance(samples: list[dict], how: str, seed: int) -> list[dict]:
    if how == "none":
        return samples
    if how not in ("oversample", "undersample"):
        raise ValueError(f"dataset.balance={how}: choose none, oversample or undersample")
    rng = random.Random(seed)
    by_label = defaultdict(list)
    for sample in samples:
        by_label[sample.get("label")].append(sample)
    sizes = [len(group) for group in by_label.values()]
    target = max(sizes) if how == "oversample" else min(sizes)
    out = []
    for group in by_label.values():
        if len(group) >= target:
            out += rng.sample(group, target)
        else:
            out += group + [rng.choice(group) for _ in range(target - len(group))]
    rng.shuffle(out)
    return out
