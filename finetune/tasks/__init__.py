"""What kind of answer a model is trained to give: its labels, how an answer is read back, what makes a
training answer usable.

A dataset names its task (`dataset.task`), and so does a classification metric (`eval.metrics.*.task`);
the pipeline's validation, the metrics, `finetune.predict` and `finetune.inference` all ask the task here
instead of choosing by name themselves:

    signals     BUY / SELL / HOLD with a confidence (the trade-log builder's JSON signal)
    sentiment   positive / neutral / negative
    action      a JSON decision {"action": BUY / SELL / HOLD / CLOSE, ...} (the decision-records builder)
    first_line  free text whose first line is the label (the finance-news builder: up / down / flat, ...)
    text        free text, no label (style, news): scored by perplexity and style metrics

`span` finds where a gold answer states its label and `render` writes a label as an answer: likelihood scoring
(finetune/eval/likelihood.py) swaps each candidate label into the gold answer's layout, and answers chosen that way
(or by the simple-model baseline) are read back by the same metrics as generated ones.

A new classification task is one entry in TASKS (e.g. `Label("spam", ("spam", "ham"))`), a builder that
writes samples with that `label`, and the YAML that names them.
"""
import json
import re

from finetune.errors import ConfigError
from finetune.eval.answers import SIGNALS, parse_action, parse_label, parse_signal, to_confidence


class Task:
    """Free text: no labels, nothing to read back."""

    scores_returns = False  # answers are scored against the sample's realised return too (profitable ratio)

    def __init__(self, name: str, labels: tuple[str, ...] = ()):
        self.name, self.labels = name, tuple(labels)

    def parse(self, text, labels=None) -> tuple[str | None, float | None]:
        """(label, confidence) read from an answer; a label outside `labels` (default: the task's) is None."""
        return None, None

    def check(self, answer: str) -> str | None:
        """Why a training answer cannot teach this task, or None."""
        return None

    def fields(self, text) -> dict:
        """What `finetune.predict` writes beside an answer."""
        return {}

    def span(self, answer: str, label: str) -> tuple[int, int] | None:
        """Where `answer` states `label` (the first whole-word match, any case), as (start, end), or None."""
        match = re.search(rf"(?<![A-Za-z0-9_]){re.escape(label)}(?![A-Za-z0-9_])", answer, re.IGNORECASE)
        return match.span() if match else None

    def render(self, label: str, confidence: float | None = None) -> str:
        """`label` written as an answer this task's metrics read back."""
        return label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.labels})"


class Label(Task):
    """One of a few labels, given as the answer (`Positive.`, `{"label": "positive"}`, `positive: ...`)."""

    def read(self, text, labels) -> tuple[str | None, float | None]:
        return parse_label(text, labels), None

    def parse(self, text, labels=None):
        labels = tuple(labels) if labels else self.labels
        label, confidence = self.read(text, labels)
        return (label, confidence) if label in labels else (None, None)

    def fields(self, text) -> dict:
        return {"label": self.parse(text)[0]}


class FirstLine(Label):
    """The label on the answer's first non-empty line, an explanation after it."""

    def read(self, text, labels):
        first = next((line for line in text.splitlines() if line.strip()), "") if isinstance(text, str) else ""
        return parse_label(first, labels), None


class Signals(Label):
    """A trading signal with its confidence; scored against the trade's realised return too."""
    scores_returns = True

    def read(self, text, labels):
        return parse_signal(text)

    def check(self, answer):
        return None if parse_signal(answer)[0] is not None else f"answer is not a signal: {answer!r:.60}"

    def render(self, label, confidence=None):
        return json.dumps({"signal": label, "confidence": None if confidence is None else round(confidence, 2)})


class Action(Label):
    """A JSON decision; its "action" is the label, its "confidence" the confidence."""

    def read(self, text, labels):
        action = parse_action(text)
        return (action["action"], to_confidence(action.get("confidence"))) if action else (None, None)

    def check(self, answer):
        return None if parse_action(answer) is not None else f"answer is not a JSON action: {answer!r:.60}"

    def fields(self, text) -> dict:
        return {"action": parse_action(text)}

    def render(self, label, confidence=None):
        return json.dumps({"action": label, "confidence": None if confidence is None else round(confidence, 2)})


TASKS = {task.name: task for task in (
    Signals("signals", SIGNALS),
    Label("sentiment", ("positive", "neutral", "negative")),
    Action("action", ("BUY", "SELL", "HOLD", "CLOSE")),
    # finance news: the direction, or how a reaction developed
    FirstLine("first_line", ("up", "down", "flat", "priced_in", "follow_through", "wait_and_see")),
    Task("text"),
)}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not one of {', '.join(TASKS)} (finetune/tasks.py lists them)")
    return TASKS[name]
