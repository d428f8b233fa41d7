"""Which checkpoint a run continues from, and only ever a complete one.

The Trainer writes a checkpoint's files one after another and trainer_state.json last; `durable_checkpoints` makes
every other file reach the disk (fsync) before trainer_state.json is written, so after a node crash a
trainer_state.json vouches for the files beside it. A checkpoint is complete when its trainer_state.json parses
and names the folder's own step, it holds the weights (PEFT's adapter file, or FSDP's sharded
`pytorch_model_fsdp_*` folder), no file in it is empty, every safetensors file is whole (its header parses and
the data it declares is all there) and every torch file (optimizer.pt, scheduler.pt, rng_state.pth, *.bin) is a
whole zip archive (its directory at the end reads and its members lie inside the file). The optimizer is not
required: DeepSpeed keeps it in `global_stepN/`, FSDP in `optimizer_0/` or `optimizer.bin`, and `save_only_model`
writes none. A kill while saving, a crash mid-copy
or a full disk leaves a checkpoint that fails this: it is deleted (saying why) and the one before it is used
(the Trainer itself would resume from the highest-numbered folder and die on it). Every rank computes the same
choice from the same files; only rank 0 deletes. `resume` in the config:
  auto  (default) continue from the run dir's latest complete checkpoint if there is one, else start;
  true  the same, but it is an error if there is nothing to continue;
  false start over, deleting the run dir's checkpoints (and saying so);
  PATH  continue from the latest complete checkpoint of another run dir (or of that checkpoint folder).
"""
import json
import logging
import re
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path

from finetune.errors import ConfigError
from finetune.rundir import CHECKPOINTS

log = logging.getLogger("finetune")
STEP = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model_fsdp_*")


def safetensors_whole(path: Path) -> bool:
    """The file's 8-byte header length, JSON header and the tensor data the header declares are all there."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return False


TORCH_FILES = ("*.pt", "*.pth", "*.bin")  # torch.save's zip archives: optimizer, scheduler, rng state, args


def torch_file_whole(path: Path) -> bool:
    """torch.save's zip archive: its central directory (written last) reads and every member lies inside the file.
    The data is not read: an optimizer of a 7B model is gigabytes."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            return all(i.header_offset + i.compress_size <= size for i in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json (stopped while saving?)"
    match = STEP.match(checkpoint.name)
    if match and state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json says step {state.get('global_step')}, not {match.group(1)}"
    if not any(next(checkpoint.glob(pattern), None) for pattern in WEIGHTS):
        return f"no weights ({', '.join(WEIGHTS)})"
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    empty = [p.relative_to(checkpoint) for p in files if p.stat().st_size == 0]
    if empty:
        return f"{empty[0]} is empty (0 bytes)"
    broken = [p.name for p in sorted(checkpoint.rglob("*.safetensors")) if not safetensors_whole(p)]
    broken += [p.name for pattern in TORCH_FILES for p in sorted(checkpoint.rglob(pattern)) if not torch_file_whole(p)]
    if broken:
        return f"{broken[0]} is truncated or corrupt"
    return None


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its entries (the files' names) reach the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_checkpoints(trainer) -> None:
    """The Trainer's checkpoints, made crash-safe: just before it writes trainer_state.json (the mark of a finished
    checkpoint) every file it wrote into the folder is fsynced, and trainer_state.json itself after. Without it the
    page cache may reach the disk in any order, and a node crash can leave a trainer_state.json beside a 0-byte
    optimizer.pt. Hooked on this trainer's state object only while it saves a checkpoint."""
    save_checkpoint = trainer._save_checkpoint

    def save_durably(model, trial):
        state = trainer.state
        save_state = type(state).save_to_json

        def fsync_then_save(json_path: str) -> None:
            folder = Path(json_path).parent
            for path in [*sorted(folder.rglob("*")), folder, folder.parent]:
                fsync(path)
            save_state(state, json_path)
            fsync(Path(json_path))
            fsync(folder)
        state.save_to_json = fsync_then_save  # an instance attribute: the dataclass's fields are unchanged
        try:
            return save_checkpoint(model, trial)
        finally:
            del state.save_to_json
    trainer._save_checkpoint = save_durably


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and STEP.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP.match(p.name).group(1)))


