"""Accuracy of generated answers for signals, sentiment or decision actions, with the numbers to trust it.

Each answer is parsed by its task (finetune/tasks/) and compared with the sample's gold `label`. An answer
that cannot be parsed, or names a class outside `labels`, counts as wrong and lands in the confusion
matrix's extra 'unparsed' column. Plain Python: `evaluate` can only load its metric modules from the hub,
which is unreachable here.

How an answer is read is the task's (finetune/tasks/): `first_line` reads the label from the answer's first
non-empty line only (the finance-news builder puts the label there and an explanation after it).

Result (task="signals"; sentiment and first_line have no confidence, so those keys are None; only signals has
`profitable_ratio`):

    {"accuracy": 0.667, "macro_f1": 0.711, "parse_rate": 0.833, "majority_baseline": 0.5,
     "majority_macro_f1": 0.222, "majority_label": "BUY", "n_answers": 6,
     "per_class": {"BUY": {"precision": 1.0, "recall": 0.667, "f1": 0.8, "support": 3}, ...},
     "confusion_matrix": {"labels": ["BUY", "SELL", "HOLD"],               # rows: gold
                          "columns": ["BUY", "SELL", "HOLD", "unparsed"],  # predicted
                          "matrix": [[2, 0, 0, 1], [0, 1, 0, 0], [0, 1, 1, 0]]},
     "confidence_mean": 0.7, "confidence_std": 0.141, "ece": 0.34,
     "calibration": [{"bin": [0.5, 0.6], "count": 1, "accuracy": 1.0, "confidence": 0.5}, ...],
     "profitable_ratio": 0.75, "n_directional": 4}

- macro_f1 averages F1 over the classes seen in gold labels or parsed predictions (sklearn's default);
  precision of a class never predicted is 0 (sklearn's zero_division=0).
- confidence_mean / confidence_std (population std) over parsed answers that carry a confidence.
- ece (expected calibration error): answers with a prediction and a confidence go into `bins` equal-width
  bins over [0, 1] (the last one closed); ECE = sum over bins of count/N * |accuracy - mean confidence|.
- majority_baseline: accuracy of always answering the most common gold label; majority_macro_f1 its macro-F1.
- profitable_ratio (signals): among answers predicting BUY or SELL on samples whose meta has a realised
  return (`return_key`, percent), the share that agrees with it: BUY if return > 0, SELL if return < 0
  (a flat 0 is not profitable). None when there is no such answer (e.g. data without returns).
"""
import statistics
from collections import Counter

from finetune import tasks
from finetune.errors import DataError


class Classification:
    needs_generation = True

    def __init__(self, task: str = "signals", labels: list[str] | None = None, bins: int = 10,
                 return_key: str = "pnl_percent"):
        if task not in tasks.TASKS:
            raise ValueError(f"Classification: task={task!r} is not one of {', '.join(tasks.TASKS)}")
        self.task = tasks.TASKS[task]
        if not self.task.labels and not labels:
            raise ValueError(f"Classification: task={task!r} has no labels to score; give `labels` or a "
                             "labelled task")
        self.labels = list(labels) if labels else list(self.task.labels)
        self.bins = bins
        self.return_key = return_key

    def parse(self, text: str) -> tuple[str | None, float | None]:
        return self.task.parse(text, self.labels)

    def check(self, samples: list[dict]) -> None:
        """What scoring needs from the held-out samples, before any model loads (the dry run calls it too)."""
        if not samples:
            raise DataError("Classification: the held-out split is empty; enlarge the dataset or the test split")
        for i, sample in enumerate(samples, 1):
            if sample.get("label") is None:
                raise DataError(f"held-out sample {i}: 'label' is None; the eval suite's classification (task "
                                f"'{self.task.name}') needs a gold label on every sample; for data without "
                                "labels use eval=perplexity")

    def __call__(self, *, samples: list[dict], outputs: list[str], model=None, tokenizer=None) -> dict:
        if len(samples) != len(outputs):
            raise ValueError(f"Classification: {len(samples)} samples but {len(outputs)} outputs")
        self.check(samples)
        gold = [str(sample["label"]) for sample in samples]
        # Gold labels outside the configured list still get a row, so nothing is silently dropped.
        labels = self.labels + sorted(set(gold) - set(self.labels))
        parsed = [self.parse(text) for text in outputs]
        predicted = [label for label, _ in parsed]
        n = len(gold)

        index = {label: i for i, label in enumerate(labels)}
        matrix = [[0] * (len(labels) + 1) for _ in labels]
        for g, p in zip(gold, predicted):
            matrix[index[g]][index[p] if p is not None else len(labels)] += 1

        per_class, f1s = {}, []
        seen = set(gold) | {p for p in predicted if p is not None}
        for label in labels:
            tp = sum(g == p == label for g, p in zip(gold, predicted))
            n_pred = predicted.count(label)
            support = gold.count(label)
            precision = tp / n_pred if n_pred else 0.0
            recall = tp / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
            if label in seen:
                f1s.append(f1)

        majority_label, majority_count = Counter(gold).most_common(1)[0]
        confidences = [c for _, c in parsed if c is not None]
        ece, calibration = self.calibration(gold, parsed)
        result = {
            "accuracy": sum(g == p for g, p in zip(gold, predicted)) / n,
            "macro_f1": sum(f1s) / len(f1s),
            "parse_rate": sum(p is not None for p in predicted) / n,
            "majority_baseline": majority_count / n,
            # macro-F1 of always answering the majority label: its F1 over the classes in the gold labels
            "majority_macro_f1": 2 * majority_count / (n + majority_count) / len(set(gold)),
            "majority_label": majority_label,
            "n_answers": n,
            "per_class": per_class,
            "confusion_matrix": {"labels": labels, "columns": labels + ["unparsed"], "matrix": matrix},
            "confidence_mean": statistics.fmean(confidences) if confidences else None,
            "confidence_std": statistics.pstdev(confidences) if confidences else None,
            "ece": ece,
            "calibration": calibration,
        }
        if self.task.scores_returns:
            result.update(self.profitable(samples, predicted))
        return result

    def calibration(self, gold: list[str], parsed: list[tuple]) -> tuple[float | None, list[dict]]:
        scored = [(c, g == p) for g, (p, c) in zip(gold, parsed) if p is not None and c is not None]
        if not scored:
            return None, []
        bins = [[] for _ in range(self.bins)]
        for confidence, correct in scored:
            bins[min(int(confidence * self.bins), self.bins - 1)].append((confidence, correct))
        ece, table = 0.0, []
        for i, members in enumerate(bins):
            if not members:
                continue
            accuracy = sum(correct for _, correct in members) / len(members)
            confidence = statistics.fmean(c for c, _ in members)
            ece += len(members) / len(scored) * abs(accuracy - confidence)
            table.append({"bin": [i / self.bins, (i + 1) / self.bins], "count": len(members),
                          "accuracy": accuracy, "confidence": confidence})
        return ece, table

    def profitable(self, samples: list[dict], predicted: list[str | None]) -> dict:
        agree = []
        for sample, p in zip(samples, predicted):
            ret = (sample.get("meta") or {}).get(self.return_key)
            if p in ("BUY", "SELL") and isinstance(ret, (int, float)) and not isinstance(ret, bool):
                agree.append(ret > 0 if p == "BUY" else ret < 0)
        return {"profitable_ratio": sum(agree) / len(agree) if agree else None, "n_directional": len(agree)}
