"""The one pipeline after every builder: build -> validate -> deduplicate -> split -> augment and rebalance the
train split -> tokenize -> stats, cached by content, on disk in Arrow files (memory-mapped, not held).

`prepare(cfg.dataset, tokenizer, run_dir / "data", seed)` returns ({"train": [...], "validation": [...],
"test": [...]}, stats) and writes those splits as JSONL plus stats.json into the run directory; the tokenized
train and validation splits (input_ids + assistant_masks, finetune/data/tokens.py) are what SFTTrainer trains on
(`load_tokens`), tokenized once, in the same pass that counts the tokens for stats.json.

The work is done in batches of 10,000 samples (`Batches`), each one built, checked, written as JSON to an Arrow
shard and tokenized into another, in `dataset.num_proc` worker processes while this one reads the next batch.
A builder's samples may be a list or a generator (cut into batches here), or `parts` that build their batch
where they run (trade_signals: this process reads the SQLite rows, the workers turn them into samples). So a
build of millions of rows holds, in memory, a 16-byte digest per sample for deduplication (of its tokens and loss
mask; the first of equal
samples is kept, in the builder's order) and the split indices; the splits are then Arrow copies of the rows at
their indices (samples and tokens), never Python objects. The result does not depend on the number of
processes: batches are taken in order.

The cache key is everything the result depends on: the source's bytes (hashed in 1 MiB chunks), the dataset
config, the seed, the tokenizer and its chat template, and the code (the builder's module, this file,
tokens.py). A second call with the same inputs builds nothing: it links the cached files into the run dir.
"""
import gc
import hashlib
import importlib
import json
import mmap
import os
import random
import signal
import shutil
import time
from collections import Counter
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune import data
from finetune.data import Built, tokens
from finetune.data.augment import augment, rebalance
from finetune.data.rows import size_limits
from finetune.errors import DataError
from finetune.train.model import cache_root
from finetune.rundir import atomic_dir, write_json
from finetune import tasks

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

