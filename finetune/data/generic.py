"""Generic builder (any use case): the instruction, chat and text data people already have.

Input (`path`): one file, a folder whose .jsonl / .json / .csv / .parquet files and `save_to_disk` folders
are all read (sorted, recursively; reading: finetune/data/files.py), or a LLaMA-Factory data folder whose
dataset_info.json names the dataset to read (`dataset_name`; finetune/data/llamafactory.py). Each file
is one of these forms, detected from its columns or forced with `format`:

- chat (OpenAI / TRL `messages`): roles system / user / assistant / tool; an assistant turn may call tools
  (`tool_calls`, arguments as JSON text or an object) and carry OpenAI's `weight` (0: not trained); content
  may be a list of parts (their text parts are joined with newlines); a top-level `tools` list.
      {"messages": [{"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function":
                        {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
                    {"role": "assistant", "content": "18 C in Paris.", "weight": 1}],
       "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]}
- sharegpt (`conversations` of from / value: human, gpt, system, function_call, observation), with an
  optional `system` column and LLaMA-Factory's `tools` (a JSON text of [{name, description, parameters}]);
  a function_call's value is the JSON text {"name", "arguments"} (or a list of them):
      {"conversations": [{"from": "human", "value": "Area of a 5 x 3 rectangle?"},
                         {"from": "function_call", "value": "{\\"name\\": \\"area\\", \\"arguments\\": {...}}"},
                         {"from": "observation", "value": "{\\"area\\": 15}"},
                         {"from": "gpt", "value": "15 square units."}], "tools": "[{\\"name\\": \\"area\\", ...}]"}
- alpaca (`instruction` / `input` / `output`, `input` optional; optional `system` and `history`, a list of
  earlier [instruction, response] pairs that become the turns before this one):
      {"instruction": "Classify the headline.", "input": "Apple beats", "output": "positive"}
- prompt_completion (`prompt` / `completion`, strings or TRL-style message lists):
      {"prompt": "Headline: Apple beats\\nSentiment?", "completion": "positive"}
- kto: any of the forms above with a true/false `label` (TRL's unpaired preference, LLaMA-Factory's
  kto_tag): the sample's "desirable" (label None). objective=kto learns from both kinds; objective=sft
  leaves the undesirable ones out of train and validation (dataset.undesirable=drop).
      {"prompt": "Capital of France?", "completion": "Paris.", "label": true}
- chosen: preference pairs (`chosen` / `rejected`, with a `prompt`, `messages`, `conversations` or alpaca
  `instruction`; or TRL's implicit prompt: `chosen` is the whole conversation): the sample is prompt + chosen,
  with the rejected answer's text as `rejected`. objective=sft trains on the chosen answer, objective=dpo on the
  pair. Auto mode never picks it: pairs are DPO data, so it stops and says so.
      {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
- text (TRL language modeling, axolotl `completion`: `text`; axolotl `segments`, label false = not trained):
      {"text": "A whole document."}
      {"segments": [{"text": "Q: 2+2?\\n", "label": false}, {"text": "4", "label": true}]}

Detection: preference pairs stop the build (set format=chosen); then chat (`messages`) and sharegpt
(`conversations`; a messages / conversations column whose turns use the other's keys role / from is read
as the other), alpaca, prompt_completion, kto when such a file's label column holds only true/false,
then text. `columns` maps our names (COLUMNS) to a file's own, `tags` the ShareGPT keys and role values
(TAGS), as LLaMA-Factory's dataset_info does: columns: {messages: dialog}, tags: {user_tag: user}.
Other message keys are dropped (a tool message keeps `name` and `tool_call_id`, a tool call its `id`), and
the last message must be an assistant's. A `system` column is the system turn of samples without one;
`system_prompt` is added to samples that still have none. Other columns are ignored unless named by
`label_field` (default "label"; `columns.label` is the same), `timestamp_field` (ISO text, a date, or epoch
seconds/ms) or `meta_fields` (copied into meta; looked up at the top level, then inside a `meta` object,
so the pipeline's own split files read back). A label or timestamp field that no record of a file has
means that file has none (None, with a log line); one that only some records lack is a bad row.

`images` / `videos` / `audios` columns (and non-text content parts) stop the build: finetune trains
text-only models. `drop_media=true` drops them and the <image> / <video> / <audio> placeholders.

Samples: chat forms give {"messages", "label", "timestamp", "meta"} (+ "tools" when the row has tools:
[{"type": "function", "function": {name, description, parameters}}]); text gives {"segments": [{"text",
"train"}], "label", "timestamp", "meta"}. One build is all chat or all text samples.

Bad rows (raise DataError naming file, place and field; or skip and count with skip_bad_rows=True):
"malformed_json", "not_an_object", "missing_field", "bad_messages", "bad_tool_call", "bad_tools",
"no_assistant_answer", "bad_segments", "missing_label", "bad_timestamp". A missing, empty, unreadable or
unrecognised file, preference rows in auto mode, and media without drop_media always raise.

Example sample (a chat line of data/demo_signals.jsonl):
    {"messages": [{"role": "system", "content": "You are a crypto trading assistant. ..."},
                  {"role": "user", "content": "SOL-USDT price 94.47\\nRSI: 36.7\\nMACD: golden_cross\\n..."},
                  {"role": "assistant", "content": "{\"signal\": \"BUY\", \"confidence\": 0.68}"}],
     "label": "BUY", "timestamp": "2024-01-01T00:00:00", "meta": {}}
"""
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from finetune.data import Built, files, llamafactory, safe_json
from finetune.data.rows import BadRow, BadRows, SkipRow, sized
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("chat", "sharegpt", "alpaca", "prompt_completion", "kto", "chosen", "text")
SHAPES = ("chat", "sharegpt", "alpaca", "prompt_completion")  # how turns are read; kto and chosen use one
REQUIRED = {"chat": ("messages",), "sharegpt": ("messages",), "alpaca": ("instruction", "output"),
            "prompt_completion": ("prompt", "completion")}
