"""One run, top to bottom: config -> data -> model -> train -> evaluate -> report (`steps`).

`run(cfg, run_dir)` holds the run dir (its lock, status.json, SIGTERM / SIGINT as a checkpointed stop, a full disk
told in one line) around the steps; each step is a function below, in the order the steps call them.
finetune/runner.py chooses between this plain run, walk-forward folds and SFT -> preference stages.
"""
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.train import incremental
from finetune.config import check_config
from finetune.errors import ConfigError, DataError, Interrupted, TrainingError
from finetune.eval.suite import score
from finetune.rundir.logs import FILE_ONLY, headline, route_library_logs
from finetune.paths import CONF_DIR
from finetune.train.preemption import Preemption
from finetune.train.resume import RunClock, durable_checkpoints, is_final, resume_from, step_of, whole_run
from finetune.rundir import (ADAPTER, ANSWERS, CHECKPOINTS, DATA, MANIFEST, METRICS, atomic_dir, manifest,
                             redact_hydra_dir, run_lock, secret_values, set_status, write_json, write_text)
from finetune.train import trainers

log = logging.getLogger("finetune")
USER_WANDB_DIR = os.environ.get("WANDB_DIR")  # read once: runs in one process must not inherit each other's


@dataclass
class Run:
    """What a run leaves in memory: metrics.json's content and data stats, the trained model, and what report.md
    is written from."""
    metrics: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    model: object = None
    tokenizer: object = None
    skipped: str | None = None    # why training was skipped (the incremental gate)
    cfg: DictConfig | None = None
    config: dict = field(default_factory=dict)   # the checked config (manifest.json's)
    run_dir: Path | None = None
    manifest: dict = field(default_factory=dict)
    base_folder: str = ""         # the folder the base model loaded from
    trainer: object = None
    train_output: object = None
    splits: dict = field(default_factory=dict)
    held_out: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)   # {"base": [...], "tuned": [...]}: the answers the metrics read
    seconds: float = 0.0


def is_main_process() -> bool:
    """Under torchrun / accelerate every rank runs this file; only rank 0 writes the run directory."""
    return int(os.environ.get("RANK", 0)) == 0


def run(cfg: DictConfig, run_dir: Path) -> Run:
    """Train and evaluate as `cfg` says, writing everything into `run_dir`."""
    main = is_main_process()
    route_library_logs()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if main else nullcontext():  # rank 0 holds it for the job
        try:
            if main:  # Hydra saved the command line into .hydra/ already: scrub it before anything can fail
                redact_hydra_dir(run_dir, secret_values(OmegaConf.to_container(cfg)))
                set_status(run_dir, "running")  # a full disk here too is told in one line
            with Preemption().installed() as preemption:  # SIGTERM / SIGINT: stop at a step with a checkpoint
                result = steps(cfg, run_dir, main, preemption)
        except Interrupted as err:
            if main:
                set_status(run_dir, "interrupted", str(err))
            raise
        except BaseException as err:
            from finetune.train.guards import disk_full, disk_full_advice
            if disk_full(err, run_dir):  # any write (checkpoint, adapter, report): one line naming the file
                if isinstance(err, TrainingError):  # told, and status.json written, where training saved
                    raise
                raise TrainingError(disk_full_advice(err, run_dir / CHECKPOINTS, main)) from err
            if main:
                set_status(run_dir, "failed", f"{type(err).__name__}: {err}")
            raise
        finally:  # this run's WANDB_DIR must not outlive it (a later run, or a subprocess, would inherit it)
            wandb = sys.modules.get("wandb")  # nor its wandb run: transformers starts one only when none is open,
            if wandb is not None and getattr(wandb, "run", None) is not None:  # so a sweep's next job would log
                wandb.finish()                                                   # into this one's
            if USER_WANDB_DIR is None:
                os.environ.pop("WANDB_DIR", None)
            else:
                os.environ["WANDB_DIR"] = USER_WANDB_DIR
        if main:
            set_status(run_dir, "skipped" if result.skipped else "completed", result.skipped)
        return result


