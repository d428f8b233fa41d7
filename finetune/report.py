"""report.md and its plots: what ran, base vs tuned side by side, the loss curves."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from finetune.rundir import write_text


def plot_loss(log_history: list[dict], path: Path) -> bool:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, name in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="." if name == "eval" else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict) -> str:
    base, tuned = metrics.get("base", {}), metrics.get("tuned", {})
    names = [k for k in {**base, **tuned} if not isinstance(base.get(k, tuned.get(k)), (dict, list))]
    rows = ["| metric | base | tuned |", "|---|---|---|"]
    rows += [f"| {n} | {fmt(base.get(n, '–'))} | {fmt(tuned.get(n, '–'))} |" for n in names]
    return "\n".join(rows)


def write_report(run_dir: Path, summary: dict, metrics: dict, stats: dict, log_history: list[dict]) -> None:
    lines = [f"# Run report: {summary['recipe']}", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
    lines += ["", "## Base vs tuned (held-out test split)", "", metrics_table(metrics), ""]
    lines += ["## Data", "", "| split | samples | labels | tokens p50 / p99 |", "|---|---|---|---|"]
    for name, s in stats["splits"].items():
        labels = ", ".join(f"{k}: {v}" for k, v in s["labels"].items())
        lines.append(f"| {name} | {s['count']} | {labels} | {s['tokens']['p50']:.0f} / {s['tokens']['p99']:.0f} |")
    if stats.get("dropped"):
        lines += ["", "Dropped rows: " + ", ".join(f"{k}: {v}" for k, v in stats["dropped"].items())]
    if plot_loss(log_history, run_dir / "loss.png"):
        lines += ["", "## Training", "", "![loss curves](loss.png)"]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
