"""Run an eval suite on one model: generate the answers once (batched, greedy), then every metric.

`conf/eval/*.yaml` lists the metrics by `_target_`; each is a small class in finetune/eval/ called as
`metric(samples=..., outputs=..., model=..., tokenizer=...) -> dict`, `outputs` being None unless a
metric of the suite `needs_generation`.
"""
import functools
import time

import torch
from tqdm.auto import tqdm

from finetune.errors import ConfigError


def generate(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int, progress: bool = True,
             **generation) -> list[str]:
    """Greedy answers to each sample's prompt (its messages without the gold answer)."""
    return generate_chats(model, tokenizer, [s["messages"][:-1] for s in samples], max_new_tokens, batch_size,
                          progress, **generation)


def last_logits(model, device) -> dict:
    """generate()'s `logits_to_keep` as an index of the last position (finetune/eval/likelihood.py `last`), where
    the model takes one: generate() passes 1, which makes a batch with a frozen lm head copy the head per row."""
    import inspect
    from finetune.eval.likelihood import last
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return {}
    return {"logits_to_keep": last(1, device)}


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation_config.eos_token_id (a list on Llama-3 and Gemma,
    e.g. <|eot_id|> beside <|end_of_text|>) and the tokenizer's EOS. Passing only `tokenizer.eos_token_id` to
    generate() would override the list and let such a model talk past the end of its turn."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    ids = [*ids, tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def prefix_into_cache(model) -> None:
    """Make generate() see a prefix-tuned PeftModel's virtual tokens. PEFT (0.21) hands them to the model as
    `past_key_values`, but transformers 5 generate() already passes its own (empty) `cache`, which wins: the
    prefix is dropped and the answers are the base model's. Here the prefix becomes that first cache."""
    config = getattr(model, "active_peft_config", None)
    if config is None or config.peft_type != "PREFIX_TUNING" or hasattr(model, "_prefix_into_cache"):
        return
    prepare = model.prepare_inputs_for_generation

    @functools.wraps(prepare)  # generate() checks its keywords against this signature
    def prepare_inputs(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        prefix, cache = inputs.pop("past_key_values", None), inputs.get("cache")
        if prefix is not None and "cache" in inputs and (cache is None or cache.get_seq_length() == 0):
            inputs["cache"] = prefix
        elif prefix is not None and "cache" not in inputs:
            inputs["past_key_values"] = prefix  # a transformers that still calls it past_key_values
        return inputs

    model.prepare_inputs_for_generation = prepare_inputs  # PeftModel.generate hands this to the base model
    model._prefix_into_cache = True


def generate_chats(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int,
                   progress: bool = True, **generation) -> list[str]:
    """Answers to prompt conversations (each a list of messages ending before the answer): greedy unless
    `generation` (eval.generation: model.generate keywords, e.g. repetition_penalty) says otherwise."""
    return generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, progress, **generation)["texts"]


