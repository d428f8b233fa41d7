"""The shared data pipeline: temporal split without leaks, cache, augmentation on train only, balance, errors."""
import json
import sys
import random
import time
from collections import Counter

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from finetune.data import Built
from finetune.data.augment import jitter_numbers
from finetune.data.pipeline import prepare
from finetune.errors import DataError
from finetune.train.model import TINY_TOKENIZER
from finetune.paths import CONF_DIR

CALLS = Counter()


def fake_build(path, n=300, skip_bad_rows=False, bad_row=None, undesirable_every=None):
    """Samples with shuffled timestamps, labels A/B/C in 3:2:1, row `bad_row` without an answer; with
    `undesirable_every`, every sample is marked desirable but each k-th one, marked undesirable."""
    CALLS["build"] += 1
    rng = random.Random(1)
    hours = list(range(n))
    rng.shuffle(hours)
    samples = []
    for i, hour in enumerate(hours):
        label = "ABBCCC"[i % 6]
        answer = [] if i == bad_row else [{"role": "assistant", "content": label}]
        samples.append({"messages": [{"role": "user", "content": f"row {i} price 100.5 rsi 30"}, *answer],
                        "label": label, "timestamp": f"2024-01-{1 + hour // 24:02d}T{hour % 24:02d}:00:00",
                        "meta": {"i": i}})
        if undesirable_every:
            samples[-1]["desirable"] = i % undesirable_every != 0
    return Built(samples)


def dataset_cfg(path, **over):
    base = OmegaConf.load(CONF_DIR / "dataset" / "_pipeline.yaml")
    cfg = OmegaConf.merge(base, {"path": str(path), "task": "sentiment", "split": "temporal",
                                 "builder": {"_target_": "test_pipeline.fake_build", "path": str(path)}}, over)
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.txt"
    path.write_text("any bytes: the cache key includes them")
    return path


def test_temporal_split_never_trains_on_a_later_row(source, tokenizer, tmp_path):
    splits, stats = prepare(dataset_cfg(source), tokenizer, tmp_path / "run", seed=0)
    latest_train = max(s["timestamp"] for s in splits["train"])
    assert latest_train < min(s["timestamp"] for s in splits["validation"])
    assert max(s["timestamp"] for s in splits["validation"]) < min(s["timestamp"] for s in splits["test"])
    assert [stats["splits"][k]["count"] for k in ("train", "validation", "test")] == [240, 30, 30]
    assert stats["splits"]["train"]["last_timestamp"] == latest_train
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert on_disk == splits["train"]


