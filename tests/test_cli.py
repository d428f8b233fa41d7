"""The command line as a user types it: default run, multirun, a user's recipe folder, the installed wheel."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli

# what these runs check (own run dirs, a recipe's adapter, the wheel's files) needs a finished run, not a trained one
SHORT = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "eval.max_samples=4",
         "~eval.metrics.latency"]  # a finished run is what these read; the default run keeps its latency metric


def completed(run_dir) -> bool:
    return json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_default_command_writes_hydra_config_and_report(default_run):
    tmp_path, _ = default_run  # conftest.py: `python -m finetune`, shared with tests/test_console.py
    assert completed(tmp_path)
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / ".hydra" / "overrides.yaml").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    assert "| perplexity |" in (tmp_path / "report.md").read_text()
    report = (tmp_path / "report.md").read_text().splitlines()  # the verdict first, then what ran
    # the rule-made demo data is easy for a classifier on its fields: the verdict weighs that simple model too
    assert report[2].startswith("**Verdict: tuning") and "majority baseline" in report[2], report[:3]
    assert "simple model" in report[2] and metrics["simple_model"]["accuracy"] > 0.9
    assert "| recipe | default |" in report and "| method | lora |" in report
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["parameters"] > manifest["trainable_parameters"] > 0 and manifest["model_folder"]
    assert metrics["tuned"]["parse_rate"] >= 0.95 and metrics["tuned"]["accuracy"] > metrics["tuned"]["majority_baseline"]
    # re-evaluating the finished run dir (python -m finetune.evaluate) reproduces its tuned metrics
    from finetune.evaluate import evaluate_run
    again = evaluate_run(tmp_path)
    for side in ("base", "tuned"):
        for key in ("perplexity", "accuracy", "macro_f1", "parse_rate", "confidence_mean"):
            expected = metrics[side][key]
            assert again[side][key] == (expected if expected is None else pytest.approx(expected, rel=1e-5)), key


def test_flat_recipe_folder_through_recipes_scheme(tmp_path):
    (tmp_path / "flat" / "team").mkdir(parents=True)
    (tmp_path / "flat" / "team" / "quick.yaml").write_text("# @package _global_\nmethod:\n  r: 2\n")
    out = cli("recipe=team/quick", f"hydra.searchpath=[recipes://{tmp_path / 'flat'}]", "--cfg", "job")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "r: 2" in out.stdout


@pytest.mark.slow
def test_installed_wheel_runs_from_another_directory(tmp_path):
    """`pip install .` (not editable): configs, recipes and sample data ship inside the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import finetune; print(finetune.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where, where
    out = subprocess.run([python, "-m", "finetune", f"hydra.run.dir={tmp_path / 'run'}", *SHORT],
                         cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert completed(tmp_path / "run") and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
