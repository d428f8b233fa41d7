"""The one pipeline after every builder: build -> validate -> deduplicate -> split -> augment and rebalance the
train split -> tokenize -> stats, cached by content, on disk in Arrow files (memory-mapped, not held).

`prepare(cfg.dataset, tokenizer, run_dir / "data", seed)` returns ({"train": [...], "validation": [...],
"test": [...]}, stats) and writes those splits as JSONL plus stats.json into the run directory; the tokenized
train and validation splits (input_ids + assistant_masks, finetune/data/tokens.py) are what SFTTrainer trains on
(`load_tokens`), tokenized once, in the same pass that counts the tokens for stats.json.

A builder's samples may be a list or a generator (trade_signals streams its SQLite rows): they are checked
and written to an Arrow file one by one, so a build of millions of rows holds one JSON string per sample on
disk, a 16-byte digest per sample for deduplication in memory, and the split indices. Each batch of 10,000 is
tokenized as it is written, in `dataset.num_proc` worker processes while this one builds the next batch; the
splits are then Arrow copies of the rows at their indices (samples and tokens), never Python objects.

The cache key is everything the result depends on: the source's bytes (hashed in 1 MiB chunks), the dataset
config, the seed, the tokenizer and its chat template, and the code (the builder's module, this file,
tokens.py). A second call with the same inputs builds nothing: it links the cached files into the run dir.
"""
import hashlib
import importlib
import json
import os
import random
import signal
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.data import Built, tokens
from finetune.data.augment import augment, rebalance
from finetune.errors import DataError
from finetune.model import cache_root
from finetune.rundir import atomic_dir, write_json
from finetune import tasks

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "validation", "test")
ROLES = {"system", "user", "assistant", "tool"}
CHUNK = 10_000  # samples per batch written, tokenized and copied


