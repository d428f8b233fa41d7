"""The benchmark harness on CPU with the tiny model: every setup trains, tokens/s counts only real tokens, and our
fast path (packed, padding-free rows) computes the same loss as the plain padded recipe on the same samples."""
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import compose, single_torch_thread
from finetune import bench
from finetune.config import check_training, resolve
from finetune.train.model import TINY_TOKENIZER

SMOKE = ["--model", "tiny", "--device", "cpu", "--warmup-steps", "1", "--lengths", "80-160", "--batch", "2",
         "--grad-accum", "1", "--max-length", "256", "--peer-max-length", "256"]
PRESETS = ["qwen2_5_7b", "deepseek_7b", "llama3_8b", "mistral_7b", "gemma2_9b"]
SHRUNK = ["model.arch.hidden_size=64", "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
          "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2", "model.arch.vocab_size=4096"]


one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny_lora.json"
    report = bench.main([*SMOKE, "--method", "lora", "--steps", "3", "--samples", "24", "--latency",
                         "--latency-n", "2", "--latency-batch", "2", "--latency-new-tokens", "2", "--latency-static",
                         "--out", str(out)])
    return report, out


def setup(report, name):
    return next(r for r in report["setups"] if r["name"] == name)


def test_every_setup_trains_and_reports_throughput(lora):
    report, out = lora
    assert [r["name"] for r in report["setups"]] == ["ours", "plain", "trl_peer"]
    for r in report["setups"]:
        assert r["error"] is None, r
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["steps"] == 3
        assert [x["step"] for x in r["losses"]] == [1, 2, 3]
        assert all(math.isfinite(x["loss"]) for x in r["losses"])
        assert 0 < r["losses"][0]["real_tokens"] < r["losses"][-1]["real_tokens"] == r["real_tokens"]
    assert report["ratios_vs_peer"]["trl_peer"] == 1.0 and report["complete"]
    assert report["latency"]["latency_seconds"] > 0 and report["latency"]["answers_per_second"] > 0
    assert report["latency"]["fast_latency_p50_seconds"] > 0 and report["latency"]["fast_answers_per_second"] > 0
    # and the adapter merged into the base, as one adapter is served: the same answers in float32
    assert report["latency"]["merged_fast_latency_p50_seconds"] > 0 and report["latency"]["merged_same_answers"] == "2/2"
    # and through generate() on a static KV cache (not compiled on CPU): the same answers again
    assert report["latency"]["merged_static_answers_per_second"] > 0
    assert report["latency"]["merged_static_same_answers"] == "2/2"
    # the file on disk is the report, and the table beside it names every setup
    assert json.loads(out.read_text())["setups"][0]["tokens_per_s"] == report["setups"][0]["tokens_per_s"]
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in ("ours", "plain", "trl_peer"))


def test_real_tokens_exclude_padding_in_the_run(lora):
    report, _ = lora
    plain, ours = setup(report, "plain"), setup(report, "ours")
    assert plain["real_tokens"] < plain["positions"] and plain["padding_fraction"] > 0  # padded to the longest
    assert ours["real_tokens"] == ours["positions"] and ours["padding_fraction"] == 0   # padding-free rows


def test_real_tokens_of_batches_built_here():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    features = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 2 + list(range(7, 5 + n))} for n in (3, 5, 8)]
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True)([dict(f) for f in features])
    assert padded["input_ids"].numel() == 24 and int(bench.real_tokens(padded)) == 16
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    assert flat["input_ids"].shape == (1, 16) and "attention_mask" not in flat and bench.real_tokens(flat) == 16


def test_ours_and_plain_train_the_same_objective(lora):
    report, _ = lora
    ours, plain, peer = (setup(report, name) for name in ("ours", "plain", "trl_peer"))
    # same samples, same weights: the packed padding-free row gives the padded batch's loss (a row whose samples
    # attend to each other moves it by ~5e-3 on this model)
    assert abs(ours["probe_loss"] - plain["probe_loss"]) < 1e-4, (ours["probe_loss"], plain["probe_loss"])
    assert abs(peer["probe_loss"] - plain["probe_loss"]) < 1e-4
    assert ours["start_digest"] == plain["start_digest"] == peer["start_digest"]  # the same adapter to start
    # the first step's loss, on each setup's own first batch, agrees within batch-to-batch noise
    first = ours["losses"][0]["loss"], plain["losses"][0]["loss"]
    assert abs(first[0] - first[1]) / first[1] < 0.02, first


