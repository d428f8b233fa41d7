"""Generation settings as the eval suite applies them: a repetition penalty that leaves the prompt out."""
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from conftest import compose
from finetune.eval.suite import generate_answers
from finetune.train.model import load_model, load_tokenizer


def test_repetition_penalty_counts_the_answer_only():
    """Every prompt turn ends with the end-of-turn token: a penalty over the prompt would push it down and the
    model would not stop. The penalty goes to generate() as a processor that ignores the prompt's tokens."""
    cfg = compose()
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, None, use_cpu=True)
    chats = [[{"role": "user", "content": "RSI 28"}], [{"role": "user", "content": "BTC trend bullish, RSI 71"}]]
    seen, generate = {}, model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)
    model.generate = spy
    penalised = generate_answers(model, tokenizer, chats, 6, 2, progress=False, repetition_penalty=1.3)
    [processor] = seen["logits_processor"]
    assert "repetition_penalty" not in seen and isinstance(processor, RepetitionPenaltyLogitsProcessor)
    assert processor.penalty == 1.3 and processor.prompt_ignore_length == seen["input_ids"].shape[1]
    # applied to a prompt followed by one generated token, only that token is pushed down
    width = seen["input_ids"].shape[1]
    prompt_token, answer_token = int(seen["input_ids"][0, -1]), (int(seen["input_ids"][0, -1]) + 1) % len(tokenizer)
    sequence = torch.cat([seen["input_ids"][:1], torch.tensor([[answer_token]])], dim=1)
    scores = processor(sequence, torch.ones(1, len(tokenizer)))
    assert sequence.shape[1] == width + 1
    assert scores[0, prompt_token] == 1.0 and abs(float(scores[0, answer_token]) - 1 / 1.3) < 1e-6
    assert len(penalised["texts"]) == 2
