"""Fold a run's adapter into its base and save one plain model: `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.

    python -m finetune.merge RUN_DIR OUT_DIR [--dtype bfloat16] [--force]

The base is loaded unquantized in the preset's dtype (model.dtype; --dtype to change it), even for a QLoRA
run: weights are folded into full-precision layers, since a 4-bit base cannot hold the sum. Then peft's
merge_and_unload(), and save_pretrained (safetensors) with the tokenizer and its chat template, so
`AutoTokenizer.from_pretrained(OUT_DIR).apply_chat_template(...)` builds the prompts training used.
merge.json records the run, the adapter and the base it came from.

Methods that add virtual tokens at run time (prefix-tuning, prompt tuning, p-tuning) have no weights to
fold in and are refused: serve those with their adapter (finetune.inference, finetune.serve). LoRA, DoRA,
IA3 (and the `modules_to_save` copies of embeddings and head) merge. OUT_DIR is written beside and renamed
at the end, so it is whole or absent; an existing non-empty OUT_DIR is refused unless --force.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from finetune.errors import ConfigError, DataError


def merge(run_dir: Path, out_dir: Path, dtype: str | None = None, force: bool = False) -> Path:
    import torch
    from omegaconf import OmegaConf
    from peft import PeftConfig, PeftModel
    from finetune.evaluate import load_run_config
    from finetune.model import load_model, load_tokenizer
    from finetune.rundir import write_json
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_run_config(run_dir, [])
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir}: no adapter/ (did the run complete? see status.json)")
    peft_config = PeftConfig.from_pretrained(adapter)
    method = getattr(peft_config.peft_type, "value", peft_config.peft_type)  # PeftType.LORA -> "LORA"
    if peft_config.is_prompt_learning:
        raise ConfigError(f"{run_dir}: a {method} adapter adds virtual tokens at run time and has "
                          "no weights to merge into the base; serve it with its adapter instead "
                          "(finetune.inference.SignalProvider.from_run, python -m finetune.serve)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another folder or pass --force")
    model_cfg = cfg.model if dtype is None else OmegaConf.merge(cfg.model, {"dtype": dtype})
    if not isinstance(getattr(torch, str(model_cfg.dtype), None), torch.dtype):
        raise ConfigError(f"dtype={model_cfg.dtype}: not a torch dtype (float32, bfloat16, float16)")
    base = load_model(model_cfg, None, use_cpu=True)  # quantization=None: full-precision layers to fold into
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tokenizer = load_tokenizer(cfg.model)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "merge.json", {"run_dir": str(run_dir.resolve()), "adapter": str(adapter.resolve()),
                                    "peft_type": method, "base": peft_config.base_model_name_or_path,
                                    "model": cfg.model.name, "dtype": str(model_cfg.dtype)})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default=None, help="default: the preset's model.dtype")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = merge(args.run_dir, args.out_dir, args.dtype, args.force)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"merged model written to {out}: AutoModelForCausalLM.from_pretrained({json.dumps(str(out))})")


if __name__ == "__main__":
    main()
