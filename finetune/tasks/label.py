"""One of a few labels, given as the answer: `Positive.`, `{"label": "positive"}`, `positive: the outlook ...`.
Sentiment (positive / neutral / negative) is this task; a new one is `Label("spam", ("spam", "ham"))` in TASKS.

    parse_label('Positive.', SENTIMENT)                         -> "positive"
    parse_label('{"sentiment": "Negative"}', SENTIMENT)         -> "negative"
    parse_label('hard to say: positive or negative', SENTIMENT) -> None (two labels, neither first)
"""
import re

from finetune.eval.answers import json_objects
from finetune.tasks.base import Task

SENTIMENT = ("positive", "neutral", "negative")


def parse_label(text, labels) -> str | None:
    """The one label of `labels` the answer gives (case-insensitive), else None.

    Tried in order: the whole answer is a label (`Positive.`); a JSON object's "label" or "sentiment";
    the answer starts with a label; exactly one distinct label is mentioned.
    """
    if not isinstance(text, str):
        return None
    canonical = {str(label).lower(): label for label in labels}
    if not canonical:
        return None
    bare = text.strip().strip(" \t\r\n.。!！\"'`*").lower()
    if bare in canonical:
        return canonical[bare]
    for obj in json_objects(text):
        for key in ("label", "sentiment"):
            if isinstance(obj.get(key), str) and obj[key].strip().lower() in canonical:
                return canonical[obj[key].strip().lower()]
    names = "|".join(re.escape(name) for name in sorted(canonical, key=len, reverse=True))
    pattern = re.compile(r"(?<![A-Za-z])(" + names + r")(?![A-Za-z])", re.IGNORECASE)
    hits = [m for m in pattern.finditer(text)]
    if hits and not text[:hits[0].start()].strip(" \t\r\n*#>`\"'[(-"):
        return canonical[hits[0].group(1).lower()]
    found = {m.group(1).lower() for m in hits}
    return canonical[found.pop()] if len(found) == 1 else None


class Label(Task):
    """One of `labels`, given as the answer (an explanation may follow); no confidence."""

    def read(self, text, labels) -> tuple[str | None, float | None]:
        return parse_label(text, labels), None

    def parse(self, text, labels=None):
        labels = tuple(labels) if labels else self.labels
        label, confidence = self.read(text, labels)
        return (label, confidence) if label in labels else (None, None)

    def fields(self, text) -> dict:
        return {"label": self.parse(text)[0]}
