"""`python -m finetune.merge`: base + adapter saved as one model that plain transformers loads, with the same
logits; prompt-learning adapters refused with a message."""
import json
import shutil

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.serving.reopen import load_run_config
from finetune.serving.inference import SignalProvider
from finetune.merge import main as merge_main
from finetune.train.model import load_model, load_tokenizer, model_source
from test_inference import SNAPSHOTS, one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)


@pytest.fixture(scope="module")
def merged(cache_dir, tmp_path_factory):
    run_dir = tiny_signal_run(cache_dir)
    out = tmp_path_factory.mktemp("merged") / "model"
    merge_main([str(run_dir), str(out)])
    return run_dir, out


def test_merged_model_loads_with_plain_transformers_and_gives_the_same_logits(merged):
    run_dir, out = merged
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")) and (out / "merge.json").is_file()
    cfg = load_run_config(run_dir, [])
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Symbol: BTC/USDT\nRSI: 28.4\nTrend: bullish"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # the saved tokenizer carries training's chat template: the same prompt ids as the run's own tokenizer
    expected_ids = load_tokenizer(cfg.model).apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                                 return_dict=True)
    assert torch.equal(ids["input_ids"], expected_ids["input_ids"])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(load_model(cfg.model, None, True), run_dir / "adapter").eval()
    with torch.no_grad():
        got, want = plain(**ids).logits, adapted(**ids).logits
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        with adapted.disable_adapter():  # and the adapter is in there: the base alone differs
            assert not torch.allclose(adapted(**ids).logits, got, atol=1e-5)


def test_merged_model_serves_the_same_answers(merged):
    run_dir, out = merged
    adapted = SignalProvider.from_run(run_dir)
    chats = [adapted.signal_prompt(m) for m in SNAPSHOTS[:2]]
    assert SignalProvider.from_pretrained(out).generate(chats) == adapted.generate(chats)


def test_merge_refuses_an_existing_folder_and_prefix_tuning(merged, tmp_path, capsys):
    run_dir, out = merged
    with pytest.raises(SystemExit):
        merge_main([str(run_dir), str(out)])
    assert "exists and is not empty; choose another folder or pass --force" in capsys.readouterr().err
    # a prefix-tuning adapter on the same base, in a copy of the run
    prefix_run = tmp_path / "prefix-run"
    shutil.copytree(run_dir / ".hydra", prefix_run / ".hydra")
    base = AutoModelForCausalLM.from_pretrained(model_source(load_run_config(run_dir, []).model))
    get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        prefix_run / "adapter")
    with pytest.raises(SystemExit) as exit_:
        merge_main([str(prefix_run), str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "PREFIX_TUNING adapter adds virtual tokens" in err and "serve" in err
    assert not (tmp_path / "merged").exists()


def test_a_qlora_adapter_is_served_on_its_dequantized_base():
    """merge=True on a 4-bit base: plain layers holding the dequantized weights plus the adapter, the 4-bit
    adapted model's logits to bf16 rounding (peft's own merge would round the sum back into 4 bits), and a model
    that casts, which a 4-bit one refuses."""
    from hydra.utils import instantiate
    from peft import get_peft_model
    from conftest import compose
    from finetune.errors import ConfigError
    from finetune.serving.inference import cast, merged, quantized
    cfg = compose("method=qlora")
    torch.manual_seed(0)
    adapted = get_peft_model(load_model(cfg.model, cfg.quantization, True), instantiate(cfg.method, _convert_="all"))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # an adapter that changes the answers (lora_B starts at zero)
            parameter.data.normal_(0, 0.05)
    adapted.eval()
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = adapted(input_ids=ids).logits.float()
        with adapted.disable_adapter():
            base_only = adapted(input_ids=ids).logits.float()
    with pytest.raises(ConfigError, match="quantized"):
        cast(adapted, "float32")
    plain = merged(adapted)
    assert not quantized(plain) and not hasattr(plain, "disable_adapter") and plain.dtype == torch.bfloat16
    assert {type(m).__module__.split(".")[0] for m in plain.modules()} <= {"torch", "transformers"}  # no bitsandbytes
    with torch.no_grad():
        got = plain(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.1 * (base_only - want).abs().max(), "the adapter is not in the weights"
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(got, want, atol=2e-2), (got - want).abs().max()
    cast(plain, "float32")  # a plain model now


def test_merge_base_dequantized_saves_the_weights_a_qlora_run_trained_against(tmp_path, capsys):
    """`--base dequantized` on a QLoRA run: the saved plain model answers as the 4-bit base + adapter did (to bf16
    rounding), closer than the default merge into the original full-precision base; a LoRA run is refused it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from peft import get_peft_model
    from conftest import compose
    cfg = compose("method=qlora")
    run_dir = tmp_path / "qlora-run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    torch.manual_seed(0)
    adapted = get_peft_model(load_model(cfg.model, cfg.quantization, True), instantiate(cfg.method, _convert_="all"))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    adapted.save_pretrained(run_dir / "adapter")
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        want = adapted.eval()(input_ids=ids).logits.float()
    merge_main([str(run_dir), str(tmp_path / "dequantized"), "--base", "dequantized"])
    merge_main([str(run_dir), str(tmp_path / "original")])
    errors = {}
    for base in ("dequantized", "original"):
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / base).eval()
        with torch.no_grad():
            errors[base] = (plain(input_ids=ids).logits.float() - want).abs().max().item()
    assert json.loads((tmp_path / "dequantized" / "merge.json").read_text())["base_weights"] == "dequantized"
    assert errors["dequantized"] < 2e-2 and errors["dequantized"] < errors["original"] / 2, errors
    lora_run = tmp_path / "lora-run"
    shutil.copytree(run_dir, lora_run)
    OmegaConf.save(compose(), lora_run / ".hydra" / "config.yaml")
    with pytest.raises(SystemExit):
        merge_main([str(lora_run), str(tmp_path / "refused"), "--base", "dequantized"])
    assert "leave --base out" in capsys.readouterr().err and not (tmp_path / "refused").exists()
