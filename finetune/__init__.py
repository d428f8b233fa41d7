"""finetune: config-driven LoRA / QLoRA / prefix-tuning of LLMs on finance and writing-style data."""
import os

# No network at run time unless the user asks: the hub stays offline and wandb (if chosen) logs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def __getattr__(name):
    # `from finetune import SignalProvider` without importing torch for every `import finetune`
    if name in ("SignalProvider", "Ensemble", "vote"):
        from finetune.serving import inference
        return getattr(inference, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