SPLITS = ("train", "validation", "test")
ROLES = {"system", "user", "assistant", "tool"}


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
    """Why a built sample cannot train for `task` (finetune/tasks/), or None. The reason names the field.

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
    if "rejected" in sample:  # a preference sample (objective=dpo): the last message is the chosen answer
        rejected = sample["rejected"]
        if not isinstance(rejected, str) or not rejected.strip():
            return f"rejected must be the text of an answer, got {rejected!r:.60}"
        if rejected == messages[-1]["content"]:
            return "rejected is the chosen answer itself"
        reason = task.check(rejected)
        if reason is not None:
            return f"rejected: {reason}"
    if "desirable" in sample and not isinstance(sample["desirable"], bool):  # objective=kto's label
        return f"desirable must be true or false, got {sample['desirable']!r:.60}"
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
    """What a sample says: its messages (or a text sample's segments) and tools (finetune/train/incremental.py)."""
    return [sample["segments"] if "messages" not in sample else sample["messages"], sample.get("tools")]


def first_of_each(digests: bytes) -> np.ndarray:
    """Which rows to keep: the first of each run of equal 16-byte digests, in row order."""
    keys = np.frombuffer(digests, dtype="V16")
    _, first = np.unique(keys, return_index=True)  # the lowest index of each distinct digest
    keep = np.zeros(len(keys), dtype=bool)
    keep[first] = True
    return keep


def split_indices(timestamps, how: str, val_size: float, test_size: float, seed: int,
                  fold: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Random; temporal: train on the oldest rows, validate on later ones, test on the latest; walk_forward with
    `fold` (k, K): the samples in time order cut into K + 1 windows, train (its latest val_size validating) on
    windows 0..k-1, test on window k. A time cut never falls between two samples of one timestamp, so every test
    timestamp is after every train one (checked). `timestamps`: ISO text or None per sample (a list, or an Arrow
    array: sorted in Arrow, never as Python strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    timestamps = timestamps if isinstance(timestamps, (pa.Array, pa.ChunkedArray)) else pa.array(timestamps,
                                                                                                  pa.string())
    n = len(timestamps)
    if how == "random":
        ordered = list(range(n))
        random.Random(seed).shuffle(ordered)
        ordered = np.asarray(ordered, dtype=np.int64)
        n_test, n_val = round(n * test_size), round(n * val_size)
        bounds = [n - n_val - n_test, n - n_test]
    elif how in ("temporal", "walk_forward"):
        missing = timestamps.null_count
        if missing:
            raise DataError(f"dataset.split={how} but {missing} samples have no timestamp; use split=random")
        ordered = pc.sort_indices(timestamps).to_numpy()  # stable: ties keep the builder's order
        in_time = timestamps.take(ordered)
        if how == "temporal":
            n_test, n_val = round(n * test_size), round(n * val_size)
            test_from = tie_start(in_time, n - n_test)
            bounds = [tie_start(in_time, test_from - n_val), test_from]
        else:
            k, folds = check_fold(fold)
            test_from, test_to = (tie_start(in_time, round(n * j / (folds + 1))) for j in (k, k + 1))
            test_to = n if k == folds else test_to
            bounds = [tie_start(in_time, test_from - round(test_from * val_size)), test_from]
            ordered = ordered[:test_to]
    else:
        raise DataError(f"dataset.split={how}: choose random, temporal or walk_forward")
    train, validation, test = np.split(ordered, bounds)
    if len(train) < 1 or (val_size > 0 and len(validation) < 1) or (test_size > 0 and len(test) < 1):
        raise DataError(f"only {n} samples" + (f" in {len(set(timestamps.to_pylist()))} distinct timestamps"
                                              if how != "random" else "") +
                        f": too few for val_size={val_size}, test_size={test_size}"
                        + (f", fold {fold[0]} of {fold[1]}" if how == "walk_forward" else ""))
    if how != "random" and len(test) and pc.min(timestamps.take(test)).as_py() <= pc.max(
            timestamps.take(np.concatenate([train, validation]))).as_py():
        raise DataError("a test sample's timestamp is not after every train sample's: the split would leak the future")
    return {"train": train, "validation": validation, "test": test}


def tie_start(in_time, position: int) -> int:
    """`position`, moved earlier to the first sample of its timestamp (a cut between two samples of one
    timestamp would train on the moment it tests on); the held-out side grows."""
    position = min(max(position, 0), len(in_time))
    while 0 < position < len(in_time) and in_time[position].as_py() == in_time[position - 1].as_py():
        position -= 1
    return position


def check_fold(fold) -> tuple[int, int]:
    if fold is None or len(fold) != 2 or not all(type(v) is int for v in fold) or not 1 <= fold[0] <= fold[1]:
        raise DataError(f"dataset.split=walk_forward needs dataset.fold=[k, K], 1 <= k <= K, got {fold!r}; "
                        "eval.walk_forward.folds=K sets it for each fold")
    return fold[0], fold[1]


TOKEN_COLUMNS = {"input_ids": "int32", "assistant_masks": "int8", "length": "int32", "first_trained": "int32"}
_worker = {}  # a worker process's tokenizer, train_turns and cache of recurring pieces (set once per process)


def token_features() -> "datasets.Features":
    import datasets
    return datasets.Features({name: datasets.Sequence(datasets.Value(kind)) if name in ("input_ids", "assistant_masks")
                              else datasets.Value(kind) for name, kind in TOKEN_COLUMNS.items()})


def sample_features() -> "datasets.Features":
    import datasets
    return datasets.Features({"sample": datasets.Value("string"), "timestamp": datasets.Value("string"),
                              "label": datasets.Value("string"), "desirable": datasets.Value("bool")})


def given(samples: list[dict]) -> tuple[list[dict], Counter]:
    """The job of a batch of samples a builder has already built."""
    return samples, Counter()


def run_batch(job, stem: str, task: str | None, skip_bad_rows: bool, dedupe: bool, tokenizer=None,
              turns: str | None = None, cache: dict | None = None) -> dict:
    """One batch, in a worker process or this one: job() builds its samples; each is checked for `task` (None:
    not checked), written as JSON to STEM.samples.arrow and tokenized into STEM.tokens.arrow, row for row.

    Returns how many were built, what was dropped (by the builder, and invalid ones with skip_bad_rows), the
    rows' 16-byte digests for deduplication, and the first invalid sample (its index in the batch, why) when
    it stops the build. In a worker the tokenizer is the one `start_worker` set."""
    if tokenizer is None:
        tokenizer, turns, cache = _worker["tokenizer"], _worker["turns"], _worker["cache"]
    collecting = gc.isenabled()
    gc.disable()  # a batch makes ~100 objects per sample that live until its end: the collector would walk them
    try:        # (and the piece cache) over and over, ~15 % of the time; what it leaves is collected after
        return checked_and_written(job, stem, task, skip_bad_rows, dedupe, tokenizer, turns, cache)
    finally:
        if collecting:
            gc.enable()


def checked_and_written(job, stem, task, skip_bad_rows, dedupe, tokenizer, turns, cache) -> dict:
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter
    samples, dropped = job()
    valid = samples
    if task is not None:
        valid = []
        for j, sample in enumerate(samples):
            reason = check_sample(sample, task)
            if reason is None:
                valid.append(sample)
            elif not skip_bad_rows:
                return {"built": len(samples), "invalid": (j, reason)}
            else:
                dropped[f"invalid: {reason.split(':')[0]}"] += 1
    with ArrowWriter(features=sample_features(), path=f"{stem}.samples.arrow") as writer:
        writer.write_table(pa.table({"sample": [json.dumps(sample, ensure_ascii=False) for sample in valid],
                                     "timestamp": [sample.get("timestamp") for sample in valid],
                                     "label": [str(sample.get("label")) for sample in valid],
                                     "desirable": [sample.get("desirable") for sample in valid]}))
        writer.finalize()
    digests = []
    with ArrowWriter(features=token_features(), path=f"{stem}.tokens.arrow") as writer:
        for k in range(0, len(valid), 1000):
            batch = valid[k:k + 1000]
            table, ids, masks, offsets = token_table(tokens.trained_tokens(batch, tokenizer, turns, cache))
            writer.write_table(table)
            if dedupe:  # what else trains: a preference sample's rejected answer, a KTO sample's label
                digests += [hashlib.blake2b(ids[a:b].tobytes() + masks[a:b].tobytes() + outcome(sample),
                                            digest_size=16).digest()
                            for sample, a, b in zip(batch, offsets[:-1], offsets[1:])]
        writer.finalize()
    return {"built": len(samples), "dropped": dropped, "invalid": None, "digests": b"".join(digests)}


def outcome(sample: dict) -> bytes:
    if "rejected" not in sample and "desirable" not in sample:
        return b""
    return json.dumps([sample.get("rejected"), sample.get("desirable")]).encode()


def token_table(encoded: list[tuple]) -> tuple["pa.Table", np.ndarray, np.ndarray, np.ndarray]:
    """TOKEN_COLUMNS of (input_ids, trained ranges) pairs, built as flat numpy arrays (datasets' writer converts
    a Python list per row, 5x slower); and the flat ids, masks and row offsets. Two samples whose ids and masks
    are equal are duplicates: they train the same (whatever else differs where the template does not look)."""
    import pyarrow as pa
    lengths = np.fromiter((len(ids) for ids, _ in encoded), np.int32, len(encoded))
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in encoded), np.int32, int(offsets[-1]))
    masks = np.zeros(len(ids), np.int8)
    first = lengths.copy()
    for row, (start, (_, ranges)) in enumerate(zip(offsets, encoded)):
        for low, high in ranges:
            masks[start + low:start + high] = 1
        if ranges:
            first[row] = min(low for low, _ in ranges)
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                      "assistant_masks": pa.ListArray.from_arrays(offsets, masks),
                      "length": lengths, "first_trained": first})
    return table, ids, masks, offsets


