"""One log per run: every library's records and Python's warnings in `<run>/finetune.log`; on the console, our
own phases and whatever is an error.

transformers (and TRL, which logs through it or accelerate) keeps its own stderr handler with propagation off,
so its warnings never reach Hydra's file handler on the root logger; `warnings.warn` (FutureWarning and the
like) goes to stderr only. `route_library_logs` sends both to the root logger. Hydra's job logging
(conf/config.yaml, `hydra.job_logging`) puts `ConsoleFilter` on the console handler: a user sees finetune's
lines and errors, and the library warnings wait in the file. Progress bars: the Trainer's (its loss dicts go to
the file, `quiet_progress`), and one per generation pass of the eval suite. `log_to(run_dir)` sets up the same split
for the commands that run outside Hydra (evaluate, predict, merge, serve).
"""
import contextlib
import io
import logging
import logging.handlers
import sys
from pathlib import Path

log = logging.getLogger("finetune")
FILE_ONLY = {"console": False}   # log.info(..., extra=FILE_ONLY): a finetune record for finetune.log only
CONSOLE_FORMAT = "%(message)s"   # conf/config.yaml's console formatter too: finetune's lines read as plain lines
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"   # Hydra's own file format
# the scalars the console's base / tuned lines show (metrics.json and finetune.log have every one)
HEADLINE = ("perplexity", "accuracy", "macro_f1", "parse_rate", "majority_baseline", "profitable_ratio",
            "total_return", "sharpe", "style_distance", "desirable_rate", "undesirable_rate", "length_ratio")


class ConsoleFilter(logging.Filter):
    """Pass finetune's own records and any error; the rest (library info and warnings) goes to the file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return record.name.split(".")[0] == "finetune" or record.levelno >= logging.ERROR


EARLY = logging.handlers.BufferingHandler(capacity=10_000)  # records from before Hydra sets up logging


def hold_records() -> None:
    """Until Hydra configures logging, a library's record would reach stderr through Python's last-resort handler
    (bitsandbytes warns when trl is first imported, to check a training.* override): hold them for finetune.log."""
    logging.getLogger().addHandler(EARLY)


def replay_held_records() -> None:
    """The held records into the handlers Hydra set up (finetune.log; the console filter as for any record)."""
    logging.getLogger().removeHandler(EARLY)
    for record in EARLY.buffer:
        logging.getLogger(record.name).handle(record)
    EARLY.buffer.clear()


def log_to(run_dir: Path) -> None:
    """For a command outside Hydra: library records and warnings appended to <run_dir>/finetune.log (dropped where
    the run dir is read-only), finetune's lines and errors on stderr. Called before torch, transformers and
    bitsandbytes are imported, so their import-time warnings land in the file too."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = Stderr()
    console.addFilter(ConsoleFilter())
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    handlers = [console]
    try:
        file = logging.FileHandler(Path(run_dir) / "finetune.log", encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        handlers.append(file)
    except OSError:
        handlers.append(logging.NullHandler())  # no file: the library lines are dropped, not printed
    for handler in handlers:
        handler.from_log_to = True
    # a second call (one process, several commands: the tests) replaces its own handlers and keeps the others'
    root.handlers = [h for h in root.handlers if not getattr(h, "from_log_to", False)] + handlers
    route_library_logs()


class Stderr(logging.StreamHandler):
    """sys.stderr as it is when a record comes, not when the handler was made (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def route_library_logs() -> None:
    """transformers, datasets and `warnings.warn` into the root logger (Hydra's run-dir file handler), each once:
    transformers' own stderr handler is removed so nothing prints twice."""
    import datasets
    import transformers
    with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints "[INFO] Running in WANDB offline mode"
        import transformers.integrations.integration_utils  # noqa: F401  (at import, with WANDB_MODE=offline)
    if said.getvalue().strip():
        log.info("%s", said.getvalue().strip(), extra=FILE_ONLY)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # weight loading and shard writing: instant at our sizes
    datasets.utils.logging.enable_propagation()
    datasets.disable_progress_bars()  # TRL's and our own passes over a tokenized split: one line each, no bar
    logging.captureWarnings(True)


def headline(metrics: dict, keys: tuple | None = HEADLINE) -> str:
    """The scalar metrics among `keys` (None: all), 4 significant digits: one readable console line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and (keys is None or k in keys))


def quiet_progress(trainer) -> None:
    """The Trainer's progress bar stays; the loss dict it prints at every logging step goes to finetune.log, and
    its evaluation bar (nested under the training bar: an ESC[A cursor move at each refresh) is not drawn."""
    from transformers.trainer_callback import ProgressCallback

    class Progress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                log.info("trainer: %s", logs, extra=FILE_ONLY)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass

    if trainer.pop_callback(ProgressCallback) is not None:  # absent with disable_tqdm
        trainer.add_callback(Progress())
