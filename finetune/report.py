"""report.md and its plots: what ran, base vs tuned side by side, data balance, loss curves, confusion
matrices, sentence-length histograms, the backtest's equity curves; for text generation, a blind A/B sheet."""
import json
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from finetune.rundir import write_json, write_text


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss(log_history: list[dict], path: Path) -> bool:
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for points, name in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="." if name == "eval" else None, label=name)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
    return True


def plot_labels(stats: dict, path: Path) -> bool:
    splits = {name: s["labels"] for name, s in stats["splits"].items() if s["count"]}
    labels = sorted({label for counts in splits.values() for label in counts})
    if len(labels) < 2 or len(labels) > 30:  # free text (label None) or an id-like column: nothing to show
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(splits)
    for i, (name, counts) in enumerate(splits.items()):
        ax.bar([x + i * width for x in range(len(labels))], [counts.get(label, 0) for label in labels],
               width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set(ylabel="samples", title="Label balance")
    ax.legend()
    save(fig, path)
    return True


def plot_confusion(metrics: dict, path: Path) -> bool:
    sides = [(side, metrics[side]["confusion_matrix"]) for side in ("base", "tuned")
             if "confusion_matrix" in metrics.get(side, {})]
    if not sides:
        return False
    fig, axes = plt.subplots(1, len(sides), figsize=(5 * len(sides), 4), squeeze=False)
    for ax, (side, cm) in zip(axes[0], sides):
        ax.imshow(cm["matrix"], cmap="Blues")
        ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=30, ha="right")
        ax.set_yticks(range(len(cm["labels"])), cm["labels"])
        for r, row in enumerate(cm["matrix"]):
            for c, n in enumerate(row):
                ax.text(c, r, n, ha="center", va="center")
        ax.set(xlabel="predicted", ylabel="gold", title=f"{side}")
    save(fig, path)
    return True


def plot_sentence_lengths(metrics: dict, path: Path) -> bool:
    if "sentence_lengths" not in metrics.get("tuned", {}):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = {"reference": metrics["tuned"]["sentence_lengths"]["reference"],
              "base": metrics["base"]["sentence_lengths"]["output"],
              "tuned": metrics["tuned"]["sentence_lengths"]["output"]}
    ax.hist(list(series.values()), bins=20, label=list(series), density=True)
    ax.set(xlabel="sentence length (words; characters for Chinese)", ylabel="density",
           title="Sentence lengths")
    ax.legend()
    save(fig, path)
    return True


def plot_equity(metrics: dict, path: Path) -> bool:
    curves = {side: metrics[side]["equity_curve"] for side in ("base", "tuned")
              if metrics.get(side, {}).get("equity_curve")}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side, curve in curves.items():
        ax.plot(curve, label=side)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="held-out trade", ylabel="equity", title="Backtest equity (after costs)")
    ax.legend()
    save(fig, path)
    return True


def write_ab_sheet(run_dir: Path, samples: list[dict], base: list[str], tuned: list[str], seed: int) -> None:
    """Seed 003's blind test: for each prompt, answers A and B in random order; the key is a separate file."""
    rng = random.Random(seed)
    lines, key = ["# Blind A/B sheet", "", "For each prompt, which answer reads more like the author? "
                  "The key is in ab_key.json: do not open it before judging.", ""], {}
    for i, (sample, b, t) in enumerate(zip(samples, base, tuned), 1):
        tuned_first = rng.random() < 0.5
        key[i] = {"A": "tuned" if tuned_first else "base", "B": "base" if tuned_first else "tuned"}
        a_text, b_text = (t, b) if tuned_first else (b, t)
        prompt = sample["messages"][-2]["content"]
        lines += [f"## {i}", "", "**Prompt**", "", prompt, "", "**A**", "", a_text, "", "**B**", "", b_text,
                  "", "Preferred: A / B", ""]
    write_text(run_dir / "ab_sheet.md", "\n".join(lines))
    write_json(run_dir / "ab_key.json", key)


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metrics_table(metrics: dict) -> str:
    base, tuned = metrics.get("base", {}), metrics.get("tuned", {})
    names = [k for k in {**base, **tuned} if not isinstance(base.get(k, tuned.get(k)), (dict, list))]
    rows = ["| metric | base | tuned |", "|---|---|---|"]
    rows += [f"| {n} | {fmt(base.get(n, '–'))} | {fmt(tuned.get(n, '–'))} |" for n in names]
    return "\n".join(rows)


def write_report(run_dir: Path, summary: dict, metrics: dict, stats: dict, log_history: list[dict]) -> None:
    lines = [f"# Run report: {summary['recipe']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
    lines += ["", "## Base vs tuned (held-out test split)", "", metrics_table(metrics), ""]
    plots = [(plot_confusion(metrics, run_dir / "confusion.png"), "Confusion matrices", "confusion.png"),
             (plot_equity(metrics, run_dir / "equity.png"), "Backtest", "equity.png"),
             (plot_sentence_lengths(metrics, run_dir / "sentence_lengths.png"), "Style", "sentence_lengths.png")]
    lines += [f"### {title}\n\n![{title}]({name})\n" for made, title, name in plots if made]
    lines += ["## Data", "", "| split | samples | labels | tokens p50 / p99 |", "|---|---|---|---|"]
    for name, s in stats["splits"].items():
        labels = ", ".join(f"{k}: {v}" for k, v in s["labels"].items())
        lines.append(f"| {name} | {s['count']} | {labels} | {s['tokens']['p50']:.0f} / {s['tokens']['p99']:.0f} |")
    if stats.get("dropped"):
        lines += ["", "Dropped rows: " + ", ".join(f"{k}: {v}" for k, v in stats["dropped"].items())]
    if plot_labels(stats, run_dir / "labels.png"):
        lines += ["", "![label balance](labels.png)"]
    if plot_loss(log_history, run_dir / "loss.png"):
        lines += ["", "## Training", "", "![loss curves](loss.png)"]
    if (run_dir / "ab_sheet.md").exists():
        lines += ["", "Blind A/B sheet: [ab_sheet.md](ab_sheet.md) (key: ab_key.json)."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