def start_worker(tokenizer, turns: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the run's preemption handler (finetune/train/preemption.py):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process stops the pool
    gc.freeze()  # what the fork inherited is never collected: the collector does not walk it for each batch
    _worker.update(tokenizer=tokenizer, turns=turns, cache={})


class Batches:
    """Jobs (finetune/data/__init__.py's Built.parts) run into numbered shards of `folder`, in `num_proc` worker
    processes while this one reads the next batch, once there is more than one batch (a process costs ~1 s to
    start); in this process otherwise. Results are taken in job order, so the first invalid sample, the counts
    and the digests are the same whatever the number of processes. `done()` waits and gives the results."""

    def __init__(self, folder: Path, tokenizer, turns: str, num_proc: int | None, where: str, **options):
        self.folder, self.tokenizer, self.turns, self.num_proc = folder, tokenizer, turns, num_proc or 0
        self.where, self.options, self.cache = where, options, {}
        self.pending, self.results, self.pool, self.first, self.count = [], [], None, None, 0
        folder.mkdir(parents=True, exist_ok=True)

    def submit(self, job) -> None:
        if self.num_proc and self.pool is None and self.first is None:
            self.first = job  # held until a second batch says the data is large enough for processes
            return
        if self.num_proc and self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(self.num_proc, mp_context=multiprocessing.get_context("fork"),
                                            initializer=start_worker, initargs=(self.tokenizer, self.turns))
            first, self.first = self.first, None
            self.submit(first)
        stem = str(self.folder / f"{self.count:05d}")
        self.count += 1
        if self.pool is None:
            self.take(run_batch(job, stem, tokenizer=self.tokenizer, turns=self.turns, cache=self.cache,
                                **self.options))
            return
        while len(self.pending) >= 2 * self.num_proc:  # bounded: the reading never runs far ahead
            self.take(self.pending.pop(0).result())
        self.pending.append(self.pool.submit(run_batch, job, stem, **self.options))

    def take(self, result: dict) -> None:
        if result["invalid"] is not None:
            j, reason = result["invalid"]
            number = sum(r["built"] for r in self.results) + j + 1
            raise DataError(f"{self.where}: sample {number}: {reason} (fix the source, or set "
                            "dataset.skip_bad_rows=true)")
        self.results.append(result)

    def done(self) -> list[dict]:
        if self.first is not None:
            first, self.first, self.num_proc = self.first, None, 0
            self.submit(first)
        while self.pending:
            self.take(self.pending.pop(0).result())  # a worker's DataError is raised here, as in this process
        self.close()
        return self.results

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def jobs_of(built: Built):
    """The builder's parts, or its samples cut into batches of CHUNK."""
    if built.parts is not None:
        yield from built.parts
        return
    samples = iter(built.samples)
    while batch := list(islice(samples, data.CHUNK)):
        yield partial(given, batch)


def write_batches(jobs, batches: Batches) -> tuple["datasets.Dataset", "datasets.Dataset", list[dict]]:
    """Every job run (a bad row stops the build, and no worker is left behind); (samples, tokens, results): the
    valid samples as Arrow rows (the JSON sample, its timestamp and label) and their tokens, row for row."""
    try:
        for job in jobs:
            batches.submit(job)
        results = batches.done()
    finally:
        batches.close()
    return shards(batches.folder, "samples", len(results)), shards(batches.folder, "tokens", len(results)), results


def shards(folder: Path, kind: str, count: int) -> "datasets.Dataset":
    import datasets
    if not count:
        features = sample_features() if kind == "samples" else token_features()
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(folder / f"{k:05d}.{kind}.arrow"))
                                          for k in range(count)])


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


