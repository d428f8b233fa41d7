"""The errors a user can act on, each printed as one line, and the interruption of a run by a signal."""
import signal


class ConfigError(Exception):
    """A config key, value or combination is wrong; the message names the key and the choices."""


class DataError(Exception):
    """Input data is missing or malformed; the message names the file, row/line and column."""


class TrainingError(Exception):
    """Training cannot go on as configured (non-finite loss, out of memory); the message says what to change."""


class Interrupted(Exception):
    """A signal (SIGTERM from a scheduler, Ctrl-C) stopped the run; `step` is the checkpoint saved, if any."""

    def __init__(self, signum: int, step: int | None):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        saved = (f"at step {step}, checkpoint-{step} saved; the same command resumes from it" if step is not None
                 else "before training had a step to save; the same command starts again (from the last "
                      "checkpoint, if there is one)")
        super().__init__(f"{name} {saved}")
