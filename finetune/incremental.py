"""Incremental training (seeds 000, 002): continue an earlier run's adapter on new data at a lower learning rate,
and skip the run when too few samples are new.

`incremental.adapter` names an earlier run dir (or its adapter/ folder). The adapter is loaded trainable into
the base (PeftModel.from_pretrained, is_trainable=True), so training continues its weights instead of a fresh
LoRA; the method group is then not used (the adapter's own config is). The learning rate is
training.learning_rate x incremental.learning_rate_scale (seed 000: 5e-5 after 1e-4, i.e. 0.5).
"New" samples are train samples whose messages the earlier run did not train on (its data/train.jsonl); given a
bare adapter folder, every sample counts as new. Fewer than incremental.min_new_samples (seed 002: 500): skip.
"""
import json
from pathlib import Path

from finetune.errors import ConfigError


def adapter_dir(path: str) -> Path:
    path = Path(path)
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"incremental.adapter={path}: no adapter_config.json there or in its adapter/ folder")


def new_samples(path: str, train: list[dict]) -> int:
    previous = Path(path) / "data" / "train.jsonl"
    if not previous.is_file():
        return len(train)
    seen = {json.dumps(json.loads(line)["messages"], sort_keys=True)
            for line in previous.read_text(encoding="utf-8").splitlines() if line}
    return sum(json.dumps(s["messages"], sort_keys=True) not in seen for s in train)