def test_qlora_on_a_shrunk_preset_shape(monkeypatch):
    """What a GPU run does, at toy size: a random-init Qwen2 model built from the preset's `arch` (shrunk here,
    with a vocab larger than the tokenizer's), saved, then quantized to NF4 on load by every setup."""
    compose_config = bench.compose
    monkeypatch.setattr(bench, "compose", lambda overrides: compose_config([*overrides, *SHRUNK]))
    try:
        report = bench.main([*SMOKE, "--model", "qwen2_5_7b", "--method", "qlora", "--steps", "2", "--samples", "12",
                             "--lengths", "80-120", "--latency", "--latency-n", "2", "--latency-batch", "2",
                             "--latency-new-tokens", "2"])
    except ImportError as err:  # bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {err}")
    errors = [r["error"] for r in report["setups"] if r["error"]]
    if errors and all("bitsandbytes" in e for e in errors):
        pytest.skip(f"bitsandbytes cannot train 4-bit on this CPU: {errors[0]}")
    assert not errors, errors
    assert report["params"] == sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**resolve(compose("model=qwen2_5_7b", *SHRUNK))["model"]["arch"])).parameters())
    for r in report["setups"]:
        assert r["tokens_per_s"] > 0 and all(math.isfinite(x["loss"]) for x in r["losses"])
        assert "paged_adamw" in r["settings"]
    assert len({r["start_digest"] for r in report["setups"]}) == 1
    probes = [r["probe_loss"] for r in report["setups"]]
    assert abs(probes[0] - math.log(4096)) < 0.1  # a random model is near uniform over its vocab
    assert max(probes) - min(probes) < 5e-3, probes  # bf16 compute on the same NF4 base
    # latency on the 4-bit model, then on its dequantized base with the adapter merged (bf16 rounding may flip a
    # near-tie of this random-init model, so the count is reported, not required)
    assert report["latency"]["fast_answers_per_second"] > 0 and report["latency"]["merged_fast_answers_per_second"] > 0
    assert report["latency"]["merged_same_answers"].endswith("/2")


def test_synthetic_samples_have_exact_uniform_lengths_and_learnable_labels():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    samples = bench.synthetic_samples(tokenizer, 300, 80, 160, seed=3)
    assert samples == bench.synthetic_samples(tokenizer, 300, 80, 160, seed=3)  # deterministic
    lengths = [bench.chat_length(tokenizer, s["messages"]) for s in samples]
    assert [len(bench.tokenize(s["messages"], tokenizer)["input_ids"]) for s in samples] == lengths
    assert min(lengths) >= 80 and max(lengths) <= 160
    assert min(lengths) <= 85 and max(lengths) >= 155 and abs(sum(lengths) / len(lengths) - 120) < 6
    for s in samples:
        rsi = float(s["messages"][1]["content"].split("RSI: ")[1].split("\n")[0])
        assert s["label"] == ("BUY" if rsi < 30 else "SELL" if rsi > 70 else "HOLD")
        assert json.loads(s["messages"][2]["content"])["signal"] == s["label"]
    with pytest.raises(bench.ConfigError, match="raise the lower bound"):
        bench.synthetic_samples(tokenizer, 1, 10, 12, seed=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_arch_blocks_build_the_presets_shape(preset):
    model = resolve(compose(f"model={preset}"))["model"]
    config = AutoConfig.for_model(**model["arch"])
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert abs(params / 1e9 - model["size"]["params_b"]) < 0.01 * model["size"]["params_b"], params
    assert config.hidden_size == model["size"]["hidden_size"]
    assert config.num_hidden_layers == model["size"]["num_layers"]


def test_levers_become_overrides_of_training_gpu():
    args = bench.parse_args(["--liger", "--batch", "8", "--checkpointing", "every2", "--compile", "--attn",
                             "flex_attention", "--optim", "adamw_8bit", "--max-length", "4096",
                             "--variant", "checkpointing=none grad-accum=2", "--setups", "trl_peer,ours,plain"])
    overrides = bench.lever_overrides(args)
    assert "++training.use_liger_kernel=true" in overrides and "model.attn_implementation=flex_attention" in overrides
    training = resolve(compose("model=qwen2_5_7b", "training=gpu", *overrides))["training"]
    check_training(training)  # every lever is an SFTConfig field
    assert training["per_device_train_batch_size"] == 8 and training["max_length"] == 4096
    assert training["activation_checkpointing_kwargs"] == {"every_n_layers": 2} and training["torch_compile"]
    plan = bench.planned(args)
    # a variant adds its levers to the flags'; setups with Liger run after the others (it patches modules)
    assert [name for name, _ in plan] == ["trl_peer", "plain", "ours", "ours[checkpointing=none grad-accum=2]"]
    variant = dict(plan)["ours[checkpointing=none grad-accum=2]"]
    assert variant == overrides + ["training.gradient_accumulation_steps=2", "training.activation_checkpointing=false"]


def test_a_finished_setup_leaves_nothing_referenced(monkeypatch):
    """Every setup starts from zero: once a setup is done, no trainer, model, optimizer or embedding of it stays
    referenced (with an 8-bit optimizer the Trainer registers the embeddings with bitsandbytes' process-wide
    manager, which kept ~1 GiB a setup on a 7B GPU run)."""
    import weakref
    kept, measure = [], bench.measure

    def watched(name, trainer, *args):
        result = measure(name, trainer, *args)
        model = trainer.model
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        kept.extend((name, what, weakref.ref(obj)) for what, obj in (
            ("trainer", trainer), ("model", model), ("optimizer", trainer.optimizer),
            *(("embedding", m) for m in embeddings)))
        return result
    monkeypatch.setattr(bench, "measure", watched)
    report = bench.main([*SMOKE, "--method", "lora", "--steps", "2", "--samples", "8", "--setups", "ours,trl_peer",
                         "--optim", "paged_adamw_8bit"])
    assert not [r["error"] for r in report["setups"] if r["error"]]
    bench.free_memory()  # what run() does before each setup
    alive = [(name, what) for name, what, ref in kept if ref() is not None]
    assert len(kept) > 6 and not alive, alive