class Mapped:
    """The record batches of a dataset's Arrow files, read through memory maps of its own, which `release()` drops
    from this process's resident memory (the pages stay in the page cache): copying the splits of 1M samples
    would otherwise leave ~1 GB of those files resident, counted in the process's peak RSS."""

    def __init__(self, dataset: "datasets.Dataset", columns: list[str] | None = None):
        import pyarrow as pa
        self.maps, self.batches = [], []
        for file in dataset.cache_files:
            with open(file["filename"], "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            table = pa.ipc.open_stream(pa.py_buffer(self.maps[-1])).read_all()
            self.batches += (table.select(columns) if columns else table).to_batches()
        self.offsets = np.cumsum([0] + [len(batch) for batch in self.batches[:-1]])

    def take(self, indices: np.ndarray) -> "pa.Table":
        return take(self.batches, self.offsets, indices)

    def release(self) -> None:
        for mapping in self.maps:
            mapping.madvise(mmap.MADV_DONTNEED)


def write_split(tmp: Path, name: str, rows: "datasets.Dataset", tokenized: "datasets.Dataset",
                indices: np.ndarray) -> "datasets.Dataset":
    """tmp/NAME.jsonl (the samples, as the run dir keeps them) and tmp/tokens/NAME.arrow (what trains): the
    rows at `indices`, copied in Arrow (never as Python objects) a chunk at a time; the split's tokens."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    samples, tokens_of = Mapped(rows, ["sample"]), Mapped(tokenized)
    (tmp / "tokens").mkdir(exist_ok=True)
    path = tmp / "tokens" / f"{name}.arrow"
    indices = np.asarray(indices, dtype=np.int64)
    with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f, \
            ArrowWriter(features=token_features(), path=str(path)) as writer:
        for k in range(0, len(indices), 5 * data.CHUNK):
            chunk = indices[k:k + 5 * data.CHUNK]
            f.writelines(line + "\n" for line in samples.take(chunk).column("sample").to_pylist())
            writer.write_table(tokens_of.take(chunk))
            samples.release()
            tokens_of.release()
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


def describe(rows: "pa.Table", tokenized: "datasets.Dataset") -> dict:
    """A split's count, labels, token lengths and time range, computed in Arrow."""
    import pyarrow.compute as pc
    lengths = column(tokenized, "length") if len(tokenized) else np.zeros(1, dtype=np.int32)
    span = pc.min_max(rows.column("timestamp")).as_py()
    labels = {row["values"]: row["counts"] for row in pc.value_counts(rows.column("label")).to_pylist()}
    return {"count": len(rows), "labels": dict(sorted(labels.items())),
            "tokens": {"total": int(lengths.sum()), "max": int(lengths.max()),
                       **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)}},
            "first_timestamp": span["min"], "last_timestamp": span["max"]}


