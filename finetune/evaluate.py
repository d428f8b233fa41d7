"""Evaluate a finished run's adapter against its base again, without training.

    python -m finetune.evaluate RUN_DIR                      # the run's own eval suite, same held-out split
    python -m finetune.evaluate RUN_DIR eval=style eval.max_samples=20   # another suite or setting

Reads RUN_DIR/.hydra/config.yaml, the held-out split in RUN_DIR/data/test.jsonl and the adapter in
RUN_DIR/adapter; writes RUN_DIR/evals/<time>/metrics.json (and report.md with the plots).
"""
import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from finetune.errors import ConfigError, DataError


def load_run_config(run_dir: Path, overrides: list[str]):
    import finetune.runner  # noqa: F401  registers the resolvers the saved config uses
    from hydra import compose, initialize_config_dir
    from finetune.paths import CONF_DIR
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no .hydra/config.yaml)")
    cfg = OmegaConf.load(path)
    groups = [o for o in overrides if o.startswith("eval=")]
    if groups:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg.eval = compose(config_name="config", overrides=groups).eval
    dotted = [o for o in overrides if not o.startswith("eval=")]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))


def evaluate_run(run_dir: Path, overrides: list[str] = ()) -> dict:
    from hydra.utils import instantiate
    from peft import PeftModel
    from finetune.data.pipeline import read_jsonl
    from finetune.eval.suite import evaluate
    from finetune.model import load_model, load_tokenizer
    cfg = load_run_config(run_dir, list(overrides))
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir}: no adapter/ (did the run complete? see status.json)")
    metrics = instantiate(cfg.eval.metrics, _convert_="all")
    samples = read_jsonl(run_dir / "data" / "test.jsonl")[: cfg.eval.max_samples]
    if not samples:
        raise DataError(f"{run_dir}/data/test.jsonl: no held-out samples to evaluate")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.quantization, cfg.training.use_cpu)
    suite = dict(metrics=metrics, tokenizer=tokenizer, samples=samples, max_new_tokens=cfg.eval.max_new_tokens,
                 batch_size=cfg.eval.batch_size,
                 generation=OmegaConf.to_container(cfg.eval.generation))
    base = evaluate(model=model, **suite)
    tuned = evaluate(model=PeftModel.from_pretrained(model, run_dir / "adapter"), **suite)
    return {"base": base["metrics"], "tuned": tuned["metrics"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="eval=NAME and dotted keys, e.g. eval.max_samples=50")
    args = parser.parse_args(argv)
    from finetune.report import metrics_table
    from finetune.rundir import write_json, write_text
    try:
        result = evaluate_run(args.run_dir, args.overrides)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    out = args.run_dir / "evals" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    write_text(out / "report.md", f"# Re-evaluation of {args.run_dir}\n\n{metrics_table(result)}\n")
    print(metrics_table(result))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
