"""Free text (`text`: style, news): no labels, nothing to read back, no answer grammar; perplexity and the style
metrics score it. Every other task is this class with a label set and its own way of reading an answer."""
import re


class Task:
    """Free text, and what every task answers: its label set, how an answer is read back and checked, how a label is
    written as an answer, the grammar an answer follows and how its JSON is laid out."""

    name = "text"
    labels: tuple[str, ...] = ()
    scores_returns = False  # answers are scored against the sample's realised return too (profitable ratio)
    # How training answers lay out JSON (item separator, key separator): a constrained JSON answer (the server's
    # response_format) keeps the layout the model learnt instead of one it never saw.
    json_layout = (", ", ": ")  # json.dumps's

    def __init__(self, name: str | None = None, labels: tuple[str, ...] | None = None):
        self.name = self.name if name is None else name
        self.labels = tuple(self.labels if labels is None else labels)

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

    def grammar(self) -> str | None:
        """The llguidance grammar every answer follows under constrained decoding, or None: the answer has no fixed
        shape."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.labels})"
