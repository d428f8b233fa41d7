"""Backtest of generated signals on held-out trades: return, Sharpe, drawdown, win rate, costs.

Each held-out sample, in timestamp order, is one trade opportunity whose realised return of going long
is `meta[return_key]` in percent (trade_signals' `return_percent`). The model's answer decides the position:

    BUY -> +return,  SELL -> -return,  HOLD / unparsed / confidence below the threshold -> no trade (0)

A trade pays `cost_bps` basis points once (set it to your round-trip cost: fees + slippage), so a BUY on
a +2 % trade at 10 bps nets 0.02 - 0.001 = 0.019. The whole equity is put on every trade and compounded.

    {"total_return": 0.031, "sharpe": 8.566, "max_drawdown": 0.011, "win_rate": 0.75,
     "n_trades": 4, "n_long": 2, "n_short": 2, "n_opportunities": 5, "avg_trade_return": 0.00775,
     "always_long_return": -0.0207, "equity_curve": [1.0, 1.019, 1.0078, 1.0078, 1.0269, 1.031]}
    # equity_curve: one point per opportunity, starting at 1 (tests/test_eval_backtest.py works it out)

- total_return: final equity - 1 (compounded net trade returns).
- sharpe: mean / sample std (ddof=1) of the net returns of the trades taken, times
  sqrt(periods_per_year). Treating one trade as one period is a convention: pass 252 for about one
  trade per trading day (default), 365 for daily crypto, 1 for the raw per-trade
  ratio. None when fewer than 2 trades or all trade returns equal (std 0): undefined, not zero.
- max_drawdown: largest fall from a running peak of the equity curve, as a positive fraction (0.0 if none).
- win_rate: share of taken trades with a positive net return; None with no trades.
- always_long_return: the same backtest for an answer of BUY on every sample, the baseline to beat.
A sample without a numeric return stops the run with the sample named: a backtest needs every outcome.
"""
import math
import statistics

from finetune.errors import DataError
from finetune.tasks.signals import parse_signal


class Backtest:
    needs_generation = True

    def __init__(self, cost_bps: float = 10.0, confidence_threshold: float = 0.0,
                 periods_per_year: float = 252, return_key: str = "pnl_percent"):
        self.cost_bps = cost_bps
        self.confidence_threshold = confidence_threshold
        self.periods_per_year = periods_per_year
        self.return_key = return_key

    def position(self, text: str) -> int:
        signal, confidence = parse_signal(text)
        if self.confidence_threshold > 0 and (confidence is None or confidence < self.confidence_threshold):
            return 0
        return {"BUY": 1, "SELL": -1}.get(signal, 0)

    def returns(self, samples: list[dict]) -> list[float]:
        values = []
        for i, sample in enumerate(samples, 1):
            meta = sample.get("meta") or {}
            value = meta.get(self.return_key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"held-out sample {i} (timestamp {sample.get('timestamp')}): meta "
                                f"'{self.return_key}' is {value!r}, the backtest needs the realised return in "
                                f"percent (meta keys: {', '.join(meta) or 'none'}); use a dataset with "
                                f"trade outcomes (dataset=trade_signals), set return_key, or choose an eval "
                                f"suite without the backtest (eval=demo_signals, eval=perplexity)")
            values.append(value / 100)
        return values

    def run(self, positions: list[int], returns: list[float]) -> dict:
        cost = self.cost_bps / 10_000
        trades = [pos * ret - cost for pos, ret in zip(positions, returns) if pos != 0]
        equity, peak, drawdown = [1.0], 1.0, 0.0
        for pos, ret in zip(positions, returns):
            # A loss beyond 100 % (short into a spike) is ruin: equity stops at 0, it cannot go negative.
            equity.append(max(0.0, equity[-1] * (1 + pos * ret - cost)) if pos != 0 else equity[-1])
            peak = max(peak, equity[-1])
            drawdown = max(drawdown, (peak - equity[-1]) / peak)
        sharpe = None
        if len(trades) >= 2 and statistics.stdev(trades) > 0:
            sharpe = statistics.fmean(trades) / statistics.stdev(trades) * math.sqrt(self.periods_per_year)
        return {
            "total_return": equity[-1] - 1,
            "sharpe": sharpe,
            "max_drawdown": drawdown,
            "win_rate": sum(t > 0 for t in trades) / len(trades) if trades else None,
            "n_trades": len(trades),
            "n_long": positions.count(1),
            "n_short": positions.count(-1),
            "n_opportunities": len(positions),
            "avg_trade_return": statistics.fmean(trades) if trades else None,
            "equity_curve": equity,
        }

    def check(self, samples: list[dict]) -> None:
        """What the backtest needs from the held-out samples, before any model loads (the dry run calls it too)."""
        if not samples:
            raise DataError("Backtest: the held-out split is empty; enlarge the dataset or the test split")
        stamps = [s.get("timestamp") for s in samples]
        if any(t is None for t in stamps) and not all(t is None for t in stamps):
            missing = next(i for i, t in enumerate(stamps, 1) if t is None)
            raise DataError(f"held-out sample {missing}: 'timestamp' is None while others have one; "
                            f"the backtest orders trades by time")
        self.returns(samples)

    def __call__(self, *, samples: list[dict], outputs: list[str], model=None, tokenizer=None) -> dict:
        if len(samples) != len(outputs):
            raise ValueError(f"Backtest: {len(samples)} samples but {len(outputs)} outputs")
        self.check(samples)
        stamps = [s.get("timestamp") for s in samples]
        # ISO 8601 strings of one format sort in time order; without timestamps the given order stands.
        order = sorted(range(len(samples)), key=lambda i: stamps[i] or "")
        returns = self.returns(samples)
        returns = [returns[i] for i in order]
        result = self.run([self.position(outputs[i]) for i in order], returns)
        result["always_long_return"] = self.run([1] * len(returns), returns)["total_return"]
        return result
