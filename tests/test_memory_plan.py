"""training=gpu's memory plan: the memory model against the H200 measurements, what the plan picks for a 7B
model at 139, 24 and 16 GiB, `auto` resolution (Liger, the CUDA allocator), and every-N-layers checkpointing on
the tiny model."""
import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose
from finetune.config import memory_plan
from finetune.config import check_config
from finetune.errors import ConfigError
from finetune.config.estimate import model_shape

MEASURED = sorted((ROOT / "docs" / "benchmarks" / "h200-2026-12-04").glob("*.json"))
QWEN_QLORA = ["model=qwen2_5_7b", "method=qlora", "training=gpu"]


@pytest.fixture(scope="module")
def qwen_shape():
    """Qwen2.5-7B's counts with LoRA r16 on q/k/v/o, on the meta device (the shape the H200 runs trained)."""
    return model_shape(compose(*QWEN_QLORA).model, compose(*QWEN_QLORA).method)


def measured_setups():
    """(file, setup, Job, rows) for every H200 setup, read from its JSON: the settings string says what ran."""
    for path in MEASURED:
        report = json.loads(path.read_text())
        for s in report["setups"]:
            text = s["settings"]
            rows = int(re.search(r"batch (\d+)x", text).group(1))
            packed = re.search(r"packed rows of (\d+)", text)
            found = re.search(r"checkpointing (offload|off|full|every (\d+) layers)", text)
            policy = {"off": ("none", 0), "full": ("full", 1), "offload": ("offload", 1)}.get(
                found.group(1), ("every", int(found.group(2) or 1)))
            job = memory_plan.Job(quantized=report["method"] == "qlora", dtype_bytes=2, full=False,
                                  upcast_embeddings=False,  # the bench loads without peft's k-bit preparation
                                  liger="liger" in text, eight_bit_optimizer="8bit" in text,
                                  # plain pads each batch to its longest sample and computes the loss on all logits
                                  row_length=int(packed.group(1)) if packed else report["lengths"][1],
                                  full_logits=packed is None)
            yield path.name, s, job, rows, policy


def test_the_memory_model_predicts_every_h200_peak_within_20_percent(qwen_shape):
    setups = list(measured_setups())
    assert len(setups) == 15
    for name, s, job, rows, policy in setups:
        own_peak = s["peak_gib"] - s["memory_at_start_gib"]  # what the setups before it left is not its own
        predicted = memory_plan.peak_gib(qwen_shape, job, rows, policy)["total"]
        assert abs(predicted / own_peak - 1) < 0.20, (name, s["name"], own_peak, predicted)


def planned(caplog, *overrides):
    """check_config as the runner calls it for a dry run, and what the runner logs of the plan (on the console
    under the CLI: Hydra's console handler shows finetune's lines)."""
    from finetune.train import recipe
    cfg = compose(*overrides, "dry_run=true")
    with caplog.at_level(logging.INFO, logger="finetune"):
        config, _ = recipe.check(cfg, Path("/nonexistent"))
    return config, caplog.text


def test_qlora_7b_on_a_139_gib_h200_checkpoints_nothing(caplog):
    config, out = planned(caplog, *QWEN_QLORA, "plan.device_memory=139GiB")
    training, plan = config["training"], config["plan"]
    assert training["activation_checkpointing"] is False and training["per_device_train_batch_size"] == 4
    assert training["gradient_accumulation_steps"] == 4
    assert "plan: no activation checkpointing, 4 rows of 2048 tokens x 4 accumulation" in out
    assert plan["chosen"]["training.activation_checkpointing"] is False and plan["predicted_gib"]["total"] < 125


@pytest.mark.parametrize("memory", ["24GiB", "16GiB"])
def test_qlora_7b_on_smaller_cards_gets_a_plan_that_fits(caplog, memory):
    config, out = planned(caplog, *QWEN_QLORA, f"plan.device_memory={memory}")
    training, plan = config["training"], config["plan"]
    print(memory, plan["lines"][-1], file=os.sys.stderr)  # the chosen plan, in the test log
    assert plan["predicted_gib"]["total"] <= plan["budget_gib"] == float(memory[:2]) * 0.9
    assert "the fastest that fits" in plan["reason"] and "plan: " in out
    # checkpointing something: the 139 GiB plan (no checkpointing, 4 rows) does not fit here
    assert training["activation_checkpointing"] is True
    # fewer rows accumulate more micro-batches: the rows per optimizer step stay 16
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 16


def test_a_users_own_values_are_kept(caplog):
    config, out = planned(caplog, *QWEN_QLORA, "plan.device_memory=24GiB", "training.activation_checkpointing=true")
    training = config["training"]
    assert training["activation_checkpointing"] is True and not training.get("activation_checkpointing_kwargs")
    assert training["per_device_train_batch_size"] == 4 and "plan: checkpointing every layer, 4 rows" in out
    caplog.clear()
    config, out = planned(caplog, *QWEN_QLORA, "plan.device_memory=139GiB", "training.per_device_train_batch_size=2")
    training = config["training"]
    assert training["per_device_train_batch_size"] == 2 and training["gradient_accumulation_steps"] == 4
    assert training["activation_checkpointing"] is False and "no activation checkpointing, 2 rows" in out


