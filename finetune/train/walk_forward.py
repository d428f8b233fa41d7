"""Walk-forward evaluation of time-stamped data: `eval.walk_forward.folds=K` trains K times, never on the future.

The samples, in time order, are cut into K + 1 windows of equal count (finetune/data/pipeline.py,
`dataset.split=walk_forward`; a cut never separates two samples of one timestamp). Fold k (1..K) trains on
windows 0..k-1 (the most recent `dataset.val_size` of them validate) and tests on window k: each fold is a whole
run in RUN_DIR/fold-k (its own data, adapter, report.md), and RUN_DIR/report.md holds each fold's base and
tuned metrics, their mean (metrics.json's base and tuned, what a sweep ranks), and the baselines of a backtest (always long; always HOLD, which trades nothing and
returns 0). Every fold is checked: its test window starts after the last timestamp it trained or validated on.
"""
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.errors import ConfigError, DataError
from finetune.rundir import METRICS, run_lock, write_json
from finetune.train.recipe import Run, is_main_process, run

# the metrics report.md shows for each fold (and finetune/train/stages.py for each stage), where the eval suite has them
SHOWN = ("accuracy", "parse_rate", "profitable_ratio", "total_return", "sharpe", "max_drawdown",
         "desirable_rate", "undesirable_rate", "outcome_margin", "perplexity")


def check(cfg: DictConfig) -> int:
    folds = cfg.eval.walk_forward.folds
    if type(folds) is not int or folds < 2:
        raise ConfigError(f"eval.walk_forward.folds={folds!r}: a whole number of folds, 2 or more (or null: off)")
    if cfg.dataset.split not in ("temporal", "walk_forward"):
        raise ConfigError(f"eval.walk_forward needs time-ordered samples and dataset.split={cfg.dataset.split}: set "
                          "dataset.split=temporal (the folds then cut by timestamp)")
    if cfg.dry_run:
        raise ConfigError("eval.walk_forward with dry_run=true: a dry run builds one split; drop one of them")
    return folds


def fold_config(cfg: DictConfig, fold: int, folds: int) -> DictConfig:
    fold_cfg = cfg.copy()
    with open_dict(fold_cfg):
        fold_cfg.dataset.split = "walk_forward"
        fold_cfg.dataset.fold = [fold, folds]
        fold_cfg.eval.walk_forward.folds = None
    return fold_cfg


def run_folds(cfg: DictConfig, run_dir: Path) -> Run:
    """Each fold's plain run (finetune/train/recipe.py) in run_dir/fold-k, then report.md and metrics.json over
    them."""
    folds = check(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with run_lock(run_dir) if is_main_process() else nullcontext():
        for fold in range(1, folds + 1):
            result = run(fold_config(cfg, fold, folds), run_dir / f"fold-{fold}")
            rows.append(fold_row(fold, result.stats, result.metrics))
    means = mean(rows)  # base / tuned as in a run's metrics.json (what a sweep's leaderboard ranks), over the folds
    summary = {"base": means["base"], "tuned": means["tuned"], "folds": rows}
    write_json(run_dir / METRICS, summary)
    (run_dir / "report.md").write_text(report(cfg, rows, means), encoding="utf-8")
    return Run(metrics=summary)


def fold_row(fold: int, stats: dict, metrics: dict) -> dict:
    """One fold's windows and metrics; a DataError when it trained on a timestamp at or after its test window."""
    splits = stats["splits"]
    seen = max(t for t in (splits["train"]["last_timestamp"], splits["validation"]["last_timestamp"]) if t)
    if splits["test"]["first_timestamp"] <= seen:
        raise DataError(f"walk-forward fold {fold}: its test window starts at {splits['test']['first_timestamp']}, "
                        f"not after {seen}, the last timestamp it trained or validated on")
    return {"fold": fold, "train_from": splits["train"]["first_timestamp"], "train_to": seen,
            "test_from": splits["test"]["first_timestamp"], "test_to": splits["test"]["last_timestamp"],
            "train_samples": splits["train"]["count"], "test_samples": splits["test"]["count"],
            "base": metrics["base"], "tuned": metrics["tuned"]}


def mean(rows: list[dict]) -> dict:
    out = {}
    for side in ("base", "tuned"):
        keys = [k for k, v in rows[0][side].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[side] = {k: sum(row[side][k] for row in rows) / len(rows) for k in keys
                     if all(isinstance(row[side].get(k), (int, float)) for row in rows)}
    return out


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def report(cfg: DictConfig, rows: list[dict], means: dict) -> str:
    shown = [k for k in SHOWN if k in rows[0]["tuned"]]
    baselines = "always_long_return" in rows[0]["tuned"]
    head = ["fold", "train window", "test window", "train / test samples", *shown]
    if baselines:
        head += ["always long", "always HOLD"]
    lines = [f"# Walk-forward report: {cfg.eval.walk_forward.folds} folds",
             "",
             "Each fold trains on every sample before its test window (the last validates) and tests on the next "
             "window; the runs are in fold-1 ... fold-K. Cells: base -> tuned, on the first eval.max_samples "
             f"({cfg.eval.max_samples}) samples of each test window. The baselines are the backtest's "
             "total return of answering BUY on every test sample, and of answering HOLD (no trade: 0).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(base, tuned):
        return [f"{fmt(base.get(k))} -> {fmt(tuned.get(k))}" for k in shown]
    for row in rows:
        line = [str(row["fold"]), f"{row['train_from']} .. {row['train_to']}", f"{row['test_from']} .. {row['test_to']}",
                f"{row['train_samples']} / {row['test_samples']}", *cells(row["base"], row["tuned"])]
        if baselines:
            line += [fmt(row["tuned"].get("always_long_return")), "0"]
        lines.append("| " + " | ".join(line) + " |")
    line = ["mean", "", "", "", *cells(means["base"], means["tuned"])]
    if baselines:
        line += [fmt(means["tuned"].get("always_long_return")), "0"]
    lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Config: " + ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in
                                          ("model.name", "dataset.path", "seed")), ""]
    return "\n".join(lines)
