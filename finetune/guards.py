"""Stop a run that cannot succeed with a message that says what to change: non-finite loss, out of memory, a full
disk."""
import errno
import math
import shutil
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


def disk_full(err: BaseException) -> bool:
    """ENOSPC (or a quota's EDQUOT), raised by Python's I/O or told in the text of safetensors' Rust error."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def disk_full_advice(err: BaseException, checkpoints: Path, main: bool) -> str:
    """The message for a full disk while training saved a checkpoint. The half-written checkpoint is removed
    (rank 0), which frees its space; the complete ones before it are left as they are."""
    from finetune.resume import complete_checkpoints
    where = getattr(err, "filename", None) or checkpoints
    kept = complete_checkpoints(checkpoints, delete=main)  # names and (rank 0) deletes the half-written one
    last = f"the last complete checkpoint, {kept[-1].name}, is intact and " if kept else ""
    return (f"no space left on {where} ({shutil.disk_usage(checkpoints.parent).free / 2**20:.0f} MiB free now); "
            f"{last}the same command resumes once there is room (lower training.save_total_limit to keep fewer "
            f"checkpoints)")
