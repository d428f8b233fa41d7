"""What kind of answer a model is trained to give. Each task is one class in one file of this package that owns its
answer format: the label set, how an answer is read back (`parse`) and what makes a training answer usable
(`check`), how a label is written as an answer (`render`, `span`), the grammar constrained decoding holds an answer
to (`grammar()`) and how its JSON is laid out (`json_layout`):

    signals     BUY / SELL / HOLD with a confidence, and the market prompt (signals.py: the trade-log builder)
    sentiment   positive / neutral / negative (label.py)
    action      a JSON decision {"action": BUY / SELL / HOLD / CLOSE, ...} (action.py: the decision-records builder)
    first_line  free text whose first line is the label (first_line.py: the finance-news builder: up / down / flat, ...)
    text        free text, no label (base.py: style, news): scored by perplexity and style metrics

A dataset names its task (`dataset.task`), and so does a classification metric (`eval.metrics.*.task`);
the pipeline's validation, the metrics, `finetune.predict`, `finetune.serving.inference` and `finetune.serve` all ask the
task here instead of choosing by name themselves.

`span` finds where a gold answer states its label and `render` writes a label as an answer: likelihood scoring
(finetune/eval/likelihood.py) swaps each candidate label into the gold answer's layout, and answers chosen that way
(or by the simple-model baseline) are read back by the same metrics as generated ones.

A new classification task is one entry in TASKS (e.g. `Label("spam", ("spam", "ham"))`, or a class of its own in a
new file here), a builder that writes samples with that `label`, and the YAML that names them.
"""
from finetune.errors import ConfigError
from finetune.tasks.action import Action
from finetune.tasks.base import Task
from finetune.tasks.first_line import FirstLine
from finetune.tasks.label import SENTIMENT, Label
from finetune.tasks.signals import Signals

TASKS = {task.name: task for task in (Signals(), Label("sentiment", SENTIMENT), Action(), FirstLine(), Task())}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not one of {', '.join(TASKS)} (finetune/tasks/ defines them)")
    return TASKS[name]
