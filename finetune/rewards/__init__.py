"""Rewards for objective=grpo: small named pieces a config lists with weights, one file each.

    objective:
      rewards:
        format: {_target_: finetune.rewards.format.Format, weight: 0.2, task: signals}
        pnl:    {_target_: finetune.rewards.pnl.Pnl, weight: 1.0, cost_percent: 0.1, clip: 10.0}

A reward is a callable trl.GRPOTrainer calls once per batch of answers: `reward(completions, **columns)` with
`completions` the model's answers (each a list with one assistant message) and one list per column of the GRPO
rows (finetune/train/grpo.py: label, timestamp, every scalar of the sample's meta: return_percent for a trade,
outcome and pnl for a decision, ...). It returns one float per answer, or None where it has nothing to say (TRL
leaves that answer out of this reward's mean). Its key in `objective.rewards` is its name in the logs
(rewards/<name>/mean) and in report.md; `weight` is its share of the summed reward (trl.GRPOConfig.reward_weights).

`reads`: the columns a reward reads that are only known once the sample's outcome is (the realised move, the
decision's outcome). The leakage check refuses a run where such a column of a train sample was known after the test
window starts (finetune/train/grpo.py). A reward without `reads` (a user's function) is taken to read them all.

    format   the answer parses under the task (format.py)
    pnl      the return the answer would have realised on the sample's move, after costs, clipped (pnl.py)
    outcome  agreement with the decisions that went well, disagreement with the bad ones (outcome.py)
"""
import functools

from hydra.utils import instantiate

from finetune.errors import ConfigError


def answer_text(completion) -> str:
    """The text of one answer: TRL hands a conversational completion as a list of messages."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)


def load(rewards: dict) -> tuple[list, list[float], dict[str, tuple[str, ...] | None]]:
    """(the reward callables, each named by its key, their weights, the outcome columns each reads (None: unknown,
    every one)) from `objective.rewards`; an entry set to null is left out (a recipe drops a default reward so)."""
    chosen = {name: spec for name, spec in (rewards or {}).items() if spec is not None}
    if not chosen:
        raise ConfigError("objective.rewards: no reward; GRPO learns from rewards only: list at least one, e.g. "
                          "objective.rewards.format={_target_: finetune.rewards.format.Format, weight: 1.0, "
                          "task: signals}")
    funcs, weights, reads = [], [], {}
    for name, spec in chosen.items():
        spec = dict(spec)
        if "_target_" not in spec:
            raise ConfigError(f"objective.rewards.{name}: no _target_; name the reward's class or function "
                              "(finetune.rewards.pnl.Pnl, or my_module.my_reward with _partial_: true)")
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"objective.rewards.{name}.weight={weight!r}: a number")
        try:
            func = instantiate(spec, _convert_="all")
        except Exception as err:  # Hydra's message names the target and the argument it could not take
            if isinstance(err.__cause__, ConfigError):  # the reward's own check already names the key
                raise err.__cause__ from None
            raise ConfigError(f"objective.rewards.{name}: {err}") from None
        if not callable(func):
            raise ConfigError(f"objective.rewards.{name}: {spec['_target_']} gave {type(func).__name__}, not a "
                              "callable; a plain function needs `_partial_: true`")
        funcs.append(named(name, func))
        weights.append(float(weight))
        inner = func.func if isinstance(func, functools.partial) else func  # a function's own `reads`
        reads[name] = tuple(inner.reads) if hasattr(inner, "reads") else None
    return funcs, weights, reads


def named(name: str, func):
    """`func` under the config's key: TRL logs each reward as rewards/<its __name__>/mean."""
    @functools.wraps(func, assigned=("__doc__",), updated=())
    def reward(completions, **columns):
        return func(completions=completions, **columns)
    reward.__name__ = reward.__qualname__ = name
    return reward
