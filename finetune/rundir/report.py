"""report.md and its plots: what ran, base vs tuned side by side, data balance, loss curves, confusion
matrices, sentence-length histograms, the backtest's equity curves; for text generation, a blind A/B sheet."""
import random
import statistics
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
    """The loss curves; for a preference objective (DPO / KTO: TRL logs rewards/chosen, rewards/rejected) a second
    panel with the implicit rewards, where the chosen answers should rise above the rejected ones."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return False
    rewards = {f"{prefix}{key}": [(e["step"], e[f"{prefix}rewards/{key}"]) for e in log_history
                                  if f"{prefix}rewards/{key}" in e]
               for prefix in ("", "eval_") for key in ("chosen", "rejected")}
    rewards = {name: points for name, points in rewards.items() if points}
    rewards.update(grpo_series(log_history, "rewards/", "/mean"))  # GRPO: each reward's mean per step
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(11 if rewards else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    for points, name in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="." if name == "eval" else None, label=name)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if rewards:
        ax = axes[0][1]
        for name, points in rewards.items():
            points = [(step, value) for step, value in points if value is not None] or [(0, float("nan"))]
            ax.plot(*zip(*points), marker="." if name.startswith("eval") else None, label=name.replace("_", " "))
        ax.set(xlabel="step", ylabel="reward", title="Rewards (mean per step)" if grpo_series(log_history, "rewards/",
               "/mean") else "Rewards (chosen should rise above rejected)")
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, path)
    return True


def grpo_series(log_history: list[dict], prefix: str, suffix: str = "") -> dict[str, list]:
    """{name: [(step, value)]} of the train logs' `prefix<name><suffix>` keys (GRPO's rewards/<name>/mean,
    answers/<label>)."""
    names = sorted({k[len(prefix):len(k) - len(suffix)] for e in log_history for k in e
                    if k.startswith(prefix) and k.endswith(suffix) and k.count("/") == prefix.count("/") +
                    suffix.count("/") and not k.startswith("eval_")})
    return {name: [(e["step"], e[f"{prefix}{name}{suffix}"]) for e in log_history
                   if f"{prefix}{name}{suffix}" in e] for name in names}  # None: no answer this reward scored


def shown(value) -> str:
    return "– (no answer it scores)" if value is None else fmt(value)


def plot_answers(log_history: list[dict], path: Path) -> bool:
    """GRPO: the share of each answer per step, the collapse guard's view (one line near 1 = one answer)."""
    shares = grpo_series(log_history, "answers/")
    if not shares:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in shares.items():
        ax.plot(*zip(*points), label=name)
    ax.set(xlabel="step", ylabel="share of the answers", ylim=(0, 1), title="Answers per step")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
    return True


