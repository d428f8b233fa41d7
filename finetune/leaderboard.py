"""A sweep's leaderboard: one row per job, best first, in <sweep dir>/leaderboard.csv and leaderboard.md.

A Hydra callback (conf/config.yaml: hydra.callbacks.leaderboard) that runs when a multirun ends and reads
each job's run dir (status, metrics, Hydra's overrides: finetune/rundir/__init__.py), so it works with any launcher
(local, joblib, submitit) and lists a failed job as a failed row instead of stopping the sweep.
The metric that ranks the jobs is `leaderboard.metric` of the config (a key of metrics.json's "tuned"),
with `leaderboard.mode` min or max; recipes choose theirs.
"""
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from finetune.rundir import HYDRA, MANIFEST, METRICS, STATUS, write_text


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def job_rows(sweep_dir: Path, metric: str) -> list[dict]:
    rows = []
    for status_file in sorted(sweep_dir.glob(f"*/{STATUS}"), key=lambda p: int(p.parent.name)
                              if p.parent.name.isdigit() else 0):
        job = status_file.parent
        status = json.loads(status_file.read_text())
        overrides_file = job / HYDRA / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.exists() else []
        metrics = read_json(job / METRICS)
        tuned = metrics.get("tuned", {})
        manifest = read_json(job / MANIFEST)
        rows.append({"job": job.name, "overrides": " ".join(overrides), "status": status["status"],
                     metric: tuned.get(metric), **{f"base_{metric}": metrics.get("base", {}).get(metric)},
                     **{k: v for k, v in tuned.items() if isinstance(v, (int, float)) and k != metric},
                     "seconds": manifest.get("seconds"), "run_dir": str(job),
                     "error": status.get("error")})
    return rows


def rank(rows: list[dict], metric: str, mode: str) -> list[dict]:
    def key(row):
        value = row.get(metric)
        if row["status"] != "completed" or value is None:
            return (1, 0.0)  # failed or unscored jobs last, in job order
        return (0, value if mode == "min" else -value)
    return sorted(rows, key=key)


def write_leaderboard(sweep_dir: Path, metric: str, mode: str) -> list[dict]:
    rows = rank(job_rows(sweep_dir, metric), metric, mode)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "leaderboard.csv", buffer.getvalue())
    shown = ["job", "overrides", "status", metric, f"base_{metric}", "seconds", "run_dir"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"# Leaderboard: {metric} ({mode}, tuned)", "", "| rank | " + " | ".join(shown) + " |",
             "|" + "---|" * (len(shown) + 1)]
    lines += [f"| {i} | " + " | ".join(fmt(row.get(c)) for c in shown) + " |" for i, row in enumerate(rows, 1)]
    failed = [row for row in rows if row["status"] != "completed"]
    if failed:
        lines += ["", "Failed jobs:"] + [f"- job {row['job']}: {row['error']}" for row in failed]
    write_text(sweep_dir / "leaderboard.md", "\n".join(lines) + "\n")
    return rows


class Leaderboard(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_leaderboard(sweep_dir, config.leaderboard.metric, config.leaderboard.mode)
        done = sum(row["status"] == "completed" for row in rows)
        print(f"leaderboard: {sweep_dir / 'leaderboard.md'} ({done} of {len(rows)} jobs completed)")
        if done < len(rows):  # the sweep went on past a failed job; its exit code still tells CI
            failed = ", ".join(row["job"] for row in rows if row["status"] != "completed")
            print(f"error: failed jobs: {failed} (leaderboard.md lists their errors)", file=sys.stderr)
            sys.exit(1)
