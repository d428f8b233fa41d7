"""Keep the checkpoint that answers best, not the one with the lowest eval loss.

Most of an answer's tokens are its layout (`{"signal": "`, `", "confidence": 0.`), so eval loss falls as the
layout is learned and says little about the one token that carries the decision. With
`training.metric_for_best_model: macro_f1` (the classification eval suites set it through
`eval.checkpoint_metric`), each evaluation also scores the validation split by likelihood
(finetune/eval/likelihood.py: no generation) and logs `eval_macro_f1` and `eval_accuracy`; the Trainer keeps the
best checkpoint by it (`load_best_model_at_end`) and early stopping follows it.
"""
from transformers import TrainerCallback

from finetune.errors import ConfigError
from finetune.eval.likelihood import likelihood_answers

METRICS = ("macro_f1", "accuracy")  # what this callback logs, as eval_<name>


def wanted(metric_for_best_model: str | None) -> bool:
    return (metric_for_best_model or "").removeprefix("eval_") in METRICS


def classifier(metrics: dict):
    """The suite's classification metric (the one that knows the task and its labels), or None."""
    return next((m for m in metrics.values() if getattr(m, "labels", None) and hasattr(m, "task")), None)


def check(metric_for_best_model: str, metrics: dict, validation: list[dict]) -> list[dict]:
    """The labelled validation samples the metric is scored on; a ConfigError (before any weight loads) when the
    suite cannot score it."""
    where = f"training.metric_for_best_model={metric_for_best_model} (eval.checkpoint_metric)"
    if classifier(metrics) is None:
        raise ConfigError(f"{where}: the eval suite has no classification metric to score the validation split "
                          "with; set eval.checkpoint_metric=eval_loss")
    labelled = [s for s in validation if s.get("label") is not None and s.get("desirable", True)]
    if not labelled:
        raise ConfigError(f"{where}: no validation sample has a gold label; set eval.checkpoint_metric=eval_loss "
                          "or give the data a validation split with labels (dataset.val_size)")
    return labelled


class ValidationScore(TrainerCallback):
    """At every evaluation: macro-F1 and accuracy on the validation split, by likelihood scoring."""

    def __init__(self, metric, samples: list[dict], tokenizer, batch_size: int):
        self.metric, self.samples, self.tokenizer, self.batch_size = metric, samples, tokenizer, batch_size

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        training = model.training
        answers = likelihood_answers(model, self.tokenizer, self.samples, self.metric.task, self.metric.labels,
                                     self.batch_size)
        scores = self.metric(samples=self.samples, outputs=answers)
        found = {f"eval_{name}": scores[name] for name in METRICS}
        metrics.update(found)  # the Trainer picks the best checkpoint from this dict after the callbacks
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1].update(found)  # report.md plots it beside the loss
        model.train(training)
