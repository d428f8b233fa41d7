"""Sweeps and processes: leaderboard with a failed job, Optuna, submitit's local launcher, trackers (two CPU ranks:
tests/test_reliability.py)."""
import csv
import sys
import re

import pytest
import yaml

from conftest import cli, compose

# what these check (leaderboards, statuses, trackers' files) needs finished jobs, not trained ones; no latency metric
TINY = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "training.logging_steps=2",
        "eval.max_samples=4", "~eval.metrics.latency"]


def leaderboard(sweep_dir):
    with open(sweep_dir / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_leaderboard_best_first_with_a_failed_job(tmp_path):
    out = cli("-m", "training.learning_rate=1e-3,5e-3", "method.r=4,oops", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 1, out.stderr[-3000:]   # the sweep went on, and says that jobs failed
    rows = leaderboard(tmp_path)
    assert len(rows) == 4
    done = [r for r in rows if r["status"] == "completed"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(done) == 2 and len(failed) == 2 and rows[:2] == done      # failed rows last
    assert float(done[0]["perplexity"]) <= float(done[1]["perplexity"])  # best (lowest) first
    assert all("method.r=oops" in r["overrides"] and "method.r" in r["error"] for r in failed)
    assert "Failed jobs" in (tmp_path / "leaderboard.md").read_text()
    assert re.search(r"failed jobs: \d, \d", out.stderr), out.stderr[-2000:]  # and the console says which


@pytest.mark.slow
def test_optuna_sweep_best_value_is_the_leaderboards_top(tmp_path):
    out = cli("-m", "recipe=sweeps/optuna_tiny", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["best_value"]
    rows = leaderboard(tmp_path)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert float(rows[0]["perplexity"]) == pytest.approx(best)


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory):
    """Two jobs through submitit's local launcher, each a process of its own that reports to both trackers: the
    launcher test reads the leaderboard, the tracker tests the first job's run dir (one run fewer than a tracked run
    of their own)."""
    sweep_dir = tmp_path_factory.mktemp("submitit")
    out = cli("-m", "hydra/launcher=local", "training.learning_rate=1e-3,3e-3",
              "training.report_to=[tensorboard,wandb]", *TINY, f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, out


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_jobs(submitit_sweep):
    sweep_dir, out = submitit_sweep
    assert out.returncode == 0, out.stderr[-3000:]
    rows = leaderboard(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "completed"]


@pytest.fixture(scope="module")
def tracked_run(submitit_sweep):
    """A run that reported to both trackers (the submitit sweep's first job): each test below reads its own
    tracker's files."""
    sweep_dir, out = submitit_sweep
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir / "0"


def test_tensorboard_events_hold_loss_and_eval_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = set()
    for events in tracked_run.rglob("events.out.tfevents.*"):
        reader = EventAccumulator(str(events))
        reader.Reload()
        tags |= set(reader.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "train/base_perplexity", "train/tuned_perplexity"} <= tags, tags


def test_wandb_offline_writes_its_run_in_the_run_dir(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"tuned_perplexity" in runs[0].read_bytes()


def test_a_run_closes_its_wandb_run_so_the_next_job_of_the_process_opens_its_own(tmp_path, monkeypatch):
    """Hydra's default launcher runs a sweep's jobs in one process, and transformers' WandbCallback starts a wandb
    run only when none is open: a run left open would take every later job's logs."""
    import types
    from finetune.errors import DataError
    from finetune.train.recipe import run
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = compose("model=tiny", "training=cpu", f"dataset.path={tmp_path / 'missing.jsonl'}")
    with pytest.raises(DataError):  # it fails before training, and still closes the run
        run(cfg, tmp_path / "job0")
    assert finished == [True]