def source_hash(path: Path) -> str:
    """sha256 over the file (or every file of the folder, with its relative name), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def code_version(builder_target: str) -> str:
    """sha256 of the code that turns the source into samples and tokens: after an upgrade the cache misses."""
    digest = hashlib.sha256()
    module = importlib.import_module(builder_target.rsplit(".", 1)[0])
    for file in (module.__file__, __file__, tokens.__file__):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def cache_key(cfg: DictConfig, seed: int, digest: str, tokenizer) -> str:
    return hashlib.sha256(json.dumps([digest, OmegaConf.to_container(cfg, resolve=True), seed, tokenizer.name_or_path,
                                      len(tokenizer), getattr(tokenizer, "chat_template", None),
                                      code_version(cfg.builder._target_)], sort_keys=True).encode()).hexdigest()


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


def body(sample: dict) -> list:
    """What makes two samples the same: their messages (or a text sample's segments) and tools."""
    return [sample["segments"] if "messages" not in sample else sample["messages"], sample.get("tools")]


def checked(samples, task: str, skip_bad_rows: bool, dedupe: bool, dropped: Counter, where: str):
    """The valid samples, in order, less duplicates (same messages or segments, and tools); a generator, so a
    streaming builder's samples pass one at a time. An invalid sample stops the build, or is counted."""
    seen = set()
    for i, sample in enumerate(samples, 1):
        reason = check_sample(sample, task)
        if reason is not None:
            if not skip_bad_rows:
                raise DataError(f"{where}: sample {i}: {reason} (fix the source, or set dataset.skip_bad_rows=true)")
            dropped[f"invalid: {reason.split(':')[0]}"] += 1
            continue
        if dedupe:
            key = hashlib.blake2b(json.dumps(body(sample), sort_keys=True, ensure_ascii=False).encode(),
                                  digest_size=16).digest()
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
        yield sample


def split_indices(timestamps: list, how: str, val_size: float, test_size: float, seed: int) -> dict[str, list[int]]:
    """Random, or temporal: train on the oldest rows, validate on later ones, test on the latest."""
    n = len(timestamps)
    if how == "temporal":
        missing = sum(t is None for t in timestamps)
        if missing:
            raise DataError(f"dataset.split=temporal but {missing} samples have no timestamp; use split=random")
        ordered = sorted(range(n), key=timestamps.__getitem__)  # stable: ties keep the builder's order
    elif how == "random":
        ordered = list(range(n))
        random.Random(seed).shuffle(ordered)
    else:
        raise DataError(f"dataset.split={how}: choose random or temporal")
    n_test, n_val = round(n * test_size), round(n * val_size)
    n_train = n - n_val - n_test
    if n_train < 1 or (val_size > 0 and n_val < 1) or (test_size > 0 and n_test < 1):
        raise DataError(f"only {n} samples: too few for val_size={val_size}, test_size={test_size}")
    return {"train": ordered[:n_train], "validation": ordered[n_train:n_train + n_val],
            "test": ordered[n_train + n_val:]}


TOKEN_COLUMNS = {"input_ids": "int32", "assistant_masks": "int8", "length": "int32", "first_trained": "int32"}
_worker = {}  # a tokenizing process's tokenizer and train_turns (set once per process)


def token_features() -> "datasets.Features":
    import datasets
    return datasets.Features({name: datasets.Sequence(datasets.Value(kind)) if name in ("input_ids", "assistant_masks")
                              else datasets.Value(kind) for name, kind in TOKEN_COLUMNS.items()})


def tokenize_file(path: str, samples: list[str], tokenizer=None, turns: str | None = None,
                  cache: dict | None = None) -> int:
    """JSON samples -> an Arrow file of input_ids, assistant_masks, length, first trained token; the row count.
    In a worker process the tokenizer (and its cache of recurring pieces) is the one `start_worker` set."""
    from datasets.arrow_writer import ArrowWriter
    if tokenizer is None:
        tokenizer, turns, cache = _worker["tokenizer"], _worker["turns"], _worker["cache"]
    with ArrowWriter(features=token_features(), path=path) as writer:
        for k in range(0, len(samples), 1000):
            encoded = tokens.tokenize_many([json.loads(sample) for sample in samples[k:k + 1000]], tokenizer, turns,
                                           cache)
            writer.write_batch({"input_ids": [e["input_ids"] for e in encoded],
                                "assistant_masks": [e["assistant_masks"] for e in encoded],
                                "length": [len(e["input_ids"]) for e in encoded],
                                "first_trained": [e["first_trained"] for e in encoded]})
        writer.finalize()
    return len(samples)


def start_worker(tokenizer, turns: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the run's preemption handler (finetune/preemption.py):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process stops the pool
    _worker.update(tokenizer=tokenizer, turns=turns, cache={})


class Tokenizing:
    """Batches of JSON samples tokenized into numbered Arrow files as they are written: in `num_proc` worker
    processes, while this one builds the next batch, once there is more than one batch (a process costs ~1 s to
    start); in this process otherwise. `done()` waits and gives the tokens, in the samples' order."""

    def __init__(self, folder: Path, tokenizer, turns: str, num_proc: int | None):
        self.folder, self.tokenizer, self.turns, self.num_proc = folder, tokenizer, turns, num_proc or 0
        self.pending, self.files, self.pool, self.first, self.cache = [], [], None, None, {}
        folder.mkdir(parents=True, exist_ok=True)

    def submit(self, samples: list[str]) -> None:
        if self.num_proc and self.pool is None and self.first is None:
            self.first = samples  # held until a second batch says the data is large enough for processes
            return
        if self.num_proc and self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(self.num_proc, mp_context=multiprocessing.get_context("fork"),
                                            initializer=start_worker, initargs=(self.tokenizer, self.turns))
            first, self.first = self.first, None
            self.submit(first)
        path = str(self.folder / f"{len(self.files):05d}.arrow")
        self.files.append(path)
        if self.pool is None:
            tokenize_file(path, samples, self.tokenizer, self.turns, self.cache)
            return
        while len(self.pending) >= 2 * self.num_proc:  # bounded: the builder never runs far ahead
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(tokenize_file, path, samples))

    def done(self) -> "datasets.Dataset":
        import datasets
        if self.first is not None:
            first, self.first, self.num_proc = self.first, None, 0
            self.submit(first)
        try:
            for future in self.pending:
                future.result()  # a worker's DataError is raised here, as it would be in this process
        finally:
            self.close()
        if not self.files:
            return datasets.Dataset.from_dict({name: [] for name in TOKEN_COLUMNS}, features=token_features())
        return datasets.concatenate_datasets([datasets.Dataset.from_file(path) for path in self.files])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def write_samples(path: Path, samples, tokenizing: Tokenizing) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """The samples as one Arrow file (the JSON sample, its timestamp and label), written in batches, each batch
    tokenized as it goes; (samples, tokens), row for row."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    features = datasets.Features({"sample": datasets.Value("string"), "timestamp": datasets.Value("string"),
                                  "label": datasets.Value("string")})
    with ArrowWriter(features=features, path=str(path)) as writer:
        batch = {"sample": [], "timestamp": [], "label": []}
        try:
            for sample in samples:
                batch["sample"].append(json.dumps(sample, ensure_ascii=False))
                batch["timestamp"].append(sample.get("timestamp"))
                batch["label"].append(str(sample.get("label")))
                if len(batch["sample"]) == CHUNK:
                    writer.write_batch(batch)
                    tokenizing.submit(batch["sample"])
                    batch = {key: [] for key in batch}
        except BaseException:
            tokenizing.close()  # a bad row stops the build: no worker is left behind
            raise
        if batch["sample"]:
            writer.write_batch(batch)
            tokenizing.submit(batch["sample"])
        writer.finalize()
    return datasets.Dataset.from_file(str(path)), tokenizing.done()


def take(batches: list, offsets: np.ndarray, indices: np.ndarray):
    """The rows at `indices` (in that order) of a table split into record batches (`offsets`: each batch's first
    row), gathered batch by batch: pyarrow's take on a many-chunk table first joins all of its chunks (1M
    samples' tokens at once)."""
    import pyarrow as pa
    where = np.searchsorted(offsets, indices, side="right") - 1
    order = np.argsort(where, kind="stable")
    picked, owner = indices[order], where[order]
    bounds = np.flatnonzero(np.diff(owner)) + 1
    parts = [batches[group[0]].take(pa.array(rows - offsets[group[0]]))
             for rows, group in zip(np.split(picked, bounds), np.split(owner, bounds))]
    return pa.Table.from_batches(parts).combine_chunks().take(pa.array(np.argsort(order)))


def write_split(tmp: Path, name: str, rows: "datasets.Dataset", tokenized: "datasets.Dataset",
                indices: list[int]) -> "datasets.Dataset":
    """tmp/NAME.jsonl (the samples, as the run dir keeps them) and tmp/tokens/NAME.arrow (what trains): the
    rows at `indices`, copied in Arrow (never as Python objects) a chunk at a time; the split's tokens."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    tables = [table.to_batches() for table in (rows.data.table.select(["sample"]), tokenized.data.table)]
    offsets = [np.cumsum([0] + [len(batch) for batch in batches[:-1]]) for batches in tables]
    (tmp / "tokens").mkdir(exist_ok=True)
    path = tmp / "tokens" / f"{name}.arrow"
    indices = np.asarray(indices, dtype=np.int64)
    with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f, \
            ArrowWriter(features=token_features(), path=str(path)) as writer:
        for k in range(0, len(indices), 5 * CHUNK):
            chunk = indices[k:k + 5 * CHUNK]
            f.writelines(line + "\n" for line in take(tables[0], offsets[0], chunk).column("sample").to_pylist())
            writer.write_table(take(tables[1], offsets[1], chunk))
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def load_tokens(stats: dict, name: str) -> "datasets.Dataset":
    """The tokenized split `name` of a prepared dataset (memory-mapped from the cache)."""
    import datasets
    files = sorted((Path(stats["build"]["dir"]) / "tokens").glob(f"{name}*.arrow"))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


def column(rows: "datasets.Dataset", name: str) -> np.ndarray:
    """A numeric column as one numpy array, read from Arrow (a Column iterates row by row)."""
    return rows.with_format("arrow")[name].to_numpy()


def values(rows: "datasets.Dataset", name: str) -> list:
    """A column as one Python list, read from Arrow in one call (a Column iterates row by row)."""
    return rows.with_format("arrow")[name].to_pylist()


def describe(rows, tokenized) -> dict:
    lengths = column(tokenized, "length") if len(tokenized) else np.zeros(1, dtype=np.int32)
    timestamps = [t for t in values(rows, "timestamp") if t]
    return {"count": len(rows), "labels": dict(sorted(Counter(values(rows, "label")).items())),
            "tokens": {"total": int(lengths.sum()), "max": int(lengths.max()),
                       **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)}},
            "first_timestamp": min(timestamps, default=None), "last_timestamp": max(timestamps, default=None)}


def build_into(tmp: Path, cfg: DictConfig, tokenizer, seed: int, source: Path, digest: str) -> dict:
    """Build, check, split and tokenize into `tmp`; stats.json's content."""
    # a partial, called here: instantiate() itself would wrap the builder's DataError in its own exception
    build = instantiate(cfg.builder, _partial_=True, _convert_="all")
    built: Built = build(skip_bad_rows=cfg.skip_bad_rows)
    dropped, counted = built.dropped, Counter()  # a streaming builder counts its drops as it is read

    def counting(samples):
        for sample in samples:
            counted["built"] += 1
            yield sample
    rows, tokenized = write_samples(tmp / "samples.arrow", checked(counting(built.samples), cfg.task,
                                                                 cfg.skip_bad_rows, cfg.dedupe, dropped, str(source)),
                                    Tokenizing(tmp / "shards", tokenizer, cfg.train_turns, cfg.num_proc))
    dropped = Counter(dropped)
    if not len(rows):
        raise DataError(f"{source}: no samples left after filtering (dropped: {dict(dropped) or 'none'})")
    first = json.loads(rows[0]["sample"])
    if cfg.augment.copies > 0 and "messages" not in first:
        raise DataError(f"{source}: dataset.augment rewrites a chat sample's user turn; these are text samples: "
                        "set dataset.augment.copies=0")
    indices = split_indices(values(rows, "timestamp"), cfg.split, cfg.val_size, cfg.test_size, seed)
    splits = {name: (rows, tokenized, indices[name]) for name in SPLITS}
    if cfg.augment.copies > 0 or cfg.balance != "none":
        # augmentation and rebalancing touch the train split only: nothing derived from a held-out row trains;
        # they work on the train samples in memory
        train = augment([json.loads(s) for s in values(rows.select(indices["train"]), "sample")],
                        cfg.augment.copies, cfg.augment.instruction_variants, cfg.augment.numeric_noise, seed)
        try:
            train = rebalance(train, cfg.balance, seed)
        except ValueError as err:
            raise DataError(str(err)) from None
        train_rows, train_tokens = write_samples(tmp / "train.arrow", train, Tokenizing(
            tmp / "train-shards", tokenizer, cfg.train_turns, cfg.num_proc))
        splits["train"] = (train_rows, train_tokens, list(range(len(train_rows))))
    stats = {"built": counted["built"], "kind": "text" if "messages" not in first else "chat",
             "dropped": dict(dropped), "splits": {}}
    for name, (split_rows, split_tokens, picked) in splits.items():
        stats["splits"][name] = describe(split_rows.select(picked), write_split(tmp, name, split_rows, split_tokens,
                                                                                picked))
    for leftover in (tmp / "samples.arrow", tmp / "train.arrow"):
        leftover.unlink(missing_ok=True)
    for leftover in (tmp / "shards", tmp / "train-shards"):
        shutil.rmtree(leftover, ignore_errors=True)
    stats["source"] = {"path": str(source), "sha256": digest}
    return stats


def link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # the cache's files are never written again: a link is a copy
    except OSError:
        shutil.copyfile(source, target)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare(cfg: DictConfig, tokenizer, out_dir: Path | None, seed: int, load: bool = True,
            max_length: int | None = None) -> tuple[dict[str, list[dict]], dict]:
    """The splits (not read back when `load` is false: a dry run needs only the stats) and stats.json's content.
    With `max_length` (training.max_length), each split's stats say how many samples it cuts (`over_max_length`)
    and how many it leaves without a trained token (`untrainable`: training leaves them out)."""
    source = Path(cfg.path)
    if not source.exists():
        raise DataError(f"dataset.path={source}: no such file or folder")
    started = time.perf_counter()
    digest = source_hash(source)
    key = cache_key(cfg, seed, digest, tokenizer)
    cached = cache_root() / "datasets" / key[:16]
    from_cache = (cached / "stats.json").exists()
    if not from_cache:
        # another process (a DDP rank) may build the same data first: same content, theirs is kept
        with atomic_dir(cached, replace=False) as tmp:
            write_json(tmp / "stats.json", build_into(tmp, cfg, tokenizer, seed, source, digest))
    if out_dir is not None:  # the run dir's copy (rank 0 only)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (*SPLITS, "stats"):
            suffix = ".json" if name == "stats" else ".jsonl"
            link_or_copy(cached / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    splits = {name: read_jsonl(cached / f"{name}.jsonl") for name in SPLITS} if load else {}
    stats = json.loads((cached / "stats.json").read_text())
    stats["build"] = {"from_cache": from_cache, "key": key[:16], "dir": str(cached)}
    if max_length:
        for name in SPLITS:
            rows = load_tokens(stats, name)
            stats["splits"][name]["over_max_length"] = int((column(rows, "length") > max_length).sum())
            stats["splits"][name]["untrainable"] = int((column(rows, "first_trained") >= max_length).sum())
    stats["build"]["seconds"] = round(time.perf_counter() - started, 4)
    return splits, stats
