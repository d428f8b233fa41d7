"""`python -m finetune`: compose -> check -> data -> model -> base eval -> train -> save -> tuned eval -> report.

One run, top to bottom. Hydra composes the config (conf/ + a recipe) and picks the run directory;
`run()` does the rest and can be called from Python with a composed config.
"""
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.config import (check_method, check_model, check_training, check_training_overrides, resolve,
                             sft_config)
from finetune.errors import ConfigError, DataError, TrainingError
from finetune.resume import resume_from
from finetune.paths import CONF_DIR, SAMPLE_DATA_DIR
from finetune.recipes import register
from finetune.rundir import manifest, redact_hydra_dir, secret_values, set_status, write_json, write_text

log = logging.getLogger("finetune")
USER_WANDB_DIR = os.environ.get("WANDB_DIR")  # read once: runs in one process must not inherit each other's

register()
OmegaConf.register_new_resolver("sample_data", lambda name: str(SAMPLE_DATA_DIR / name), replace=True)
OmegaConf.register_new_resolver("launch_time", lambda fmt: launch_time(fmt), use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_name", lambda recipe: "default" if recipe in (None, "none")
                                else str(recipe).replace("/", "-"), replace=True)


def launch_time(fmt: str) -> str:
    """The run dir's time stamp. Hydra's ${now:} is per process, and DDP ranks started a second apart would
    write to different dirs; ranks share their launcher (torchrun, accelerate), so they take its start time."""
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        try:
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass  # not Linux: set hydra.run.dir explicitly for multi-process runs
    return time.strftime(fmt, time.localtime(started))


@dataclass
class Run:
    """What a run leaves in memory: metrics.json's content, data stats, and the trained model."""
    metrics: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: object = None
    tokenizer: object = None
    skipped: str | None = None    # why training was skipped (the incremental gate)


def is_main_process() -> bool:
    """Under torchrun / accelerate every rank runs this file; only rank 0 writes the run directory."""
    return int(os.environ.get("RANK", 0)) == 0


def run(cfg: DictConfig, run_dir: Path) -> Run:
    """Train and evaluate as `cfg` says, writing everything into `run_dir`."""
    main = is_main_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        set_status(run_dir, "running")
    try:
        result = _run(cfg, run_dir, main)
    except BaseException as err:
        if main:
            set_status(run_dir, "failed", f"{type(err).__name__}: {err}")
        raise
    finally:  # this run's WANDB_DIR must not outlive it (a later run, or a subprocess, would inherit it)
        if USER_WANDB_DIR is None:
            os.environ.pop("WANDB_DIR", None)
        else:
            os.environ["WANDB_DIR"] = USER_WANDB_DIR
    if main:
        set_status(run_dir, "skipped" if result.skipped else "completed", result.skipped)
    return result