PROMPT = {"chat": "messages", "sharegpt": "messages", "alpaca": "instruction", "prompt_completion": "prompt"}
COLUMNS = ("messages", "instruction", "input", "output", "system", "history", "tools", "prompt", "completion",
           "chosen", "rejected", "text", "segments", "label", "images", "videos", "audios")
MEDIA = ("images", "videos", "audios")
MEDIA_PARTS = ("image", "image_url", "input_image", "video", "video_url", "audio", "input_audio", "audio_url", "file")
PLACEHOLDER = re.compile(r"<(?:image|video|audio)>")
TAGS = {  # tag -> (chat default, sharegpt default)
    "role_tag": ("role", "from"), "content_tag": ("content", "value"), "system_tag": ("system", "system"),
    "user_tag": ("user", "human"), "assistant_tag": ("assistant", "gpt"),
    "observation_tag": ("tool", "observation"), "function_tag": (None, "function_call")}
LLAMAFACTORY_NAMES = {"query": "input", "response": "output", "kto_tag": "label"}


@dataclass
class Plan:
    """How one file's records become samples."""
    format: str          # one of FORMATS
    shape: str | None    # one of SHAPES (text: None; chosen: None for TRL's implicit prompt)
    columns: dict        # our name -> the file's column
    tags: dict           # ShareGPT-style keys and role values of the turns


