"""Print the Markdown table of docs/results.md from finished run dirs: each row read from the run's own files.

    python scripts/results_table.py outputs/<run> [outputs/<run> ...]
    python scripts/results_table.py --decision outputs/<run> ...   # the decision table: label shares, answers,
                                                                   # macro-F1 against the simple model
    python scripts/results_table.py --models SFT=outputs/<run>/sft "SFT -> GRPO"=outputs/<run> ...
        # the models side by side on the same held-out samples (each run's tuned scores), the simple model last

Columns: the command (manifest argv), wall minutes (manifest seconds), the main metric base -> tuned with its
baseline, parse rate, answer length against the reference (length_ratio) and perplexity base -> tuned; a tuned
value is bold only where it is better than the base's.
"""
import json
import sys
from pathlib import Path


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def change(base, tuned, digits: int = 3, lower_is_better: bool = False) -> str:
    """`base → tuned`, the tuned value in bold only when it is better."""
    better = base is not None and tuned is not None and (tuned < base if lower_is_better else tuned > base)
    shown = fmt(tuned, digits)
    return f"{fmt(base, digits)} → {f'**{shown}**' if better else shown}"


def row(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    base, tuned = metrics["base"], metrics["tuned"]
    argv = " ".join(a for a in manifest["argv"][1:] if not a.startswith("hydra.run.dir="))
    accuracy = (f"{change(base['accuracy'], tuned['accuracy'])} (majority {fmt(tuned['majority_baseline'])})"
                if "accuracy" in tuned else "–")
    style = (change(base["style_distance"], tuned["style_distance"], lower_is_better=True)
             if "style_distance" in tuned else "–")
    return (f"| `python -m finetune {argv}` | {manifest['seconds'] / 60:.1f} | {accuracy} | "
            f"{fmt(base.get('parse_rate'), 2)} → {fmt(tuned.get('parse_rate'), 2)} | "
            f"{change(base['perplexity'], tuned['perplexity'], 2, lower_is_better=True)} | {style} | "
            f"{fmt(base.get('length_ratio'), 2)} → {fmt(tuned.get('length_ratio'), 2)} |")


def answered(metrics: dict) -> str:
    """How often each label was answered, from the tuned confusion matrix's columns."""
    cm = metrics["confusion_matrix"]
    counts = [sum(row[i] for row in cm["matrix"]) for i in range(len(cm["columns"]))]
    return " / ".join(f"{c} {n}" for c, n in zip(cm["columns"], counts) if n)


def decision_row(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    base, tuned, simple = metrics["base"], metrics["tuned"], metrics.get("simple_model") or {}
    train = stats["splits"]["train"]["labels"]
    path = next((a.split("=", 1)[1] for a in manifest["argv"] if a.startswith("dataset.path=")), "data/")
    gap = tuned["macro_f1"] - simple["macro_f1"] if simple else None
    return (f"| {Path(path).name} | {' / '.join(f'{k} {v}' for k, v in train.items())} | {answered(tuned)} | "
            f"{change(base['accuracy'], tuned['accuracy'])} ({fmt(tuned['majority_baseline'])}) | "
            f"{change(base['macro_f1'], tuned['macro_f1'])} ({fmt(tuned.get('majority_macro_f1'))}) | "
            f"{fmt(simple.get('accuracy'))} / {fmt(simple.get('macro_f1'))} | {fmt(gap)} | "
            f"{manifest['seconds'] / 60:.1f} |")


def model_row(name: str, scores: dict, minutes: float | None) -> str:
    trades = (f"{fmt(scores.get('profitable_ratio'))} ({scores['n_trades']})" if scores.get("n_trades") is not None
              else "–")
    shares = (answered(scores) if "confusion_matrix" in scores else
              f"{scores['n_long']} long / {scores['n_short']} short" if "n_long" in scores else "–")
    return (f"| {name} | {shares} | {fmt(scores['accuracy'])} | "
            f"{fmt(scores['macro_f1'])} | {trades} | {fmt(scores.get('total_return'))} | "
            f"{'–' if minutes is None else f'{minutes:.1f}'} |")


def models(named: list[str]) -> None:
    """NAME=RUN_DIR ...: each run's tuned scores; the first run's base model and simple model around them."""
    print("| model | answers (test) | accuracy | macro-F1 | profitable ratio (trades) | total return after 10 bps | "
          "minutes |")
    print("|---|---|---|---|---|---|---|")
    runs = [(name, Path(path)) for name, path in (item.rsplit("=", 1) for item in named)]
    first = json.loads((runs[0][1] / "metrics.json").read_text())
    print(model_row("base model", first["base"], None))
    for name, run_dir in runs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        print(model_row(name, metrics["tuned"], manifest["seconds"] / 60))
    if first.get("simple_model"):
        print(model_row(first["simple_model"]["model"], first["simple_model"], None))
    print(f"\nmajority: accuracy {fmt(first['tuned']['majority_baseline'])}, macro-F1 "
          f"{fmt(first['tuned'].get('majority_macro_f1'))}; always long: total return "
          f"{fmt(first['tuned'].get('always_long_return'))}")


def main(paths: list[str]) -> None:
    if not paths or paths[0] in ("-h", "--help"):
        return print(__doc__)
    if paths[0] == "--models":
        return models(paths[1:])
    if paths[0] == "--decision":
        print("| log | train labels | tuned answers (test) | accuracy base → tuned (majority) | macro-F1 base → tuned "
              "(majority) | simple model accuracy / macro-F1 | macro-F1 tuned - simple | minutes |")
        print("|---|---|---|---|---|---|---|---|")
        for path in paths[1:]:
            print(decision_row(Path(path)))
        return
    print("| command | minutes | accuracy base → tuned | parse rate | perplexity | style distance | "
          "answer length / reference |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
