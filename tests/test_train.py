"""Training on the tiny model, in-process: loss down, adapter reloads to the same logits, every method runs."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import FAST, compose
from finetune.errors import ConfigError, DataError
from finetune.runner import run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default")  # the full default run is tests/test_cli.py's
    return run_dir, run(compose(*FAST), run_dir)


def test_default_run_writes_the_run_dir_and_improves(default_run):
    run_dir, result = default_run
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "manifest.json", "status.json", "report.md", "loss.png", "data/stats.json", "data/train.jsonl"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tuned"]["perplexity"] < 0.5 * metrics["base"]["perplexity"], metrics
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "completed", "error": None}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 42 and len(manifest["data_sha256"]) == 64 and manifest["versions"]["peft"]


def test_adapter_reloads_to_the_same_logits(default_run):
    run_dir, result = default_run
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    trained = result.model.eval()
    ids = result.tokenizer.apply_chat_template([{"role": "user", "content": "BTC-USDT price 43000\nRSI: 30"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = trained(**ids).logits
        got = reloaded(**ids).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    # and the adapter really changed the model: the base alone gives other logits
    with torch.no_grad(), reloaded.disable_adapter():
        assert not torch.allclose(reloaded(**ids).logits, got, atol=1e-3)


# prefix and prompt tuning learn virtual tokens: they want 10x LoRA's learning rate
@pytest.mark.parametrize("method, extra", [("qlora", []), ("prefix", ["training.learning_rate=3e-2"]), ("dora", []),
                                           ("ia3", []), ("prompt", ["training.learning_rate=3e-2"])])
def test_every_method_trains_on_cpu(method, extra, tmp_path):
    result = run(compose(f"method={method}", *FAST, *extra), tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]


def test_a_4bit_base_scored_before_training_still_passes_gradients():
    """The runner scores the base in eval mode, then trains it: the gradient through the 4-bit layers must be
    the same after that scoring as before (bitsandbytes repacks them for a kernel without backward on
    AVX512-BF16 CPUs unless load_model turns that off)."""
    from finetune.train.model import load_model
    cfg = compose("method=qlora")
    model = load_model(cfg.model, cfg.quantization, True)
    ids = torch.arange(3, 19).reshape(2, 8)

    def input_gradient():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.float().square().mean().backward()
        return embeds.grad

    model.train()
    before = input_gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert torch.allclose(input_gradient(), before), "the eval-mode forward changed the 4-bit layers' backward"


@pytest.mark.parametrize("setting", ["training.activation_checkpointing=true", "+training.gradient_checkpointing=true",
                                     "training.packing=true"])
def test_prefix_refuses_settings_it_cannot_train_with(setting, tmp_path):
    with pytest.raises(ConfigError, match="prefix"):
        run(compose("method=prefix", setting), tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "metrics.json").exists()


def test_generation_sees_the_prefix():
    """generate() answers with the prefix, not as the base: its first token is the forward pass's argmax, in a
    left-padded batch (transformers 5 generate() dropped the prefix PEFT passes, so prefix-tuned models
    answered as their base)."""
    from peft import get_peft_model
    from hydra.utils import instantiate
    from finetune.eval.suite import generate_answers
    from finetune.train.model import load_model, load_tokenizer

    cfg = compose("method=prefix")
    tokenizer = load_tokenizer(cfg.model)
    model = get_peft_model(load_model(cfg.model, None, True), instantiate(cfg.method, _convert_="all"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn_like(p) * 3)  # virtual tokens far from their initialisation
    model.eval()
    chats = [[{"role": "user", "content": "BTC-USDT price 43000"}],
             [{"role": "user", "content": "ETH-USDT price 2300, RSI 71, trend bearish, volume rising"}]]
    ids = tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        adapted = model(**ids).logits[0, -1]
        with model.disable_adapter():
            base = model(**ids).logits[0, -1]
    assert adapted.argmax() != base.argmax()
    answers = generate_answers(model, tokenizer, chats, max_new_tokens=1, batch_size=2, progress=False)
    assert tokenizer.decode([adapted.argmax()], skip_special_tokens=True).strip() == answers["texts"][0]


def test_full_fine_tuning_saves_a_whole_model_that_loads_without_peft(tmp_path):
    from transformers import AutoTokenizer
    from finetune.evaluate import evaluate_run
    from finetune.serving.inference import SignalProvider
    result = run(compose("method=full", *FAST), tmp_path)
    adapter = tmp_path / "adapter"
    assert (adapter / "config.json").is_file() and (adapter / "model.safetensors").is_file()
    assert not (adapter / "adapter_config.json").exists()
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["trainable_parameters"] == sum(p.numel() for p in result.model.parameters())  # every weight
    loaded, tokenizer = AutoModelForCausalLM.from_pretrained(adapter), AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer("RSI 28, trend bullish", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, result.model.eval()(**ids).logits, atol=1e-5)
    assert "method | full" in (tmp_path / "report.md").read_text()
    (tmp_path / ".hydra").mkdir(exist_ok=True)  # what `python -m finetune` writes; run() alone does not
    from omegaconf import OmegaConf
    OmegaConf.save(compose("method=full", *FAST), tmp_path / ".hydra" / "config.yaml")
    again = evaluate_run(tmp_path, ["eval.max_samples=8"])
    assert again["tuned"]["perplexity"] < again["base"]["perplexity"]
    assert SignalProvider.from_run(tmp_path).generate([[{"role": "user", "content": "RSI 28"}]])[0] is not None


def test_full_fine_tuning_of_a_7b_preset_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"method=full on qwen2.5-7b-instruct \(7\.\d B parameters\) needs ~1\d\d GiB"
                                          r".*fsdp"):
        run(compose("model=qwen2_5_7b", "training=cpu", "method=full"), tmp_path)
    assert not (tmp_path / "data").exists()


def test_dpo_on_data_without_pairs_stops_before_the_model_loads(tmp_path, monkeypatch):
    """objective=dpo on supervised samples names the two ways to give it pairs; no weight has loaded."""
    import finetune.train.recipe as recipe
    monkeypatch.setattr(recipe, "load_base", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"objective=dpo: no train sample has a rejected answer; .*"
                                        r"dataset\.builder\.format=chosen .* dataset\.builder\.preference=true"):
        run(compose("objective=dpo", "training.max_steps=2"), tmp_path)


def test_kto_on_data_without_desirability_stops_before_the_model_loads(tmp_path, monkeypatch):
    import finetune.train.recipe as recipe
    monkeypatch.setattr(recipe, "load_base", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(DataError, match=r"objective=kto: no train sample says whether its answer is desirable; .*"
                                        r"undesirable_outcomes=\[bad\].*format=kto"):
        run(compose("objective=kto", "training.max_steps=2"), tmp_path)
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(json.dumps({"prompt": f"{i} + {i}?", "completion": str(2 * i), "label": True}) + "\n"
                                 for i in range(30)))
    with pytest.raises(DataError, match=r"objective=kto: every train sample is desirable; KTO learns from both"):
        run(compose("objective=kto", "dataset=generic", f"dataset.path={only_good}", "eval=perplexity"),
            tmp_path / "good")


@pytest.mark.parametrize("overrides, message", [
    (["+objective.betta=0.2"], r"objective\.betta: not a trl\.DPOConfig field; did you mean beta\?"),
    (["objective=kto", "+objective.desirable_weigth=2"], r"objective\.desirable_weigth: not a trl\.KTOConfig field; "
                                                        r"did you mean desirable_weight or undesirable_weight\?"),
    (["objective.training.packing=true"], r"objective=dpo with training\.packing=true: .* set training\.packing=false"),
    (["objective.name=ppo"], r"objective\.name='ppo': choose sft, dpo, kto"),
    (["objective.start_from=/no/such/run"], r"objective\.start_from=/no/such/run: no such run dir; give an SFT run's"),
    (["objective.start_from={tmp}/empty"], r"objective\.start_from=.*earlier/empty: no adapter_config\.json there"),
    (["objective.start_from=sft", "method=full"], r"objective\.start_from=sft with method=full: .*\(method=lora\)"),
    (["objective.start_from={tmp}", "incremental.adapter={tmp}"], r"objective\.start_from with incremental\.adapter"),
    (["objective.start_from={tmp}"],
     r"objective\.start_from=.*: that run trained model=smollm2-135m-instruct, this one is model=tiny"),
])
def test_a_bad_objective_setting_is_named_before_anything_runs(tmp_path, monkeypatch, overrides, message):
    import finetune.train.recipe as recipe
    monkeypatch.setattr(recipe, "load_base", lambda *a: pytest.fail("the model loaded"))
    earlier = tmp_path / "earlier"  # a run dir of another model, with an adapter
    (earlier / "adapter").mkdir(parents=True)
    (earlier / "adapter" / "adapter_config.json").write_text("{}")
    (earlier / "empty").mkdir()
    (earlier / "manifest.json").write_text(json.dumps({"config": {"model": {"name": "smollm2-135m-instruct"}}}))
    overrides = [o.format(tmp=earlier) for o in overrides]
    with pytest.raises(ConfigError, match=message):
        run(compose("objective=dpo", *overrides), tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["eval.walk_forward.folds=1"], r"eval\.walk_forward\.folds=1: a whole number of folds, 2 or more"),
    (["eval.walk_forward.folds=3", "dry_run=true"], r"eval\.walk_forward with dry_run=true"),
    (["eval.walk_forward.folds=3", "dataset.split=random"], r"needs time-ordered samples"),
])
def test_a_bad_walk_forward_setting_is_named(tmp_path, overrides, message):
    with pytest.raises((ConfigError, DataError), match=message):
        run(compose(*overrides), tmp_path)


def test_packed_training_counts_samples_not_packed_rows(tmp_path):
    # training=gpu packs; the count of trained samples must be the samples', not the packed sequences'
    count = run(compose("training.packing=true", "training.max_steps=2", "training.per_device_train_batch_size=2",
                        "training.eval_steps=2", "training.save_steps=2", "eval.max_samples=8"),
                tmp_path).stats["splits"]["train"]["count"]
    report = (tmp_path / "report.md").read_text()
    assert f"| train samples | {count} |" in report, [line for line in report.splitlines() if "train samples" in line]


def test_the_tiny_model_on_a_gpu_gets_the_cpu_schedule():
    # conf/fit/tiny_gpu.yaml: the GPU preset's 7B schedule would leave the random-init tiny model at chance
    gpu, cpu = compose("training=gpu").training, compose("training=cpu").training
    for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_length"):
        assert gpu[key] == cpu[key], key
