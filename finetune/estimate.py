"""The dry run's estimate of memory and time: arithmetic on parameter counts, not a measurement.

Memory = base weights (4-bit ~0.55 byte/param with double quant, bf16 2, fp32 4) + trainable state
(weights, grads and two AdamW moments in fp32: 16 bytes/param) + activations (per token and layer about
2*hidden bytes kept with gradient checkpointing, ~34*hidden without, after Korthikanti et al. 2022).
Time = training FLOPs / sustained FLOP/s: a frozen base costs ~4N FLOP per token (forward + input grads),
+2N when checkpointing recomputes the forward; sustained rates are ~40 % of an H100's bf16 peak, or what the
tiny model measured on a 2-core CPU.
"""
SUSTAINED_FLOPS = {"cuda": 0.4 * 989e12, "cpu": 2.0e10}


def tiny_size(arch: dict, vocab: int) -> dict:
    h, layers, inter = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return {"params_b": (2 * vocab * h + layers * per_layer) / 1e9, "hidden_size": h, "num_layers": layers}


def trainable_params(method: dict, size: dict, vocab: int) -> float:
    h, layers = size["hidden_size"], size["num_layers"]
    target = method.get("_target_", "")
    if target.endswith("PrefixTuningConfig") or target.endswith("PromptTuningConfig"):
        per = 2 * layers * h if target.endswith("PrefixTuningConfig") else h
        return method["num_virtual_tokens"] * per
    if target.endswith("IA3Config"):
        return layers * 3 * h
    modules = method.get("target_modules") or []
    n = len(modules) if isinstance(modules, list) else 7
    extra = 2 * vocab * h if method.get("modules_to_save") else 0
    return layers * n * method.get("r", 16) * 2 * h + extra


def estimate(size: dict, method: dict, quantized: bool, dtype: str, training: dict, train_tokens: int,
             vocab: int) -> dict:
    params = size["params_b"] * 1e9
    weight_bytes = 0.55 if quantized else {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    trainable = trainable_params(method, size, vocab)
    checkpointing = training.get("gradient_checkpointing", False)
    tokens_per_step = training["per_device_train_batch_size"] * training["max_length"]
    act_per_token = size["hidden_size"] * size["num_layers"] * (2 if checkpointing else 34)
    gib = {"weights": params * weight_bytes / 2**30, "trainable_state": trainable * 16 / 2**30,
           "activations": tokens_per_step * act_per_token / 2**30}
    device = "cpu" if training.get("use_cpu") else "cuda"
    epochs = training["num_train_epochs"] if training.get("max_steps", -1) <= 0 else None
    tokens = train_tokens * epochs if epochs else training["max_steps"] * tokens_per_step
    flops = (6 if checkpointing else 4) * params * tokens
    return {"params": int(params), "trainable_params": int(trainable),
            "memory_gib": {**{k: round(v, 3) for k, v in gib.items()}, "total": round(sum(gib.values()), 3)},
            "train_tokens": int(tokens), "device": device,
            "seconds": round(flops / SUSTAINED_FLOPS[device], 1)}