def build(path, *, skip_bad_rows=False, format="auto", label_field="label", timestamp_field="timestamp",
          meta_fields=(), system_prompt=None, encoding="utf-8-sig", columns=None, tags=None, dataset_name=None,
          drop_media=False, completion="chat") -> Built:
    columns, tags = dict(columns or {}), dict(tags or {})
    _check_options(format, columns, tags)
    if completion not in ("chat", "continuation"):
        raise ConfigError(f"dataset.builder.completion={completion}: choose chat (a text prompt is a user turn, its "
                          "completion the answer) or continuation (prompt + completion one text, as TRL trains them)")
    path = Path(path)
    root, hint = path.parent, None
    entry = llamafactory.entry(path, dataset_name)
    if entry is not None:  # the registry's file, form, columns and tags; the options given here win
        path, hint = entry.path, entry.shape
        columns, tags = {**entry.columns, **columns}, {**entry.tags, **tags}
    label_field = columns.pop("label", label_field)
    known = {"messages", "conversations", "instruction", "output", "prompt", "completion", "chosen", "text",
             "segments", *columns.values()}  # columns that make a pretty-printed JSON object one record
    samples, dropped, kinds = [], Counter(), {}
    for source in files.sources(path):
        name = _name(source, root)
        records = files.read(source, name, encoding, known)
        if not records:
            raise DataError(f"{name}: no records (the file is empty)")
        present = {key for _, record in records if isinstance(record, dict) for key in record}
        plan = _plan(format, hint, present, records, name, columns, tags, label_field)
        label = plan.columns["label"]
        fields = {"label": label if plan.format != "kto" else None, "timestamp": timestamp_field}
        for what, field in fields.items():
            if field and field not in present:
                log.info("%s: no '%s' field, so its samples have %s None", name, field, what)
        bad = BadRows(name, skip_bad_rows, "fix it or set dataset.skip_bad_rows=true", dropped)
        before, with_media = len(samples), 0
        for where, record in records:  # a BadRow from _sample names the field; the place is added here
            if drop_media and isinstance(record, dict):
                record, had = _without_media(record, plan.columns)
                with_media += had
            try:
                record = sized(record, None)  # over conf/dataset/_pipeline.yaml's caps: a bad row, or cut
                samples.append(_sample(record, plan, {k: f for k, f in fields.items() if f in present},
                                       meta_fields, system_prompt, completion == "continuation"))
            except SkipRow as skip:
                dropped[skip.reason] += 1
            except BadRow as err:
                if err.reason == "media":  # a choice about the whole data set, not a bad row
                    raise DataError(f"{name}: {where}, {err.message}") from None
                bad(err.reason, f"{where}, {err.message}")
        kept = len(samples) - before
        if with_media:
            log.info("%s: drop_media: media and <image>/<video>/<audio> placeholders removed from %d rows",
                     name, with_media)
        if plan.format == "kto":
            log.info("%s: kto: %d desirable and %d undesirable samples", name,
                     sum(s["desirable"] for s in samples[before:]), sum(not s["desirable"] for s in samples[before:]))
        if plan.format == "chosen":
            log.info("%s: format=chosen: %d samples of prompt + chosen, %d with a rejected answer ('%s')", name,
                     kept, sum("rejected" in sample for sample in samples[before:]), plan.columns["rejected"])
        if kept:
            kinds.setdefault("text" if plan.format == "text" else "chat", name)
        if len(kinds) == 2:
            raise DataError(f"{kinds['text']} holds text samples and {kinds['chat']} chat samples; one build is one "
                            "kind: point dataset.path at a file or folder of one kind")
    if not samples:
        raise DataError(f"{path.name}: no samples left (dropped: {dict(dropped)})")
    return Built(samples, dropped)


def _name(source: Path, root: Path) -> str:
    try:
        name = str(source.relative_to(root))
    except ValueError:  # a registry's file_name outside its folder
        name = str(source)
    return name + "/" if source.is_dir() else name


def _check_options(format, columns, tags) -> None:
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"dataset.builder.format={format}: choose auto, {', '.join(FORMATS)}")
    for key, value in columns.items():
        if key not in COLUMNS:
            hint = f" (LLaMA-Factory's {key} is our {LLAMAFACTORY_NAMES[key]})" if key in LLAMAFACTORY_NAMES else ""
            raise ConfigError(f"dataset.builder.columns.{key}: not one of {', '.join(COLUMNS)}{hint}")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"dataset.builder.columns.{key}: expected a column name, got {value!r}")
    for key, value in tags.items():
        if key not in TAGS:
            raise ConfigError(f"dataset.builder.tags.{key}: not one of {', '.join(TAGS)}")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"dataset.builder.tags.{key}: expected a key or role name, got {value!r}")