def build_into(tmp: Path, cfg: DictConfig, tokenizer, seed: int, source: Path, digest: str) -> dict:
    """Build, check, deduplicate, split and tokenize into `tmp`; stats.json's content."""
    if cfg.undesirable not in ("drop", "keep"):
        raise DataError(f"dataset.undesirable={cfg.undesirable!r}: choose drop (out of train and validation) or keep")
    # a partial, called here: instantiate() itself would wrap the builder's DataError in its own exception
    build = instantiate(cfg.builder, _partial_=True, _convert_="all")
    with size_limits(cfg.get("max_field_chars"), cfg.get("max_row_chars"), cfg.get("oversize", "refuse")):
        built: Built = build(skip_bad_rows=cfg.skip_bad_rows)  # its rows are read in here, or in the workers
        batches = Batches(tmp / "shards", tokenizer, cfg.train_turns, cfg.num_proc, str(source), task=cfg.task,
                          skip_bad_rows=cfg.skip_bad_rows, dedupe=cfg.dedupe)
        rows, tokenized, results = write_batches(jobs_of(built), batches)
    dropped = built.dropped
    for result in results:
        dropped.update(result["dropped"])
    count = sum(result["built"] for result in results)
    if built.finish is not None:
        built.finish(count)
    kept = np.arange(len(rows))
    if cfg.dedupe:
        kept = np.flatnonzero(first_of_each(b"".join(result["digests"] for result in results)))
        if len(kept) < len(rows):
            dropped["duplicate"] += len(rows) - len(kept)
    dropped = Counter(dropped)
    if not len(kept):
        raise DataError(f"{source}: no samples left after filtering (dropped: {dict(dropped) or 'none'})")
    first = json.loads(rows[int(kept[0])]["sample"])
    if cfg.augment.copies > 0 and "messages" not in first:
        raise DataError(f"{source}: dataset.augment rewrites a chat sample's user turn; these are text samples: "
                        "set dataset.augment.copies=0")
    table = rows.data.table  # Arrow from here on: no Python object per sample, no datasets fingerprint per select
    indices = split_indices(table.column("timestamp").take(kept), cfg.split, cfg.val_size, cfg.test_size, seed,
                            None if cfg.get("fold") is None else tuple(cfg.fold))
    splits = {name: (rows, tokenized, kept[indices[name]]) for name in SPLITS}
    if cfg.undesirable == "drop":  # SFT must not imitate them; the test split keeps them for the outcome metric
        desirable = table.column("desirable")
        for name in ("train", "validation"):
            picked = splits[name][2]
            good = desirable.take(picked).fill_null(True).to_numpy(zero_copy_only=False).astype(bool)
            if not good.all():
                dropped[f"undesirable ({name})"] += int((~good).sum())
                splits[name] = (rows, tokenized, picked[good])
    if cfg.augment.copies > 0 or cfg.balance != "none":
        # augmentation and rebalancing touch the train split only: nothing derived from a held-out row trains;
        # they work on the train samples in memory
        train = augment([json.loads(s) for s in table.column("sample").take(splits["train"][2]).to_pylist()],
                        cfg.augment.copies, cfg.augment.instruction_variants, cfg.augment.numeric_noise, seed)
        try:
            train = rebalance(train, cfg.balance, seed)
        except ValueError as err:
            raise DataError(str(err)) from None
        train_rows, train_tokens, _ = write_batches(jobs_of(Built(train)), Batches(
            tmp / "train-shards", tokenizer, cfg.train_turns, cfg.num_proc, str(source), task=None,
            skip_bad_rows=False, dedupe=False))
        splits["train"] = (train_rows, train_tokens, np.arange(len(train_rows)))
    stats = {"built": count, "kind": "text" if "messages" not in first else "chat",
             "dropped": dict(dropped), "splits": {}}
    for name, (split_rows, split_tokens, picked) in splits.items():
        split_table = split_rows.data.table.select(["timestamp", "label"])
        stats["splits"][name] = describe(split_table.take(picked), write_split(tmp, name, split_rows, split_tokens,
                                                                               picked))
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