@torch.no_grad()
def generate_answers(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch_size: int,
                     progress: bool = True, grammar: str | None = None, streamer=None, **generation) -> dict:
    """{"texts": answers, "tokens": generated tokens per answer (its stop token not counted), "stopped": whether
    the answer ended on a stop id before `max_new_tokens` ran out, "prompt_tokens": each prompt's length}.

    `repetition_penalty` counts the answer's own tokens only. transformers counts the prompt's too by default,
    which pushes down the end-of-turn token (every turn of the prompt ends with it, so a penalised model never
    stops) and every word a rewrite should keep; its processor's `prompt_ignore_length` leaves the prompt out.
    `grammar`: the llguidance grammar every answer follows (constrained decoding, finetune/eval/constrained.py);
    `streamer`: generate()'s, for a batch of one (finetune/serve.py streams with it)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    generation = dict(generation)
    penalty = generation.pop("repetition_penalty", None)
    model.eval()
    prefix_into_cache(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models generate after the last real token
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    texts, tokens, stopped, prompt_tokens = [], [], [], []
    try:
        for start in tqdm(range(0, len(chats), batch_size), desc="generate", leave=False, disable=not progress):
            prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                       for chat in chats[start:start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            width = batch["input_ids"].shape[1]  # left-padded: every answer starts here
            prompt_tokens.extend(batch["attention_mask"].sum(dim=1).tolist())
            processors = LogitsProcessorList(
                [RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=width)] if penalty else [])
            if grammar is not None:
                from finetune.eval.constrained import GrammarLogits
                processors.append(GrammarLogits(tokenizer, grammar, len(prompts), width, stops))
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops, logits_processor=processors, streamer=streamer,
                                 **{"do_sample": False, **last_logits(model, device), **generation})
            for row in out[:, width:].tolist():
                end = next((i for i, token in enumerate(row) if token in stops), None)
                tokens.append(len(row) if end is None else end)
                stopped.append(end is not None)
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return {"texts": texts, "tokens": tokens, "stopped": stopped, "prompt_tokens": prompt_tokens}


def answer_lengths(tokenizer, samples: list[dict], answers: dict) -> dict:
    """How long the generated answers are against the gold ones, in tokens: a model that never learned to stop
    runs to max_new_tokens (length_ratio >> 1, stop_rate 0)."""
    reference = [len(tokenizer(s["messages"][-1]["content"], add_special_tokens=False)["input_ids"]) for s in samples]
    generated = answers["tokens"]
    mean_reference = sum(reference) / len(reference) if reference else 0.0
    mean_generated = sum(generated) / len(generated) if generated else 0.0
    return {"answer_tokens_mean": mean_generated, "reference_tokens_mean": mean_reference,
            "length_ratio": mean_generated / mean_reference if mean_reference else None,
            "stop_rate": sum(answers["stopped"]) / len(generated) if generated else None}


def score(metrics: dict, model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int,
          generation: dict | None = None, grammar: str | None = None, scoring: str = "generate") -> dict:
    """The eval suite's metrics for one model (base or tuned) on the held-out samples: the answers are generated
    once, for every metric that reads them. With a `grammar` (eval.constrained) the answering metrics are scored
    a second time on constrained answers, as `constrained_<metric>` beside the free-running ones.
    `scoring="likelihood"`: the answers are the labels the model finds likeliest (finetune/eval/likelihood.py),
    no generation. (`python -m finetune.evaluate` is the command that re-scores a run.)"""
    results, outputs = {}, None
    answering = {name: m for name, m in metrics.items() if m.needs_generation}
    chats = [s["messages"][:-1] for s in samples] if answering else []  # text samples have no prompts
    if answering and scoring == "likelihood":
        from finetune.eval.checkpoint import classifier
        from finetune.eval.likelihood import likelihood_answers
        labelled = classifier(metrics)
        if labelled is None:
            raise ConfigError("eval.scoring=likelihood scores a classification suite's labels; this suite has no "
                              "classification metric: use eval.scoring=generate")
        start = time.perf_counter()
        outputs = likelihood_answers(model, tokenizer, samples, labelled.task, labelled.labels, batch_size)
        results["scoring_seconds"] = time.perf_counter() - start
    elif scoring != "generate":
        raise ConfigError(f"eval.scoring={scoring}: choose generate or likelihood")
    elif answering:
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, **(generation or {}))
        results["generation_seconds"] = time.perf_counter() - start
        results.update(answer_lengths(tokenizer, samples, answers))
        outputs = answers["texts"]
    for metric in metrics.values():
        results.update(call(metric, samples, outputs, model, tokenizer))
    if answering and grammar is not None:
        constrained = generate_answers(model, tokenizer, chats, max_new_tokens, batch_size, grammar=grammar,
                                       **(generation or {}))["texts"]
        for metric in answering.values():
            scores = call(metric, samples, constrained, model, tokenizer)
            results.update({f"constrained_{k}": v for k, v in scores.items()})
    return {"metrics": results, "outputs": outputs}


def check(metrics: dict, samples: list[dict]) -> None:
    """Each metric's requirements on the held-out samples (a gold label, a meta key), before any model loads: a
    metric with a `check(samples)` raises there the DataError that scoring would raise after generating."""
    for metric in metrics.values():
        if hasattr(metric, "check"):
            metric.check([samples[i] for i in wanted(metric, samples)])


def wanted(metric, samples: list[dict]) -> list[int]:
    """The samples whose answer is wanted: one marked "desirable": false (a decision that went badly) is no gold
    answer to match, so only a metric that `reads_undesirable` (finetune/eval/outcomes.py) sees it."""
    if getattr(metric, "reads_undesirable", False):
        return list(range(len(samples)))
    return [i for i, s in enumerate(samples) if s.get("desirable", True)]


def call(metric, samples: list[dict], outputs: list[str] | None, model, tokenizer) -> dict:
    """A metric on the samples whose answer is wanted (`wanted`)."""
    keep = wanted(metric, samples)
    if len(keep) < len(samples):
        samples = [samples[i] for i in keep]
        outputs = None if outputs is None else [outputs[i] for i in keep]
    return metric(samples=samples, outputs=outputs, model=model, tokenizer=tokenizer)
