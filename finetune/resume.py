"""Which checkpoint a run continues from, and only ever a complete one.

The Trainer writes a checkpoint's files one after another and trainer_state.json last, so a checkpoint
whose trainer_state.json parses and whose adapter, optimizer and scheduler files exist is complete. A kill
while saving leaves one without them: it is deleted before resuming (the Trainer itself would resume from
the highest-numbered folder and die on it). `resume` in the config:
  auto  (default) continue from the run dir's latest complete checkpoint if there is one, else start;
  true  the same, but it is an error if there is nothing to continue;
  false start over, deleting the run dir's checkpoints (and saying so);
  PATH  continue from the latest complete checkpoint of another run dir (or of that checkpoint folder).
"""
import json
import logging
import re
import shutil
from pathlib import Path

from finetune.errors import ConfigError
from finetune.rundir import CHECKPOINTS

log = logging.getLogger("finetune")
STEP = re.compile(r"^checkpoint-(\d+)$")
NEEDED = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def is_complete(checkpoint: Path) -> bool:
    if not all((checkpoint / name).is_file() for name in NEEDED):
        return False
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and STEP.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP.match(p.name).group(1)))


def drop_incomplete(folder: Path) -> None:
    for checkpoint in checkpoints(folder):
        if not is_complete(checkpoint):
            log.warning("deleting incomplete checkpoint %s (the run was stopped while saving it)", checkpoint)
            shutil.rmtree(checkpoint)


def resume_from(resume, run_dir: Path) -> str | None:
    """The checkpoint folder to pass to trainer.train(resume_from_checkpoint=...), or None to start fresh."""
    own = run_dir / CHECKPOINTS
    if resume is False or str(resume).lower() == "false":
        if checkpoints(own):
            log.warning("resume=false: deleting %d checkpoint(s) in %s and starting over", len(checkpoints(own)), own)
            shutil.rmtree(own)
        return None
    if resume in (True, "auto") or str(resume).lower() in ("true", "auto"):
        folder, required = own, str(resume).lower() == "true"
    else:
        path = Path(str(resume))
        folder = path if STEP.match(path.name) else path / CHECKPOINTS
        if STEP.match(path.name):
            if not is_complete(path):
                raise ConfigError(f"resume={resume}: that checkpoint is incomplete (missing or unreadable "
                                  f"{', '.join(NEEDED)})")
            return str(path)
        required = True
    drop_incomplete(folder)
    found = checkpoints(folder)
    if found:
        log.info("resuming from %s", found[-1])
        return str(found[-1])
    if required:
        raise ConfigError(f"resume={resume}: no complete checkpoint in {folder}")
    return None