def _run(cfg: DictConfig, run_dir: Path, main: bool) -> Run:
    started = time.perf_counter()
    # --- config: everything checked before data is built or weights load
    if HydraConfig.initialized():  # the user's recipe and the method's own values outrank a fit
        from finetune.fit import apply_fit_precedence
        for line in apply_fit_precedence(cfg, HydraConfig.get()):
            log.info("%s", line)
            if main:
                print(line)
    config = resolve(cfg)
    check_training(config["training"])
    check_method(config["method"], config["training"])
    args = None if cfg.dry_run else sft_config(config["training"], run_dir / "checkpoints")
    check_model(config["model"])
    if cfg.incremental.adapter:  # continue an earlier adapter at a lower learning rate
        from finetune.incremental import adapter_dir
        incremental_adapter = adapter_dir(cfg.incremental.adapter)
        config["training"]["learning_rate"] *= cfg.incremental.learning_rate_scale
        if args is not None:
            args.learning_rate = config["training"]["learning_rate"]
    metrics = instantiate(cfg.eval.metrics, _convert_="all")
    peft_config = instantiate(cfg.method, _convert_="all")

    import torch
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    from finetune.data.pipeline import prepare
    from finetune.model import load_model, load_tokenizer
    tokenizer = load_tokenizer(cfg.model)

    # --- data
    splits, stats = prepare(cfg.dataset, tokenizer, run_dir / "data" if main else None, cfg.seed,
                            load=not cfg.dry_run)
    log.info("data: %s (%s in %.3f s)", {k: v["count"] for k, v in stats["splits"].items()},
             "from cache" if stats["build"]["from_cache"] else "built", stats["build"]["seconds"])
    if cfg.dry_run:
        stats["estimate"] = dry_run_estimate(cfg, config, stats, tokenizer)
        print_dry_run(stats)
        write_json(run_dir / "data" / "estimate.json", stats["estimate"])
        return Run(stats=stats, tokenizer=tokenizer)
    if cfg.incremental.adapter:
        from finetune.incremental import new_samples
        fresh = new_samples(cfg.incremental.adapter, splits["train"])
        if fresh < cfg.incremental.min_new_samples:
            message = (f"incremental: only {fresh} new train samples since {cfg.incremental.adapter} "
                       f"(incremental.min_new_samples={cfg.incremental.min_new_samples}); not training")
            log.warning(message)
            print(message)
            return Run(stats=stats, tokenizer=tokenizer, skipped=message)
        log.info("incremental: %d new train samples; continuing %s at lr %g", fresh, incremental_adapter,
                 args.learning_rate)
    resume_checkpoint = resume_from(cfg.resume, run_dir) if main else None
    if main:
        secrets = secret_values(config)
        redact_hydra_dir(run_dir, secrets)
        run_manifest = manifest(config, stats["source"]["sha256"], cfg.seed, secrets)
        write_json(run_dir / "manifest.json", run_manifest)
        # wandb's offline run (if chosen) lands in this run dir, unless the user chose a WANDB_DIR
        os.environ["WANDB_DIR"] = USER_WANDB_DIR or str(run_dir)

    # --- model, and the base model's scores before any training
    import datasets
    from transformers import set_seed
    from trl import SFTTrainer
    from finetune.guards import StopOnNonFiniteLoss, out_of_memory_advice
    from finetune.eval.suite import evaluate
    set_seed(cfg.seed)
    model = load_model(cfg.model, cfg.quantization, args.use_cpu)
    if cfg.quantization is not None and not cfg.model.modules_to_save:
        # a 4-bit pretrained base: norms in fp32 and input grads on, as QLoRA trains it (peft's k-bit preparation);
        # with modules_to_save (the random-init tiny base) it would cast the saved copies wrongly, so not there
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    held_out = splits["test"][: cfg.eval.max_samples]
    suite = dict(metrics=metrics, tokenizer=tokenizer, samples=held_out,
                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                 generation=OmegaConf.to_container(cfg.eval.generation))
    base = evaluate(model=model, **suite) if main else None  # other ranks wait at the first collective
    log.info("base: %s", base and base["metrics"])

    # --- train: SFTTrainer wraps the model with the PEFT method (for a 4-bit base it casts the adapter to bf16;
    # TRL 1.16 does not call peft's prepare_model_for_kbit_training, and doing so here breaks modules_to_save)
    def as_dataset(samples):  # prompt/completion form: loss on the answer only
        return datasets.Dataset.from_list([{"prompt": s["messages"][:-1], "completion": s["messages"][-1:]}
                                           for s in samples])
    callbacks = [StopOnNonFiniteLoss()]
    if cfg.early_stopping.patience:
        from transformers import EarlyStoppingCallback
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    if cfg.incremental.adapter:  # the earlier adapter, trainable: SFTTrainer must not wrap it again
        from peft import PeftModel
        model, peft_config = PeftModel.from_pretrained(model, incremental_adapter, is_trainable=True), None
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_dataset(splits["train"]),
                         eval_dataset=as_dataset(splits["validation"]) if splits["validation"] else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if len(trainer.train_dataset) == 0:
        raise DataError(f"no training sample is left after tokenization (training.max_length="
                        f"{args.max_length}): every answer was cut off; raise training.max_length")
    if args.world_size > 1:  # each rank trains on its own shard: say which, so a log shows it
        first = next(iter(trainer.get_train_dataloader()))["input_ids"]
        log.info("rank %d of %d: first batch digest %s", args.process_index, args.world_size,
                 hashlib.sha256(first.cpu().numpy().tobytes()).hexdigest()[:12])
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_checkpoint)
    except torch.OutOfMemoryError as err:
        raise TrainingError(out_of_memory_advice(config["training"])) from err
    if not main:
        return Run(model=trainer.model, tokenizer=tokenizer)

    # --- save: PEFT format, written beside and renamed so a crash never leaves a half adapter
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    tmp.rename(run_dir / "adapter")

    # --- tuned scores on the same held-out samples, then the report
    tuned = evaluate(model=trainer.model, **suite)
    log.info("tuned: %s", tuned["metrics"])
    write_answers(run_dir / "answers.jsonl", held_out, base["outputs"], tuned["outputs"])
    result = {"base": base["metrics"], "tuned": tuned["metrics"]}
    # the trainer's trackers (report_to: tensorboard, wandb) get the eval metrics beside the losses
    trainer.log({f"{side}_{k}": v for side in ("base", "tuned") for k, v in result[side].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    from finetune.report import method_name, write_ab_sheet, write_report
    if cfg.dataset.task == "text" and tuned["outputs"] is not None:
        write_ab_sheet(run_dir, held_out, base["outputs"], tuned["outputs"], cfg.seed)
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    recipe = choices.get("recipe") or "none"
    if hasattr(trainer.model, "get_nb_trainable_parameters"):  # a PeftModel: adapter + frozen base (4-bit aware)
        trainable, total = trainer.model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
    loaded = {"model_folder": model.name_or_path, "parameters": total - trainable,  # the folder it loaded from
              "trainable_parameters": trainable}
    summary = {"recipe": "default" if recipe == "none" else recipe, "model": cfg.model.name,
               "model folder": loaded["model_folder"], "parameters": loaded["parameters"],
               "trainable parameters": f"{trainable:,} ({trainable / max(total, 1):.2%} of all)",
               "method": method_name(config["method"], cfg.quantization is not None, choices.get("method")),
               "dataset": str(cfg.dataset.path), "eval suite": ", ".join(cfg.eval.metrics),
               "train samples": len(splits["train"]), "held-out samples": len(held_out),
               "steps": trainer.state.global_step, "train loss": train_output.training_loss,
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(run_dir / "manifest.json", {**run_manifest, **loaded, "seconds": summary["seconds"],
                                           "steps": summary["steps"]})
    write_report(run_dir, summary, result, stats, trainer.state.log_history, cfg.leaderboard.metric,
                 cfg.leaderboard.mode)
    write_json(run_dir / "metrics.json", result)
    return Run(metrics=result, stats=stats, model=trainer.model, tokenizer=tokenizer)


def write_answers(path: Path, samples: list[dict], base: list[str] | None, tuned: list[str] | None) -> None:
    """Each held-out prompt's gold answer beside the base and tuned answers the metrics scored."""
    if tuned is None:
        return
    rows = [{"prompt": s["messages"][:-1], "reference": s["messages"][-1]["content"], "label": s.get("label"),
             "base": b, "tuned": t} for s, b, t in zip(samples, base, tuned)]
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def dry_run_estimate(cfg: DictConfig, config: dict, stats: dict, tokenizer) -> dict:
    from finetune.estimate import estimate, model_shape
    shape = model_shape(cfg.model, cfg.method)  # the chosen model's real shape, counted on the meta device
    return estimate(shape, cfg.quantization is not None, cfg.model.dtype, config["training"],
                    stats["splits"]["train"]["tokens"]["total"], stats["splits"]["train"]["count"])


def print_dry_run(stats: dict) -> None:
    build = stats["build"]
    print(f"data: {'from cache' if build['from_cache'] else 'built'} in {build['seconds']:.3f} s; "
          f"{stats['built']} samples from the builder; dropped: {stats['dropped'] or 'none'}")
    for name, s in stats["splits"].items():
        t = s["tokens"]
        print(f"  {name:<10} {s['count']:>6} samples  labels {s['labels']}  "
              f"tokens p50 {t['p50']:.0f} p90 {t['p90']:.0f} max {t['max']}")
    e = stats["estimate"]
    print(f"estimate ({e['device']}): {e['params'] / 1e6:.1f} M params, {e['trainable_params'] / 1e6:.2f} M "
          f"trainable, ~{e['memory_gib']['total']:.1f} GiB, ~{e['seconds']:.0f} s for {e['train_tokens']} tokens")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # status.json says failed; the leaderboard lists the job as failed, the sweep goes on, and a
            # sweeper (Optuna) counts NaN as a failed trial
            log.exception("job failed: %s", err)
            return float("nan")
        if isinstance(err, (ConfigError, DataError, TrainingError)):  # status.json keeps it too
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        raise
    print(f"run dir: {run_dir}")
    # what a sweeper (Optuna) optimises: the leaderboard's metric
    return result.metrics.get("tuned", {}).get(cfg.leaderboard.metric)


def main() -> None:
    """The `finetune` command and `python -m finetune`."""
    try:
        check_training_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    hydra_main()
