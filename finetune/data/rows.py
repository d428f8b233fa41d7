"""What the builders share about rows: what becomes of a bad one (BadRows), and reading JSON Lines.

A builder's `row -> sample` function raises BadRow(reason, message) for a row that is bad on its own
(the message names the row and the field), or SkipRow(reason) for one that is skipped and counted
whatever skip_bad_rows says (a trade not yet closed, an outcome that does not train). BadRows.each runs
it over the rows. A bad row is counted in `dropped` under its reason with skip_bad_rows=True; without,
it stops the build with one line: "<file>: <message>; <what to do>".

Every row is also held to the size caps of conf/dataset/_pipeline.yaml (`sized`): one 50 MB cell, split into words
and tokens, would cost gigabytes, so a field over `max_field_chars` is refused as a bad row (or cut, with
oversize=cut) and a row over `max_row_chars` refused, before the builder turns it into a sample.
"""
import codecs
import json
import re
from collections import Counter
from contextlib import contextmanager

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


LIMITS = {"field": None, "row": None, "oversize": "refuse"}  # the build's caps, set by `size_limits`
UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8 (finetune/data/sqlite.py keeps it so)


@contextmanager
def size_limits(field: int | None, row: int | None, oversize: str):
    """The caps for the rows read inside the block (the pipeline's build; worker processes forked in it too)."""
    if oversize not in ("refuse", "cut"):
        raise DataError(f"dataset.oversize={oversize!r}: choose refuse (a bad row) or cut (to max_field_chars)")
    saved = dict(LIMITS)
    LIMITS.update(field=field, row=row, oversize=oversize)
    try:
        yield
    finally:
        LIMITS.update(saved)


def sized(record, where: str | None):
    """`record` (a JSON object, a row tuple, a text) within the caps, its over-long fields cut under oversize=cut;
    otherwise BadRow naming `where` (the row; None: the caller's message names it) and the field."""
    field, most, cut = LIMITS["field"], LIMITS["row"], LIMITS["oversize"] == "cut"
    size = 0

    def walk(node, path: str):
        nonlocal size
        if isinstance(node, str) and (bad := UNDECODED.search(node)):
            raise BadRow("bad_text", f"{where + ', ' if where else ''}field {path or 'text'}: not UTF-8 text (byte "
                                     f"0x{ord(bad.group()) - 0xdc00:02x} at character {bad.start()}); re-save it as "
                                     "UTF-8")
        if isinstance(node, (str, bytes)):
            if field is not None and len(node) > field:
                if not cut:
                    raise BadRow("field_too_large", f"{where + ', ' if where else ''}field {path or 'text'}: "
                                                    f"{len(node):,} characters, "
                                                    f"over dataset.max_field_chars={field:,} (dataset.oversize=cut "
                                                    f"cuts it instead)")
                node = node[:field]
            size += len(node)
            return node
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if type(node) in (list, tuple):
            return type(node)(walk(v, f"{path}[{i}]" if path else f"column {i + 1}") for i, v in enumerate(node))
        return node
    record = walk(record, "")
    if most is not None and size > most:
        raise BadRow("row_too_large", f"{where + ': ' if where else ''}{size:,} characters in all, over "
                                      f"dataset.max_row_chars={most:,}")
    return record


def sized_row(row, position: int):
    """A row as the builders pass them to BadRows: (number, record), (place, record), a tuple of columns whose
    first is the row id (SQLite), or a bare record (named by its position)."""
    if type(row) is tuple and row and isinstance(row[0], (int, str)) and not isinstance(row[0], bool):
        where = f"row {row[0]}" if isinstance(row[0], int) else row[0]
        return (row[0], sized(row[1], where)) if len(row) == 2 else sized(row, where)
    return sized(row, f"row {position}")


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
        for position, row in enumerate(rows, 1):
            try:
                sample = convert(sized_row(row, position))
            except SkipRow as skip:
                self.dropped[skip.reason] += 1
                continue
            except BadRow as bad:
                self(bad.reason, bad.message)
                continue
            yield sample


def jsonl_records(path, encoding):
    """(line number, object) for each non-blank line of a JSONL file; for a line that is no JSON object (or not
    `encoding` text: one bad byte spoils its line, not the file), (line number, why) as a str, so that the builder
    decides what a bad line is. UnicodeDecodeError when no line decodes: the file is in another encoding."""
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # their newline is not one byte
    undecoded, decoded = [], False  # lines that did not decode before the first one that did
    with open(path, "r" if wide else "rb", encoding=encoding if wide else None) as f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw if wide else raw.decode(encoding)
            except UnicodeDecodeError as e:
                undecoded.append((line, f"not {encoding} text ({e.reason} at byte {e.start} of the line)", e))
                if decoded:
                    yield undecoded.pop()[:2]
                continue
            if not text.strip():
                continue
            decoded = True
            while undecoded:
                yield undecoded.pop(0)[:2]
            try:
                record = safe_json.loads(text)
            except json.JSONDecodeError as e:
                yield line, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            yield line, record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
    if undecoded:  # not one line decoded
        raise undecoded[0][2]
