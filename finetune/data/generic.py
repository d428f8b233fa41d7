"""Generic builder (any use case): ready-made instruction data in chat, alpaca or prompt/completion form.

Input (`path`): one file, or a folder whose .jsonl / .json / .csv / .parquet files are all read (sorted,
recursively). Each file is one of three forms, detected from its columns (or forced with `format`):

- chat (`messages`):          {"messages": [{"role": "system", "content": "..."},
                                            {"role": "user", "content": "RSI: 28.4"},
                                            {"role": "assistant", "content": "{\"signal\": \"BUY\", ...}"}]}
- alpaca (`instruction`/`input`/`output`, `input` optional, an optional `system` column):
                              {"instruction": "Classify the headline.", "input": "Apple beats", "output": "positive"}
- prompt_completion (`prompt`/`completion`, as strings or as TRL-style message lists):
                              {"prompt": "Headline: Apple beats\\nSentiment?", "completion": "positive"}

When several match, chat wins over alpaca over prompt_completion. Roles are system / user / assistant
(other message keys, e.g. `name`, are dropped) and the last message must be the assistant's answer.
Other columns are ignored unless named by `label_field` (default "label"), `timestamp_field` (default
"timestamp": ISO text, a date, or epoch seconds/ms) or `meta_fields` (copied into meta; looked up at
the top level, then inside a `meta` object, so the pipeline's own split files read back). A label or
timestamp field that no record of a file has means that file has none (None, with a log line); one
that only some records lack is a bad row. `system_prompt` is added to samples without a system turn.

Reading: .jsonl line by line with the json module, so a malformed line is named by its line number
(the `datasets` JSON loader reports "Expected object or value" with no line, and rejects a column
whose type changes between rows, e.g. a label that is 1 in one row and "BUY" in another). .json is
a list of objects (or JSON Lines under a .json name); .csv and .parquet go through
`datasets.load_dataset("csv" | "parquet", data_files=...)`, local only. Places in errors are
"line N" (.jsonl and JSON Lines), "record N" (.json list) or "row N" (.csv data rows, .parquet), 1-based.

Bad rows (raise DataError naming file, place and field; or skip and count with skip_bad_rows=True):
"malformed_json", "not_an_object", "missing_field", "bad_messages", "no_assistant_answer",
"missing_label", "bad_timestamp". A missing, empty, unreadable or unrecognised file always raises.

Example sample (a chat line of data/demo_signals.jsonl):
    {"messages": [{"role": "system", "content": "You are a crypto trading assistant. ..."},
                  {"role": "user", "content": "SOL-USDT price 94.47\\nRSI: 36.7\\nMACD: golden_cross\\n..."},
                  {"role": "assistant", "content": "{\"signal\": \"BUY\", \"confidence\": 0.68}"}],
     "label": "BUY", "timestamp": "2024-01-01T00:00:00", "meta": {}}
"""
import json
import logging
import math
from collections import Counter
from datetime import date, datetime
from pathlib import Path

from finetune.data import Built, safe_json
from finetune.data.rows import BadRow, BadRows
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("chat", "alpaca", "prompt_completion")
REQUIRED = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
ROLES = ("system", "user", "assistant")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def build(path, *, skip_bad_rows=False, format="auto", label_field="label", timestamp_field="timestamp",
          meta_fields=(), system_prompt=None, encoding="utf-8-sig") -> Built:
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"dataset.builder.format={format}: choose auto, {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{path.name}/: no {' / '.join(EXTENSIONS)} files in the folder ({path})")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path.name}: file not found ({path}); set dataset.path to a file or folder")
    samples, dropped = [], Counter()
    for file in files:
        name = str(file.relative_to(path.parent))
        records = _read(file, name, encoding)
        if not records:
            raise DataError(f"{name}: no records (the file is empty)")
        columns = {key for _, record in records if isinstance(record, dict) for key in record}
        kind = format if format != "auto" else _detect(columns, name, records)
        fields = {"label": label_field, "timestamp": timestamp_field}
        for what, field in fields.items():
            if field and field not in columns:
                log.info("%s: no '%s' field, so its samples have %s None", name, field, what)
        bad = BadRows(name, skip_bad_rows, "fix it or set dataset.skip_bad_rows=true", dropped)
        for where, record in records:  # a BadRow from _sample names the field; the place is added here
            try:
                samples.append(_sample(record, kind, {k: f for k, f in fields.items() if f in columns},
                                       meta_fields, system_prompt))
            except BadRow as err:
                bad(err.reason, f"{where}, {err.message}")
    if not samples:
        raise DataError(f"{path.name}: no samples left (dropped: {dict(dropped)})")
    return Built(samples, dropped)


