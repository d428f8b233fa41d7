"""Preemption: SIGTERM or SIGINT (SLURM, Kubernetes, a Ctrl-C) ends a run at a step boundary, with a checkpoint.

A cluster preempts with SIGTERM and kills some seconds later (SLURM's KillWait and Kubernetes' grace period are
30 s by default). `Preemption` holds both signals for the whole run:
- during training a signal only sets a flag. At the end of the step in progress every rank agrees (an
  all-reduce, so a rank that got no signal stops at the same step), the Trainer saves checkpoint-N and stops,
  and the runner raises `Interrupted`: status.json says interrupted at step N, the exit code is 128 + the
  signal, and the same command resumes from checkpoint-N (resume=auto). The wait is one step at most.
- before or after training a signal raises `Interrupted` at once: nothing new to save (the data cache, the
  checkpoints and a saved adapter are whole: every write in the run dir is atomic).
A job requeued by SLURM or the submitit launcher runs the same command in the same run dir, so it resumes.
"""
import signal
import threading
from contextlib import contextmanager

from finetune.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The signal handlers (`installed`) and, through `callback()`, the Trainer's view of them. Not a
    TrainerCallback itself: importing transformers' trainer modules costs ~2.5 s (peft, bitsandbytes), which a
    dry run, merge or serve never needs."""

    def __init__(self):
        self.signum: int | None = None   # the signal received (on this rank)
        self.training = False
        self.stopped_at: int | None = None  # the step whose checkpoint the Trainer saved before stopping

    def handle(self, signum, frame) -> None:
        self.signum = signum
        if not self.training:
            raise Interrupted(signum, None)

    @contextmanager
    def installed(self):
        """The handlers for the block (signals reach the main thread only: elsewhere, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def callback(self):
        """A TrainerCallback that hands the Trainer's events to this object."""
        from transformers import TrainerCallback
        preemption = self

        class Steps(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                preemption.on_train_begin(args, state, control)

            def on_train_end(self, args, state, control, **kwargs):
                preemption.on_train_end(args, state, control)

            def on_step_end(self, args, state, control, **kwargs):
                preemption.on_step_end(args, state, control)
        return Steps()

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if self.signum is not None:  # it came while the trainer was being set up
            raise Interrupted(self.signum, None)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def agreed(self, args) -> bool:
        """Whether any rank got a signal (one all-reduce of a flag per step under DDP)."""
        stop = self.signum is not None
        import torch.distributed as dist
        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            import torch
            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def raise_if_stopped(self) -> None:
        """After trainer.train(): the run was stopped by a signal (here or on another rank)."""
        if self.stopped_at is not None:
            raise Interrupted(self.signum or signal.SIGTERM, self.stopped_at)
