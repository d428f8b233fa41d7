"""The command line as a user types it: default run, multirun, a user's recipe folder, the installed wheel."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cli

# what these runs check (own run dirs, a recipe's adapter, the wheel's files) needs a finished run, not a trained one
SHORT = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "eval.max_samples=4"]


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


def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    # as the README types it: Hydra's default sweep dir (outputs/<date>/<time>-multirun-default), no hydra.sweep.dir
    out = cli("-m", "training.learning_rate=1e-3,3e-3", *SHORT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    [sweep] = list(tmp_path.glob("outputs/*/*-multirun-default"))
    for job in ("0", "1"):
        assert completed(sweep / job) and (sweep / job / "metrics.json").is_file()
    rates = [json.loads((sweep / j / "manifest.json").read_text())["config"]["training"]["learning_rate"]
             for j in ("0", "1")]
    assert rates == [1e-3, 3e-3]
    assert "| 2 |" in (sweep / "leaderboard.md").read_text()


def test_a_sweep_with_a_failed_job_exits_non_zero_after_its_leaderboard(tmp_path):
    out = cli("-m", "method.r=oops,-", *SHORT, cwd=tmp_path)   # both jobs fail their config check: no weights load
    assert out.returncode == 1, out.stderr[-3000:]
    [sweep] = list(tmp_path.glob("outputs/*/*-multirun-default"))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert "Failed jobs" in (sweep / "leaderboard.md").read_text()
    assert "failed jobs: 0, 1" in out.stderr


def test_recipe_from_a_user_folder(tmp_path):
    # Hydra's layout: <dir>/recipe/NAME.yaml, found through --config-dir
    (tmp_path / "mine" / "recipe").mkdir(parents=True)
    (tmp_path / "mine" / "recipe" / "my_recipe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: dora\nmethod:\n  r: 4\n")
    out = cli("--config-dir", str(tmp_path / "mine"), "recipe=my_recipe", *SHORT, f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert completed(tmp_path / "run")
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["use_dora"] is True


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