def steps(cfg: DictConfig, run_dir: Path, main: bool, preemption: Preemption) -> Run:
    started = time.perf_counter()
    # 1. config: everything checked before data is built or weights load
    config, args = check(cfg, run_dir)
    start = trainers.start_adapter(cfg)  # objective.start_from: the SFT adapter a preference stage continues
    metrics, grammar = eval_metrics(cfg)
    peft_config = method_config(cfg, config, args)  # None: method=full
    tokenizer = load_tokenizer(cfg)

    # 2. data, and the held-out samples the suite scores (what each metric reads checked on them)
    splits, stats = build_data(cfg, tokenizer, run_dir, main)
    suite = eval_suite(cfg, metrics, grammar, tokenizer, splits, stats)
    if cfg.dry_run:
        return dry_run(cfg, config, stats, tokenizer, run_dir)
    trainers.check(cfg, splits)
    scorer = validation_scorer(cfg, args, metrics, splits, tokenizer)  # macro-F1 picks the checkpoint kept
    earlier_adapter, skipped = incremental.plan(cfg, config, args, splits["train"])
    if skipped:
        return Run(stats=stats, tokenizer=tokenizer, skipped=skipped)
    checkpoint = resume_point(cfg, run_dir, main)  # the same on every rank: they resume in step
    run_manifest = record(cfg, config, stats, run_dir) if main else None

    # 3. the model, scored before training (other ranks wait at the first collective)
    model, peft_config = load_base(cfg, args, start, peft_config)
    base = scores("base", score(model=model, **suite) if main else None)

    # 4. train
    trainer = trainers.build(cfg, args, model, earlier_adapter, peft_config, splits, stats, tokenizer, preemption,
                             scorer)
    clock = RunClock(started, checkpoint)  # report.md's seconds: those of the runs this one resumed too
    train_output = train(trainer, checkpoint, [clock.callback()], header(cfg, trainer, splits, stats, run_dir, main))
    preemption.raise_if_stopped()
    if not main:
        return Run(model=trainer.model, tokenizer=tokenizer)
    save_adapter(cfg, trainer, tokenizer, run_dir)

    # 5. evaluate: the same held-out samples, the simple model beside
    tuned = scores("tuned", score(model=trainer.model, **suite))
    result = results(cfg, trainer, splits["train"], suite, base, tuned)

    # 6. report
    done = Run(metrics=result, stats=stats, model=trainer.model, tokenizer=tokenizer, cfg=cfg, config=config,
               run_dir=run_dir, manifest=run_manifest, base_folder=model.name_or_path, trainer=trainer,
               train_output=train_output, splits=splits, held_out=suite["samples"],
               answers={"base": base["outputs"], "tuned": tuned["outputs"]}, seconds=clock.seconds())
    report(done)
    return done


def resume_point(cfg: DictConfig, run_dir: Path, main: bool) -> str | None:
    """The checkpoint this run resumes from (resume: auto / true / false / a run dir), said by every rank."""
    checkpoint = resume_from(cfg.resume, run_dir, main)
    if checkpoint and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        log.info("rank %s resumes from %s", os.environ.get("RANK"), checkpoint)
    return checkpoint


def scores(side: str, scored: dict | None) -> dict | None:
    """Log one side's scores: the headline on the console, every metric in finetune.log."""
    if scored is not None:
        log.info("%s: %s", side, headline(scored["metrics"]))
        log.info("%s, every metric: %s", side, headline(scored["metrics"], None), extra=FILE_ONLY)
    return scored


def eval_metrics(cfg: DictConfig) -> tuple[dict, str | None]:
    """The eval suite's metrics and, with eval.constrained, the task's answer grammar."""
    metrics = instantiate(cfg.eval.metrics, _convert_="all")
    return metrics, constrained_grammar(cfg, [name for name, m in metrics.items() if m.needs_generation])


def method_config(cfg: DictConfig, config: dict, args):
    """The PEFT config the method names; None for method=full, refused where its optimizer state cannot fit."""
    if cfg.method is None:
        check_full_fits(cfg, config, args)
    return instantiate(cfg.method, _convert_="all")


def load_tokenizer(cfg: DictConfig):
    """The model's tokenizer, with torch's threads chosen first (cpu_threads)."""
    import torch
    from finetune.config.cpu import choose_threads
    from finetune.train.model import load_tokenizer as load
    threads = choose_threads(cfg.cpu_threads)
    if threads:
        torch.set_num_threads(threads)
    return load(cfg.model)