def grpo_table(log_history: list[dict]) -> str:
    """GRPO's first and last steps side by side (the mean of up to 10 each: a step answers a few prompts): each
    reward's mean, each answer's share, the share of groups whose answers all scored alike (they teach nothing: a
    policy that gives one answer everywhere stops learning), the KL to the reference. format up while pnl stays
    flat is a model learning the layout, not the trade."""
    rows = [(f"reward {name} (mean)", points) for name, points in grpo_series(log_history, "rewards/", "/mean").items()]
    rows += [(f"answers {name} (share)", points) for name, points in grpo_series(log_history, "answers/").items()]
    for key, name in (("frac_reward_zero_std", "groups scored alike (no gradient)"), ("kl", "kl to the reference")):
        points = [(e["step"], e[key]) for e in log_history if isinstance(e.get(key), (int, float))]
        rows += [(name, points)] if points else []
    if not rows:
        return ""
    n = max(1, min(10, max(len(points) for _, points in rows) // 2))
    lines = [f"| | first {n} steps (mean) | last {n} steps (mean) |", "|---|---|---|"]
    lines += [f"| {name} | {shown(mean(points[:n]))} | {shown(mean(points[-n:]))} |" for name, points in rows if points]
    return "\n".join(lines)


def mean(points: list) -> float | None:
    """The mean of the (step, value) points' values; None where no step had one."""
    values = [value for _, value in points if value is not None]
    return statistics.fmean(values) if values else None


def plot_labels(stats: dict, path: Path, order: list[str] | None = None) -> bool:
    """Samples per label and split, labels in `order` (the confusion matrix's rows) and any others after them."""
    splits = {name: s["labels"] for name, s in stats["splits"].items() if s["count"]}
    found = {label for counts in splits.values() for label in counts}
    labels = [label for label in order or [] if label in found] + sorted(found - set(order or []))
    if len(labels) < 2 or len(labels) > 30:  # free text (label None) or an id-like column: nothing to show
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(splits)
    for i, (name, counts) in enumerate(splits.items()):
        ax.bar([x + i * width for x in range(len(labels))], [counts.get(label, 0) for label in labels],
               width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set(ylabel="samples", title="Label balance")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over one
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
    ax.set(xlabel="held-out trade (in time order)", ylabel="equity (1 = start; 1.1 = +10 %)",
           title="Backtest equity (after costs)")
    ax.legend()
    save(fig, path)
    return True


def write_ab_sheet(run_dir: Path, samples: list[dict], base: list[str], tuned: list[str], seed: int,
                   question: str = "which answer reads more like the author?") -> None:
    """Blind test: each prompt's answers A and B in random order; the key is a separate file.
    `question`: what the judge decides (the style corpus asks for the author's voice, other text tasks for the
    better answer)."""
    rng = random.Random(seed)
    lines, key = ["# Blind A/B sheet", "", f"For each prompt, {question} "
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
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"  # parameter counts: 4,718,592
    return str(value)


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Sizes and timings of an eval, not its quality: shown in their own table. Anything else numeric is quality.
# n_*, *_seconds, *_per_second and latency* are counts by their names (is_count); these three are not.
COUNT_KEYS = {"perplexity_tokens", "answer_tokens_mean", "reference_tokens_mean"}
# Shares in [0, 1]: a verdict states their differences in percentage points.
PROPORTIONS = {"accuracy", "macro_f1", "parse_rate", "win_rate", "profitable_ratio", "stop_rate"}
# A trivial strategy's score for a metric, from the same metrics dict: what tuning must beat besides the base.
BASELINES = {"accuracy": ("majority_baseline", "majority baseline"), "macro_f1": ("majority_macro_f1", "majority baseline"),
             "total_return": ("always_long_return", "always-long baseline")}
PEFT_METHODS = {"LoraConfig": "lora", "PrefixTuningConfig": "prefix", "PromptTuningConfig": "prompt",
                "IA3Config": "ia3"}


def is_count(name: str) -> bool:
    return (name in COUNT_KEYS or name.startswith("n_") or name.endswith(("_seconds", "_per_second"))
            or name.startswith("latency"))


def method_name(method: dict, quantized: bool, choice: str | None = None) -> str:
    """The method as a user names it: the Hydra choice (`method=dora`) when there is one, else from the peft
    class: LoraConfig -> lora (dora with use_dora, qlora on a quantized base), PrefixTuningConfig -> prefix."""
    if choice:
        return str(choice)
    if method is None:
        return "full"
    target = str(method.get("_target_", "")).rsplit(".", 1)[-1]
    name = PEFT_METHODS.get(target, target.removesuffix("Config").lower() or "none")
    if name == "lora" and method.get("use_dora"):
        return "dora"
    if name == "lora" and quantized:
        return "qlora"
    return name


def change(name: str, base, tuned) -> str:
    """tuned - base; for perplexity also the relative change in %."""
    if not (number(base) and number(tuned)):
        return "–"
    text = f"{tuned - base:+.4g}"
    if name == "perplexity" and base:
        text += f" ({(tuned - base) / base * 100:+.1f}%)"
    return text


def table(metrics: dict, names: list[str]) -> str:
    """base | tuned | change, and the simple model's value where metrics.json has one."""
    base, tuned, simple = metrics.get("base", {}), metrics.get("tuned", {}), metrics.get("simple_model")
    extra = " simple model |" if simple else ""
    rows = [f"| metric | base | tuned | change (tuned - base) |{extra}", "|---|---|---|---|" + ("---|" if simple else "")]
    rows += [f"| {n} | {fmt(base.get(n, '–'))} | {fmt(tuned.get(n, '–'))} | {change(n, base.get(n), tuned.get(n))} |"
             + (f" {fmt(simple.get(n, '–'))} |" if simple else "") for n in names]
    if simple:
        rows += ["", f"Simple model: {simple['model']}, fitted on {simple['train_samples']} train samples, scored "
                 "on the same held-out samples (finetune/eval/simple_model.py)."]
    return "\n".join(rows)


def scalar_names(metrics: dict) -> list[str]:
    base, tuned = metrics.get("base", {}), metrics.get("tuned", {})
    return [k for k in {**base, **tuned} if not isinstance(base.get(k, tuned.get(k)), (dict, list))]


def quality_table(metrics: dict) -> str:
    return table(metrics, [n for n in scalar_names(metrics) if not is_count(n)])


def counts_table(metrics: dict) -> str | None:
    names = [n for n in scalar_names(metrics) if is_count(n)]
    return table(metrics, names) if names else None


def metrics_table(metrics: dict) -> str:
    """Quality metrics, then (when any) the counts and timings, as markdown tables."""
    counts = counts_table(metrics)
    return quality_table(metrics) + (f"\n\nCounts and timings:\n\n{counts}" if counts else "")


def main_metric(metrics: dict, metric: str | None, mode: str | None) -> tuple[str | None, str]:
    """The metric the verdict is about: `leaderboard.metric` / `mode` when the tuned scores have it, else
    perplexity (min), else None."""
    tuned = metrics.get("tuned", {})
    if metric and number(tuned.get(metric)):
        return metric, mode if mode in ("min", "max") else "max"
    if number(tuned.get("perplexity")):
        return "perplexity", "min"
    return None, mode or "max"


def show(name: str, value: float) -> str:
    return f"{value:.3f}" if name in PROPORTIONS else fmt(float(value))


def difference(name: str, value: float, other: float) -> str:
    if name in PROPORTIONS:
        return f"{(value - other) * 100:+.1f} points"
    if name == "perplexity" and other:
        return f"{(value - other) / other * 100:+.1f}%"
    return f"{value - other:+.4g}"


def rivals(metrics: dict, name: str) -> list[tuple[str, float]]:
    """What the tuned `name` is compared with: the base, the trivial baseline of the metric (majority, always-long)
    and the simple model (finetune/eval/simple_model.py), each where measured."""
    base, tuned, simple = metrics.get("base", {}), metrics.get("tuned", {}), metrics.get("simple_model") or {}
    found = [("base", base[name])] if number(base.get(name)) else []
    key, label = BASELINES.get(name, (None, None))
    if key and number(tuned.get(key, base.get(key))):
        found.append((label, tuned.get(key, base.get(key))))
    if number(simple.get(name)):
        found.append(("simple model", simple[name]))
    return found


def comparison(metrics: dict, name: str, mode: str) -> tuple[list[str], str]:
    """(the rivals the tuned value did not beat, 'accuracy 0.804 tuned vs 0.000 base and ... (+80.4 points vs
    base, ...)')."""
    value = metrics["tuned"][name]
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    others = rivals(metrics, name)
    text = f"{name} {show(name, value)} tuned"
    if others:
        listed = [f"{show(name, v)} {label}" for label, v in others]
        text += " vs " + (", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0])
        text += " (" + ", ".join(f"{difference(name, value, v)} vs {'the ' if label != 'base' else ''}{label}"
                                 for label, v in others)
        text += ", lower is better)" if mode == "min" else ")"
    return [label for label, v in others if not better(value, v)] or ([] if others else ["nothing measured"]), text


def verdict(metrics: dict, metric: str | None = None, mode: str | None = None) -> str:
    """report.md's first line after the title, and the run's last console line: did tuning help?

    A classification run (the tuned scores have an accuracy) helped only when accuracy and macro-F1 both beat the
    base, the majority baseline and the simple model; otherwise the line names what it did not beat. A text run
    is judged on `metric` (leaderboard.metric, `mode` min or max) against the base, else on perplexity."""
    tuned = metrics.get("tuned", {})
    if number(tuned.get("accuracy")):
        names = ["accuracy"] + (["macro_f1"] if number(tuned.get("macro_f1")) else [])
        judged = [(name, *comparison(metrics, name, "max")) for name in names]
        missed = [f"{label} on {name}" for name, lost, _ in judged for label in lost]
        line = (f"**Verdict: tuning {'did not help' if missed else 'helped'}.** "
                + "; ".join(text for _, _, text in judged) + ".")
        if missed:
            line += f" Not beaten: {', '.join(missed)}."
        if number(tuned.get("total_return")):
            line += f" Backtest: {comparison(metrics, 'total_return', 'max')[1]}."
        return line
    name, mode = main_metric(metrics, metric, mode)
    if name is None:
        wanted = f"{metric} nor perplexity" if metric and metric != "perplexity" else "perplexity"
        return f"**Verdict: unknown.** The eval suite reported neither {wanted}; see the tables below."
    missed, text = comparison(metrics, name, mode)
    line = f"**Verdict: tuning {'did not help' if missed else 'helped'}.** {text}."
    if name != metric and metric:
        line += f" (leaderboard.metric {metric} was not measured; perplexity stands in.)"
    return line


def write_report(run_dir: Path, summary: dict, metrics: dict, stats: dict, log_history: list[dict],
                 metric: str | None = None, mode: str | None = None) -> None:
    """report.md: the verdict on `metric` (leaderboard.metric, `mode` min or max) first, then what ran, base vs
    tuned quality with the change, counts and timings, plots, data and training."""
    lines = [f"# Run report: {summary['recipe']}", "", verdict(metrics, metric, mode), "", "| | |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary.items()]
    lines += ["", "## Base vs tuned (held-out test split)", "", quality_table(metrics), ""]
    counts = counts_table(metrics)
    if counts:
        lines += ["### Counts and timings", "", counts, ""]
    plots = [(plot_confusion(metrics, run_dir / "confusion.png"), "Confusion matrices", "confusion.png"),
             (plot_equity(metrics, run_dir / "equity.png"), "Backtest", "equity.png"),
             (plot_sentence_lengths(metrics, run_dir / "sentence_lengths.png"), "Style", "sentence_lengths.png")]
    lines += [f"### {title}\n\n![{title}]({name})\n" for made, title, name in plots if made]
    lines += ["## Data", "", "| split | samples | labels | tokens p50 / p99 |", "|---|---|---|---|"]
    for name, s in stats["splits"].items():
        unlabelled = (None, "None", "null")  # the key of label-less samples, in memory / read back from JSON
        labels = ", ".join(f"{k}: {v}" if k not in unlabelled else f"no label: {v}" for k, v in s["labels"].items())
        labels = "–" if all(k in unlabelled for k in s["labels"]) else labels  # free text: nothing to count
        lines.append(f"| {name} | {s['count']} | {labels} | {s['tokens']['p50']:.0f} / {s['tokens']['p99']:.0f} |")
    if stats.get("dropped"):
        lines += ["", "Dropped rows: " + ", ".join(f"{k}: {v}" for k, v in stats["dropped"].items())]
    order = metrics.get("tuned", {}).get("confusion_matrix", {}).get("labels")  # labels.png as confusion.png
    if plot_labels(stats, run_dir / "labels.png", order):
        lines += ["", "![label balance](labels.png)"]
    if plot_loss(log_history, run_dir / "loss.png"):
        lines += ["", "## Training", "", "![loss curves](loss.png)"]
    grpo = grpo_table(log_history)
    if grpo:  # objective=grpo: the rewards beside the loss, and what the policy answered
        lines += ["", "### Rewards and answers (GRPO)", "", grpo]
        lines += ["", f"**Warning: {summary['answer collapse']}**"] if summary.get("answer collapse") else []
        if plot_answers(log_history, run_dir / "answers.png"):
            lines += ["", "![answers per step](answers.png)"]
    if (run_dir / "ab_sheet.md").exists():
        lines += ["", "Blind A/B sheet: [ab_sheet.md](ab_sheet.md) (key: ab_key.json)."]
    write_text(run_dir / "report.md", "\n".join(lines) + "\n")
