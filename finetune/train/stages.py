"""SFT, then a preference stage (DPO / KTO) from its adapter, in one command: `objective.start_from=sft`.

1. The SFT stage is a whole run in RUN_DIR/sft: the composed config with objective=sft, `training` as composed
   (a fit's CPU values included) and undesirable samples out of train and validation (dataset.undesirable=drop).
2. The preference stage runs in RUN_DIR itself from RUN_DIR/sft/adapter (objective.start_from=RUN_DIR/sft): the
   adapter trains on, TRL keeps a frozen copy of it as the reference, `objective.training` goes over `training`.
   Its "base" scores are the SFT model's, so its report.md compares SFT with SFT -> DPO on the same held-out
   samples (both stages split the same samples with the same seed; test keeps every sample).

RUN_DIR is then an ordinary run dir (adapter/ is the final adapter: predict, serve and evaluate read it as any),
and its report.md and metrics.json add the three models side by side ("stages": the base model, after SFT,
after SFT -> preference). A command run again on the same dir does not train a completed SFT stage again.
"""
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, open_dict

from finetune.config import check_config
from finetune.leaderboard import read_json
from finetune.rundir import METRICS, STATUS, run_lock, write_json, write_text
from finetune.train.recipe import Run, is_main_process, run
from finetune.train.walk_forward import SHOWN, fmt

SFT_DIR = "sft"


def sft_config(cfg: DictConfig) -> DictConfig:
    sft = cfg.copy()
    with open_dict(sft):
        sft.objective = {"name": "sft"}
        sft.dataset.undesirable = "drop"
    return sft


def preference_config(cfg: DictConfig, sft_dir: Path) -> DictConfig:
    preference = cfg.copy()
    with open_dict(preference):
        preference.objective.start_from = str(sft_dir)
    return preference


def completed(run_dir: Path) -> dict | None:
    """A finished run's metrics.json, or None."""
    if read_json(run_dir / STATUS).get("status") != "completed":
        return None
    return read_json(run_dir / METRICS) or None


def run_stages(cfg: DictConfig, run_dir: Path) -> Run:
    """The SFT stage's run in RUN_DIR/sft (unless it completed), then the preference stage's in `run_dir`, both
    the plain run of finetune/train/recipe.py; the stages table added to its report.md and metrics.json."""
    main = is_main_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir) if main else nullcontext():  # the whole two-stage run, not each stage alone
        check_config(cfg, None)  # the preference stage's settings too, before the SFT stage trains
        sft_dir = run_dir / SFT_DIR
        sft = completed(sft_dir)
        if sft is None:
            sft = run(sft_config(cfg), sft_dir).metrics
        result = run(preference_config(cfg, sft_dir), run_dir)
    if not main or result.skipped:
        return result
    name = cfg.objective.name.upper()
    stages = {"base": sft["base"], "sft": sft["tuned"], name.lower(): result.metrics["tuned"]}
    result.metrics["stages"] = stages
    write_json(run_dir / METRICS, result.metrics)
    report = run_dir / "report.md"
    write_text(report, report.read_text(encoding="utf-8") + table(stages, name))
    return result


def table(stages: dict, name: str) -> str:
    shown = [k for k in SHOWN if any(isinstance(s.get(k), (int, float)) for s in stages.values())]
    lines = ["", f"## Stages: base -> SFT -> SFT + {name}", "",
             f"The same held-out samples. SFT: {SFT_DIR}/ (its report.md); {name}: this run, from the SFT adapter, "
             "with the SFT model as the reference.", "",
             f"| metric | base model | after SFT | after SFT + {name} |", "|---|---|---|---|"]
    for key in shown:
        lines.append(f"| {key} | " + " | ".join(fmt(s.get(key)) for s in stages.values()) + " |")
    return "\n".join(lines) + "\n"