def _sample(record, kind, fields, meta_fields, system_prompt) -> dict:
    if isinstance(record, str):  # a line the json module could not parse: record holds why
        raise BadRow("malformed_json", record)
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    for field in REQUIRED[kind]:
        if _blank(record.get(field)):
            raise BadRow("missing_field", f"field '{field}' is missing or empty ({kind} form needs "
                                          f"{', '.join(REQUIRED[kind])})")
    if kind == "chat":
        messages = _messages(record["messages"], "messages")
    elif kind == "alpaca":
        user = _text(record, "instruction")
        if not _blank(record.get("input")):
            user += "\n\n" + _text(record, "input")
        messages = _system(record) + [{"role": "user", "content": user},
                                      {"role": "assistant", "content": _text(record, "output")}]
    else:
        prompt, completion = record["prompt"], record["completion"]
        prompt = _messages(prompt, "prompt", answer=False) if isinstance(prompt, list) else \
            [{"role": "user", "content": _text(record, "prompt")}]
        completion = _messages(completion, "completion") if isinstance(completion, list) else \
            [{"role": "assistant", "content": _text(record, "completion")}]
        messages = (_system(record) if prompt[0]["role"] != "system" else []) + prompt + completion
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})

    label = None
    if "label" in fields:
        value = record.get(fields["label"])
        if _blank(value):
            raise BadRow("missing_label", f"field '{fields['label']}' is missing or empty")
        # a CSV integer column with an empty cell comes back as floats: 1.0 is label "1"
        label = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()
    timestamp = None
    if "timestamp" in fields:
        value = record.get(fields["timestamp"])
        timestamp = parse_timestamp(value)
        if timestamp is None:
            raise BadRow("bad_timestamp", f"field '{fields['timestamp']}': {value!r} is not a date-time "
                                          "(ISO text or epoch seconds; or set dataset.builder.timestamp_field=null)")
    nested = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    meta = {field: _scalar(record[field] if field in record else nested.get(field)) for field in meta_fields}
    return {"messages": messages, "label": label, "timestamp": timestamp, "meta": meta}


def _messages(value, field, answer=True) -> list[dict]:
    if isinstance(value, str):  # a CSV or Parquet cell holding the JSON list
        try:
            value = safe_json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow("bad_messages", f"field '{field}': not a JSON list of messages ({e.msg})") from None
    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", f"field '{field}': expected a non-empty list of {{role, content}}")
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadRow("bad_messages", f"field '{field}[{i}].role': {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise BadRow("bad_messages", f"field '{field}[{i}].content': must be non-empty text")
        messages.append({"role": role, "content": content})
    if answer and messages[-1]["role"] != "assistant":
        raise BadRow("no_assistant_answer", f"field '{field}': the last message is '{messages[-1]['role']}', "
                                            "it must be the assistant's answer")
    return messages


def _system(record) -> list[dict]:
    system = record.get("system")
    return [{"role": "system", "content": str(system)}] if not _blank(system) else []


def _text(record, field) -> str:
    value = record[field]
    if isinstance(value, (dict, list)):
        raise BadRow("missing_field", f"field '{field}': expected text, got {type(value).__name__}")
    return str(value).strip()


def _blank(value) -> bool:
    # CSV/Parquet give None or NaN for an empty cell
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def _scalar(value):
    if _blank(value) or (isinstance(value, float) and not math.isfinite(value)):  # meta must stay strict JSON
        return None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value, ensure_ascii=False, default=str)


def _detect(columns, name, records) -> str:
    for kind in FORMATS:
        if all(field in columns for field in REQUIRED[kind]):
            return kind
    unparsed = [(where, record) for where, record in records if isinstance(record, str)]
    if unparsed and not columns:
        raise DataError(f"{name}: {unparsed[0][0]}, {unparsed[0][1]}; no line of the file parses as a JSON object")
    found = ", ".join(c if c.isprintable() else repr(c) for c in sorted(columns))  # a key may hold a newline
    raise DataError(f"{name}: cannot tell the format from its columns (found: {found or 'none'}); "
                    "expected messages (chat), instruction + output (alpaca) or prompt + completion, "
                    "or set dataset.builder.format")


# ---- reading: a list of (place, record); a record that did not parse is a str saying why

def _read(file, name, encoding) -> list[tuple[str, object]]:
    suffix = file.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{name}: unsupported extension '{file.suffix}' (use {', '.join(EXTENSIONS)})")
    if suffix in (".csv", ".parquet"):
        return _read_with_datasets(file, name, suffix[1:])
    try:
        text = file.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not {encoding} text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    if suffix == ".json":
        try:
            whole = safe_json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip()[:1] == "[":
                raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
            whole = None  # JSON Lines under a .json name: read line by line below
        if isinstance(whole, list):
            return [(f"record {i}", record) for i, record in enumerate(whole, 1)]
        if whole is not None and "\n" in text.strip():
            raise DataError(f"{name}: one JSON {type(whole).__name__} spanning several lines; expected a list "
                            "of records, or one record per line (JSON Lines)")
    records = []
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            try:
                records.append((f"line {line}", safe_json.loads(raw)))
            except json.JSONDecodeError as e:
                records.append((f"line {line}", f"malformed JSON ({e.msg} at column {e.colno})"))
    return records


def _read_with_datasets(file, name, kind) -> list[tuple[str, dict]]:
    import datasets  # a slow import, only paid when a CSV or Parquet file is read

    try:
        table = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as e:  # datasets wraps the parser's error; its cause says what and where
        cause = e.__cause__ or e
        raise DataError(f"{name}: cannot read as {kind.upper()} ({' '.join(str(cause).split())[:200]})") from None
    return [(f"row {i}", record) for i, record in enumerate(table.to_list(), 1)]