# ---- which form a file is in

def _columns(shape, columns, label_field) -> dict:
    default = {c: c for c in COLUMNS} | {"messages": "conversations" if shape == "sharegpt" else "messages",
                                         "label": label_field}
    return default | columns


def _tags(shape, tags) -> dict:
    return {tag: default[1 if shape == "sharegpt" else 0] for tag, default in TAGS.items()} | tags


def _plan(format, hint, present, records, name, columns, tags, label_field) -> Plan:
    def has(shape, ours):
        return _columns(shape, columns, label_field)[ours] in present

    def complete(shape):
        return all(has(shape, field) for field in REQUIRED[shape])

    if format == "auto" and has(None, "chosen") and has(None, "rejected"):
        pair = _columns(None, columns, label_field)
        raise DataError(f"{name}: '{pair['chosen']}' / '{pair['rejected']}' columns: these rows are preference pairs (DPO data), not supervised "
                        "samples; set dataset.builder.format=chosen: objective=dpo trains on the pairs, the default "
                        "objective=sft on prompt + chosen")
    if format in SHAPES:
        shape = format
    elif hint in SHAPES:
        shape = hint
    elif format == "chosen":
        shape = next((s for s in SHAPES if has(s, PROMPT[s])), None)
    elif format in ("auto", "kto") and hint != "text":
        shape = next((s for s in SHAPES if complete(s)), None)
    else:
        shape = None
    if shape in ("chat", "sharegpt") and format not in SHAPES and hint is None and "role_tag" not in tags:
        shape, columns = _turn_style(shape, records, name, columns, label_field)
    plan_columns = _columns(shape, columns, label_field)
    label = plan_columns["label"]
    if format == "auto":
        if shape is not None and label and _booleans(records, label):
            format = "kto"
        elif shape is not None:
            format = shape
        elif hint == "text" or has(None, "text") or has(None, "segments"):
            format = "text"
        else:
            _unknown(present, records, name, columns, label_field)
    if format == "kto" and shape is None:
        raise DataError(f"{name}: format=kto reads messages, conversations, instruction + output or prompt + "
                        f"completion rows with a true/false label; found {_found(present)}")
    if format == "kto" and (not label or label not in present):
        raise DataError(f"{name}: format=kto needs a true/false column '{label}' (desirable or not); set "
                        "+dataset.builder.columns.label=<the file's column>")
    if format == "text":
        shape = None
        plan_columns = _columns(None, columns, label_field)
    return Plan(format, shape, plan_columns, _tags(shape, tags))


def _turn_style(shape, records, name, columns, label_field):
    """chat or sharegpt, from the keys of the first turn found: role / content, or from / value."""
    column = _columns(shape, columns, label_field)["messages"]
    other = "sharegpt" if shape == "chat" else "chat"
    for _, record in records:
        turns = record.get(column) if isinstance(record, dict) else None
        if isinstance(turns, str):
            try:
                turns = safe_json.loads(turns)
            except json.JSONDecodeError:
                continue
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            mine, theirs = _tags(shape, {})["role_tag"], _tags(other, {})["role_tag"]
            if mine not in turns[0] and theirs in turns[0]:
                log.info("%s: '%s' turns have '%s' keys: read as %s", name, column, theirs, other)
                return other, {**columns, "messages": column}
            break
    return shape, columns


def _booleans(records, column) -> bool:
    values = [r[column] for _, r in records if isinstance(r, dict) and not _blank(r.get(column))]
    return bool(values) and all(isinstance(v, bool) for v in values)


def _found(present) -> str:
    return ", ".join(c if c.isprintable() else repr(c) for c in sorted(present)) or "none"  # a key may hold a newline


