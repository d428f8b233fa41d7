"""The dry run's estimate of memory and time: exact parameter counts, then arithmetic, not a measurement.

Counts come from the model the run would load, built on the meta device (no weights, a few seconds for a 7B
shape): its architecture is the config.json of the folder the run reads (`model.path`, the built tiny model,
the converted GGUF), or for a hub preset with no local weights its `arch` block. Trainable parameters are what
peft.get_peft_model reports for the run's own `method` on that model (QLoRA's 4-bit base trains the same ones).

Memory = base weights (4-bit ~0.55 byte/param with double quant, bf16 2, fp32 4) + trainable state
(weights, grads and two AdamW moments in fp32: 16 bytes/param) + activations (per token and layer about
2*hidden bytes kept with activation checkpointing, ~34*hidden without, after Korthikanti et al. 2022).
Time = training FLOPs / sustained FLOP/s: a frozen base costs ~4N FLOP per token (forward + input grads),
+2N when checkpointing recomputes the forward; sustained rates are ~40 % of an H100's bf16 peak, or what the
tiny model measured on a 2-core CPU.
"""
from omegaconf import DictConfig, OmegaConf

from finetune.errors import ConfigError

# cpu: SmolLM2-135M LoRA measured on 2 shared cores, 40 steps of 8 x ~133 tokens in ~550 s (docs/results.md)
SUSTAINED_FLOPS = {"cuda": 0.4 * 989e12, "cpu": 4.0e10}


def model_config(model_cfg: DictConfig):
    """The chosen model's transformers config and where it came from (a folder, or the preset's `arch`)."""
    from transformers import AutoConfig
    from finetune.train.model import model_source
    if model_cfg.tiny is not None or model_cfg.get("gguf") is not None or model_cfg.path is not None:
        folder = model_source(model_cfg)  # builds the tiny model / converts the GGUF once into the cache
        return AutoConfig.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code), folder
    if model_cfg.get("arch") is not None:
        return AutoConfig.for_model(**OmegaConf.to_container(model_cfg.arch)), "arch"
    raise ConfigError(f"model {model_cfg.name}: no model.path and no `arch` block, so the dry run cannot size "
                      f"the model; set model.path=/local/dir (a Hugging Face folder with config.json)")


def model_shape(model_cfg: DictConfig, method_cfg: DictConfig) -> dict:
    """Exact parameter counts of the chosen model and of the run's PEFT method on it, counted on the meta device."""
    import peft
    import torch
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM
    config, source = model_config(model_cfg)
    text = config.get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once, as peft does
        if method_cfg is None:  # method=full: every parameter trains
            trainable = params
        else:
            peft_model = peft.get_peft_model(model, instantiate(method_cfg, _convert_="all"))
            trainable, _ = peft_model.get_nb_trainable_parameters()
        # input and output embeddings (once when tied): NF4 leaves them in the model dtype (finetune/config/memory_plan.py)
        embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(),
                                                                 model.get_output_embeddings()) if m is not None}
    return {"source": source, "params": int(params), "trainable_params": int(trainable),
            "hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers, "vocab_size": text.vocab_size,
            "intermediate_size": getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            "embedding_params": int(sum(embeddings.values()))}


def checkpointing(training: dict) -> bool:
    """Activation checkpointing as SFTConfig resolves it: the new key, else its deprecated alias, else on
    (SFTConfig's default)."""
    for key in ("activation_checkpointing", "gradient_checkpointing"):
        if training.get(key) is not None:
            return bool(training[key])
    return True


def estimate(shape: dict, quantized: bool, dtype: str, training: dict, train_tokens: int,
             train_samples: int = 0) -> dict:
    params, trainable = shape["params"], shape["trainable_params"]
    weight_bytes = 0.55 if quantized else {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    recompute = checkpointing(training)
    tokens_per_step = training["per_device_train_batch_size"] * training["max_length"]
    act_per_token = shape["hidden_size"] * shape["num_layers"] * (2 if recompute else 34)
    gib = {"weights": params * weight_bytes / 2**30, "trainable_state": trainable * 16 / 2**30,
           "activations": tokens_per_step * act_per_token / 2**30}
    device = "cpu" if training.get("use_cpu") else "cuda"
    epochs = training["num_train_epochs"] if training.get("max_steps", -1) <= 0 else None
    # with max_steps: steps x samples per step x the mean sample's tokens (rows are padded to their batch, not
    # to max_length)
    per_sample = min(train_tokens / train_samples, training["max_length"]) if train_samples else training["max_length"]
    samples_per_step = training["per_device_train_batch_size"] * training.get("gradient_accumulation_steps", 1)
    tokens = train_tokens * epochs if epochs else training["max_steps"] * samples_per_step * per_sample
    flops = (6 if recompute else 4) * params * tokens
    return {"params": int(params), "trainable_params": int(trainable),
            "memory_gib": {**{k: round(v, 3) for k, v in gib.items()}, "total": round(sum(gib.values()), 3)},
            "train_tokens": int(tokens), "device": device, "activation_checkpointing": recompute,
            "seconds": round(flops / SUSTAINED_FLOPS[device], 1),
            "model": {k: shape.get(k) for k in ("source", "hidden_size", "num_layers", "vocab_size")}}
