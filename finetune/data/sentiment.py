"""Sentiment builder, the finance sentiment use case: labelled financial headlines -> positive / neutral / negative.

Input: a CSV (header row; read with the csv module, so quoted commas and newlines, a UTF-8 BOM and
Chinese text are fine) or a JSONL file (one object per line), chosen by the file extension
(.csv / .jsonl). Column names are options: `text_field` (default "text"), `label_field` ("label")
and an optional `timestamp_field` (ISO date-time or epoch seconds; None = no timestamps).

    text,label,timestamp
    "Apple beats estimates, raises guidance",positive,2024-01-05T14:30:00
    宁德时代遭监管立案调查,bearish,2024-01-06 09:35:00

Raw labels are matched case-insensitively against the canonical names and SYNONYMS (pos, bullish,
利好, ...); `synonyms` adds to or overrides them, e.g. {"2": positive, "1": neutral, "0": negative}
for FinancialPhraseBank-style ids. Bare digits are not in the defaults on purpose: "1" means
positive in a -1/0/1 scheme and neutral in a 0/1/2 one, and guessing would mislabel silently.

Bad rows (raise DataError naming file, line and column, or skip and count with skip_bad_rows=True):
malformed JSON line ("malformed_json"), empty text ("empty_text"), missing label ("missing_label"),
unknown label ("unknown_label"), bad or missing timestamp when a timestamp field is set
("bad_timestamp"). Blank lines are ignored. The line is the file's 1-based line where the record starts.

Example sample:
    {"messages": [{"role": "system", "content": "You classify the sentiment of financial news headlines."},
                  {"role": "user", "content": "Headline: Apple beats estimates, raises guidance\\nSentiment?"},
                  {"role": "assistant", "content": "positive"}],
     "label": "positive", "timestamp": "2024-01-05T14:30:00",
     "meta": {"line": 2, "raw_label": "positive"}}
"""
import csv
from functools import partial
from pathlib import Path

from finetune.data import Built
from finetune.data.rows import BadRow, BadRows, jsonl_records
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError
from finetune.tasks import TASKS

LABELS = TASKS["sentiment"].labels
SYNONYMS = {
    "positive": ["pos", "bullish", "bull", "up", "buy", "+1", "正面", "积极", "利好", "看涨", "看多"],
    "neutral": ["neu", "flat", "hold", "none", "中性", "中立", "持平"],
    "negative": ["neg", "bearish", "bear", "down", "sell", "-1", "负面", "消极", "利空", "看跌", "看空"],
}
SYSTEM_PROMPT = "You classify the sentiment of financial news headlines."


def build(path, *, skip_bad_rows=False, text_field="text", label_field="label", timestamp_field=None,
          synonyms=None, encoding="utf-8-sig", system_prompt=SYSTEM_PROMPT) -> Built:
    path = Path(path)
    label_of = _check_options(path, synonyms)
    bad = BadRows(path.name, skip_bad_rows, "fix the row or set dataset.skip_bad_rows=true")
    to_sample = partial(_sample, text_field=text_field, label_field=label_field, timestamp_field=timestamp_field,
                        label_of=label_of, system_prompt=system_prompt)
    try:  # the records are read as they are converted: a decoding error can come at any row
        samples = bad.each(_records(path, [f for f in (text_field, label_field, timestamp_field) if f], encoding),
                           to_sample)
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not {encoding} text ({e.reason} at byte {e.start}); "
                        "re-save as UTF-8 or set dataset.builder.encoding (e.g. gbk)") from e
    if not samples:
        dropped = dict(bad.dropped) or "none, the file has no rows"
        raise DataError(f"{path.name}: no samples left (dropped: {dropped})")
    return Built(samples, bad.dropped)


def _check_options(path, synonyms) -> dict[str, str]:
    """The raw label -> label map; a DataError for a missing file or an unknown extension, a ConfigError for
    bad synonyms, before any row is read."""
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path}); set dataset.path to a .csv or .jsonl file")
    label_of = _label_map(synonyms)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"{path.name}: unsupported extension '{path.suffix}' (use .csv or .jsonl)")
    return label_of


def _sample(item, *, text_field, label_field, timestamp_field, label_of, system_prompt) -> dict:
    line, record = item
    if isinstance(record, str):  # a JSONL line that did not parse: record holds the reason
        raise BadRow("malformed_json", f"line {line}, {record}")
    text = record.get(text_field)
    if text is None or str(text).strip() == "":
        raise BadRow("empty_text", f"line {line}, column '{text_field}' is empty or missing")
    raw = record.get(label_field)
    if raw is None or str(raw).strip() == "":
        raise BadRow("missing_label", f"line {line}, column '{label_field}' is empty or missing")
    label = label_of.get(str(raw).strip().lower()) if not isinstance(raw, bool) else None
    if label is None:
        raise BadRow("unknown_label", f"line {line}, column '{label_field}': unknown label {raw!r} "
                     f"(known: {', '.join(sorted(label_of))}); map it in dataset.builder.synonyms")
    timestamp = None
    if timestamp_field:
        timestamp = parse_timestamp(record.get(timestamp_field))
        if timestamp is None:
            raise BadRow("bad_timestamp", f"line {line}, column '{timestamp_field}': {record.get(timestamp_field)!r} "
                         "is not a date-time (or set dataset.builder.timestamp_field=null)")
    headline = " ".join(str(text).split())  # CSV cells may hold newlines; one line reads better
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": f"Headline: {headline}\nSentiment?"},
                 {"role": "assistant", "content": label}]
    return {"messages": messages, "label": label, "timestamp": timestamp,
            "meta": {"line": line, "raw_label": str(raw)}}


# ---- reading: (line, record) pairs; a JSONL line that did not parse is a str saying why

def _records(path, fields, encoding):
    return _csv_records(path, path.name, fields, encoding) if path.suffix.lower() == ".csv" else \
        jsonl_records(path, encoding)


def _csv_records(path, name, fields, encoding):
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{name}: the file is empty (expected a header row with {', '.join(fields)})")
            header = [h.strip() for h in header]
            missing = [c for c in fields if c not in header]
            if missing:
                found = ", ".join(h if h.isprintable() else repr(h) for h in header)  # a cell may hold a newline
                raise DataError(f"{name}: no column '{missing[0]}' in the header (found: {found}); "
                                "set dataset.builder.text_field / label_field / timestamp_field")
            start = reader.line_num + 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    # a short row leaves its last columns None, which reads as "missing"
                    yield start, dict(zip(header, row))
                start = reader.line_num + 1
        except csv.Error as e:  # e.g. a cell over csv's 128 KiB field limit: no headline is that long
            raise DataError(f"{name}: line {reader.line_num}, not readable as CSV ({e}); "
                            "is it the right file?") from None


def _label_map(extra):
    label_of = {label: label for label in LABELS}
    label_of.update({s.lower(): label for label, names in SYNONYMS.items() for s in names})
    for raw, label in dict(extra or {}).items():
        if label not in LABELS:
            raise ConfigError(f"dataset.builder.synonyms: {raw!r} maps to {label!r}; choose one of {', '.join(LABELS)}")
        label_of[str(raw).strip().lower()] = label
    return label_of
