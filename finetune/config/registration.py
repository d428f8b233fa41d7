"""What composing our config needs, registered in one call: `register()`.

The `recipe` group (recipes/ served as a Hydra config source, finetune/config/recipes.py) and three resolvers the
config files use: `${sample_data:NAME}` (a shipped sample file), `${launch_time:FMT}` (the run dir's time
stamp, shared by DDP ranks) and `${run_name:RECIPE}`. The CLI calls it before Hydra composes; call it yourself
before `hydra.compose(...)` from Python (tests/conftest.py does). Calling it again does nothing new.
"""
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from finetune.config import recipes
from finetune.paths import SAMPLE_DATA_DIR


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    recipes.register()
    OmegaConf.register_new_resolver("sample_data", lambda name: str(SAMPLE_DATA_DIR / name), replace=True)
    OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_name", lambda recipe: "default" if recipe in (None, "none")
                                    else str(recipe).replace("/", "-"), replace=True)


def launch_time(fmt: str) -> str:
    """The run dir's time stamp. Hydra's ${now:} is per process, and DDP ranks started a second apart would
    write to different dirs; ranks share their launcher (torchrun, accelerate), so they take its start time."""
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        try:
            ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass  # not Linux: set hydra.run.dir explicitly for multi-process runs
    return time.strftime(fmt, time.localtime(started))