def test_unchanged_inputs_are_served_from_the_cache(source, tokenizer, tmp_path):
    CALLS.clear()
    cfg = dataset_cfg(source, builder={"n": 3000})
    start = time.perf_counter()
    _, cold_stats = prepare(cfg, tokenizer, tmp_path / "a", seed=0, load=False)  # what a dry run does
    cold = time.perf_counter() - start
    start = time.perf_counter()
    _, warm_stats = prepare(cfg, tokenizer, tmp_path / "b", seed=0, load=False)
    warm = time.perf_counter() - start
    assert CALLS["build"] == 1 and not cold_stats["build"]["from_cache"] and warm_stats["build"]["from_cache"]
    assert warm * 10 < cold, (cold, warm)
    first, _ = prepare(cfg, tokenizer, tmp_path / "c", seed=0)
    assert CALLS["build"] == 1 and first["train"] == [json.loads(line) for line in
                                                       (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    source.write_text("changed")
    prepare(cfg, tokenizer, tmp_path / "d", seed=0)
    assert CALLS["build"] == 2


def test_augmentation_and_balance_touch_the_train_split_only(source, tokenizer, tmp_path):
    cfg = dataset_cfg(source, split="random", augment={"copies": 2, "numeric_noise": 0.1}, balance="oversample")
    splits, stats = prepare(cfg, tokenizer, tmp_path / "run", seed=0)
    labels = Counter(s["label"] for s in splits["train"])
    assert len(set(labels.values())) == 1 and labels["A"] > 40 * 3   # oversampled up to the largest class
    assert any(s["meta"].get("augmented") for s in splits["train"])
    held_out = splits["validation"] + splits["test"]
    assert not any(s["meta"].get("augmented") for s in held_out) and len(held_out) == 60
    held_out_rows = {s["meta"]["i"] for s in held_out}
    assert not {s["meta"]["i"] for s in splits["train"]} & held_out_rows


def test_numeric_noise_stays_within_bounds():
    rng = random.Random(0)
    for _ in range(50):
        out = jitter_numbers("RSI: 30.0 price 200", 0.1, rng)
        rsi, price = (float(x) for x in out.replace("RSI: ", "").split(" price "))
        assert 27.0 <= rsi <= 33.0 and 180 <= price <= 220


def test_a_bad_sample_is_named_or_skipped(source, tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"sample 8: last message must be the assistant's answer"):
        prepare(dataset_cfg(source, builder={"bad_row": 7}), tokenizer, tmp_path / "a", seed=0)
    splits, stats = prepare(dataset_cfg(source, builder={"bad_row": 7}, skip_bad_rows=True), tokenizer,
                            tmp_path / "b", seed=0)
    assert stats["dropped"] == {"invalid: last message must be the assistant's answer": 1}
    assert sum(len(v) for v in splits.values()) == 299


def test_too_few_samples_is_an_error(source, tokenizer, tmp_path):
    with pytest.raises(DataError, match="only 3 samples"):
        prepare(dataset_cfg(source, builder={"n": 3}), tokenizer, tmp_path / "a", seed=0)


def test_new_builder_code_or_chat_template_misses_the_cache(source, tokenizer, tmp_path, monkeypatch):
    """The cache key holds the builder's source and the chat template: an upgraded builder or a new template
    builds again instead of serving old splits and token counts."""
    module = tmp_path / "my_builder.py"
    module.write_text("from test_pipeline import fake_build as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = dataset_cfg(source, builder={"_target_": "my_builder.build"})
    CALLS.clear()
    prepare(cfg, tokenizer, None, seed=0, load=False)
    _, stats = prepare(cfg, tokenizer, None, seed=0, load=False)
    assert CALLS["build"] == 1 and stats["build"]["from_cache"]
    module.write_text("from test_pipeline import fake_build as build  # version 2\n")
    _, stats = prepare(cfg, tokenizer, None, seed=0, load=False)
    assert CALLS["build"] == 2 and not stats["build"]["from_cache"]
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    try:
        _, stats = prepare(cfg, tokenizer, None, seed=0, load=False)
    finally:
        tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|> ", "<|im_start|>")
    assert CALLS["build"] == 3 and not stats["build"]["from_cache"]


def test_worker_processes_tokenize_the_same_as_one_process(source, tokenizer, tmp_path, monkeypatch):
    """Batches of 40 samples (CHUNK, shrunk) tokenized by 2 worker processes while the build goes on give the
    same token files, split files and stats as one process; a worker's template error stops the build."""
    from finetune import data
    from finetune.data import pipeline
    monkeypatch.setattr(data, "CHUNK", 40)
    built = {}
    for num_proc in (None, 2):
        _, stats = prepare(dataset_cfg(source, num_proc=num_proc), tokenizer, tmp_path / f"run{num_proc}", seed=0,
                           load=False)
        folder = tmp_path / f"run{num_proc}"
        tokens = {name: pipeline.load_tokens(stats, name).to_dict() for name in pipeline.SPLITS}
        built[num_proc] = (stats["splits"], tokens, [(folder / f"{n}.jsonl").read_text() for n in pipeline.SPLITS])
    assert built[None] == built[2]
    assert sum(len(t["input_ids"]) for t in built[2][1].values()) == 300
    broken = tokenizer.chat_template.replace("{% for", "{% if messages[0]['content'].startswith('row 2') %}"
                                             "{{ raise_exception('no row 2x') }}{% endif %}{% for")
    monkeypatch.setattr(tokenizer, "chat_template", broken)
    with pytest.raises(DataError, match="no row 2x"):
        prepare(dataset_cfg(source, num_proc=2), tokenizer, tmp_path / "broken", seed=0, load=False)


def test_duplicates_are_dropped_and_the_first_is_kept(source, tokenizer, tmp_path, monkeypatch):
    """Samples that train the same tokens with the same loss mask are one (their meta may differ); the first in
    the builder's order stays, across batches and worker processes alike."""
    from finetune import data
    monkeypatch.setattr(data, "CHUNK", 40)
    samples = fake_build(source, n=120).samples
    copies = [{**samples[i], "meta": {"i": 1000 + i}} for i in (3, 50, 77)]  # later, in other batches
    monkeypatch.setattr(sys.modules[__name__], "fake_build", lambda path, **_: Built(samples + copies))
    for num_proc in (None, 2):
        splits, stats = prepare(dataset_cfg(source, split="random", num_proc=num_proc), tokenizer,
                                tmp_path / f"run{num_proc}", seed=0)
        kept = sorted(s["meta"]["i"] for split in splits.values() for s in split)
        assert stats["dropped"] == {"duplicate": 3} and kept == list(range(120))
    _, stats = prepare(dataset_cfg(source, split="random", dedupe=False), tokenizer, tmp_path / "all", seed=0)
    assert stats["built"] == 123 and sum(s["count"] for s in stats["splits"].values()) == 123


def test_walk_forward_folds_roll_forward_and_never_train_on_their_test_window(source, tokenizer, tmp_path):
    """K + 1 windows in time order: fold k trains (and validates) on windows 0..k-1, tests on window k; ties at a
    cut stay on one side, so no fold sees a timestamp at or after its test window."""
    from finetune.data.pipeline import split_indices
    timestamps = [f"2024-01-{1 + i // 6:02d}T00:00:00" for i in range(70)]  # 6 a day: the windows cut days
    random.Random(0).shuffle(timestamps)
    previous_test = None
    for k in range(1, 5):
        split = split_indices(timestamps, "walk_forward", 0.1, 0.0, 0, fold=(k, 4))
        seen = [timestamps[i] for i in (*split["train"], *split["validation"])]
        test = [timestamps[i] for i in split["test"]]
        assert max(seen) < min(test) and max(timestamps[i] for i in split["train"]) < min(
            timestamps[i] for i in split["validation"])
        assert len(test) >= 6 and (previous_test is None or min(test) > max(previous_test))
        previous_test = test
    assert max(previous_test) == max(timestamps)  # the last fold tests on the latest window
    for k in (0, 5):
        with pytest.raises(DataError, match=r"dataset.fold=\[k, K\], 1 <= k <= K"):
            split_indices(timestamps, "walk_forward", 0.1, 0.0, 0, fold=(k, 4))
    # the temporal split keeps ties together too: no test sample shares the last train timestamp
    split = split_indices(timestamps, "temporal", 0.1, 0.15, 0)
    assert max(timestamps[i] for i in (*split["train"], *split["validation"])) < min(
        timestamps[i] for i in split["test"])
    with pytest.raises(DataError, match="only 7 samples in 1 distinct timestamps"):
        split_indices(["2024-01-01"] * 7, "temporal", 0.1, 0.2, 0)


def test_undesirable_samples_leave_train_and_validation_only_and_the_test_split_is_the_same(source, tokenizer,
                                                                                            tmp_path):
    """dataset.undesirable=drop (objective=sft) keeps what SFT imitates clean and the held-out split whole, so
    an SFT run and a KTO run (undesirable=keep) of the same data test on the same samples."""
    builder = {"builder": {"undesirable_every": 4}}
    drop, drop_stats = prepare(dataset_cfg(source, **builder), tokenizer, tmp_path / "drop", seed=0)
    keep, keep_stats = prepare(dataset_cfg(source, **builder, undesirable="keep"), tokenizer, tmp_path / "keep", seed=0)
    assert drop["test"] == keep["test"] and any(not s["desirable"] for s in drop["test"])
    for name in ("train", "validation"):
        assert all(s["desirable"] for s in drop[name])
        assert drop[name] == [s for s in keep[name] if s["desirable"]]
        assert drop_stats["dropped"][f"undesirable ({name})"] == sum(not s["desirable"] for s in keep[name]) > 0
    assert not any(k.startswith("undesirable") for k in keep_stats["dropped"])
    with pytest.raises(DataError, match=r"dataset\.undesirable='some': choose drop .* or keep"):
        prepare(dataset_cfg(source, **builder, undesirable="some"), tokenizer, tmp_path / "bad", seed=0)
