"""The finance-news builder's answers: the label on the first non-empty line, an explanation after it.

    'up\nThe beat and the raised guidance ...'  -> ("up", None)
    'The stock fell.\ndown'                     -> (None, None): the first line states no label
"""
from finetune.tasks.label import Label, parse_label


class FirstLine(Label):
    """The direction of a news item's price impact, or how a market reaction developed, on the first line."""

    name = "first_line"
    labels = ("up", "down", "flat", "priced_in", "follow_through", "wait_and_see")

    def read(self, text, labels):
        first = next((line for line in text.splitlines() if line.strip()), "") if isinstance(text, str) else ""
        return parse_label(first, labels), None
