"""Incremental training: continue an earlier run's adapter
on new data at a lower learning rate, and skip the run when too few samples are new.

`incremental.adapter` names an earlier run dir (or its adapter/ folder). The adapter is loaded trainable into
the base (PeftModel.from_pretrained, is_trainable=True), so training continues its weights instead of a fresh
LoRA; the method group is then not used (the adapter's own config is). The learning rate is
training.learning_rate x incremental.learning_rate_scale (e.g. 0.5: 5e-5 after a first run at 1e-4).
"New" samples are train samples whose messages the earlier run did not train on (its data/train.jsonl); given a
bare adapter folder, every sample counts as new. Fewer than incremental.min_new_samples (e.g. 500;
0 by default): skip.
"""
import json
import logging
from pathlib import Path

from finetune.data.pipeline import body
from finetune.errors import ConfigError
from finetune.rundir import ADAPTER, DATA

log = logging.getLogger("finetune")


def plan(cfg, config: dict, args, train: list[dict]) -> tuple[Path | None, str | None]:
    """(the earlier adapter to continue, or None; why not to train, or None). Continuing lowers the learning
    rate in the run's config and its trainer arguments."""
    if not cfg.incremental.adapter:
        return None, None
    adapter = adapter_dir(cfg.incremental.adapter)
    fresh = new_samples(cfg.incremental.adapter, train)
    if fresh < cfg.incremental.min_new_samples:
        message = (f"incremental: only {fresh} new train samples since {cfg.incremental.adapter} "
                   f"(incremental.min_new_samples={cfg.incremental.min_new_samples}); not training")
        log.warning(message)  # on the console once (Hydra's console handler), and in finetune.log
        return adapter, message
    config["training"]["learning_rate"] *= cfg.incremental.learning_rate_scale
    args.learning_rate = config["training"]["learning_rate"]
    log.info("incremental: %d new train samples; continuing %s at lr %g", fresh, adapter, args.learning_rate)
    return adapter, None


def adapter_dir(path: str, option: str = "incremental.adapter") -> Path:
    path = Path(path)
    for candidate in (path / ADAPTER, path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"{option}={path}: no adapter_config.json there or in its adapter/ folder")


def new_samples(path: str, train: list[dict]) -> int:
    previous = Path(path) / DATA / "train.jsonl"
    if not previous.is_file():
        return len(train)
    seen = {json.dumps(body(json.loads(line)), sort_keys=True)
            for line in previous.read_text(encoding="utf-8").splitlines() if line}
    return sum(json.dumps(body(s), sort_keys=True) not in seen for s in train)