def complete_checkpoints(folder: Path, delete: bool) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first; each other one is named with why (and deleted)."""
    complete = []
    for checkpoint in checkpoints(folder):
        why = problem(checkpoint)
        if why is None:
            complete.append(checkpoint)
            continue
        log.warning("skipping checkpoint %s: %s%s", checkpoint, why, "; deleting it" if delete else "")
        if delete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return complete


def resume_from(resume, run_dir: Path, main: bool = True) -> str | None:
    """The checkpoint folder to pass to trainer.train(resume_from_checkpoint=...), or None to start fresh. Every
    rank calls it and gets the same answer; only `main` (rank 0) deletes anything."""
    own = run_dir / CHECKPOINTS
    if resume is False or str(resume).lower() == "false":
        if checkpoints(own) and main:
            log.warning("resume=false: deleting %d checkpoint(s) in %s and starting over", len(checkpoints(own)), own)
            shutil.rmtree(own)
        return None
    if resume in (True, "auto") or str(resume).lower() in ("true", "auto"):
        folder, required = own, str(resume).lower() == "true"
    else:
        path = Path(str(resume))
        folder = path if STEP.match(path.name) else path / CHECKPOINTS
        if STEP.match(path.name):
            why = problem(path)
            if why is not None:
                raise ConfigError(f"resume={resume}: that checkpoint is incomplete ({why})")
            return str(path)
        required = True
    found = complete_checkpoints(folder, delete=main)
    if found:
        log.info("resuming from %s", found[-1])
        return str(found[-1])
    if required:
        raise ConfigError(f"resume={resume}: no complete checkpoint in {folder}")
    return None


class RunClock:
    """The seconds a run took over all its segments: a resumed run adds those of the runs before it, up to the
    checkpoint it resumed from. `callback()` writes the count into each checkpoint's trainer_state.json (the
    Trainer keeps an ExportableState callback's state there, as `stateful_callbacks`)."""

    def __init__(self, started: float, checkpoint: str | None):
        self.started = started  # time.perf_counter() when this segment started
        self.before = 0.0
        if checkpoint is not None:
            state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
            self.before = float(state.get("stateful_callbacks", {}).get("RunClock", {}).get("attributes", {})
                                .get("seconds", 0.0))

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def callback(self):
        from transformers import TrainerCallback
        from transformers.trainer_callback import ExportableState
        clock = self

        class RunClock(TrainerCallback, ExportableState):
            def state(self) -> dict:
                return {"args": {}, "attributes": {"seconds": clock.seconds()}}
        return RunClock()


def step_of(checkpoint: str | None) -> int | None:
    """The step a checkpoint holds (read before training: save_total_limit may delete it meanwhile)."""
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


def whole_run(output, state, resumed: int | None):
    """trainer.train()'s TrainOutput with the mean loss over every step of the run. The Trainer's covers the steps
    of its own segment only; a run resumed at step `resumed` adds the logged losses of the steps before it (each
    log is the mean since the one before)."""
    if resumed is None:
        return output
    total, steps, last = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and entry["step"] <= resumed:
            total += entry["loss"] * (entry["step"] - last)
            steps, last = steps + entry["step"] - last, entry["step"]
    segment = state.global_step - resumed
    return output._replace(training_loss=(total + output.training_loss * segment) / max(steps + segment, 1))


def is_final(checkpoint: str | None, max_steps: int) -> bool:
    """Whether `checkpoint` is of the run's last step (`training.max_steps`): a run killed after its final save.
    The Trainer (transformers 5) resumed from there trains one step past max_steps when max_steps ends mid-epoch,
    so the runner takes the trained model from the checkpoint instead."""
    if checkpoint is None or max_steps <= 0:
        return False
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] >= max_steps