def eval_suite(cfg: DictConfig, metrics: dict, grammar: str | None, tokenizer, splits: dict, stats: dict) -> dict:
    """score()'s arguments but the model: the metrics, the held-out samples (checked to carry the gold label or
    meta key each metric needs: missing stops the run here, not after training) and the generation settings."""
    from finetune.eval.suite import check as check_suite
    answering = [name for name, m in metrics.items() if m.needs_generation]
    if stats.get("kind") == "text" and answering:
        raise ConfigError(f"eval.metrics {', '.join(answering)} score answers to prompts, and text samples have "
                          "none; use eval=perplexity")
    held_out = held_out_samples(cfg, splits, stats)
    check_suite(metrics, held_out)
    return dict(metrics=metrics, tokenizer=tokenizer, samples=held_out, max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size, generation=OmegaConf.to_container(cfg.eval.generation),
                grammar=grammar, scoring=cfg.eval.get("scoring", "generate"))


def load_base(cfg: DictConfig, args, start: Path | None, peft_config):
    """The base model (4-bit for QLoRA), or for a preference stage the SFT adapter on it, trained on and scored
    as "base"; with the PEFT config the trainer still has to apply (None once an adapter is loaded)."""
    from transformers import set_seed
    from finetune.train.model import load_model
    set_seed(cfg.seed)
    model = load_model(cfg.model, cfg.quantization, args.use_cpu)
    if cfg.quantization is not None and not cfg.model.modules_to_save:
        # a 4-bit pretrained base: norms in fp32 and input grads on, as QLoRA trains it (peft's k-bit preparation);
        # with modules_to_save (the random-init tiny base) it would cast the saved copies wrongly, so not there
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    if start is None:
        return model, peft_config
    from peft import PeftModel
    return PeftModel.from_pretrained(model, start, is_trainable=True), None


def header(cfg: DictConfig, trainer, splits: dict, stats: dict, run_dir: Path, main: bool) -> str | None:
    return training_header(trainer, trained_count(cfg, trainer, splits, stats), run_dir) if main else None


def save_adapter(cfg: DictConfig, trainer, tokenizer, run_dir: Path) -> None:
    """adapter/ in PEFT format (a crash never leaves half an adapter); method=full: the whole model."""
    with atomic_dir(run_dir / ADAPTER) as tmp:
        if hasattr(trainer.model, "peft_config"):  # the trained adapter, not TRL's frozen "ref" copy beside it
            trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        else:
            trainer.model.save_pretrained(tmp)
        if cfg.method is None:  # method=full: a whole model, with its tokenizer (chat template included)
            tokenizer.save_pretrained(tmp)