def _unknown(present, records, name, columns, label_field):
    unparsed = [(where, record) for where, record in records if isinstance(record, str)]
    if unparsed and not present:
        raise DataError(f"{name}: {unparsed[0][0]}, {unparsed[0][1]}; no line of the file parses as a JSON object")
    only_prompt = _columns(None, columns, label_field)["prompt"] in present
    hint = "; prompt-only rows have no answer to train on" if only_prompt else ""
    raise DataError(f"{name}: cannot tell the format from its columns (found: {_found(present)}){hint}; "
                    "expected messages (chat), conversations (sharegpt), instruction + output (alpaca), prompt + "
                    "completion, chosen + rejected (preference pairs) or text / segments; or map your columns, e.g. "
                    # `+`: dataset.builder.columns is empty in the config, and Hydra adds a new key only with it
                    "dataset.builder.format=prompt_completion +dataset.builder.columns.prompt=<column> "
                    "+dataset.builder.columns.completion=<column>")


# ---- one record -> one sample

def _sample(record, plan, fields, meta_fields, system_prompt, continuation=False) -> dict:
    if isinstance(record, str):  # a line the json module could not parse: record holds why
        raise BadRow("malformed_json", record)
    if not isinstance(record, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    col = plan.columns
    for ours in MEDIA:
        if not _blank(record.get(col[ours])) and record.get(col[ours]) != []:
            raise BadRow("media", f"field '{col[ours]}' holds {ours}: finetune trains text-only models; set "
                                  "dataset.builder.drop_media=true to drop the media and their <image> / <video> / "
                                  "<audio> placeholders")
    if plan.format == "text":
        required = ()  # _segments names what is missing
    elif plan.format == "chosen":
        required = ("chosen", PROMPT[plan.shape]) if plan.shape else ("chosen",)
    else:
        required = REQUIRED[plan.shape]
    for ours in required:
        if _blank(record.get(col[ours])):
            names = ", ".join(col[f] for f in required)
            raise BadRow("missing_field", f"field '{col[ours]}' is missing or empty ({plan.format} form needs {names})")

    if plan.format == "text":
        sample = {"segments": _segments(record, col)}
    elif continuation and plan.format == "prompt_completion":
        sample = {"segments": _continuation(record, col)}
    else:
        if plan.format == "chosen":
            messages = _prompt(record, plan) + _chosen(record, plan)
        else:
            messages = _prompt(record, plan) + _answer(record, plan)
        system = record.get(col["system"])
        if not _blank(system) and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": _text(record, col["system"])})
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        sample = {"messages": messages}
        if plan.format == "chosen" and not _blank(record.get(col["rejected"])):
            sample["rejected"] = _rejected(record, plan)
        tools = _tools(record.get(col["tools"]), col["tools"])
        if tools:
            sample["tools"] = tools

    label = None
    if plan.format == "kto":
        value = record.get(col["label"])
        if not isinstance(value, bool):
            raise BadRow("missing_label", f"field '{col['label']}': expected true or false (kto: is the answer "
                                          f"desirable?), got {value!r:.40}")
        sample["desirable"] = value
    elif "label" in fields:
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
    return {**sample, "label": label, "timestamp": timestamp, "meta": meta}


def _prompt(record, plan) -> list[dict]:
    """The turns before the trained answer (for chat forms and implicit-prompt pairs: all turns but chosen)."""
    col, shape = plan.columns, plan.shape
    if shape in ("chat", "sharegpt"):
        return _turns(record[col["messages"]], col["messages"], plan.tags, answer=plan.format != "chosen")
    if shape == "alpaca":
        user = _text(record, col["instruction"])
        if not _blank(record.get(col["input"])):
            user += "\n\n" + _text(record, col["input"])
        return _history(record.get(col["history"]), col["history"]) + [{"role": "user", "content": user}]
    if shape == "prompt_completion":
        prompt = record[col["prompt"]]
        return _turns(prompt, col["prompt"], _tags("chat", {}), answer=False) if isinstance(prompt, list) else \
            [{"role": "user", "content": _text(record, col["prompt"])}]
    return []  # TRL's implicit prompt: `chosen` is the whole conversation


def _answer(record, plan) -> list[dict]:
    col = plan.columns
    if plan.shape == "alpaca":
        return [{"role": "assistant", "content": _text(record, col["output"])}]
    if plan.shape == "prompt_completion":
        completion = record[col["completion"]]
        return _turns(completion, col["completion"], _tags("chat", {})) if isinstance(completion, list) else \
            [{"role": "assistant", "content": _text(record, col["completion"])}]
    return []  # chat and sharegpt: the answer is in the turns


def _chosen(record, plan) -> list[dict]:
    field = plan.columns["chosen"]
    chosen = record[field]
    tags = plan.tags if plan.shape == "sharegpt" else _tags("chat", {})
    if isinstance(chosen, dict):  # LLaMA-Factory: one turn, {"from": "gpt", "value": ...}
        return _turns([chosen], field, tags)
    if isinstance(chosen, list):
        return _turns(chosen, field, tags)
    if plan.shape is None:
        raise BadRow("missing_field", f"field '{field}' is text and there is no prompt column: to train on it as "
                                      f"plain text set dataset.builder.format=text +dataset.builder.columns.text="
                                      f"{field}, or name the prompt with +dataset.builder.columns.prompt=<column>")
    return [{"role": "assistant", "content": _text(record, field)}]


def _rejected(record, plan) -> str:
    """The rejected answer's text: a string, one turn, or a conversation whose last turn is the answer."""
    field = plan.columns["rejected"]
    value = record[field]
    if isinstance(value, str):
        return _text(record, field)
    tags = plan.tags if plan.shape == "sharegpt" else _tags("chat", {})
    turns = _turns([value] if isinstance(value, dict) else value, field, tags)
    if turns[-1]["role"] != "assistant" or not isinstance(turns[-1].get("content"), str):
        raise BadRow("bad_messages", f"field '{field}': the rejected answer must end with an assistant turn")
    return turns[-1]["content"]


def _turns(value, field, tags, answer=True) -> list[dict]:
    """Messages from a list of turns: OpenAI / TRL chat (role / content) or ShareGPT (from / value), per `tags`."""
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    value = _json_cell(value, field, "bad_messages", "a JSON list of messages")
    if not isinstance(value, list) or not value:
        raise BadRow("bad_messages", f"field '{field}': expected a non-empty list of {{{role_tag}, {content_tag}}}")
    roles = {tags[f"{role}_tag"]: role for role in ("system", "user", "assistant", "observation", "function")
             if tags[f"{role}_tag"]}
    plain = ", ".join(name for name, role in roles.items() if role in ("system", "user", "assistant"))
    messages = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        raw = turn.get(role_tag) if isinstance(turn, dict) else None
        role = roles.get(raw) if isinstance(raw, str) else None
        if role is None:
            keys = f" (the turn's keys: {_found(turn)}; set dataset.builder.format or dataset.builder.tags)" \
                if isinstance(turn, dict) and role_tag not in turn else ""
            raise BadRow("bad_messages", f"field '{where}.{role_tag}': {raw!r:.40} is not one of {', '.join(roles)}"
                                         f"{keys}")
        if role == "observation" and not (messages and (messages[-1].get("tool_calls") or
                                                         messages[-1]["role"] == "tool")):
            raise BadRow("bad_messages", f"field '{where}.{role_tag}': {raw!r} is not one of {plain}: a tool result "
                                         "must follow an assistant message with tool calls")
        if role == "function":  # ShareGPT: the assistant's turn is a call, its value {"name", "arguments"}
            message = {"role": "assistant", "content": "",
                       "tool_calls": _function_call(turn.get(content_tag), f"{where}.{content_tag}")}
        else:
            content = _content(turn.get(content_tag), f"{where}.{content_tag}")
            message = {"role": "tool" if role == "observation" else role, "content": content or ""}
        if role == "assistant" and turn.get("tool_calls") not in (None, []):
            message["tool_calls"] = _tool_calls(turn["tool_calls"], f"{where}.tool_calls")
        if role == "observation":
            message.update({key: turn[key] for key in ("name", "tool_call_id") if isinstance(turn.get(key), str)})
        if turn.get("weight") is not None:
            weight = turn["weight"]
            if role != "assistant" or isinstance(weight, bool) or weight not in (0, 1):
                raise BadRow("bad_messages", f"field '{where}.weight': {weight!r:.20} on a {message['role']} message; "
                                             "weight is 0 or 1, on assistant messages only")
            message["weight"] = int(weight)
        if not message["content"].strip() and not message.get("tool_calls"):
            raise BadRow("bad_messages", f"field '{where}.{content_tag}': must be non-empty text")
        messages.append(message)
    if answer and messages[-1]["role"] != "assistant":
        raise BadRow("no_assistant_answer", f"field '{field}': the last message is '{messages[-1]['role']}', "
                                            "it must be the assistant's answer")
    if answer and all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise BadRow("no_assistant_answer", f"field '{field}': every assistant message has weight 0: nothing trains")
    return messages


def _content(value, where) -> str | None:
    """Text content, or the text parts of a list of parts ([{"type": "text", "text": ...}]) joined."""
    if isinstance(value, str) or value is None:
        return value
    if not isinstance(value, list):
        return None
    texts = []
    for i, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and part.get("type") in MEDIA_PARTS:
            raise BadRow("media", f"field '{where}[{i}]': a '{part['type']}' part: finetune trains text-only models; "
                                  "set dataset.builder.drop_media=true to drop media parts")
        else:
            raise BadRow("bad_messages", f"field '{where}[{i}]': expected a part {{\"type\": \"text\", \"text\": ...}}")
    return "\n".join(texts)


def _call(name, arguments, where) -> dict:
    if not isinstance(name, str) or not name.strip():
        raise BadRow("bad_tool_call", f"field '{where}': the function name must be non-empty text")
    if isinstance(arguments, str):  # OpenAI: the arguments are JSON text
        try:
            arguments = safe_json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise BadRow("bad_tool_call", f"field '{where}': arguments are not JSON ({e.msg})") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRow("bad_tool_call", f"field '{where}': arguments must be a JSON object, got "
                                      f"{type(arguments).__name__}")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_calls(value, where) -> list[dict]:
    """OpenAI's [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    value = _json_cell(value, where, "bad_tool_call", "a JSON list of tool calls")
    if not isinstance(value, list):
        raise BadRow("bad_tool_call", f"field '{where}': expected a list of {{type, function: {{name, arguments}}}}")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise BadRow("bad_tool_call", f"field '{where}[{i}].function': expected {{name, arguments}}")
        calls.append(_call(function.get("name"), function.get("arguments"), f"{where}[{i}].function"))
        if isinstance(call.get("id"), str):
            calls[-1] = {"id": call["id"], **calls[-1]}
    return calls


def _function_call(value, where) -> list[dict]:
    """ShareGPT's function_call value: the JSON text of {"name", "arguments"}, or of a list of them."""
    value = _json_cell(value, where, "bad_tool_call", 'JSON {"name", "arguments"}')
    calls = value if isinstance(value, list) and value else [value]
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise BadRow("bad_tool_call", f"field '{where}': expected {{\"name\", \"arguments\"}}, got "
                                          f"{type(call).__name__}")
    return [_call(call.get("name"), call.get("arguments"), where) for call in calls]


def _json_cell(value, field, reason, expected):
    """A value as read; text (a CSV or Parquet cell, LLaMA-Factory's tools) parsed as JSON, or a BadRow."""
    if not isinstance(value, str):
        return value
    try:
        return safe_json.loads(value)
    except json.JSONDecodeError as e:
        raise BadRow(reason, f"field '{field}': not {expected} ({e.msg})") from None


def _tools(value, field) -> list[dict]:
    """A row's tools as [{"type": "function", "function": {name, description, parameters}}]: from OpenAI's list
    or LLaMA-Factory's JSON text of [{name, description, parameters}]."""
    if _blank(value):
        return []
    value = _json_cell(value, field, "bad_tools", "a JSON list of function schemas")
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise BadRow("bad_tools", f"field '{field}': expected a list of {{name, description, parameters}}")
    tools = []
    for i, tool in enumerate(value):
        schema = tool.get("function") if isinstance(tool, dict) and isinstance(tool.get("function"), dict) else tool
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str) or not schema["name"].strip():
            raise BadRow("bad_tools", f"field '{field}[{i}]': expected a function schema with a name")
        if "parameters" in schema and not isinstance(schema["parameters"], dict):
            raise BadRow("bad_tools", f"field '{field}[{i}].parameters': expected a JSON schema object")
        tools.append({"type": "function", "function": {key: schema[key] for key in ("name", "description",
                                                                                     "parameters") if key in schema}})
    return tools


