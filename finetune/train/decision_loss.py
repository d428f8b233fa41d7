"""A loss that weighs the decision above the layout.

A signal answer is ~15 tokens and one of them says BUY / SELL / HOLD; plain SFT averages over all of them, so the
layout dominates and a skewed log teaches its majority label. With `decision.weight` w > 1 the tokens that state
the label (found by swapping each label into a train answer: the tokens that differ) weigh w and every other
answer token 1; `decision.balance=true` also divides each label's weight by its share of the train split
(normalised so the labels average 1), so a 77 % HOLD log does not teach HOLD alone.

It is the Trainer's loss hook: SFTTrainer.compute_loss for training steps with the same fused per-token
log-probabilities TRL uses; evaluation keeps TRL's plain loss, so eval_loss stays comparable between runs.
"""
from collections import Counter

import torch
from trl import SFTTrainer

from finetune.eval.likelihood import label_tails


def token_weights(tokenizer, samples: list[dict], task, weight: float, balance: bool) -> dict[int, float]:
    """{token id: loss weight} for the tokens that state each label in the train answers."""
    labels = list(task.labels)
    counts = Counter(s["label"] for s in samples if s.get("label") in labels)
    if not counts:
        return {}
    share = {label: counts[label] / sum(counts.values()) for label in labels}
    seen = [label for label in labels if counts[label]]
    factor = {label: 1.0 for label in labels}
    if balance:
        inverse = {label: 1 / share[label] for label in seen}
        mean = sum(inverse.values()) / len(inverse)
        factor = {label: inverse.get(label, 1.0) / mean for label in labels}
    owners: dict[int, set[str]] = {}
    for sample in [s for s in samples if s.get("label") in labels][:32]:  # one layout per builder: a few suffice
        _, tails = label_tails(tokenizer, sample, task, labels)
        common = set.intersection(*(set(t) for t in tails))
        for label, tail in zip(labels, tails):
            for token in set(tail) - common:
                owners.setdefault(token, set()).add(label)
    return {token: weight * sum(factor[label] for label in owner) / len(owner) for token, owner in owners.items()}


class DecisionWeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss weighs each answer token by `token_weights` (1 for any other token)."""

    def __init__(self, *args, token_weights: dict[int, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.token_weights = token_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs or not self.token_weights:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        targets = inputs["labels"][:, 1:].to(outputs.log_probs.device)  # log_probs[:, t] scores token t + 1
        weights = torch.ones_like(outputs.log_probs)
        for token, w in self.token_weights.items():
            weights = torch.where(targets == token, torch.full_like(weights, w), weights)
        weights = weights * outputs.label_mask
        # a micro-batch's weighted mean, scaled like TRL's sum / num_items_in_batch under gradient accumulation
        loss = -(outputs.log_probs * weights).sum() / weights.sum().clamp(min=1e-6)
        if num_items_in_batch is not None:
            loss = loss * outputs.label_mask.sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)
            if self.args.average_tokens_across_devices:  # as TRL: the count is every rank's, DDP averages
                loss = loss * self.accelerator.num_processes
        return loss