def results(cfg: DictConfig, trainer, train: list[dict], suite: dict, base: dict, tuned: dict) -> dict:
    """metrics.json: base and tuned scores and the simple model's; the trainer's trackers (report_to:
    tensorboard, wandb) get them beside the losses."""
    result = {"base": base["metrics"], "tuned": tuned["metrics"]}
    baseline = simple_baseline(cfg, train, suite["samples"], suite["metrics"])  # the same numbers, scikit-learn
    if baseline:
        result["simple_model"] = baseline
    trainer.log({f"{side}_{k}": v for side in ("base", "tuned") for k, v in result[side].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return result


def check_full_fits(cfg: DictConfig, config: dict, args) -> None:
    """method=full keeps ~16 bytes of state a parameter (fp32 weights, grads, two AdamW moments): refused, before
    anything loads, where that is more than one device holds and training is not sharded over several GPUs."""
    if cfg.incremental.adapter is not None:
        raise ConfigError("method=full with incremental.adapter: an incremental run continues a PEFT adapter; "
                          "drop incremental.adapter, or use a PEFT method")
    from finetune.config.estimate import model_shape
    params = model_shape(cfg.model, None)["params"]
    need = params * 16 / 2**30
    training = config["training"]
    sharded = int(os.environ.get("WORLD_SIZE", 1)) > 1 and (training.get("fsdp") or training.get("deepspeed"))
    if sharded:
        return
    import torch
    if training.get("use_cpu") or not torch.cuda.is_available():
        device, have = "this machine's memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    else:
        device, have = "one GPU", torch.cuda.get_device_properties(0).total_memory / 2**30
    if need > 0.8 * have:
        raise ConfigError(f"method=full on {cfg.model.name} ({params / 1e9:.1f} B parameters) needs ~{need:.0f} "
                          f"GiB for weights, gradients and AdamW state, more than {device} ({have:.0f} GiB): shard it "
                          "over several GPUs (training=gpu with accelerate launch --config_file "
                          "conf/accelerate/fsdp.yaml or deepspeed_zero3.yaml), or use method=lora / qlora")


def simple_baseline(cfg: DictConfig, train: list[dict], held_out: list[dict], metrics: dict) -> dict | None:
    """A small scikit-learn classifier's scores on the held-out split (finetune/eval/simple_model.py), for a
    classification suite on labelled data; None otherwise."""
    from finetune import tasks
    from finetune.eval.checkpoint import classifier
    task = tasks.get(cfg.dataset.task)
    if not task.labels or classifier(metrics) is None or not any(s.get("label") for s in held_out):
        return None
    from finetune.eval.simple_model import simple_model
    try:
        return simple_model(train, held_out, task, metrics)
    except DataError as err:  # one label in train: nothing to fit, and the report says why
        log.info("no simple-model baseline: %s", err)
        return None


def validation_scorer(cfg: DictConfig, args, metrics: dict, splits: dict, tokenizer):
    """The callback that scores the validation split at each evaluation when the kept checkpoint follows the
    task's metric (training.metric_for_best_model: macro_f1); checked before any weight loads."""
    from finetune.eval import checkpoint
    if not checkpoint.wanted(args.metric_for_best_model):  # the Trainer reads it at every save, best kept or not
        return None
    samples = checkpoint.check(args.metric_for_best_model, metrics, splits["validation"])
    return checkpoint.ValidationScore(checkpoint.classifier(metrics), samples, tokenizer, cfg.eval.batch_size)


def constrained_grammar(cfg: DictConfig, answering: list[str]) -> str | None:
    """eval.constrained: the task's answer grammar, or an error for a task (or suite) that has none."""
    if not cfg.eval.get("constrained"):
        return None
    from finetune import tasks
    grammar = tasks.get(cfg.dataset.task).grammar()
    if grammar is None or not answering:
        with_one = ", ".join(name for name, task in tasks.TASKS.items() if task.grammar() is not None)
        raise ConfigError("eval.constrained=true: " + (f"dataset.task={cfg.dataset.task} has no answer grammar "
                          f"(tasks with one: {with_one})" if grammar is None else
                          "the eval suite has no metric that reads answers"))
    return grammar


def check(cfg: DictConfig, run_dir: Path) -> tuple[dict, object]:
    """The resolved config (the fit composed and a preference stage's own values printed) and the trainer's
    arguments (None for a dry run)."""
    def say(lines):  # on the console once (Hydra's console handler) and in finetune.log
        for line in lines:
            log.info("%s", line)
    say(fit_values(cfg))
    config, args = check_config(cfg, None if cfg.dry_run else run_dir / CHECKPOINTS)
    say(stage_values(cfg, config))
    return config, args


def fit_values(cfg: DictConfig) -> list[str]:
    """One line naming the fit Hydra composed (conf/fit/<model>_<training>.yaml) and the values it left in `cfg`
    (the method, a recipe and the command line come after it in the defaults list and win)."""
    fit = HydraConfig.get().runtime.choices.get("fit") if HydraConfig.initialized() else None
    path = CONF_DIR / "fit" / f"{fit}.yaml"
    if fit is None or not path.is_file():
        return []
    keys = OmegaConf.load(path).get("training", {})
    values = ", ".join(f"{key}={cfg.training.get(key)}" for key in keys)
    return [f"fit {fit} (conf/fit/{fit}.yaml, under the method, the recipe and the command line): training {values}"]


def stage_values(cfg: DictConfig, config: dict) -> list[str]:
    """One line for each `training` value a preference stage does not use: objective.training sets another."""
    own = {} if config["objective"]["name"] == "sft" else config["objective"].get("training") or {}
    return [f"objective={cfg.objective.name}: training.{key}={value} from objective.training "
            f"(training.{key}={cfg.training[key]} is not used by this stage)"
            for key, value in own.items() if cfg.training.get(key, value) != value]


def build_data(cfg: DictConfig, tokenizer, run_dir: Path, main: bool) -> tuple[dict, dict]:
    from finetune.data.pipeline import prepare
    splits, stats = prepare(cfg.dataset, tokenizer, run_dir / DATA if main else None, cfg.seed,
                            load=not cfg.dry_run, max_length=cfg.training.get("max_length"))
    log.info("data: %s (%s in %.3f s)", {k: v["count"] for k, v in stats["splits"].items()},
             "from cache" if stats["build"]["from_cache"] else "built", stats["build"]["seconds"])
    return splits, stats


def held_out_samples(cfg: DictConfig, splits: dict, stats: dict) -> list[dict]:
    """The test samples the eval suite scores, the first eval.max_samples; a dry run (splits not loaded) reads
    just those from the built split."""
    if splits:
        return splits["test"][: cfg.eval.max_samples]
    from itertools import islice
    with open(Path(stats["build"]["dir"]) / "test.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in islice((line for line in f if line.strip()), cfg.eval.max_samples)]


def dry_run(cfg: DictConfig, config: dict, stats: dict, tokenizer, run_dir: Path) -> Run:
    stats["estimate"] = dry_run_estimate(cfg, config, stats, tokenizer)
    print_dry_run(stats)
    write_json(run_dir / DATA / "estimate.json", stats["estimate"])
    return Run(stats=stats, tokenizer=tokenizer)


def record(cfg: DictConfig, config: dict, stats: dict, run_dir: Path) -> dict:
    """manifest.json before training (secrets scrubbed from Hydra's saved config too); wandb's offline run into
    the run dir."""
    secrets = secret_values(config)
    redact_hydra_dir(run_dir, secrets)
    run_manifest = manifest(config, stats["source"]["sha256"], cfg.seed, secrets)
    write_json(run_dir / MANIFEST, run_manifest)
    os.environ["WANDB_DIR"] = USER_WANDB_DIR or str(run_dir)  # unless the user chose a WANDB_DIR
    return run_manifest


def trained_count(cfg: DictConfig, trainer, splits: dict, stats: dict) -> int | str:
    """The samples that trained; those of the train split left out (every answer past max_length) said so. SFT
    counts them from the built split's stats: with packing the trainer's rows are packed sequences, not samples."""
    split = len(splits["train"])
    if cfg.objective.name == "sft":
        trained = split - stats["splits"]["train"].get("untrainable", 0)
    else:  # the preference rows TRL trains on
        trained = len(trainer.train_dataset)
    return trained if trained == split else f"{trained} (of {split}: {split - trained} answer past training.max_length)"


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, all) parameters; a PeftModel counts its adapter and its frozen base (4-bit aware)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def training_header(trainer, samples: int | str, run_dir: Path) -> str:
    """One line before the progress bar: what trains, how long, and where the run dir is."""
    import math
    args = trainer.args
    steps = args.max_steps if args.max_steps > 0 else math.ceil(
        len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs)
    trainable, total = parameter_counts(trainer.model)
    return (f"training: {samples} samples, {steps} steps, {trainable:,} trainable parameters "
            f"({trainable / max(total, 1):.2%} of {total:,}); run dir {run_dir}")


def write_answers(path: Path, samples: list[dict], base: list[str] | None, tuned: list[str] | None) -> None:
    """Each held-out prompt's gold answer beside the base and tuned answers the metrics scored."""
    if tuned is None:
        return
    rows = [{"prompt": s["messages"][:-1], "reference": s["messages"][-1]["content"], "label": s.get("label"),
             "base": b, "tuned": t} for s, b, t in zip(samples, base, tuned)]
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def dry_run_estimate(cfg: DictConfig, config: dict, stats: dict, tokenizer) -> dict:
    from finetune.config.estimate import estimate, model_shape
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
        if s.get("over_max_length"):
            print(f"  {'':<10} {s['over_max_length']} longer than training.max_length (cut); "
                  f"{s['untrainable']} with no answer token within it (left out of training)")
    e = stats["estimate"]
    print(f"estimate ({e['device']}): {e['params'] / 1e6:.1f} M params, {e['trainable_params'] / 1e6:.2f} M "
          f"trainable, ~{e['memory_gib']['total']:.1f} GiB, ~{e['seconds']:.0f} s for {e['train_tokens']} tokens")


def train(trainer, checkpoint: str | None, callbacks: list, header: str | None):
    """trainer.train() with `callbacks` added, resuming from `checkpoint`; out of memory or a full disk told in
    one line. From a checkpoint of the last step there is nothing left to train: its weights (or the best
    checkpoint's, with load_best_model_at_end) and its state are loaded."""
    import torch
    from finetune.train.guards import disk_full, disk_full_advice, out_of_memory_advice
    for callback in filter(None, callbacks):
        trainer.add_callback(callback)
    if header:
        log.info("%s", header)
    durable_checkpoints(trainer)  # each checkpoint's files on disk before its trainer_state.json
    try:
        if not is_final(checkpoint, trainer.args.max_steps):
            resumed = step_of(checkpoint)
            return whole_run(trainer.train(resume_from_checkpoint=checkpoint), trainer.state, resumed)
    except torch.OutOfMemoryError as err:
        raise TrainingError(out_of_memory_advice(trainer.args.to_dict())) from err
    except Exception as err:
        if not disk_full(err, Path(trainer.args.output_dir)):
            raise
        raise TrainingError(disk_full_advice(err, Path(trainer.args.output_dir), is_main_process())) from err
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput
    log.info("%s is the last step's: loading it, no step left to train", checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def report(run: Run) -> None:
    """answers.jsonl, report.md (and the A/B sheet for free text), metrics.json, and the manifest completed with
    the model and the time."""
    from finetune.rundir.report import method_name, write_ab_sheet, write_report
    cfg, config, trainer, run_dir = run.cfg, run.config, run.trainer, run.run_dir
    write_answers(run_dir / ANSWERS, run.held_out, run.answers["base"], run.answers["tuned"])
    if cfg.dataset.task == "text" and run.answers["tuned"] is not None:  # a style corpus is judged on the voice
        style = cfg.dataset.builder.get("_target_") == "finetune.data.style_corpus.build"
        write_ab_sheet(run_dir, run.held_out, run.answers["base"], run.answers["tuned"], cfg.seed,
                       "which answer reads more like the author?" if style else
                       "which answer is the better answer to the prompt (closer to what a correct one says)?")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    recipe = choices.get("recipe") or "none"
    trainable, total = parameter_counts(trainer.model)
    loaded = {"model_folder": run.base_folder, "parameters": total - trainable, "trainable_parameters": trainable}
    summary = {"recipe": "default" if recipe == "none" else recipe, "model": cfg.model.name,
               "model folder": loaded["model_folder"], "parameters": loaded["parameters"],
               "trainable parameters": f"{trainable:,} ({trainable / max(total, 1):.2%} of all)",
               "method": method_name(config["method"], cfg.quantization is not None, choices.get("method")),
               "objective": trainers.objective_name(config["objective"]),
               "dataset": str(cfg.dataset.path), "eval suite": ", ".join(cfg.eval.metrics),
               "train samples": trained_count(cfg, trainer, run.splits, run.stats),
               "held-out samples": len(run.held_out),
               "steps": trainer.state.global_step, "train loss": run.train_output.training_loss,
               "seconds": round(run.seconds, 1)}
    collapsed = getattr(trainer, "collapsed", None)  # objective=grpo: the first step one answer took over
    if collapsed:
        from finetune.train.grpo import COLLAPSE_ADVICE, COLLAPSE_WINDOW
        summary["answer collapse"] = (f"collapse at step {collapsed['step']}: {collapsed['share']:.0%} of the last "
                                      f"{COLLAPSE_WINDOW} answers "
                                      f"were {collapsed['answer']} (objective.collapse_share "
                                      f"{config['objective']['collapse_share']}). {COLLAPSE_ADVICE}")
    if config["objective"].get("start_from"):  # "base" below is the SFT model this stage continued, not the base
        summary["base scores"] = f"the model this run starts from: {config['objective']['start_from']}"
    write_json(run_dir / MANIFEST, {**run.manifest, **loaded, "seconds": summary["seconds"],
                                    "steps": summary["steps"]})
    write_report(run_dir, summary, run.metrics, run.stats, trainer.state.log_history, cfg.leaderboard.metric,
                 cfg.leaderboard.mode)
    write_json(run_dir / METRICS, run.metrics)