def test_without_a_gpu_or_a_size_the_plan_says_how_to_get_one(caplog):
    config, out = planned(caplog, *QWEN_QLORA)
    assert config["training"]["activation_checkpointing"] is True  # the most memory-saving, as before the plan
    assert "plan.device_memory=24GiB" in out and config["plan"]["device_memory_gib"] is None


def test_device_memory_sizes_and_a_bad_one():
    assert memory_plan.device_memory("24GiB", {})[0] == 24
    assert memory_plan.device_memory("80GB", {})[0] == pytest.approx(80e9 / 2**30)
    assert memory_plan.device_memory(16384, {})[0] == 16384  # a bare number is GiB
    assert memory_plan.device_memory("16384MiB", {})[0] == 16
    with pytest.raises(ConfigError, match="plan.device_memory=lots"):
        memory_plan.device_memory("lots", {})


def test_liger_auto_is_off_on_cpu():
    config, _ = check_config(compose("training=gpu", "training.use_cpu=true", "training.bf16=false"), None)
    assert config["training"]["use_liger_kernel"] is False
    assert "training.use_liger_kernel: auto -> false (no CUDA GPU)" in config["plan"]["lines"]


def test_liger_auto_is_on_with_cuda_when_importable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_plan, "find_spec", lambda name: object() if name == "liger_kernel" else None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    config, _ = check_config(compose(*QWEN_QLORA, "plan.device_memory=139GiB", "dry_run=true"), None)
    assert config["training"]["use_liger_kernel"] is True
    assert "training.use_liger_kernel: auto -> true (CUDA, liger-kernel installed)" in config["plan"]["lines"]
    # a GPU run gets expandable segments, said in the plan
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" == config["plan"]["allocator"]
    monkeypatch.setattr(memory_plan, "find_spec", lambda name: None)
    config, _ = check_config(compose(*QWEN_QLORA, "plan.device_memory=139GiB", "dry_run=true"), None)
    assert config["training"]["use_liger_kernel"] is False and "not installed" in config["plan"]["lines"][1]


def test_the_allocator_setting_of_a_user_is_kept(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    memory_plan.use_cuda_allocator_for_packing()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    memory_plan.use_cuda_allocator_for_packing()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_checkpointing_every_2nd_layer_trains_and_recomputes_those_layers(tmp_path):
    """What the plan writes for `every 2 layers` (activation_checkpointing_kwargs {every_n_layers: 2}) reaches
    transformers: layers 0, 2 run under checkpoint, 1 and 3 keep their activations, and the adapter learns."""
    import datasets
    from hydra.utils import instantiate
    from trl import SFTTrainer
    from finetune.train.model import load_model, load_tokenizer
    cfg = compose("model.tiny.num_hidden_layers=4", "training.activation_checkpointing=true",
                  "+training.activation_checkpointing_kwargs={every_n_layers:2}", "training.max_steps=3",
                  "training.eval_strategy=no", "training.save_strategy=no", "training.load_best_model_at_end=false")
    _, args = check_config(cfg, tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    rows = [{"prompt": [{"role": "user", "content": f"price {i} RSI {20 + i}"}],
             "completion": [{"role": "assistant", "content": "BUY" if i % 2 else "SELL"}]} for i in range(32)]
    trainer = SFTTrainer(model=load_model(cfg.model, None, True), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=instantiate(cfg.method, _convert_="all"))
    layers = trainer.model.get_base_model().model.layers
    calls = {index: 0 for index in range(len(layers))}
    from transformers.modeling_layers import GradientCheckpointingLayer
    original_call = GradientCheckpointingLayer.__call__

    def counting(self, *a, **k):  # a layer's calls under checkpoint during training
        if self.gradient_checkpointing and self.training:
            calls[next(i for i, layer in enumerate(layers) if layer is self)] += 1
        return original_call(self, *a, **k)
    GradientCheckpointingLayer.__call__ = counting
    try:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        result = trainer.train()
    finally:
        GradientCheckpointingLayer.__call__ = original_call
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True, False]
    assert calls[0] > 0 and calls[2] > 0 and calls[1] == calls[3] == 0, calls
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_manifest_records_what_the_plan_chose(caplog, tmp_path, monkeypatch):
    """.hydra/config.yaml keeps `auto` (what was asked); manifest.json's config says what trained, with the plan."""
    from finetune.train import recipe
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # record() points wandb at the run dir: undone after the test
    config, _ = planned(caplog, *QWEN_QLORA, "plan.device_memory=24GiB")
    recipe.record(compose(*QWEN_QLORA), config, {"source": {"sha256": "0" * 64}}, tmp_path)
    written = json.loads((tmp_path / "manifest.json").read_text())["config"]
    assert written["training"]["activation_checkpointing"] is True
    assert written["training"]["per_device_train_batch_size"] == config["training"]["per_device_train_batch_size"]
    assert written["plan"]["device_memory_gib"] == 24 and written["plan"]["reason"].startswith("predicted peak")
    assert written["plan"]["chosen"]["training.activation_checkpointing"] is True
