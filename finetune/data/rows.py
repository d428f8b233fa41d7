"""What the builders share about rows: what becomes of a bad one (BadRows), and reading JSON Lines.

A builder's `row -> sample` function raises BadRow(reason, message) for a row that is bad on its own
(the message names the row and the field), or SkipRow(reason) for one that is skipped and counted
whatever skip_bad_rows says (a trade not yet closed, an outcome that does not train). BadRows.each runs
it over the rows. A bad row is counted in `dropped` under its reason with skip_bad_rows=True; without,
it stops the build with one line: "<file>: <message>; <what to do>".
"""
import json
from collections import Counter

from finetune.data import safe_json
from finetune.errors import DataError


class BadRow(Exception):
    """One row cannot become a sample: its reason (the key in `dropped`) and a message naming the row."""

    def __init__(self, reason: str, message: str):
        super().__init__(reason, message)
        self.reason, self.message = reason, message


class SkipRow(Exception):
    """A row that gives no sample and is counted under `reason`, whatever skip_bad_rows says."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRows:
    """The bad rows of one build: counted in `dropped` (skip_bad_rows=True), or a DataError for the first.

    `name` (the file; None when the messages name it themselves) starts the error, `fix` ends it.
    """

    def __init__(self, name: str | None, skip_bad_rows: bool, fix: str, dropped: Counter | None = None):
        self.prefix = f"{name}: " if name is not None else ""
        self.skip_bad_rows, self.fix = skip_bad_rows, fix
        self.dropped = Counter() if dropped is None else dropped

    def __call__(self, reason: str, message: str) -> None:
        if not self.skip_bad_rows:
            raise DataError(f"{self.prefix}{message}; {self.fix}") from None
        self.dropped[reason] += 1

    def each(self, rows, convert) -> list:
        """convert(row) for each row, in order, less the rows it rejects with SkipRow or BadRow."""
        return list(self.stream(rows, convert))

    def stream(self, rows, convert):
        """each() as a generator: a row is read, converted and handed on one at a time."""
        for row in rows:
            try:
                sample = convert(row)
            except SkipRow as skip:
                self.dropped[skip.reason] += 1
                continue
            except BadRow as bad:
                self(bad.reason, bad.message)
                continue
            yield sample


def jsonl_records(path, encoding):
    """(line number, object) for each non-blank line of a JSONL file; for a line that is no JSON object,
    (line number, why) as a str, so that the builder decides what a bad line is."""
    with open(path, encoding=encoding) as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = safe_json.loads(text)
            except json.JSONDecodeError as e:
                yield line, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            yield line, record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
