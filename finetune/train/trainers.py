"""The seam between objectives: `build` gives the Trainer for SFT (TRL's SFTTrainer, or its decision-weighted
subclass), DPO, KTO or GRPO (finetune/train/grpo.py), from the same model, arguments and splits. A new objective is
one branch here."""
import functools
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from finetune.train import incremental
from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import quiet_progress
from finetune.rundir import MANIFEST

log = logging.getLogger("finetune")


def build(cfg: DictConfig, args, model, earlier_adapter: Path | None, peft_config, splits: dict, stats: dict,
          tokenizer, preemption=None, scorer=None):
    """SFTTrainer wraps the model with the PEFT method (for a 4-bit base it casts the adapter to bf16; TRL 1.16
    does not call peft's prepare_model_for_kbit_training, and doing so here breaks modules_to_save), or goes on
    with the earlier adapter of an incremental run."""
    from trl import SFTTrainer
    from finetune.train.guards import StopOnNonFiniteLoss
    from finetune.data.pipeline import load_tokens

    def as_dataset(name):  # tokenized once by the pipeline, loss on the answers (finetune/data/tokens.py)
        rows = load_tokens(stats, name)
        if args.max_length:  # TRL cuts each row to max_length: one whose answers start later trains on nothing
            rows = rows.filter(lambda first: first < args.max_length, input_columns="first_trained")
        return rows.select_columns(["input_ids", "assistant_masks"])
    callbacks = [StopOnNonFiniteLoss()] + ([preemption.callback()] if preemption is not None else [])
    callbacks += [scorer] if scorer is not None else []  # before early stopping, which reads the metric it adds
    if cfg.early_stopping.patience:
        from transformers import EarlyStoppingCallback
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    if earlier_adapter is not None:  # trainable: SFTTrainer must not wrap it again
        from peft import PeftModel
        model, peft_config = PeftModel.from_pretrained(model, earlier_adapter, is_trainable=True), None
    if cfg.objective.name == "grpo":  # TRL generates and scores the answers itself
        return grpo_trainer(cfg, args, model, peft_config, splits, tokenizer, callbacks, scored=scorer is not None)
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
    if weights:  # the tokens that state the label weigh more than the layout's (finetune/train/decision_loss.py)
        from finetune.train.decision_loss import DecisionWeightedSFTTrainer
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


def grpo_trainer(cfg: DictConfig, args, model, peft_config, splits: dict, tokenizer, callbacks: list, scored: bool):
    """finetune/train/grpo.py's GRPOTrainer: the rewards of objective.rewards on the train samples whose outcome
    was known before the test window (the leakage check). scored: the validation split is scored by the task's
    metric (eval/checkpoint.py), which is then the whole evaluation."""
    from omegaconf import OmegaConf
    from finetune.rewards import load
    from finetune.train import grpo
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    funcs, _, reads = load(objective["rewards"])  # their weights are GRPOConfig.reward_weights already
    # check() said what it found; the same samples kept here. Validation answers are scored, never learnt from.
    train = grpo.check_leakage(splits["train"], splits["test"], reads, objective.get("leakage", "refuse"), say=False)
    validation = splits["validation"]
    trainer = grpo.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=grpo.rows(train),
                               eval_dataset=grpo.rows(validation) if validation else None, processing_class=tokenizer,
                               peft_config=peft_config, callbacks=callbacks, task=cfg.dataset.task,
                               collapse_share=objective.get("collapse_share", 0.9), scored=scored)
    quiet_progress(trainer)
    return trainer


def decision_weights(cfg: DictConfig, train: list[dict], tokenizer) -> dict[int, float]:
    """decision.weight / decision.balance as {token id: weight}; empty for plain SFT or a task without labels."""
    from finetune import tasks
    weight, balance = float(cfg.decision.weight), bool(cfg.decision.balance)
    task = tasks.get(cfg.dataset.task)
    if (weight == 1.0 and not balance) or not task.labels:
        return {}
    from finetune.train.decision_loss import token_weights
    weights = token_weights(tokenizer, train, task, weight, balance)
    log.info("decision tokens weighted: %s", {tokenizer.decode([t]): round(w, 2) for t, w in weights.items()})
    return weights


def check(cfg: DictConfig, splits: dict) -> None:
    """What the objective needs from the train split, checked before any weight loads."""
    if cfg.objective.name == "grpo":  # the leakage check, before any weight loads
        from omegaconf import OmegaConf
        from finetune.rewards import load
        from finetune.train import grpo
        objective = OmegaConf.to_container(cfg.objective, resolve=True)
        reads = load(objective["rewards"])[2]
        grpo.check_columns(splits["train"], reads)
        grpo.check_leakage(splits["train"], splits["test"], reads, objective.get("leakage", "refuse"))
    elif cfg.objective.name != "sft":
        preference_rows(cfg.objective.name, splits["train"], "train", check_only=True)


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
    if name == "grpo":
        rewards = ", ".join(f"{key} x{spec.get('weight', 1.0)}" for key, spec in objective["rewards"].items() if spec)
        return (f"GRPO (beta {objective.get('beta')}, {objective.get('num_generations')} answers a prompt; rewards "
                f"{rewards}; {where})")
    return f"{name.upper()} (beta {objective.get('beta', 0.1)}, {objective.get('loss_type')}; {what}; {where})"
