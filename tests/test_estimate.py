"""The dry run's estimate counts the model the run would load, and the run's own PEFT method on it, exactly."""
import json

import peft
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT, compose
from finetune.errors import ConfigError
from finetune.config.estimate import checkpointing, estimate, model_shape
from finetune.train.model import convert_gguf, load_model
from finetune.runner import run


def dry_run(tmp_path, *overrides):
    cfg = compose(*overrides, "dry_run=true")
    run(cfg, tmp_path)
    return cfg, json.loads((tmp_path / "data" / "estimate.json").read_text())


def real_counts(cfg) -> tuple[int, int]:
    """What the runner loads, and what peft reports for the run's method on it."""
    model = load_model(cfg.model, None, use_cpu=True)
    params = sum(p.numel() for p in model.parameters())
    trainable, _ = peft.get_peft_model(model, instantiate(cfg.method, _convert_="all")).get_nb_trainable_parameters()
    return params, trainable


@pytest.fixture(scope="module")
def smollm2_folder(cache_dir):
    """SmolLM2-135M-Instruct converted once into this session's cache (~40 s): a real Hugging Face folder."""
    return convert_gguf(OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml").gguf)


def test_local_folder_counts_the_real_model(smollm2_folder, tmp_path):
    """model=local reads the folder's config.json; LoRA on all-linear passes the checks and counts as peft does."""
    cfg, e = dry_run(tmp_path, "model=local", f"model.path={smollm2_folder}", "method=lora")
    assert cfg.model.lora_target_modules == "all-linear"
    params, trainable = real_counts(cfg)
    assert e["params"] == params == 134_515_008
    assert e["trainable_params"] == trainable == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    assert e["model"] == {"source": str(smollm2_folder), "hidden_size": 576, "num_layers": 30, "vocab_size": 49152}
    assert e["memory_gib"]["weights"] == round(params * 4 / 2**30, 3)  # float32


@pytest.mark.parametrize("overrides", [
    ["method=lora"],                                  # the tiny preset's modules_to_save: embed_tokens, lm_head
    ["method=prefix"],
    ["method=ia3", "model.modules_to_save=null"],
    ["method=qlora"],                                 # a 4-bit base trains the same parameters
], ids=lambda o: " ".join(o))
def test_tiny_trainable_count_is_peft_s(overrides, tmp_path):
    cfg, e = dry_run(tmp_path, *overrides)
    params, trainable = real_counts(cfg)
    assert (e["params"], e["trainable_params"]) == (params, trainable)
    assert e["model"]["hidden_size"] == cfg.model.tiny.hidden_size
    assert e["model"]["num_layers"] == cfg.model.tiny.num_hidden_layers
    if "method=qlora" in overrides:
        assert e["memory_gib"]["weights"] == round(params * 0.55 / 2**30, 3)


def test_hub_preset_without_weights_counts_its_arch_block():
    """No local weights: the preset's `arch` on the meta device, not a hard-coded size (GQA's small k/v count)."""
    cfg = compose("model=qwen2_5_7b", "method=qlora")
    shape = model_shape(cfg.model, cfg.method)
    assert shape["source"] == "arch" and shape["params"] == 7_615_616_512
    assert shape["trainable_params"] == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512))  # q, o; k, v
    assert (shape["hidden_size"], shape["num_layers"]) == (3584, 28)


def test_activation_checkpointing_is_read():
    assert checkpointing({}) is True  # SFTConfig's default
    assert checkpointing({"activation_checkpointing": False, "gradient_checkpointing": True}) is False
    assert checkpointing({"gradient_checkpointing": False}) is False
    shape = {"params": 10**9, "trainable_params": 10**6, "hidden_size": 1024, "num_layers": 16}
    training = {"per_device_train_batch_size": 4, "max_length": 4096, "num_train_epochs": 1, "use_cpu": False}
    on = estimate(shape, False, "bfloat16", {**training, "activation_checkpointing": True}, 10**8)
    off = estimate(shape, False, "bfloat16", {**training, "activation_checkpointing": False}, 10**8)
    assert on["memory_gib"]["activations"] * 17 == pytest.approx(off["memory_gib"]["activations"], rel=1e-3)
    assert on["seconds"] == pytest.approx(off["seconds"] * 1.5, rel=1e-3)


def test_local_without_path_names_model_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path: missing; model=local needs model\.path=/dir"):
        run(compose("model=local", "dry_run=true"), tmp_path)
    assert not (tmp_path / "data").exists()  # stopped before the data or any weights
