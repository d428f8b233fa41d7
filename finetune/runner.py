"""`python -m finetune`: check -> data -> model -> base scores -> train -> save -> tuned scores -> report.

One run, top to bottom: `_run` calls one function per step. Hydra composes the config (conf/ + a recipe) and
picks the run directory; `run()` does the rest and can be called from Python with a composed config (call
`finetune.registration.register()` before composing).
"""
import functools
import hashlib
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune import incremental
from finetune.config import check_config, check_training_overrides
from finetune.errors import ConfigError, DataError, Interrupted, TrainingError
from finetune.logs import FILE_ONLY, headline, hold_records, quiet_progress, replay_held_records, route_library_logs
from finetune.paths import CONF_DIR
from finetune.preemption import Preemption
from finetune.recipes import check_recipe_overrides
from finetune.registration import register
from finetune.resume import RunClock, durable_checkpoints, is_final, resume_from, step_of, whole_run
from finetune.rundir import (ADAPTER, ANSWERS, CHECKPOINTS, DATA, MANIFEST, METRICS, atomic_dir,
                             hide_secret_overrides, manifest,
                             redact_hydra_dir, run_lock, secret_values, set_status, write_json, write_text)

log = logging.getLogger("finetune")
USER_WANDB_DIR = os.environ.get("WANDB_DIR")  # read once: runs in one process must not inherit each other's


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
    route_library_logs()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if main else nullcontext():  # rank 0 holds it for the job
        if cfg.eval.get("walk_forward", {}).get("folds") is not None:  # K runs in run_dir/fold-k, one report
            from finetune import walk_forward
            return Run(metrics=walk_forward.run_folds(cfg, run_dir, run))
        if cfg.objective.get("start_from") == "sft":  # RUN_DIR/sft first, then the preference stage here
            from finetune import stages
            return stages.run_stages(cfg, run_dir, run, _locked_run, main)
        return _locked_run(cfg, run_dir, main)


def _locked_run(cfg: DictConfig, run_dir: Path, main: bool) -> Run:
    try:
        if main:  # Hydra saved the command line into .hydra/ already: scrub it before anything can fail
            redact_hydra_dir(run_dir, secret_values(OmegaConf.to_container(cfg)))
            set_status(run_dir, "running")  # a full disk here too is told in one line
        with Preemption().installed() as preemption:  # SIGTERM / SIGINT: stop at a step with a checkpoint
            result = _run(cfg, run_dir, main, preemption)
    except Interrupted as err:
        if main:
            set_status(run_dir, "interrupted", str(err))
        raise
    except BaseException as err:
        from finetune.guards import disk_full, disk_full_advice
        if disk_full(err, run_dir):  # any write (checkpoint, adapter, report): one line naming the file
            if isinstance(err, TrainingError):  # told, and status.json written, where training saved
                raise
            raise TrainingError(disk_full_advice(err, run_dir / CHECKPOINTS, main)) from err
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


