"""The one pipeline after every builder: build -> validate -> deduplicate -> split -> augment and rebalance the
train split -> stats, cached by content.

`prepare(cfg.dataset, tokenizer, run_dir / "data")` returns {"train": [...], "validation": [...], "test": [...]}
and writes those splits as JSONL plus stats.json into the run directory. A second call with the same
inputs (source bytes, dataset config, tokenizer) copies the cached result and builds nothing.
"""
import hashlib
import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.data import Built
from finetune.data.augment import augment, rebalance
from finetune.errors import DataError
from finetune.model import cache_root
from finetune.rundir import atomic_dir, write_json, write_text
from finetune import tasks

SPLITS = ("train", "validation", "test")
ROLES = {"system", "user", "assistant", "tool"}


def source_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def check_sample(sample: dict, task: str) -> str | None:
    """Why a built sample cannot train for `task` (finetune/tasks.py), or None. The reason names the field.

    A chat sample: messages (an assistant's may call tools, then its content may be empty; a tool result follows
    a call), the last one the assistant's. A text sample (segments, no messages) trains for task text only."""
    task = tasks.get(task)
    if "segments" in sample and "messages" not in sample:
        return check_segments(sample["segments"], task)
    messages = sample.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages missing or empty"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message role must be one of {sorted(ROLES)}, got {message!r:.60}"
        calls = message.get("tool_calls")
        if calls is not None and (message["role"] != "assistant" or not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(
                    c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), dict)
                for c in calls)):
            return f"tool_calls must be an assistant's [{{function: {{name, arguments}}}}], got {calls!r:.60}"
        if message["role"] == "tool" and not (i and (messages[i - 1].get("tool_calls") or
                                                      messages[i - 1]["role"] == "tool")):
            return "a tool message must follow an assistant message with tool_calls"
        if not isinstance(message.get("content"), str) or not (message["content"].strip() or calls):
            return f"empty {message.get('role')} content"
    if messages[-1]["role"] != "assistant":
        return "last message must be the assistant's answer"
    if task.labels and sample.get("label") in (None, ""):
        return "label missing"
    return task.check(messages[-1]["content"])


def check_segments(segments, task) -> str | None:
    if task.name != "text":
        return f"text samples (segments) train for dataset.task=text only, not {task.name}"
    if not isinstance(segments, list) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                                 and isinstance(s.get("train"), bool) for s in segments):
        return f"segments must be a list of {{text, train}}, got {segments!r:.60}"
    if not any(s["train"] and s["text"].strip() for s in segments):
        return "no trained text in segments"
    return None


def validate(samples: list[dict], task: str, skip_bad_rows: bool, dropped: Counter, where: str) -> list[dict]:
    kept = []
    for i, sample in enumerate(samples, 1):
        reason = check_sample(sample, task)
        if reason is None:
            kept.append(sample)
        elif skip_bad_rows:
            dropped[f"invalid: {reason.split(':')[0]}"] += 1
        else:
            raise DataError(f"{where}: sample {i}: {reason} (fix the source, or set dataset.skip_bad_rows=true)")
    return kept


def deduplicate(samples: list[dict], dropped: Counter) -> list[dict]:
    seen, kept = set(), []
    for sample in samples:
        body = sample["segments"] if "segments" in sample and "messages" not in sample else sample["messages"]
        key = json.dumps([body, sample.get("tools")], sort_keys=True, ensure_ascii=False)
        if key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(sample)
    return kept


def split(samples: list[dict], how: str, val_size: float, test_size: float, seed: int) -> dict[str, list[dict]]:
    """Random, or temporal: train on the oldest rows, validate on later ones, test on the latest."""
    if how == "temporal":
        missing = sum(s.get("timestamp") is None for s in samples)
        if missing:
            raise DataError(f"dataset.split=temporal but {missing} samples have no timestamp; use split=random")
        ordered = sorted(samples, key=lambda s: s["timestamp"])
    elif how == "random":
        ordered = samples[:]
        random.Random(seed).shuffle(ordered)
    else:
        raise DataError(f"dataset.split={how}: choose random or temporal")
    n = len(ordered)
    n_test, n_val = round(n * test_size), round(n * val_size)
    n_train = n - n_val - n_test
    if n_train < 1 or (val_size > 0 and n_val < 1) or (test_size > 0 and n_test < 1):
        raise DataError(f"only {n} samples: too few for val_size={val_size}, test_size={test_size}")
    return {"train": ordered[:n_train], "validation": ordered[n_train:n_train + n_val],
            "test": ordered[n_train + n_val:]}