def _history(value, field) -> list[dict]:
    """Alpaca's earlier turns: [[instruction, response], ...] -> user / assistant messages."""
    if _blank(value):
        return []
    value = _json_cell(value, field, "bad_messages", "a JSON list of [instruction, response]")
    if not isinstance(value, list):
        raise BadRow("bad_messages", f"field '{field}': expected a list of [instruction, response] pairs")
    messages = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise BadRow("bad_messages", f"field '{field}[{i}]': expected [instruction, response], two non-empty texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _continuation(record, col) -> list[dict]:
    """A text prompt / completion pair as one text, the completion trained, each character kept (TRL's reading of a
    string pair: " 66" continues "2 x 33 =" with its space; as chat turns it would become the answer "66")."""
    for ours in ("prompt", "completion"):
        if not isinstance(record[col[ours]], str):
            raise BadRow("bad_segments", f"field '{col[ours]}' is not text; dataset.builder.completion=continuation "
                                         "takes text prompts and completions (message lists: completion=chat)")
    return [{"text": record[col["prompt"]], "train": False}, {"text": record[col["completion"]], "train": True}]


def _segments(record, col) -> list[dict]:
    """A text row: `text` is one trained segment; axolotl's `segments` [{"text", "label"}] keep their label."""
    if col["segments"] not in record:
        value = record.get(col["text"])
        if not isinstance(value, str) or not value.strip():
            raise BadRow("missing_field", f"field '{col['text']}': expected non-empty text (text form needs "
                                          f"{col['text']} or {col['segments']})")
        return [{"text": value, "train": True}]
    field, value = col["segments"], record[col["segments"]]
    value = _json_cell(value, field, "bad_segments", "a JSON list of segments")
    if not isinstance(value, list) or not value:
        raise BadRow("bad_segments", f"field '{field}': expected a non-empty list of {{text, label}}")
    segments = []
    for i, segment in enumerate(value):
        text = segment.get("text") if isinstance(segment, dict) else None
        label = segment.get("label") if isinstance(segment, dict) else None
        if not isinstance(text, str) or not isinstance(label, bool):
            raise BadRow("bad_segments", f"field '{field}[{i}]': expected {{\"text\": text, \"label\": true or false}} "
                                         "(label false: not trained)")
        segments.append({"text": text, "train": label})
    if not any(s["train"] and s["text"].strip() for s in segments):
        raise BadRow("bad_segments", f"field '{field}': no segment with label true has text: nothing trains")
    return segments


def _without_media(record, col) -> tuple[dict, bool]:
    """The record less its media columns, non-text content parts and <image>/<video>/<audio> placeholders."""
    changed = any(not _blank(record.get(col[m])) and record.get(col[m]) != [] for m in MEDIA)
    record = {key: value for key, value in record.items() if key not in {col[m] for m in MEDIA}}

    def clean(value):
        nonlocal changed
        if isinstance(value, str) and PLACEHOLDER.search(value):
            changed = True
            return PLACEHOLDER.sub("", value).strip()
        if isinstance(value, list):
            kept = [v for v in value if not (isinstance(v, dict) and v.get("type") in MEDIA_PARTS)]
            changed = changed or len(kept) < len(value)
            return [clean(v) for v in kept]
        if isinstance(value, dict):
            return {key: clean(v) for key, v in value.items()}
        return value
    return clean(record), changed


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