def _run(cfg: DictConfig, run_dir: Path, main: bool, preemption: Preemption) -> Run:
    started = time.perf_counter()
    config, args = check(cfg, run_dir, main)  # everything checked before data is built or weights load
    start = start_adapter(cfg)  # objective.start_from: the SFT adapter a preference stage continues
    metrics = instantiate(cfg.eval.metrics, _convert_="all")
    peft_config = instantiate(cfg.method, _convert_="all")  # None: method=full
    if cfg.method is None:
        check_full_fits(cfg, config, args)
    answering = [name for name, m in metrics.items() if m.needs_generation]
    grammar = constrained_grammar(cfg, answering)
    import torch
    from finetune.model import load_tokenizer
    from finetune.cpu import choose_threads
    threads = choose_threads(cfg.cpu_threads)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg.model)

    splits, stats = build_data(cfg, tokenizer, run_dir, main)
    if stats.get("kind") == "text" and answering:
        raise ConfigError(f"eval.metrics {', '.join(answering)} score answers to prompts, and text samples have "
                          "none; use eval=perplexity")
    held_out = held_out_samples(cfg, splits, stats)
    from finetune.eval.suite import check as check_suite, score
    check_suite(metrics, held_out)  # a gold label or meta key the suite needs: missing stops the run here, not later
    if cfg.dry_run:
        return dry_run(cfg, config, stats, tokenizer, run_dir)
    if cfg.objective.name != "sft":  # checked before any weight loads
        preference_rows(cfg.objective.name, splits["train"], "train", check_only=True)
    scorer = validation_scorer(cfg, args, metrics, splits, tokenizer)  # macro-F1 picks the checkpoint kept
    earlier_adapter, skipped = incremental.plan(cfg, config, args, splits["train"])
    if skipped:
        return Run(stats=stats, tokenizer=tokenizer, skipped=skipped)
    checkpoint = resume_from(cfg.resume, run_dir, main)  # the same on every rank: they resume in step
    if checkpoint and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        log.info("rank %s resumes from %s", os.environ.get("RANK"), checkpoint)
    run_manifest = record(cfg, config, stats, run_dir) if main else None

    model = load_base(cfg, args)
    if start is not None:  # a preference stage from an SFT adapter: that model is trained on, and scored as "base"
        from peft import PeftModel
        model, peft_config = PeftModel.from_pretrained(model, start, is_trainable=True), None
    suite = dict(metrics=metrics, tokenizer=tokenizer, samples=held_out,
                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                 generation=OmegaConf.to_container(cfg.eval.generation), grammar=grammar,
                 scoring=cfg.eval.get("scoring", "generate"))
    base = score(model=model, **suite) if main else None  # other ranks wait at the first collective
    if main:
        log.info("base: %s", headline(base["metrics"]))
        log.info("base, every metric: %s", headline(base["metrics"], None), extra=FILE_ONLY)

    trainer = make_trainer(cfg, args, model, earlier_adapter, peft_config, splits, stats, tokenizer, preemption)
    clock = RunClock(started, checkpoint)  # report.md's seconds: those of the runs this one resumed too
    trainer.add_callback(clock.callback())
    if scorer is not None:
        trainer.add_callback(scorer)
    if main:
        log.info("%s", training_header(trainer, trained_count(cfg, trainer, splits, stats), run_dir))
    try:
        train_output = train(trainer, checkpoint)
    except torch.OutOfMemoryError as err:
        from finetune.guards import out_of_memory_advice
        raise TrainingError(out_of_memory_advice(config["training"])) from err
    except Exception as err:
        from finetune.guards import disk_full, disk_full_advice
        if not disk_full(err, Path(args.output_dir)):
            raise
        raise TrainingError(disk_full_advice(err, Path(args.output_dir), main)) from err
    preemption.raise_if_stopped()
    if not main:
        return Run(model=trainer.model, tokenizer=tokenizer)
    with atomic_dir(run_dir / ADAPTER) as tmp:  # PEFT format; a crash never leaves half an adapter
        if hasattr(trainer.model, "peft_config"):  # the trained adapter, not TRL's frozen "ref" copy beside it
            trainer.model.save_pretrained(tmp, selected_adapters=["default"])
        else:
            trainer.model.save_pretrained(tmp)
        if cfg.method is None:  # method=full: a whole model, with its tokenizer (chat template included)
            tokenizer.save_pretrained(tmp)

    tuned = score(model=trainer.model, **suite)
    log.info("tuned: %s", headline(tuned["metrics"]))
    log.info("tuned, every metric: %s", headline(tuned["metrics"], None), extra=FILE_ONLY)
    write_answers(run_dir / ANSWERS, held_out, base["outputs"], tuned["outputs"])
    result = {"base": base["metrics"], "tuned": tuned["metrics"]}
    baseline = simple_baseline(cfg, splits["train"], held_out, metrics)  # the same numbers, scikit-learn
    if baseline:
        result["simple_model"] = baseline
    # the trainer's trackers (report_to: tensorboard, wandb) get the eval metrics beside the losses
    trainer.log({f"{side}_{k}": v for side in ("base", "tuned") for k, v in result[side].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    report(cfg, config, run_dir, run_manifest, model, trainer, train_output, splits, held_out, stats,
           base, tuned, result, clock.seconds())
    write_json(run_dir / METRICS, result)
    return Run(metrics=result, stats=stats, model=trainer.model, tokenizer=tokenizer)


def check_full_fits(cfg: DictConfig, config: dict, args) -> None:
    """method=full keeps ~16 bytes of state a parameter (fp32 weights, grads, two AdamW moments): refused, before
    anything loads, where that is more than one device holds and training is not sharded over several GPUs."""
    if cfg.incremental.adapter is not None:
        raise ConfigError("method=full with incremental.adapter: an incremental run continues a PEFT adapter; "
                          "drop incremental.adapter, or use a PEFT method")
    from finetune.estimate import model_shape
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


def check(cfg: DictConfig, run_dir: Path, main: bool) -> tuple[dict, object]:
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


def load_base(cfg: DictConfig, args):
    from transformers import set_seed
    from finetune.model import load_model
    set_seed(cfg.seed)
    model = load_model(cfg.model, cfg.quantization, args.use_cpu)
    if cfg.quantization is not None and not cfg.model.modules_to_save:
        # a 4-bit pretrained base: norms in fp32 and input grads on, as QLoRA trains it (peft's k-bit preparation);
        # with modules_to_save (the random-init tiny base) it would cast the saved copies wrongly, so not there
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    return model


def make_trainer(cfg: DictConfig, args, model, earlier_adapter: Path | None, peft_config, splits: dict, stats: dict,
                 tokenizer, preemption: Preemption | None = None):
    """SFTTrainer wraps the model with the PEFT method (for a 4-bit base it casts the adapter to bf16; TRL 1.16
    does not call peft's prepare_model_for_kbit_training, and doing so here breaks modules_to_save), or goes on
    with the earlier adapter of an incremental run."""
    from trl import SFTTrainer
    from finetune.guards import StopOnNonFiniteLoss
    from finetune.data.pipeline import load_tokens

    def as_dataset(name):  # tokenized once by the pipeline, loss on the answers (finetune/data/tokens.py)
        rows = load_tokens(stats, name)
        if args.max_length:  # TRL cuts each row to max_length: one whose answers start later trains on nothing
            rows = rows.filter(lambda first: first < args.max_length, input_columns="first_trained")
        return rows.select_columns(["input_ids", "assistant_masks"])
    callbacks = [StopOnNonFiniteLoss()] + ([preemption.callback()] if preemption is not None else [])
    if cfg.early_stopping.patience:
        from transformers import EarlyStoppingCallback
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    if earlier_adapter is not None:  # trainable: SFTTrainer must not wrap it again
        from peft import PeftModel
        model, peft_config = PeftModel.from_pretrained(model, earlier_adapter, is_trainable=True), None
    if cfg.objective.name != "sft":  # TRL tokenizes the rows itself, the chat template on each side
        import trl
        cls = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[cfg.objective.name]
        validation = splits["validation"] and preference_rows(cfg.objective.name, splits["validation"], "validation")
        trainer = cls(model=model, args=args, train_dataset=preference_rows(cfg.objective.name, splits["train"], "train"),
                      eval_dataset=validation or None, processing_class=tokenizer, peft_config=peft_config,
                      callbacks=callbacks)
        quiet_progress(trainer)
        return trainer
    weights = decision_weights(cfg, splits["train"], tokenizer)
    if weights:  # the tokens that state the label weigh more than the layout's (finetune/decision_loss.py)
        from finetune.decision_loss import DecisionWeightedSFTTrainer
        SFTTrainer = functools.partial(DecisionWeightedSFTTrainer, token_weights=weights)  # noqa: N806
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_dataset("train"),
                         eval_dataset=as_dataset("validation") if splits["validation"] else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    quiet_progress(trainer)  # the bar stays, its loss dicts go to finetune.log
    if len(trainer.train_dataset) == 0:
        raise DataError(f"no training sample is left after tokenization (training.max_length="
                        f"{args.max_length}): every answer starts past it; raise training.max_length")
    if args.world_size > 1:  # each rank trains on its own shard: say which, so a log shows it
        first = next(iter(trainer.get_train_dataloader()))["input_ids"]
        log.info("rank %d of %d: first batch digest %s", args.process_index, args.world_size,
                 hashlib.sha256(first.cpu().numpy().tobytes()).hexdigest()[:12])
    return trainer


def decision_weights(cfg: DictConfig, train: list[dict], tokenizer) -> dict[int, float]:
    """decision.weight / decision.balance as {token id: weight}; empty for plain SFT or a task without labels."""
    from finetune import tasks
    weight, balance = float(cfg.decision.weight), bool(cfg.decision.balance)
    task = tasks.get(cfg.dataset.task)
    if (weight == 1.0 and not balance) or not task.labels:
        return {}
    from finetune.decision_loss import token_weights
    weights = token_weights(tokenizer, train, task, weight, balance)
    log.info("decision tokens weighted: %s", {tokenizer.decode([t]): round(w, 2) for t, w in weights.items()})
    return weights


def preference_rows(objective: str, samples: list[dict], split: str, check_only: bool = False):
    """TRL's conversational rows: for dpo the prompt (every message but the last), the chosen answer (the last)
    and the rejected one (the sample's `rejected`); for kto the prompt, the answer and its `desirable` label.
    Samples without a rejected answer / a desirable label are left out; none at all is a DataError."""
    import datasets
    key = {"dpo": "rejected", "kto": "desirable"}[objective]
    usable = [s for s in samples if key in s]
    if not usable:
        raise DataError(f"objective=dpo: no {split} sample has a rejected answer; DPO learns from pairs: use "
                        "dataset=generic with dataset.builder.format=chosen (prompt / chosen / rejected), or "
                        "dataset=trade_signals with dataset.builder.preference=true" if objective == "dpo" else
                        f"objective=kto: no {split} sample says whether its answer is desirable; use "
                        "dataset=decision_records with dataset.builder.undesirable_outcomes=[bad], dataset=generic "
                        "with dataset.builder.format=kto (prompt / completion / label), or dataset=trade_signals "
                        "with dataset.builder.desirability=true")
    if objective == "kto" and len({s["desirable"] for s in usable}) < 2 and split == "train":
        side = "desirable" if usable[0]["desirable"] else "undesirable"
        raise DataError(f"objective=kto: every train sample is {side}; KTO learns from both kinds (check "
                        "dataset.undesirable=keep and the builder's outcome options)")
    if check_only:
        return None
    if objective == "dpo":
        rows = [{"prompt": s["messages"][:-1], "chosen": [s["messages"][-1]],
                 "rejected": [{"role": "assistant", "content": s["rejected"]}]} for s in usable]
    else:
        rows = [{"prompt": s["messages"][:-1], "completion": [s["messages"][-1]], "label": s["desirable"]}
                for s in usable]
    return datasets.Dataset.from_list(rows)


def start_adapter(cfg: DictConfig) -> Path | None:
    """objective.start_from's adapter (an SFT run dir's), checked to be for this run's model; None without one."""
    start = cfg.objective.get("start_from")
    if start is None:
        return None
    adapter = incremental.adapter_dir(start, "objective.start_from")
    manifest_file = Path(start) / MANIFEST
    if manifest_file.is_file():
        trained_on = json.loads(manifest_file.read_text())["config"]["model"]["name"]
        if trained_on != cfg.model.name:
            raise ConfigError(f"objective.start_from={start}: that run trained model={trained_on}, this one is "
                              f"model={cfg.model.name}; start from a run of the same model")
    return adapter


def objective_name(objective: dict) -> str:
    name = objective["name"]
    if name == "sft":
        return "SFT (the answers as targets)"
    start = objective.get("start_from")
    what = "chosen over rejected answers" if name == "dpo" else "desirable vs undesirable answers"
    where = ("from the base; reference: the model before this run" if start is None else
             f"from the SFT adapter of {start}, also the reference")
    return f"{name.upper()} (beta {objective.get('beta', 0.1)}, {objective.get('loss_type')}; {what}; {where})"


def train(trainer, checkpoint: str | None):
    """trainer.train(), resuming from `checkpoint`; from a checkpoint of the last step there is nothing left to
    train: its weights (or the best checkpoint's, with load_best_model_at_end) and its state are loaded."""
    durable_checkpoints(trainer)  # each checkpoint's files on disk before its trainer_state.json
    if not is_final(checkpoint, trainer.args.max_steps):
        resumed = step_of(checkpoint)
        return whole_run(trainer.train(resume_from_checkpoint=checkpoint), trainer.state, resumed)
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput
    log.info("%s is the last step's: loading it, no step left to train", checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def report(cfg: DictConfig, config: dict, run_dir: Path, run_manifest: dict, model, trainer, train_output,
           splits: dict, held_out: list[dict], stats: dict, base: dict, tuned: dict, result: dict,
           seconds: float) -> None:
    """report.md (and the A/B sheet for free text) and the manifest completed with the model and the time."""
    from finetune.report import method_name, write_ab_sheet, write_report
    if cfg.dataset.task == "text" and tuned["outputs"] is not None:  # a style corpus is judged on the author's voice
        style = cfg.dataset.builder.get("_target_") == "finetune.data.style_corpus.build"
        write_ab_sheet(run_dir, held_out, base["outputs"], tuned["outputs"], cfg.seed,
                       "which answer reads more like the author?" if style else
                       "which answer is the better answer to the prompt (closer to what a correct one says)?")
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    recipe = choices.get("recipe") or "none"
    trainable, total = parameter_counts(trainer.model)
    loaded = {"model_folder": model.name_or_path, "parameters": total - trainable,  # the folder it loaded from
              "trainable_parameters": trainable}
    summary = {"recipe": "default" if recipe == "none" else recipe, "model": cfg.model.name,
               "model folder": loaded["model_folder"], "parameters": loaded["parameters"],
               "trainable parameters": f"{trainable:,} ({trainable / max(total, 1):.2%} of all)",
               "method": method_name(config["method"], cfg.quantization is not None, choices.get("method")),
               "objective": objective_name(config["objective"]),
               "dataset": str(cfg.dataset.path), "eval suite": ", ".join(cfg.eval.metrics),
               "train samples": trained_count(cfg, trainer, splits, stats),
               "held-out samples": len(held_out),
               "steps": trainer.state.global_step, "train loss": train_output.training_loss,
               "seconds": round(seconds, 1)}
    if config["objective"].get("start_from"):  # "base" below is the SFT model this stage continued, not the base
        summary["base scores"] = f"the model this run starts from: {config['objective']['start_from']}"
    write_json(run_dir / MANIFEST, {**run_manifest, **loaded, "seconds": summary["seconds"],
                                    "steps": summary["steps"]})
    write_report(run_dir, summary, result, stats, trainer.state.log_history, cfg.leaderboard.metric,
                 cfg.leaderboard.mode)


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
        if s.get("over_max_length"):
            print(f"  {'':<10} {s['over_max_length']} longer than training.max_length (cut); "
                  f"{s['untrainable']} with no answer token within it (left out of training)")
    e = stats["estimate"]
    print(f"estimate ({e['device']}): {e['params'] / 1e6:.1f} M params, {e['trainable_params'] / 1e6:.2f} M "
          f"trainable, ~{e['memory_gib']['total']:.1f} GiB, ~{e['seconds']:.0f} s for {e['train_tokens']} tokens")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    replay_held_records()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except Interrupted as err:  # status.json says interrupted; a sweep stops here too
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
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
    if is_main_process():  # the last console line: the verdict of report.md, and where the run is
        from finetune.report import verdict
        said = verdict(result.metrics, cfg.leaderboard.metric, cfg.leaderboard.mode).replace("**", "") \
            if result.metrics.get("tuned") else None
        print(f"{said} Run dir: {run_dir}" if said else f"run dir: {run_dir}")
    # what a sweeper (Optuna) optimises: the leaderboard's metric
    return result.metrics.get("tuned", {}).get(cfg.leaderboard.metric)


def main() -> None:
    """The `finetune` command and `python -m finetune`."""
    register()
    sys.argv[1:] = hide_secret_overrides(sys.argv[1:])  # before Hydra and wandb read argv
    hold_records()  # library records until Hydra's logging is set up: finetune.log, not the console
    try:
        check_recipe_overrides(sys.argv[1:])
        check_training_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    hydra_main()
