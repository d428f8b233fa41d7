"""Perplexity of the gold answers given their prompts: exp(mean NLL over the tokens training puts loss on).

The tokens scored are the ones training trains (finetune/data/tokens.py: every assistant turn, or the last with
`turns: last`, as `dataset.train_turns` says; a text sample's trained segments), so base and tuned perplexity
measure exactly what fine-tuning optimises; metrics.json says which (`perplexity_turns`). On a style corpus that
is the author's own text: the main measure of a style run.
"""
import math

import torch
import torch.nn.functional as F

from finetune.data.tokens import tokenize


class Perplexity:
    needs_generation = False

    def __init__(self, batch_size: int = 16, max_length: int = 1024, turns: str = "all"):
        self.batch_size = batch_size
        self.max_length = max_length
        self.turns = turns

    def encode(self, tokenizer, sample: dict) -> tuple[list[int], list[int]]:
        tokens = tokenize(sample, tokenizer, self.turns)
        return tokens["input_ids"][: self.max_length], tokens["assistant_masks"][: self.max_length]

    @torch.no_grad()
    def __call__(self, *, samples, outputs=None, model, tokenizer) -> dict:
        model.eval()
        total_nll, total_tokens = 0.0, 0
        encoded = [self.encode(tokenizer, s) for s in samples]
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start:start + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, trained) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.tensor([i if t else -100 for i, t in zip(ids, trained)])
                mask[row, : len(ids)] = 1
            device = next(model.parameters()).device
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            logits = logits[:, -width:]  # prompt tuning puts its virtual tokens in front: score real positions only
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((shift_labels != -100).sum())
        return {"perplexity": math.exp(total_nll / max(total_tokens, 1)), "perplexity_tokens": total_tokens,
                "perplexity_turns": self.turns}
