"""Reading the generic builder's sources into records: a list of (place, record) per source.

A source is a .jsonl / .json / .csv / .parquet file, or a folder written by `datasets`' `save_to_disk`
(a Dataset: state.json + dataset_info.json + *.arrow; a DatasetDict: dataset_dict.json + one folder per
split). `sources(path)` lists them under a file or folder (sorted, recursively; the files inside a
save_to_disk folder are its data, never read one by one). `read(source, ...)` gives its records:

- .jsonl line by line with the json module, so a malformed line is named by its line number (the
  `datasets` JSON loader reports "Expected object or value" with no line, and rejects a column whose
  type changes between rows). A .jsonl that holds one JSON list is read as that list (with a log line).
- .json: a list of objects, JSON Lines under a .json name, or one object pretty-printed across lines
  (one record, when it has a column a format reads; a wrapper such as {"data": [...]} is refused).
- .csv and .parquet through `datasets.load_dataset("csv" | "parquet", data_files=...)`, local only.
- a save_to_disk folder through `datasets.load_from_disk`; a DatasetDict's splits are read one after
  the other (the pipeline splits the samples again).

A record that did not parse is a str saying why, so that the builder decides what a bad row is. Places
are "line N" (JSON Lines), "record N" (a JSON list or object), "row N" (CSV data rows, Parquet, a saved
Dataset) or "split 'S' row N" (a saved DatasetDict), 1-based.
"""
import json
import logging
from pathlib import Path

from finetune.data import safe_json
from finetune.data.rows import jsonl_records
from finetune.errors import DataError

log = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SAVED = ("state.json", "dataset_dict.json")  # what save_to_disk writes at the top of its folder
METADATA = ("dataset_info.json", *SAVED)     # metadata, never data, when a folder is scanned


def saved(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in SAVED)


def sources(path: Path) -> list[Path]:
    if path.is_file() or saved(path):
        return [path]
    if not path.is_dir():
        raise DataError(f"{path.name}: file not found ({path}); set dataset.path to a file or folder")
    found, inside = [], []
    for entry in sorted(path.rglob("*")):  # a folder sorts before its files
        if any(folder in entry.parents for folder in inside):
            continue
        if saved(entry):
            inside.append(entry)
            found.append(entry)
        elif entry.is_file() and entry.suffix.lower() in EXTENSIONS and entry.name not in METADATA:
            found.append(entry)
    if not found:
        raise DataError(f"{path.name}/: no {' / '.join(EXTENSIONS)} files or save_to_disk folders in the folder "
                        f"({path})")
    return found


def read(source: Path, name: str, encoding: str, known: set[str]) -> list[tuple[str, object]]:
    """The records of one source; `known` (column names a format reads) tells a pretty-printed record from a
    wrapper object."""
    if source.is_dir():
        return _read_saved(source, name)
    suffix = source.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{name}: unsupported extension '{source.suffix}' (use {', '.join(EXTENSIONS)})")
    if suffix in (".csv", ".parquet"):
        return _read_with_datasets(source, name, suffix[1:])
    try:
        text = source.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        if suffix == ".jsonl":  # one bad byte spoils its line, a bad row like any other, not the whole file
            try:
                return [(f"line {line}", record) for line, record in jsonl_records(source, encoding)]
            except UnicodeDecodeError:
                pass  # no line decodes: the file is in another encoding
        raise DataError(f"{name}: not {encoding} text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    parsed, whole = False, None
    if suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            whole, parsed = safe_json.loads(text), True
        except json.JSONDecodeError as e:
            if suffix == ".json" and text.lstrip()[:1] == "[":
                raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
            # JSON Lines (under a .json name too): read line by line below
    if parsed and isinstance(whole, list):
        if suffix == ".jsonl":
            log.info("%s: one JSON list, not JSON Lines: read as a list of %d records", name, len(whole))
        return [(f"record {i}", record) for i, record in enumerate(whole, 1)]
    if parsed and isinstance(whole, dict) and "\n" in text.strip():
        if known & whole.keys():
            log.info("%s: one JSON object across several lines: read as one record", name)
            return [("record 1", whole)]
        lists = [key for key, value in whole.items() if isinstance(value, list) and value
                 and all(isinstance(item, dict) for item in value)]
        hint = f" (its '{lists[0]}' holds a list of {len(whole[lists[0]])} records: save that list as the file)" \
            if lists and lists[0].isprintable() else ""
        raise DataError(f"{name}: one JSON dict spanning several lines; expected a list of records, one record per "
                        f"line (JSON Lines), or one record{hint}")
    records = []
    for line, raw in enumerate(text.splitlines(), 1):
        if raw.strip():
            try:
                records.append((f"line {line}", safe_json.loads(raw)))
            except json.JSONDecodeError as e:
                records.append((f"line {line}", f"malformed JSON ({e.msg} at column {e.colno})"))
    return records


def _cause(error: Exception) -> str:
    cause = error.__cause__ or error  # datasets wraps the parser's error; its cause says what and where
    return " ".join(str(cause).split())[:200]


def _read_with_datasets(file: Path, name: str, kind: str) -> list[tuple[str, dict]]:
    import datasets  # a slow import, only paid when a CSV or Parquet file is read

    try:
        table = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as e:
        raise DataError(f"{name}: cannot read as {kind.upper()} ({_cause(e)})") from None
    return [(f"row {i}", record) for i, record in enumerate(table.to_list(), 1)]


def _read_saved(folder: Path, name: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DataError(f"{name}: cannot read the save_to_disk folder ({_cause(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        log.info("%s: a DatasetDict: its splits (%s) are read as one set; the pipeline splits it again "
                 "(dataset.split, dataset.val_size, dataset.test_size)", name, ", ".join(loaded))
        return [(f"split '{split}' row {i}", record) for split, part in loaded.items()
                for i, record in enumerate(part.to_list(), 1)]
    return [(f"row {i}", record) for i, record in enumerate(loaded.to_list(), 1)]
