"""`python -m finetune.merge`: base + adapter saved as one model that plain transformers loads, with the same
logits; prompt-learning adapters refused with a message."""
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
