"""Stop a run that cannot succeed with a message that says what to change: non-finite loss, out of memory, a full
disk."""
import errno
import math
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import TrainingError


class StopOnNonFiniteLoss(TrainerCallback):
    """The Trainer logs NaN / inf loss and trains on; we stop at the first one (logging_nan_inf_filter is off)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingError(
                    f"{key} became {value} at step {state.global_step}: lower training.learning_rate "
                    f"(now {args.learning_rate:g}), keep training.max_grad_norm set (now {args.max_grad_norm}), "
                    f"and prefer bf16 to fp16 (training.fp16={args.fp16})")


def out_of_memory_advice(training: dict) -> str:
    return ("CUDA out of memory. Lower memory with: training.per_device_train_batch_size (now "
            f"{training.get('per_device_train_batch_size')}) with a higher training.gradient_accumulation_steps, "
            f"training.max_length (now {training.get('max_length')}), training.activation_checkpointing=true, "
            "training.packing=true (no padding), or method=qlora (4-bit base)")


LOW_SPACE = 256 * 2**20  # bytes free below which a failed torch file write is taken for a full disk
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")  # torch.save's C++ writer, which has no errno


def chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling (__cause__, __context__)."""
    found = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def disk_full(err: BaseException, where: Path | None = None) -> bool:
    """ENOSPC (or a quota's EDQUOT) anywhere in the exception chain: raised by Python's I/O, told in the text of
    safetensors' Rust error, or torch.save's `unexpected pos` / `file write failed` (its C++ writer gives no errno)
    while the disk of `where` has under LOW_SPACE free."""
    for e in chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text or "os error 28" in text:
            return True
        if where is not None and any(marker in text for marker in TORCH_WRITE_FAILED):
            try:
                return shutil.disk_usage(where).free < LOW_SPACE
            except OSError:
                return False
    return False


def full_file(err: BaseException, checkpoints: Path) -> Path | str:
    """The file the full disk stopped: the one an OSError names, else the newest file of the newest checkpoint
    (torch.save's error names none), else the checkpoints folder."""
    for e in chain(err):
        if isinstance(e, OSError) and e.filename:
            return e.filename
    files = [p for p in checkpoints.glob("checkpoint-*/**/*") if p.is_file()] if checkpoints.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else checkpoints


def disk_full_advice(err: BaseException, checkpoints: Path, main: bool) -> str:
    """The one-line message for a full disk while the run wrote a file. status.json says `failed` first (the
    run's record must not be left `running`), then the half-written checkpoint is removed (rank 0), which frees
    its space, and status.json gets the whole message; the complete checkpoints are kept."""
    from finetune.train.resume import complete_checkpoints
    where = full_file(err, checkpoints)
    free = shutil.disk_usage(checkpoints.parent).free
    message = f"no space left on {where} ({free / 2**20:.0f} MiB free)"
    if main:
        status_failed(checkpoints.parent, message)
    kept = complete_checkpoints(checkpoints, delete=main)  # names and (rank 0) deletes the half-written one
    last = f"the last complete checkpoint, {kept[-1].name}, is intact and " if kept else ""
    message = (f"{message}; {last}the same command resumes once there is room (lower training.save_total_limit to "
               f"keep fewer checkpoints)")
    if main:
        status_failed(checkpoints.parent, message)
    return message


@contextmanager
def told_if_disk_full(where: Path):
    """A command's writes (evaluate, predict, merge): a full disk is one line naming the file (or `where`) and exit
    status 1, not a traceback."""
    try:
        yield
    except Exception as err:
        if not disk_full(err):
            raise
        target = next((e.filename for e in chain(err) if isinstance(e, OSError) and e.filename), None) or where
        print(f"error: no space left on {target} ({shutil.disk_usage(Path(where).parent).free / 2**20:.0f} MiB "
              f"free); free some space and run the same command again", file=sys.stderr)
        sys.exit(1)


def status_failed(run_dir: Path, message: str) -> None:
    from finetune.rundir import set_status
    try:
        set_status(run_dir, "failed", message)
    except OSError:  # the disk is still full (the first write): written again once the half checkpoint is gone
        pass
