"""A run dir is data someone handed over: opening it (serve, predict, evaluate, SignalProvider.from_run) never runs
a callable its saved config names, and never turns on trust_remote_code."""
import json
import shutil

import pytest
from omegaconf import OmegaConf

from finetune.evaluate import evaluate_run
from finetune.serving.inference import SignalProvider
from finetune.predict import main as predict_main
from finetune.serving.reopen import load_run_config
from test_inference import SNAPSHOTS, one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)


@pytest.fixture(scope="module")
def hostile_run(cache_dir, tmp_path_factory):
    """The shared tiny run, its saved config naming shutil.copyfile wherever something is instantiated: each
    call would copy `bait` to a file named after the place (`quantization.hit`, ...)."""
    root = tmp_path_factory.mktemp("hostile")
    run_dir = root / "shared-run"
    shutil.copytree(tiny_signal_run(cache_dir), run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    bait = root / "bait.txt"
    bait.write_text("copied\n")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")

    def copy(place):
        return {"_target_": "shutil.copyfile", "src": str(bait), "dst": str(root / f"{place}.hit")}
    cfg.quantization = copy("quantization")
    cfg.eval.metrics.evil = copy("metric")
    cfg.eval.metrics.perplexity.nested = copy("nested")
    cfg.dataset.builder._target_ = "antigravity.fly"  # importing it would open a browser
    cfg.model.trust_remote_code = True
    code = root / "custom_generate"  # what transformers' generate(custom_generate=DIR, trust_remote_code=True) runs
    code.mkdir()
    (code / "generate.py").write_text(f"open({str(root / 'generate.hit')!r}, 'w')\ndef generate(model, **kw):\n"
                                      f"    return model.generate(**kw)\n")
    cfg.eval.generation = {"custom_generate": str(root), "trust_remote_code": True}
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, root


def no_hits(root) -> list[str]:
    return sorted(p.name for p in root.glob("*.hit"))


def test_the_run_config_keeps_shipped_targets_and_drops_others(hostile_run):
    run_dir, root = hostile_run
    cfg = load_run_config(run_dir)
    assert cfg.quantization is None and "evil" not in cfg.eval.metrics
    assert cfg.eval.metrics.perplexity._target_ == "finetune.eval.perplexity.Perplexity"
    assert "nested" not in cfg.eval.metrics.perplexity and "builder" not in cfg.dataset
    assert cfg.model.trust_remote_code is False  # the run dir's true is not honoured
    assert dict(cfg.eval.generation) == {}  # custom_generate and trust_remote_code are not generation settings
    assert load_run_config(run_dir, trust_remote_code=True).model.trust_remote_code is True  # the command line's is


def test_from_run_and_evaluate_answer_without_calling_it(hostile_run):
    run_dir, root = hostile_run
    provider = SignalProvider.from_run(run_dir)
    signal, confidence = provider.get_signal(SNAPSHOTS[0])
    assert signal in ("BUY", "SELL", "HOLD")
    result = evaluate_run(run_dir, ["eval.max_samples=4"])
    assert "perplexity" in result["tuned"] and "evil" not in result["tuned"]
    assert no_hits(root) == []


def test_predict_answers_without_calling_it(hostile_run, tmp_path, capsys):
    run_dir, root = hostile_run
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"id": "a", "market_data": SNAPSHOTS[0]}) + "\n")
    predict_main([str(run_dir), "--input", str(inputs), "--output", str(tmp_path / "out.jsonl")])
    assert json.loads((tmp_path / "out.jsonl").read_text())["signal"] in ("BUY", "SELL", "HOLD")
    assert no_hits(root) == []


def test_serve_starts_and_answers_without_calling_it(hostile_run, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from finetune.serve import main as serve_main
    import finetune.train.model
    run_dir, root = hostile_run
    apps, trusted, load_model = [], [], finetune.train.model.load_model

    def spy(cfg, *args):  # what the base model is loaded with
        trusted.append(cfg.trust_remote_code)
        return load_model(cfg, *args)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    monkeypatch.setattr(finetune.train.model, "load_model", spy)
    serve_main([str(run_dir), "--port", "0"])
    answer = TestClient(apps[0]).post("/signal", json={"market_data": SNAPSHOTS[0]})
    assert answer.status_code == 200 and answer.json()["signal"] in ("BUY", "SELL", "HOLD")
    assert no_hits(root) == []
    serve_main([str(run_dir), "--port", "0", "--trust-remote-code"])
    assert trusted == [False, True]  # the run dir's true counts only when the command line says so
