"""Fold a run's adapter into its base and save one plain model: `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.

    python -m finetune.merge RUN_DIR OUT_DIR [--dtype bfloat16] [--force]
    python -m finetune.merge RUN_DIR OUT_DIR --base dequantized     # a QLoRA run: the weights it trained on

The base is loaded unquantized in the preset's dtype (model.dtype; --dtype to change it), even for a QLoRA
run: weights are folded into full-precision layers, since a 4-bit base cannot hold the sum. Then peft's
merge_and_unload(). For a QLoRA run that is the original full-precision base, which differs from the 4-bit weights
the adapter trained against by their quantization error; `--base dequantized` folds the adapter into those 4-bit
weights dequantized instead (in the compute dtype, as `python -m finetune.serve --merge` serves it:
finetune.serving.inference.dequantized_merge), so the saved model gives the answers the run evaluated. Then
save_pretrained (safetensors) with the tokenizer and its chat template, so
`AutoTokenizer.from_pretrained(OUT_DIR).apply_chat_template(...)` builds the prompts training used.
merge.json records the run, the adapter folder (`adapter_dir`) and the base it came from.

Methods that add virtual tokens at run time (prefix-tuning, prompt tuning, p-tuning) have no weights to
fold in and are refused: serve those with their adapter (finetune.serving.inference, finetune.serve). LoRA, DoRA,
IA3 (and the `modules_to_save` copies of embeddings and head) merge. OUT_DIR is written beside and renamed
at the end, so it is whole or absent; an existing non-empty OUT_DIR is refused unless --force.
"""
import argparse
import json
import sys
from pathlib import Path

from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import log_to


def merge(run_dir: Path, out_dir: Path, dtype: str | None = None, force: bool = False, base: str = "original") -> Path:
    import torch
    from peft import PeftConfig, PeftModel
    from finetune.rundir import atomic_dir, write_json
    from finetune.serving.reopen import adapter_path, load_run, load_run_config
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_run_config(run_dir)  # everything checked before the model loads
    adapter = adapter_path(run_dir)
    from finetune.serving.reopen import is_full_model
    if is_full_model(adapter):
        raise ConfigError(f"{run_dir}: a method=full run; {adapter} is already the whole model, nothing to merge "
                          "(AutoModelForCausalLM.from_pretrained loads it)")
    peft_config = PeftConfig.from_pretrained(adapter)
    method = getattr(peft_config.peft_type, "value", peft_config.peft_type)  # PeftType.LORA -> "LORA"
    if peft_config.is_prompt_learning:
        raise ConfigError(f"{run_dir}: a {method} adapter adds virtual tokens at run time and has "
                          "no weights to merge into the base; serve it with its adapter instead "
                          "(finetune.serving.inference.SignalProvider.from_run, python -m finetune.serve)")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another folder or pass --force")
    if base not in ("original", "dequantized"):
        raise ConfigError(f"--base {base}: original or dequantized")
    if base == "dequantized" and cfg.get("quantization") is None:
        raise ConfigError(f"{run_dir}: --base dequantized is for a run on a quantized base (QLoRA); this run's base "
                          "is not quantized, so leave --base out")
    dtype = str(cfg.model.dtype if dtype is None else dtype)
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"dtype={dtype}: not a torch dtype (float32, bfloat16, float16)")
    if base == "dequantized":  # the 4-bit weights the adapter trained against, dequantized, then the adapter
        from finetune.serving.inference import dequantized_merge
        _, tokenizer, quantized, _ = load_run(run_dir, use_cpu=True)
        merged = dequantized_merge(PeftModel.from_pretrained(quantized, adapter))
        if isinstance(merged, PeftModel):  # a LoRA variant it cannot fold (DoRA), named in its warning
            raise ConfigError(f"{run_dir}: this adapter does not fold into dequantized 4-bit weights; merge it into "
                              "the original base (leave --base out)")
        merged = merged.to(getattr(torch, dtype))
    else:  # quantized=False: full-precision layers to fold the adapter into
        _, tokenizer, full, _ = load_run(run_dir, quantized=False, dtype=dtype, use_cpu=True)
        merged = PeftModel.from_pretrained(full, adapter).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "merge.json", {"run_dir": str(run_dir.resolve()), "adapter_dir": str(adapter.resolve()),
                                        "peft_type": method, "base": peft_config.base_model_name_or_path,
                                        "model": cfg.model.name, "dtype": dtype, "base_weights": base})
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default=None, help="default: the preset's model.dtype")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--base", choices=("original", "dequantized"), default="original",
                        help="a QLoRA run: fold into the original full-precision base (default) or into its "
                             "dequantized 4-bit weights, the ones it trained against")
    args = parser.parse_args(argv)
    log_to(args.run_dir)  # library lines and warnings into the run's finetune.log, not the console
    from finetune.train.guards import told_if_disk_full
    try:
        with told_if_disk_full(args.out_dir):
            out = merge(args.run_dir, args.out_dir, args.dtype, args.force, args.base)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"merged model written to {out}: AutoModelForCausalLM.from_pretrained({json.dumps(str(out))})")


if __name__ == "__main__":
    main()