def token_lengths(samples: list[dict], tokenizer) -> list[int]:
    """Tokens per sample as training sees them: the chat template (with the sample's tools), or a text sample's
    segments joined, with the tokenizer's EOS."""
    texts = [None] * len(samples)
    plain = [i for i, s in enumerate(samples) if "messages" in s and not s.get("tools")]
    if plain:  # one batched call for the common case
        rendered = render(tokenizer, [samples[i]["messages"] for i in plain], None, "messages")
        for i, text in zip(plain, rendered):
            texts[i] = text
    for i, sample in enumerate(samples):
        if "messages" not in sample:
            texts[i] = "".join(s["text"] for s in sample["segments"]) + (tokenizer.eos_token or "")
        elif sample.get("tools"):
            texts[i] = render(tokenizer, sample["messages"], sample["tools"], "tools")
    for sample, text in zip(samples, texts):
        missing = [c["function"]["name"] for m in sample.get("messages", []) for c in m.get("tool_calls", [])] + \
            [t["function"]["name"] for t in sample.get("tools", [])]
        missing = [name for name in missing if name not in text]
        if missing:
            raise DataError(f"{template_name(tokenizer)} does not render tool calls or tools (the rendered sample "
                            f"lacks {missing[0]!r}), so they would not train; set model.chat_template to a template "
                            "that does (model.chat_template=chatml_tools for a ChatML tokenizer)")
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def template_name(tokenizer) -> str:
    return f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


def render(tokenizer, messages, tools, what: str):
    """apply_chat_template(tokenize=False); a template that cannot render the messages or tools is a DataError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception as e:  # jinja2's TemplateError, or what the template's raise_exception() raises
        raise DataError(f"{template_name(tokenizer)} cannot render these {what} ({' '.join(str(e).split())[:160]}); "
                        "set model.chat_template to a template that can (model.chat_template=chatml_tools for a "
                        "ChatML tokenizer with tool calls)") from None


def describe(splits: dict[str, list[dict]], dropped: Counter, tokenizer, n_built: int) -> dict:
    stats = {"built": n_built, "dropped": dict(dropped), "splits": {}}
    for name, samples in splits.items():
        lengths = token_lengths(samples, tokenizer) if samples else [0]
        stats["splits"][name] = {
            "count": len(samples),
            "labels": dict(sorted(Counter(str(s.get("label")) for s in samples).items())),
            "tokens": {"total": int(sum(lengths)), "max": int(max(lengths)),
                       **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)}},
            "first_timestamp": min((s["timestamp"] for s in samples if s.get("timestamp")), default=None),
            "last_timestamp": max((s["timestamp"] for s in samples if s.get("timestamp")), default=None),
        }
    return stats


def write_jsonl(path: Path, samples: list[dict]) -> None:
    write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def prepare(cfg: DictConfig, tokenizer, out_dir: Path | None, seed: int,
            load: bool = True) -> tuple[dict[str, list[dict]], dict]:
    """The splits (not read back when `load` is false: a dry run needs only the stats) and stats.json's content."""
    source = Path(cfg.path)
    if not source.exists():
        raise DataError(f"dataset.path={source}: no such file or folder")
    digest = source_hash(source)
    key = hashlib.sha256(json.dumps([digest, OmegaConf.to_container(cfg, resolve=True), seed,
                                     tokenizer.name_or_path, len(tokenizer), getattr(tokenizer, "chat_template", None)],
                                    sort_keys=True).encode()).hexdigest()  # the template decides token counts
    cached = cache_root() / "datasets" / key[:16]
    started, from_cache = time.perf_counter(), (cached / "stats.json").exists()
    if not from_cache:
        # a partial, called here: instantiate() itself would wrap the builder's DataError in its own exception
        build = instantiate(cfg.builder, _partial_=True, _convert_="all")
        built: Built = build(skip_bad_rows=cfg.skip_bad_rows)
        dropped = Counter(built.dropped)
        samples = validate(built.samples, cfg.task, cfg.skip_bad_rows, dropped, str(source))
        if cfg.dedupe:
            samples = deduplicate(samples, dropped)
        if not samples:
            raise DataError(f"{source}: no samples left after filtering (dropped: {dict(dropped) or 'none'})")
        if cfg.augment.copies > 0 and "messages" not in samples[0]:
            raise DataError(f"{source}: dataset.augment rewrites a chat sample's user turn; these are text samples: "
                            "set dataset.augment.copies=0")
        splits = split(samples, cfg.split, cfg.val_size, cfg.test_size, seed)
        # augmentation and rebalancing touch the train split only: nothing derived from a held-out row trains
        train = augment(splits["train"], cfg.augment.copies, cfg.augment.instruction_variants,
                        cfg.augment.numeric_noise, seed)
        try:
            splits["train"] = rebalance(train, cfg.balance, seed)
        except ValueError as err:
            raise DataError(str(err)) from None
        stats = describe(splits, dropped, tokenizer, len(built.samples))
        stats["source"] = {"path": str(source), "sha256": digest}
        # another process (a DDP rank) may build the same data first: same content, theirs is kept
        with atomic_dir(cached, replace=False) as tmp:
            for name in SPLITS:
                write_jsonl(tmp / f"{name}.jsonl", splits[name])
            write_json(tmp / "stats.json", stats)
    if out_dir is not None:  # the run dir's copy (rank 0 only)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*SPLITS, "stats"):
            suffix = ".json" if name == "stats" else ".jsonl"
            shutil.copyfile(cached / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    splits = {name: read_jsonl(cached / f"{name}.jsonl") for name in SPLITS} if load else {}
    stats = json.loads((cached / "stats.json").read_text())
    stats["build"] = {"from_cache": from_cache, "seconds": round(time.perf_counter() - started, 4), "key": key[:16]}
    return splits, stats
