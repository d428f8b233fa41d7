"""objective=grpo: trl.GRPOTrainer learning from rewards on the model's own answers (finetune/rewards/).

Each step the policy answers every prompt `num_generations` times; the rewards score each answer against what the
sample records (its realised move, its decision's outcome), and GRPO moves the policy towards the answers that
scored above their group's mean. The answers are the model's own, so a reward can pay a SELL the log never took.

Here, beside TRL:
- `rows`: the GRPO rows, the prompt (every message but the last) and the columns rewards read: label,
  timestamp, desirable, and each scalar of the sample's meta (return_percent, outcome, pnl, known_at, ...).
- `check_leakage`: a train sample whose outcome was known (meta `known_at`: a decision's time + its duration, a
  trade's exit time) after the test window starts is refused when a reward reads outcomes (or left out:
  objective.leakage=drop).
- `GRPOTrainer`: TRL's, with the answer distribution logged each step (answers/<label>: its share of the step's
  answers, answers/unparsed) and a warning when one answer's share of the last COLLAPSE_WINDOW answers (several
  steps: one step answers a few prompts, which may all want the same answer) reaches objective.collapse_share: a
  policy that answers HOLD to everything earns a safe 0 from `pnl` and learns nothing more (TRL logs
  rewards/<name>/mean and /std, and kl to the reference with beta > 0).
"""
import collections
import logging

import datasets
import trl

from finetune import tasks
from finetune.errors import DataError
from finetune.rewards import answer_text

log = logging.getLogger("finetune")
COLLAPSE_WINDOW = 64  # answers pooled by the collapse guard: 8 steps at batch 8 (2 prompts x 4 answers)
COLLAPSE_ADVICE = ("Groups that answer alike score alike and teach GRPO nothing: start from an SFT adapter that gives "
                   "every answer (dataset.balance=oversample), raise objective.temperature, or make HOLD cost "
                   "something (objective.rewards.pnl.hold_cost)")


def rows(samples: list[dict]) -> datasets.Dataset:
    """The prompt and the columns a reward reads, one row per sample (a column some samples lack is None there)."""
    columns = sorted({key for s in samples for key, value in (s.get("meta") or {}).items() if scalar(value)})
    out = []
    for s in samples:
        meta = s.get("meta") or {}
        row = {"prompt": s["messages"][:-1], "label": s.get("label"), "timestamp": s.get("timestamp"),
               "desirable": s.get("desirable")}
        row.update({key: meta.get(key) if scalar(meta.get(key)) else None for key in columns if key not in row})
        out.append(row)
    return datasets.Dataset.from_list(out)


def scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_columns(train: list[dict], reads: dict) -> None:
    """Each column a reward reads is one the train samples carry, said before any weight loads (a reward would
    otherwise fail at the first step)."""
    have = {"label", "timestamp", "desirable"} | {key for s in train for key in (s.get("meta") or {})}
    for name, columns in reads.items():
        missing = [c for c in columns or () if c not in have]
        if missing:
            raise DataError(f"objective.rewards.{name} reads '{missing[0]}', which the train samples do not carry "
                            f"(they carry {', '.join(sorted(have))}); use a dataset that records it (return_percent: "
                            f"dataset=trade_signals; outcome: dataset=decision_records), or drop the reward "
                            f"(objective.rewards.{name}=null)")


def check_leakage(train: list[dict], test: list[dict], reads: dict, leakage: str, say: bool = True) -> list[dict]:
    """The train samples GRPO may learn from: when a reward reads outcomes, a sample whose outcome (meta known_at)
    was known after the test window starts is refused (leakage=refuse, checked by finetune/config) or left out
    (leakage=drop)."""
    readers = [name for name, columns in reads.items() if columns is None or columns]
    stamps = [s["timestamp"] for s in test if s.get("timestamp")]
    if not readers or not stamps:
        return train
    test_start = min(stamps)
    known = [s for s in train if (s.get("meta") or {}).get("known_at")]
    if len(known) < len(train) and say:
        log.info("grpo: %d of %d train samples do not say when their outcome was known (meta known_at: decision "
                 "records' duration_hours, trade_signals' columns.exit_timestamp); the leakage check cannot see "
                 "whether theirs came after the test window starts (%s)", len(train) - len(known), len(train),
                 test_start)
    late = [s for s in known if s["meta"]["known_at"] > test_start]
    if not late:
        return train
    if leakage == "drop":
        if say:
            log.warning("grpo: %d train samples left out: their outcome was known after the test window starts "
                        "(%s)", len(late), test_start)
        left_out = {id(s) for s in late}
        kept = [s for s in train if id(s) not in left_out]
        if not kept:
            raise DataError(f"objective.leakage=drop: every train sample's outcome was known after the test window "
                            f"starts ({test_start}); nothing is left to learn from")
        return kept
    first = late[0]
    where = ", ".join(f"{k} {v}" for k, v in first["meta"].items() if k in ("line", "trade_id", "conversation_id"))
    raise DataError(f"objective.rewards.{readers[0]} reads the outcome of train sample {where or first['timestamp']} "
                    f"(at {first['timestamp']}, outcome known at {first['meta']['known_at']}), after the test window "
                    f"starts ({test_start}): it would learn from prices the test period sets ({len(late)} such train "
                    "samples). Set objective.leakage=drop to leave them out, or move the test window later")


class GRPOTrainer(trl.GRPOTrainer):
    """trl.GRPOTrainer that logs the share of each answer per step and warns when one answer takes over."""

    def __init__(self, *args, task: str, collapse_share: float, scored: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.task, self.collapse_share, self.scored = tasks.get(task), collapse_share, scored
        self.collapsed: dict | None = None  # the first step one answer reached collapse_share: report.md says so
        self.in_collapse = False
        self.recent = collections.deque(maxlen=COLLAPSE_WINDOW)  # the last train answers, the guard's view

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        mode = "train" if self.model.training else "eval"
        answers = [self.task.parse(answer_text(c))[0] or "unparsed" for c in completions]
        names = list(self.task.labels) + ["unparsed"]
        for name in names:
            self._metrics[mode][f"answers/{name}"].append(sum(a == name for a in answers) / max(len(answers), 1))
        if mode == "train":
            self.recent.extend(answers)
            self.guard(step=self.state.global_step + 1)  # the step these answers train (global_step: finished ones)
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def guard(self, step: int) -> None:
        """Warn once per episode when one answer's share of the last COLLAPSE_WINDOW answers reaches
        collapse_share (nothing before the window is full)."""
        if len(self.recent) < COLLAPSE_WINDOW:
            return
        top = max(self.task.labels, key=self.recent.count)
        share = self.recent.count(top) / len(self.recent)
        if share >= self.collapse_share and not self.in_collapse:
            self.collapsed = self.collapsed or {"step": step, "answer": top, "share": share}
            log.warning("grpo: collapse at step %d: %.0f%% of the last %d answers are %s (objective.collapse_share="
                        "%s); a policy that gives one answer to every prompt has stopped reading the market. %s",
                        step, 100 * share, len(self.recent), top, self.collapse_share, COLLAPSE_ADVICE)
        self.in_collapse = share >= self.collapse_share

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """With the kept checkpoint following the task's metric (scored: eval/checkpoint.py's ValidationScore, by
        likelihood), that score is the evaluation. TRL's own samples num_generations answers to every validation
        prompt (357 s for 58 prompts on SmolLM2 on CPU; scoring passes each prompt once per label, no sampling),
        and its loss, ~0 by construction, says nothing about which checkpoint answers best."""
        if not self.scored:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics: dict = {}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.log(metrics)
        return metrics
