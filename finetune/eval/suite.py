"""Run an eval suite on one model: generate the answers once (batched, greedy), then every metric.

`conf/eval/*.yaml` lists the metrics by `_target_`; each is a small class in finetune/eval/ called as
`metric(samples=..., outputs=..., model=..., tokenizer=...) -> dict`, `outputs` being None unless a
metric of the suite `needs_generation`.
"""
import time

import torch
from tqdm.auto import tqdm


def generate(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int, **generation) -> list[str]:
    """Greedy answers to each sample's prompt (its messages without the gold answer)."""
    return generate_chats(model, tokenizer, [s["messages"][:-1] for s in samples], max_new_tokens, batch_size,
                          **generation)


@torch.no_grad()
def generate_chats(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int,
                   progress: bool = True, **generation) -> list[str]:
    """Answers to prompt conversations (each a list of messages ending before the answer): greedy unless
    `generation` (eval.generation: model.generate keywords, e.g. repetition_penalty) says otherwise."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    device = next(model.parameters()).device
    answers = []
    try:
        for start in tqdm(range(0, len(chats), batch_size), desc="generate", leave=False, disable=not progress):
            prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                       for chat in chats[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **{"do_sample": False, **generation})
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def evaluate(metrics: dict, model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int,
             generation: dict | None = None) -> dict:
    results, outputs = {}, None
    if any(m.needs_generation for m in metrics.values()):
        start = time.perf_counter()
        outputs = generate(model, tokenizer, samples, max_new_tokens, batch_size, **(generation or {}))
        results["generation_seconds"] = time.perf_counter() - start
    for metric in metrics.values():
        results.update(metric(samples=samples, outputs=outputs, model=model, tokenizer=tokenizer))
    return {"metrics": results, "outputs": outputs}
