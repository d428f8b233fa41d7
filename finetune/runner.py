"""`python -m finetune`: the entry point. Hydra composes the config (conf/ + a recipe) and picks the run dir;
`run` chooses what to run and finetune/train/recipe.py runs it, top to bottom. From Python: compose a config
(call `finetune.config.registration.register()` first) and call `run(cfg, run_dir)`.
"""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune.config import check_training_overrides
from finetune.errors import ConfigError, DataError, Interrupted, TrainingError
from finetune.rundir.logs import hold_records, replay_held_records
from finetune.paths import CONF_DIR
from finetune.config.recipes import check_recipe_overrides
from finetune.config.registration import register
from finetune.rundir import hide_secret_overrides

log = logging.getLogger("finetune")


def run(cfg: DictConfig, run_dir: Path):
    """Train and evaluate as `cfg` says, writing everything into `run_dir`: K walk-forward folds (each a run in
    run_dir/fold-k), an SFT stage then a preference stage (objective.start_from=sft), or one run. Returns the
    run's finetune.train.recipe.Run. The training stack (torch, transformers) is imported here, not at start-up,
    so a command line that fails its checks stops in about a second."""
    from finetune.train import recipe, stages, walk_forward
    if cfg.eval.get("walk_forward", {}).get("folds") is not None:
        return walk_forward.run_folds(cfg, run_dir)
    if cfg.objective.get("start_from") == "sft":
        return stages.run_stages(cfg, run_dir)
    return recipe.run(cfg, run_dir)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    replay_held_records()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except Interrupted as err:  # status.json says interrupted; a sweep stops here too
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # status.json says failed; the leaderboard lists the job as failed, the sweep goes on, and a
            # sweeper (Optuna) counts NaN as a failed trial
            log.exception("job failed: %s", err)
            return float("nan")
        if isinstance(err, (ConfigError, DataError, TrainingError)):  # status.json keeps it too
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        raise
    from finetune.train.recipe import is_main_process
    if is_main_process():  # the last console line: the verdict of report.md, and where the run is
        from finetune.rundir.report import verdict
        said = verdict(result.metrics, cfg.leaderboard.metric, cfg.leaderboard.mode).replace("**", "") \
            if result.metrics.get("tuned") else None
        print(f"{said} Run dir: {run_dir}" if said else f"run dir: {run_dir}")
    # what a sweeper (Optuna) optimises: the leaderboard's metric
    return result.metrics.get("tuned", {}).get(cfg.leaderboard.metric)


def main() -> None:
    """The `finetune` command and `python -m finetune`."""
    register()
    sys.argv[1:] = hide_secret_overrides(sys.argv[1:])  # before Hydra and wandb read argv
    hold_records()  # library records until Hydra's logging is set up: finetune.log, not the console
    try:
        check_recipe_overrides(sys.argv[1:])
        check_training_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    hydra_main()
