"""A LLaMA-Factory data folder: `dataset_info.json` names each dataset and says how to read its file.

    {"glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "tools": "tools"}},
     "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
     "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}}}

`entry(path, dataset_name)` reads the entry that `dataset.builder.dataset_name` picks (the only one may go
unnamed) and translates it into the generic builder's terms: the data file or folder, the form
(`formatting`: alpaca, the default, or sharegpt; an alpaca entry whose only column is `prompt` is
LLaMA-Factory's pre-training text), the columns (LLaMA-Factory's prompt / query / response / kto_tag are
our instruction / input / output / label under alpaca) and the ShareGPT tags (same names as ours).
`ranking: true` needs no translation: its chosen / rejected columns say it is preference data. Entries
on a hub (hf_hub_url, ms_hub_url, script_url, cloud_file_name) are refused: finetune reads local files.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import safe_json
from finetune.data.files import saved
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
COLUMNS = {  # LLaMA-Factory's column names -> ours, per formatting
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "tools": "tools", "images": "images", "videos": "videos", "audios": "audios",
               "chosen": "chosen", "rejected": "rejected", "kto_tag": "label"},
    "sharegpt": {"messages": "messages", "system": "system", "tools": "tools", "images": "images",
                 "videos": "videos", "audios": "audios", "chosen": "chosen", "rejected": "rejected",
                 "kto_tag": "label"},
}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
IGNORED = ("subset", "split", "folder", "num_samples")  # hub options, or a subsample finetune does not take


@dataclass
class Entry:
    path: Path              # the data file or folder
    shape: str              # sharegpt, alpaca or text
    columns: dict = field(default_factory=dict)   # our name -> the file's column
    tags: dict = field(default_factory=dict)


def registry(path: Path) -> Path | None:
    """The dataset_info.json that makes `path` a LLaMA-Factory data folder (or is `path`), or None."""
    file = path / "dataset_info.json" if path.is_dir() else path
    if file.name != "dataset_info.json" or not file.is_file() or saved(file.parent):
        return None  # a save_to_disk folder has a dataset_info.json of its own: datasets' metadata
    return file


def entry(path: Path, dataset_name: str | None) -> Entry | None:
    file, info = registry(path), None
    if file is not None:
        where = f"{file.parent.name}/{file.name}"
        try:
            info = safe_json.loads(file.read_bytes())
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
        if not _is_registry(info):  # e.g. a Hugging Face dataset_info.json: metadata, the folder is read as data
            log.info("%s: not a LLaMA-Factory registry (no entries with file_name, formatting or columns)", where)
            info = None
    if info is None:
        if dataset_name is not None:
            raise ConfigError(f"dataset.builder.dataset_name={dataset_name}: {path.name} is not a LLaMA-Factory data "
                              "folder (no dataset_info.json registry in it); set dataset.builder.dataset_name=null")
        return None
    local = [name for name, e in info.items() if "file_name" in e]
    if dataset_name is None:
        if len(info) > 1:
            others = f" ({len(info) - len(local)} more are on a hub)" if len(local) < len(info) else ""
            raise ConfigError(f"{where} lists {len(info)} datasets: set dataset.builder.dataset_name to one of "
                              f"{', '.join(local)}{others}")
        dataset_name = next(iter(info))
    if dataset_name not in info:
        raise ConfigError(f"dataset.builder.dataset_name={dataset_name}: not in {where}; it lists "
                          f"{', '.join(local) or 'no local file'}")
    spec = info[dataset_name]
    where = f"{where}, dataset '{dataset_name}'"
    if "file_name" not in spec:
        remote = next((key for key in REMOTE if key in spec), None)
        named = f" (it names {remote} {spec[remote]!r})" if remote else ""
        raise DataError(f"{where}: no file_name{named}; finetune reads local files only: download the data and "
                        "give the entry a file_name")
    data = file.parent / str(spec["file_name"])
    if not data.exists():
        raise DataError(f"{where}: file_name {spec['file_name']!r} not found in {file.parent}")
    formatting = spec.get("formatting", "alpaca")
    if formatting not in COLUMNS:
        raise DataError(f"{where}: formatting {formatting!r} is not alpaca or sharegpt")
    columns, tags = spec.get("columns") or {}, spec.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: columns and tags must be objects")
    unknown = sorted(set(columns) - set(COLUMNS[formatting])) + sorted(set(tags) - set(TAGS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)} in columns / tags (a {formatting} entry "
                        f"takes columns {', '.join(COLUMNS[formatting])}; tags {', '.join(TAGS)})")
    ignored = [key for key in IGNORED if key in spec]
    if ignored:
        log.info("%s: %s ignored (every row of the file is read)", where, ", ".join(ignored))
    ours = {COLUMNS[formatting][key]: str(value) for key, value in columns.items()}
    shape = formatting
    if formatting == "alpaca" and set(columns) == {"prompt"} and not spec.get("ranking"):
        shape, ours = "text", {"text": str(columns["prompt"])}  # pre-training documents: text only
    log.info("%s: %s, read as %s", where, data.name, shape)
    return Entry(data, shape, ours, {key: str(value) for key, value in tags.items()})


def _is_registry(info) -> bool:
    return isinstance(info, dict) and bool(info) and all(isinstance(e, dict) for e in info.values()) and \
        any(key in e for e in info.values() for key in ("file_name", "formatting", "columns", *REMOTE))
