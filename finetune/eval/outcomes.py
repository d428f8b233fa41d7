"""How often the model repeats the held-out decisions that went well, and the ones that went badly.

Held-out samples marked "desirable" (decision records with dataset.builder.undesirable_outcomes, generic
format=kto) say what happened after the recorded answer: true for a decision that went well, false for one that
went badly. Each generated answer is parsed for the task's label (finetune/tasks/: the action of a JSON
decision, the signal of a trade signal); the model repeats a decision when its label is the recorded one.

    {"desirable_rate": 0.62, "undesirable_rate": 0.31, "outcome_margin": 0.31,
     "n_desirable": 50, "n_undesirable": 16}

- desirable_rate: share of the desirable samples whose decision the model repeats (higher is better);
- undesirable_rate: share of the undesirable ones it repeats (lower is better);
- outcome_margin: desirable_rate - undesirable_rate, what KTO should raise.
A rate is None with no sample of its kind; nothing at all is returned when no sample carries the mark.
"""
from finetune import tasks


class Outcomes:
    needs_generation = True
    reads_undesirable = True   # finetune/eval/suite.py gives the other metrics only the desirable samples

    def __init__(self, task: str = "action"):
        if task not in tasks.TASKS or not tasks.TASKS[task].labels:
            raise ValueError(f"Outcomes: task={task!r} is not a labelled task (of "
                             f"{', '.join(t for t, v in tasks.TASKS.items() if v.labels)})")
        self.task = tasks.TASKS[task]

    def __call__(self, *, samples: list[dict], outputs: list[str], model=None, tokenizer=None) -> dict:
        if len(samples) != len(outputs):
            raise ValueError(f"Outcomes: {len(samples)} samples but {len(outputs)} outputs")
        repeats = {True: [], False: []}
        for sample, text in zip(samples, outputs):
            if "desirable" in sample:
                label, _ = self.task.parse(text, self.task.labels)
                repeats[sample["desirable"]].append(label is not None and label == str(sample["label"]))
        if not repeats[True] and not repeats[False]:
            return {}
        good, bad = (sum(r) / len(r) if r else None for r in (repeats[True], repeats[False]))
        return {"desirable_rate": good, "undesirable_rate": bad,
                "outcome_margin": good - bad if good is not None and bad is not None else None,
                "n_desirable": len(repeats[True]), "n_undesirable": len(repeats[False])}
