"""Backtest on a five-trade series, every number worked out by hand (cost 10 bps = 0.001 per trade)."""
import math

import pytest

from finetune.errors import DataError
from finetune.eval.backtest import Backtest


def sample(ts, pnl):
    return {"messages": [], "label": None, "timestamp": ts, "meta": {"symbol": "BTC-USDT", "pnl_percent": pnl}}


# (timestamp, realised long return %, answer); given out of time order on purpose
ROWS = [("2024-01-04T00:00:00", -2.0, '{"signal": "SELL", "confidence": 0.8}'),   # +0.02 - 0.001 = 0.019
        ("2024-01-01T00:00:00", 2.0, '{"signal": "BUY", "confidence": 0.9}'),     # +0.02 - 0.001 = 0.019
        ("2024-01-03T00:00:00", -3.0, '{"signal": "HOLD", "confidence": 0.7}'),   # no trade
        ("2024-01-02T00:00:00", 1.0, "信号：SELL，置信度：60%"),                      # -0.01 - 0.001 = -0.011
        ("2024-01-05T00:00:00", 0.5, "BUY - trend up")]                          # +0.005 - 0.001 = 0.004
SAMPLES = [sample(ts, pnl) for ts, pnl, _ in ROWS]
OUTPUTS = [answer for _, _, answer in ROWS]


def test_backtest_by_hand():
    m = Backtest(cost_bps=10, periods_per_year=1)(samples=SAMPLES, outputs=OUTPUTS)
    # time order: 0.019, -0.011, (hold), 0.019, 0.004
    # equity 1 -> 1.019 -> 1.019*0.989 = 1.007791 -> 1.007791 -> *1.019 = 1.026939029 -> *1.004 = 1.031046785116
    assert m["equity_curve"] == pytest.approx([1.0, 1.019, 1.007791, 1.007791, 1.026939029, 1.031046785116])
    assert m["total_return"] == pytest.approx(0.031046785116)
    # peak 1.019, trough 1.007791: (1.019 - 1.007791) / 1.019 = 0.011
    assert m["max_drawdown"] == pytest.approx(0.011)
    # mean (0.019 - 0.011 + 0.019 + 0.004) / 4 = 0.00775; deviations .01125 -.01875 .01125 -.00375,
    # squares sum 0.00061875, sample variance / 3 = 0.00020625, std 0.0143614 -> 0.00775 / 0.0143614 = 0.53964
    assert m["sharpe"] == pytest.approx(0.00775 / math.sqrt(0.00020625))
    assert m["sharpe"] == pytest.approx(0.53964, abs=1e-5)
    assert m["win_rate"] == pytest.approx(3 / 4)
    assert (m["n_trades"], m["n_long"], m["n_short"], m["n_opportunities"]) == (4, 2, 2, 5)
    assert m["avg_trade_return"] == pytest.approx(0.00775)
    # always long, time order: 0.019, 0.009, -0.031, -0.021, 0.004
    assert m["always_long_return"] == pytest.approx(1.019 * 1.009 * 0.969 * 0.979 * 1.004 - 1)


def test_sharpe_is_annualised_by_sqrt_periods():
    m = Backtest(cost_bps=10, periods_per_year=252)(samples=SAMPLES, outputs=OUTPUTS)
    assert m["sharpe"] == pytest.approx(0.00775 / math.sqrt(0.00020625) * math.sqrt(252))  # 8.5664


def test_confidence_threshold_and_zero_std():
    # at 0.7 the 60 % SELL and the BUY without confidence are skipped: trades 0.019, 0.019
    m = Backtest(cost_bps=10, confidence_threshold=0.7)(samples=SAMPLES, outputs=OUTPUTS)
    assert m["n_trades"] == 2
    assert m["total_return"] == pytest.approx(1.019 ** 2 - 1)   # 0.038361
    assert m["sharpe"] is None                                   # std 0: undefined, not a crash
    assert (m["max_drawdown"], m["win_rate"]) == (0.0, 1.0)


def test_no_trades():
    m = Backtest()(samples=SAMPLES, outputs=["HOLD", "no idea", "", "HOLD", "?"])
    assert (m["total_return"], m["max_drawdown"], m["n_trades"]) == (0.0, 0.0, 0)
    assert m["sharpe"] is None and m["win_rate"] is None and m["avg_trade_return"] is None
    assert m["equity_curve"] == [1.0] * 6


def test_costs_turn_a_flat_trade_into_a_loss():
    m = Backtest(cost_bps=25)(samples=[sample("2024-01-01", 0.0)], outputs=["BUY"])
    assert m["total_return"] == pytest.approx(-0.0025)
    assert m["win_rate"] == 0.0 and m["sharpe"] is None         # one trade: no std


def test_missing_return_names_the_sample():
    samples = [sample("2024-01-01", 1.0), {**sample("2024-01-02", None), "meta": {"symbol": "ETH-USDT"}}]
    with pytest.raises(DataError, match=r"held-out sample 2 .*'pnl_percent' is None.*meta keys: symbol"):
        Backtest()(samples=samples, outputs=["BUY", "BUY"])
    with pytest.raises(DataError, match="held-out sample 1: 'timestamp' is None"):
        Backtest()(samples=[sample(None, 1.0), sample("2024-01-01", 1.0)], outputs=["BUY", "BUY"])


def test_without_timestamps_the_given_order_stands():
    m = Backtest(cost_bps=0)(samples=[sample(None, 10.0), sample(None, -10.0)], outputs=["BUY", "BUY"])
    # 1 -> 1.1 -> 0.99: drawdown (1.1 - 0.99) / 1.1 = 0.1
    assert m["equity_curve"] == pytest.approx([1.0, 1.1, 0.99])
    assert m["max_drawdown"] == pytest.approx(0.1)


def test_ruin_stops_equity_at_zero():
    # SELL into a +150 % move loses 150 %: equity stops at 0, drawdown is the whole account
    samples = [sample("2024-01-01", 150.0), sample("2024-01-02", 5.0)]
    m = Backtest(cost_bps=0)(samples=samples, outputs=["SELL", "BUY"])
    assert m["equity_curve"] == [1.0, 0.0, 0.0]
    assert (m["total_return"], m["max_drawdown"]) == (-1.0, 1.0)
