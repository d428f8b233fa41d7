"""Stop a run that cannot succeed with a message that says what to change: non-finite loss, out of memory."""
import math

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
