"""Evaluate a finished run's adapter against its base again, without training.

    python -m finetune.evaluate RUN_DIR                      # the run's own eval suite, same held-out split
    python -m finetune.evaluate RUN_DIR eval=style eval.max_samples=20   # another suite or setting
    python -m finetune.evaluate RUN_DIR eval.constrained=true    # also under the task's answer grammar

Reads the run's saved config (finetune/rundir/__init__.py), the held-out split in RUN_DIR/data/test.jsonl and the adapter in
RUN_DIR/adapter; writes RUN_DIR/evals/<time>/metrics.json (and report.md with the plots).
"""
import argparse
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import log_to


def evaluate_run(run_dir: Path, overrides: list[str] = (), trust_remote_code: bool = False) -> dict:
    from hydra.utils import instantiate
    from finetune.data.pipeline import read_jsonl
    from finetune.eval.suite import score
    from finetune.rundir import DATA
    from finetune.serving.reopen import adapter_path, load_run, load_run_config, tuned_model
    cfg = load_run_config(run_dir, list(overrides), trust_remote_code)  # everything checked before the model loads
    adapter_path(run_dir)
    metrics = instantiate(cfg.eval.metrics, _convert_="all")
    from finetune.train.recipe import constrained_grammar
    grammar = constrained_grammar(cfg, [name for name, m in metrics.items() if m.needs_generation])
    test = run_dir / DATA / "test.jsonl"
    samples = read_jsonl(test)[: cfg.eval.max_samples]
    if not samples:
        raise DataError(f"{test}: no held-out samples to evaluate")
    _, tokenizer, model, adapter = load_run(run_dir, overrides, trust_remote_code=trust_remote_code)
    suite = dict(metrics=metrics, tokenizer=tokenizer, samples=samples, max_new_tokens=cfg.eval.max_new_tokens,
                 batch_size=cfg.eval.batch_size,
                 generation=OmegaConf.to_container(cfg.eval.generation), grammar=grammar)
    base = score(model=model, **suite)
    tuned = score(model=tuned_model(model, adapter), **suite)
    return {"base": base["metrics"], "tuned": tuned["metrics"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="eval=NAME and dotted keys, e.g. eval.max_samples=50")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model's own code from its folder (a run dir's setting is never used)")
    args = parser.parse_args(argv)
    log_to(args.run_dir)  # library lines and warnings into the run's finetune.log, not the console
    from finetune.rundir.report import metrics_table
    from finetune.rundir import METRICS, write_json, write_text
    try:
        result = evaluate_run(args.run_dir, args.overrides, args.trust_remote_code)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    from finetune.train.guards import told_if_disk_full
    out = args.run_dir / "evals" / time.strftime("%Y%m%d-%H%M%S")  # beside the run's own metrics
    with told_if_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / METRICS, result)
        write_text(out / "report.md", f"# Re-evaluation of {args.run_dir}\n\n{metrics_table(result)}\n")
    print(metrics_table(result))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
