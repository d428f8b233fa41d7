"""`pnl`: the return in percent the answer would have realised on the sample's move, after costs, clipped.

The move is the sample's `return_percent`: going long over the trade, in percent (the trade-log builder's meta;
6.1 = the price rose 6.1 % from entry to exit). BUY earns the move, SELL the opposite, each less the round-trip
`cost_percent` (0.1 = 10 bps, the backtest's); HOLD earns minus `hold_cost` (0: no trade, no gain; > 0 an
opportunity cost, against a policy that answers HOLD to stay safe). The result is clipped to +-`clip`, so one
outlier trade does not rule a batch. An answer that does not parse earns the worst any answer could have on that
move: never more than a readable one, or a policy would learn to write nothing whenever HOLD costs more than
`format` pays (hold_cost 0.5 against format's 0.2 x 1). A sample without a move earns None: this reward has nothing
to say about it.

    pnl: {_target_: finetune.rewards.pnl.Pnl, weight: 1.0, cost_percent: 0.1, hold_cost: 0.0, clip: 10.0}
"""
from finetune import tasks
from finetune.errors import ConfigError
from finetune.rewards import answer_text


class Pnl:
    reads = ("return_percent",)

    def __init__(self, task: str = "signals", cost_percent: float = 0.1, hold_cost: float = 0.0,
                 clip: float = 10.0):
        for key, value in (("cost_percent", cost_percent), ("hold_cost", hold_cost), ("clip", clip)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"objective.rewards.pnl.{key}={value!r}: a number >= 0 (percent)")
        self.task, self.cost, self.hold_cost, self.clip = tasks.get(task), cost_percent, hold_cost, clip

    def __call__(self, completions, return_percent=None, **_) -> list[float | None]:
        if return_percent is None:
            raise ConfigError("objective.rewards.pnl: the samples carry no return_percent (the realised move); "
                              "use dataset=trade_signals, or drop the reward (objective.rewards.pnl=null)")
        return [self.one(answer_text(c), move) for c, move in zip(completions, return_percent)]

    def one(self, answer: str, move: float | None) -> float | None:
        signal = self.task.parse(answer)[0]
        if move is None:
            return None
        earned = {"BUY": move - self.cost, "SELL": -move - self.cost, "HOLD": -self.hold_cost}
        return max(-self.clip, min(self.clip, earned[signal] if signal in earned else min(earned.values())))
