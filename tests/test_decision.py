"""Learning the decision, not just the answer's layout: the kept checkpoint follows validation macro-F1, scoring
by likelihood agrees with greedy answers, the decision tokens weigh more, and a simple model is the baseline."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from finetune import tasks
from finetune.runner import run


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory) -> Path:
    """The default run (tiny model, demo signals) with the decision tokens weighted and balanced, in 100 steps
    instead of 180: validation macro-F1 levels off by step 50 while the eval loss still falls to step 100, so the
    two still pick different checkpoints."""
    run_dir = tmp_path_factory.mktemp("weighted")
    run(compose("decision.weight=5", "decision.balance=true", "training.max_steps=100"), run_dir)
    return run_dir


def last_state(run_dir: Path) -> dict:
    states = sorted((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())


def test_the_kept_checkpoint_is_the_one_with_the_best_validation_macro_f1_not_eval_loss(weighted_run):
    evals = [e for e in last_state(weighted_run)["log_history"] if "eval_loss" in e]
    assert all("eval_macro_f1" in e and "eval_accuracy" in e for e in evals)
    by_f1 = max(evals, key=lambda e: (e["eval_macro_f1"], -e["step"]))["step"]  # the Trainer keeps the first best
    by_loss = min(evals, key=lambda e: e["eval_loss"])["step"]
    assert by_f1 != by_loss, "this run no longer tells the two apart; pick settings where they differ"
    state = last_state(weighted_run)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{by_f1}")
    kept = load_file(weighted_run / "adapter" / "adapter_model.safetensors")
    best = load_file(weighted_run / "checkpoints" / f"checkpoint-{by_f1}" / "adapter_model.safetensors")
    assert kept.keys() == best.keys() and all(torch.equal(kept[k], best[k]) for k in kept)


def test_the_run_reports_the_simple_model_and_the_verdict_weighs_it(weighted_run):
    metrics = json.loads((weighted_run / "metrics.json").read_text())
    simple = metrics["simple_model"]
    assert simple["model"].startswith("gradient boosting on") and simple["train_samples"] == 480
    assert 0 <= simple["macro_f1"] <= 1 and simple["n_answers"] == metrics["tuned"]["n_answers"]
    report = (weighted_run / "report.md").read_text()
    assert "| metric | base | tuned | change (tuned - base) | simple model |" in report
    verdict = report.splitlines()[2]
    assert f"{simple['accuracy']:.3f} simple model" in verdict
    helped = all(metrics["tuned"][k] > simple[k] for k in ("accuracy", "macro_f1"))
    assert verdict.startswith("**Verdict: tuning helped.**" if helped else "**Verdict: tuning did not help.**")


def test_likelihood_scoring_agrees_with_greedy_answers(weighted_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from finetune.eval.likelihood import label_scores, likelihood_answers
    from finetune.eval.suite import generate_answers
    base = json.loads((weighted_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), weighted_run / "adapter")
    samples = [json.loads(line) for line in (weighted_run / "data" / "test.jsonl").open()]
    task = tasks.get("signals")
    greedy = generate_answers(model, tokenizer, [s["messages"][:-1] for s in samples], 24, 16, progress=False)
    by_generation = [task.parse(text)[0] for text in greedy["texts"]]
    by_likelihood = [task.parse(text)[0] for text in likelihood_answers(model, tokenizer, samples, task,
                                                                        list(task.labels))]
    agree = sum(a == b for a, b in zip(by_generation, by_likelihood)) / len(samples)
    assert agree >= 0.95, list(zip(by_generation, by_likelihood))
    # the one-pass path (shared prompt once, each label's tokens masked from the others') scores as running each
    # candidate whole
    from finetune.eval import likelihood
    rows = [likelihood.label_tails(tokenizer, s, task, list(task.labels)) for s in samples[:4]]
    one_pass = likelihood._batch_shared(model, tokenizer.pad_token_id, "cpu", [r[0] for r in rows],
                                        [r[1] for r in rows])
    whole = likelihood._batch_whole(model, tokenizer.pad_token_id, "cpu", [r[0] for r in rows], [r[1] for r in rows])
    assert sum(one_pass, []) == pytest.approx(sum(whole, []), abs=1e-3)
    # label_scores continues the template's start, cached once, and batches rows of other lengths together
    assert likelihood.prefix_cache(model, "cpu", [r[0] for r in rows])[0] > 5
    scores = label_scores(model, tokenizer, samples[:4], task, list(task.labels), batch_size=3)
    assert [row[label] for row in scores for label in task.labels] == pytest.approx(sum(whole, []), abs=1e-3)
    # tails of other lengths in one row (labels that tokenize unevenly)
    uneven = [[tails[0][:2], tails[1], tails[2] + tails[2][-1:]] for _, tails in rows]
    one_pass = likelihood._batch_shared(model, tokenizer.pad_token_id, "cpu", [r[0] for r in rows], uneven)
    whole = likelihood._batch_whole(model, tokenizer.pad_token_id, "cpu", [r[0] for r in rows], uneven)
    assert sum(one_pass, []) == pytest.approx(sum(whole, []), abs=1e-3)


def test_decision_tokens_are_the_label_tokens_and_balance_follows_the_label_shares():
    from finetune.train.decision_loss import token_weights
    from finetune.train.model import load_tokenizer
    tokenizer = load_tokenizer(compose().model)
    answer = '{"signal": "%s", "confidence": 0.7}'
    samples = [{"messages": [{"role": "user", "content": f"RSI: {i}"}, {"role": "assistant", "content": answer % label}],
                "label": label} for i, label in enumerate(["HOLD"] * 6 + ["BUY"] * 3 + ["SELL"])]
    plain = token_weights(tokenizer, samples, tasks.get("signals"), 4.0, balance=False)
    assert {tokenizer.decode([t]).strip(' "') for t in plain} >= {"BUY", "SELL", "HOLD"}
    assert set(plain.values()) == {4.0} and "confidence" not in tokenizer.decode(list(plain))
    balanced = token_weights(tokenizer, samples, tasks.get("signals"), 4.0, balance=True)
    weight = {tokenizer.decode([t]).strip(' "'): w for t, w in balanced.items()}
    assert weight["SELL"] > weight["BUY"] > weight["HOLD"]  # rarer labels weigh more, their mean stays 4
    assert sum(weight[k] for k in ("SELL", "BUY", "HOLD")) / 3 == pytest.approx(4.0)


def test_the_weighted_loss_is_trls_loss_when_every_weight_is_one(tmp_path):
    from hydra.utils import instantiate
    from finetune.config import check_config
    from finetune.train.decision_loss import DecisionWeightedSFTTrainer, token_weights
    from finetune.train.model import load_tokenizer
    from finetune.train.recipe import build_data, load_base
    from finetune.train.trainers import build as make_trainer
    cfg = compose("training.max_steps=2")
    _, args = check_config(cfg, tmp_path / "checkpoints")
    tokenizer = load_tokenizer(cfg.model)
    splits, stats = build_data(cfg, tokenizer, tmp_path, True)
    model, peft_config = load_base(cfg, args, None, instantiate(cfg.method, _convert_="all"))
    trainer = make_trainer(cfg, args, model, None, peft_config, splits, stats, tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    plain = trainer.compute_loss(trainer.model, dict(batch)).item()
    weights = token_weights(tokenizer, splits["train"], tasks.get("signals"), 1.0, balance=False)
    assert weights
    trainer.token_weights = weights
    assert DecisionWeightedSFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item() == pytest.approx(plain)
    trainer.token_weights = {t: 5.0 for t in weights}
    assert DecisionWeightedSFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item() != pytest.approx(plain)


def test_early_stopping_follows_the_validation_macro_f1(tmp_path):
    """early_stopping.patience with the kept checkpoint on macro-F1: the stop reads the score the validation
    scorer adds at each evaluation (it ran after early stopping once, which then found no metric and stopped
    nothing)."""
    result = run(compose("training.max_steps=80", "training.eval_steps=5", "training.save_steps=5",
                         "early_stopping.patience=2", "eval.max_samples=4"), tmp_path)
    state = result.trainer.state
    scores = [e["eval_macro_f1"] for e in state.log_history if "eval_macro_f1" in e]
    assert state.global_step < 80, scores  # it stopped
    assert max(scores[-2:]) <= max(scores[:-2]) and len(scores) == state.global_step // 5, scores


def test_top_layer_fit_runs_the_layers_above_a_cached_one_as_the_whole_model_does(weighted_run, tmp_path, monkeypatch, capsys):
    """scripts/top_layer_fit.py (docs/results.md): the cut model fed the cached states of layer 1 gives the whole
    model's label logits, and the script trains and reports each epoch on a run's splits."""
    import shutil
    import sys
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from conftest import ROOT
    from finetune.eval.likelihood import left_pad, left_positions
    sys.path.insert(0, str(ROOT / "scripts"))
    import top_layer_fit as fit
    base = json.loads((weighted_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
    samples = [json.loads(line) for line in (weighted_run / "data" / "test.jsonl").open()][:5]
    task = tasks.get("signals")
    states, gold, firsts = fit.cached(model, tokenizer, samples, task, list(task.labels), 1, tokenizer.pad_token_id)
    assert [len(s) for s in states] == [len(fit.label_tails(tokenizer, s, task, list(task.labels))[0])
                                        for s in samples] and gold.tolist() == [task.labels.index(s["label"])
                                                                                 for s in samples]
    with torch.no_grad():
        ids, mask = left_pad([fit.label_tails(tokenizer, s, task, list(task.labels))[0] for s in samples],
                             tokenizer.pad_token_id, "cpu")
        whole = model(input_ids=ids, attention_mask=mask, position_ids=left_positions(mask)).logits[:, -1][:, firsts]
        fit.keep_top(model, 1)
        cut_states, cut_mask, _ = next(fit.batches(states, torch.arange(len(states)), len(states)))
        cut = fit.label_logits(model, cut_states, cut_mask, torch.tensor(firsts))
    assert torch.equal(cut_mask, mask)
    assert cut == pytest.approx(whole, abs=1e-4)
    run_dir = tmp_path / "run"  # the run as the command line leaves it: with the config that trained it
    shutil.copytree(weighted_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(compose("decision.weight=5", "decision.balance=true", "training.max_steps=100"),
                   run_dir / ".hydra" / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["top_layer_fit.py", str(run_dir), "--layer", "1", "--epochs", "2",
                                      "--threads", "1"])
    fit.main()
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 2 |" in out and "kept by validation: epoch" in out
    assert "the run's simple model: accuracy" in out
