"""The simple-model baseline: what a small scikit-learn classifier gets on the same numbers.

A quant's first question of a tuned LLM is whether it beats a plain model on the snapshot's own fields. This
fits one on the train split and scores it on the same held-out samples, through the same metrics (accuracy,
macro-F1, the backtest where the suite has one), so report.md and metrics.json put it beside base and tuned
and the verdict says "helped" only above it.

What it reads, per sample:
- `meta.features` when the builder gives them (decision records: the symbol's market data, regime, account);
- else the prompt's `Name: value` lines (the trade-log builder's snapshot: `RSI: 28.4`, `Trend: bullish`):
  numbers as numbers, anything else as a category (one-hot);
- else, when fewer than half the samples have such fields (headlines, news), the prompt's words
  (TF-IDF of words and word pairs).
Fields -> gradient boosting; words -> logistic regression. Deterministic (random_state 0).

    simple_model(train, held_out, task, metrics)
    # {"model": "gradient boosting on 7 fields", "train_samples": 252, "accuracy": 0.71, "macro_f1": 0.41, ...}
"""
import re

from finetune.errors import DataError

_LINE = re.compile(r"^\s*([^:\n]{1,40}?)\s*:\s*(.+?)\s*$")


def _value(text: str):
    try:
        return float(text.rstrip("%"))
    except ValueError:
        return text.strip()[:40]


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(node, (list, tuple)):
        return {f"{prefix}count": len(node), **_flat(node[0], f"{prefix}0.")} if node else {f"{prefix}count": 0}
    if isinstance(node, bool) or node is None:
        return {prefix[:-1]: str(node)}
    return {prefix[:-1]: node if isinstance(node, (int, float)) else str(node)[:40]}


def fields(sample: dict) -> dict:
    """The sample's fields: the builder's `meta.features`, else the prompt's `Name: value` lines."""
    given = (sample.get("meta") or {}).get("features")
    if given:
        return _flat(given)
    prompt = next((m["content"] for m in reversed(sample["messages"][:-1]) if m["role"] == "user"), "")
    found = {}
    for line in prompt.splitlines() if isinstance(prompt, str) else []:
        match = _LINE.match(line)
        if match:
            found[match.group(1)] = _value(match.group(2))
    return found


def _text(sample: dict) -> str:
    return " ".join(m["content"] for m in sample["messages"][:-1] if m["role"] == "user" and isinstance(m["content"], str))


def _labelled(samples: list[dict], labels: list[str]) -> list[dict]:
    return [s for s in samples if s.get("label") in labels and s.get("desirable", True)]


def fit(train: list[dict], labels: list[str]):
    """(a fitted scikit-learn pipeline, its description) on the labelled train samples."""
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    train = _labelled(train, labels)
    gold = [s["label"] for s in train]
    if len(set(gold)) < 2:
        raise DataError(f"simple model: the train split has {len(set(gold))} label(s); nothing to classify")
    rows = [fields(s) for s in train]
    if sum(len(r) >= 2 for r in rows) >= len(rows) / 2:
        model = make_pipeline(DictVectorizer(sparse=False), GradientBoostingClassifier(random_state=0))
        model.fit(rows, gold)
        names = model[0].get_feature_names_out()
        return model, f"gradient boosting on {len({n.split('=')[0] for n in names})} fields", fields
    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1), LogisticRegression(max_iter=1000))
    model.fit([_text(s) for s in train], gold)
    return model, "logistic regression on the prompt's words (TF-IDF)", _text


def simple_model(train: list[dict], held_out: list[dict], task, metrics: dict) -> dict:
    """The baseline's scores on `held_out` by the suite's answering metrics (classification, backtest)."""
    from finetune.eval.suite import call
    labels = list(task.labels)
    model, description, read = fit(train, labels)
    probabilities = model.predict_proba([read(s) for s in held_out])
    classes = list(model.classes_)
    outputs = [task.render(classes[row.argmax()], float(row.max())) for row in probabilities]
    result = {"model": description, "train_samples": len(_labelled(train, labels))}
    for metric in metrics.values():
        if metric.needs_generation:
            scores = call(metric, held_out, outputs, None, None)
            result.update({k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return result
