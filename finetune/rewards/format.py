"""`format`: 1 when the answer parses under the task (a signal with BUY / SELL / HOLD, a JSON decision with an
action), else 0. It pays for a readable answer only: a rising `format` beside a flat `pnl` is a model learning the
layout, not the trade (report.md plots both).

    format: {_target_: finetune.rewards.format.Format, weight: 0.2, task: signals}
"""
from finetune import tasks
from finetune.rewards import answer_text


class Format:
    reads = ()  # the answer alone: no outcome, nothing that could leak

    def __init__(self, task: str):
        self.task = tasks.get(task)

    def __call__(self, completions, **_) -> list[float]:
        return [float(self.task.parse(answer_text(c))[0] is not None) for c in completions]
