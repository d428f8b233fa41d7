"""`outcome`: for decision records, +1 for an answer that takes the recorded action of a decision that went well
and -1 for one that takes another; -1 for repeating the action of a decision that went badly and +1 for any other.
Outcomes in neither list (acceptable_loss, neutral) earn 0; an answer that does not parse earns -1, as a wrong
one: never more than a readable answer, or a policy would learn to write nothing rather than risk a wrong action.
The samples need both kinds: dataset.builder.undesirable_outcomes=[bad] keeps the bad decisions.

    outcome: {_target_: finetune.rewards.outcome.Outcome, weight: 1.0, good: [excellent, good], bad: [bad]}
"""
from finetune import tasks
from finetune.errors import ConfigError
from finetune.rewards import answer_text


class Outcome:
    reads = ("outcome",)

    def __init__(self, task: str = "action", good=("excellent", "good"), bad=("bad",)):
        self.task, self.good, self.bad = tasks.get(task), set(good), set(bad)
        if self.good & self.bad:
            raise ConfigError(f"objective.rewards.outcome: {sorted(self.good & self.bad)[0]} is in both good and bad")

    def __call__(self, completions, label=None, outcome=None, **_) -> list[float | None]:
        if outcome is None or label is None:
            raise ConfigError("objective.rewards.outcome: the samples carry no outcome; use dataset=decision_records "
                              "(with dataset.builder.undesirable_outcomes=[bad]), or drop the reward "
                              "(objective.rewards.outcome=null)")
        return [self.one(answer_text(c), taken, judged) for c, taken, judged in zip(completions, label, outcome)]

    def one(self, answer: str, taken: str | None, judged: str | None) -> float | None:
        action = self.task.parse(answer)[0]
        if action is None:
            return -1.0
        agrees = action == taken
        if judged in self.good:
            return 1.0 if agrees else -1.0
        if judged in self.bad:
            return -1.0 if agrees else 1.0
        return 0.0
