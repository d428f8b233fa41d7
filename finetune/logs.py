"""One log per run: every library's records and Python's warnings in `<run>/finetune.log`; on the console, our
own phases and whatever is an error.

transformers (and TRL, which logs through it or accelerate) keeps its own stderr handler with propagation off,
so its warnings never reach Hydra's file handler on the root logger; `warnings.warn` (FutureWarning and the
like) goes to stderr only. `route_library_logs` sends both to the root logger. Hydra's job logging
(conf/config.yaml, `hydra.job_logging`) puts `ConsoleFilter` on the console handler: a user sees finetune's
lines and errors, and the library warnings wait in the file. Progress bars: the Trainer's, and one per
generation pass of the eval suite.
"""
import logging


class ConsoleFilter(logging.Filter):
    """Pass finetune's own records and any error; the rest (library info and warnings) goes to the file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "finetune" or record.levelno >= logging.ERROR


def route_library_logs() -> None:
    """transformers, datasets and `warnings.warn` into the root logger (Hydra's run-dir file handler), each once:
    transformers' own stderr handler is removed so nothing prints twice."""
    import datasets
    import transformers
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # weight loading and shard writing: instant at our sizes
    datasets.utils.logging.enable_propagation()
    datasets.disable_progress_bars()  # TRL's and our own passes over a tokenized split: one line each, no bar
    logging.captureWarnings(True)


def headline(metrics: dict) -> str:
    """The scalar metrics, 4 significant digits: one readable console line (metrics.json has everything)."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))
