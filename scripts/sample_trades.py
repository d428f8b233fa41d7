"""Write data/trades.db: the crypto trade log's `trades` + `signals` tables, ~600 closed trades over six months.

Deterministic (seeded random.Random). Every closed trade's market snapshot is drawn so that the indicator rule
(`label_rule: indicators`) gives the wanted class (BUY / SELL / HOLD in turn, so the classes are balanced),
and its outcome agrees with that class, so `label_rule: pnl` and `label_rule: indicators` give the same, learnable
labels: a BUY set-up is mostly a winning long (pnl > 5 %), sometimes a losing short (pnl < -3 %, the
opposite side); SELL mirrors it; a HOLD set-up is a long or short that moved too little (-3 % .. 5 %).
Real-log blemishes on purpose: extra columns, open trades, closed trades with NULL pnl, trades with no
signal row at their timestamp, signal rows without a trade, NULL signal_confidence, lower-case ai_signal.

    python scripts/sample_trades.py
    python scripts/sample_trades.py --out momentum.db --rule momentum --shares BUY=0.1,SELL=0.1,HOLD=0.8 --seed 2

Other logs for checking that a tuned model learns the decision and not one label (docs/results.md): `--rule` picks
which snapshot fields decide (indicators: RSI and trend, the default; momentum: the 24 h change and volume;
reversion: Bollinger position and RSI), `--shares` the label shares (default: balanced, in turn), `--seed` the
draw, `--noise` the share of trades whose snapshot was drawn for another label than the one its outcome gives
(markets are noisy: no rule on the snapshot is right every time).
"""
import argparse
import json
import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "trades.db"
N_CLOSED = 600
SYMBOLS = {"BTC/USDT": 43000.0, "ETH/USDT": 2300.0, "SOL/USDT": 95.0, "BNB/USDT": 310.0}


def rule(rsi, trend, strength):
    """The indicator rule with its confidence (the builder's, so signal_confidence agrees)."""
    if rsi < 35 and trend == "bullish":
        return "BUY", 0.6 + (35 - rsi) / 100
    if rsi > 65 and trend == "bearish":
        return "SELL", 0.6 + (rsi - 65) / 100
    if trend == "bullish" and strength > 0.6:
        return "BUY", 0.5 + strength / 4
    if trend == "bearish" and strength > 0.6:
        return "SELL", 0.5 + strength / 4
    return "HOLD", 0.55


def momentum(data):
    """A 24 h move on high volume is followed."""
    change, volume = data["change_percent"], data["volume_ratio"]
    if volume > 1.3 and abs(change) > 2.5:
        return ("BUY" if change > 0 else "SELL"), round(0.55 + min(abs(change), 6) / 20, 2)
    return "HOLD", 0.55


def reversion(data):
    """Stretched prices revert: low in the Bollinger band with a soft RSI buys, high with a hot RSI sells."""
    bb, rsi = data["technical"]["bb_position"], data["technical"]["rsi"]
    if bb < 20 and rsi < 45:
        return "BUY", round(0.6 + (20 - bb) / 100, 2)
    if bb > 80 and rsi > 55:
        return "SELL", round(0.6 + (bb - 80) / 100, 2)
    return "HOLD", 0.55


RULES = {"indicators": None, "momentum": momentum, "reversion": reversion}  # None: `rule`, drawn as always


def snapshot(rng, symbol, want, decide=None):
    """A market snapshot for which the rule (`decide`, default the indicator rule) gives `want`."""
    while True:  # draw until the rule gives the wanted class
        trend = rng.choice(["bullish", "bearish", "neutral"])
        rsi, strength = round(rng.uniform(15, 85), 1), round(rng.uniform(0, 1), 2)
        if decide is None:
            signal, confidence = rule(rsi, trend, strength)
            if signal != want:
                continue
        macd = {"bullish": "golden_cross", "bearish": "death_cross"}.get(trend, "flat")
        if rng.random() < 0.25:  # MACD lags the trend now and then
            macd = rng.choice(["golden_cross", "death_cross", "flat"])
        price = round(SYMBOLS[symbol] * rng.uniform(0.85, 1.15), 2)
        data = {"symbol": symbol, "price": price, "change_percent": round(rng.uniform(-6, 6), 2),
                "volume_ratio": round(rng.uniform(0.5, 2.5), 2),
                "technical": {"rsi": rsi, "macd_state": macd, "trend_direction": trend, "trend_strength": strength,
                              "atr_percent": round(rng.uniform(0.8, 4.5), 2),
                              "bb_position": round(rng.uniform(0, 100))}}
        if decide is not None:
            signal, confidence = decide(data)
            if signal != want:
                continue
        return data, signal, confidence


def outcome(rng, want):
    """(direction, pnl %) consistent with the wanted label under the pnl rule (loss_label: opposite)."""
    if want == "HOLD":
        return rng.choice(["long", "short"]), round(rng.uniform(-2.5, 4.5), 2)
    right = "long" if want == "BUY" else "short"
    if rng.random() < 0.8:
        return right, round(rng.uniform(5.5, 14.0), 2)
    return ("short" if right == "long" else "long"), round(-rng.uniform(3.5, 10.0), 2)


def write_trades(out: Path, n_closed: int = N_CLOSED, spacing: timedelta = timedelta(hours=1),
                 rule_name: str = "indicators", shares: dict | None = None, seed: int = 0, noise: float = 0.0) -> str:
    """The trade log with `n_closed` closed trades, 3-11 `spacing`s apart (scripts/bench_data.py: minutes);
    labels by `rule_name` (RULES) in `shares` ({"HOLD": 0.8, ...}; None: in turn), drawn from `seed`."""
    rng = random.Random(seed)
    decide = RULES[rule_name]
    trades, signals = [], []
    t = datetime(2024, 1, 1, 8)
    for i in range(n_closed):
        t += rng.randint(3, 11) * spacing
        ts = t.strftime("%Y-%m-%d %H:%M:%S")
        want = ("BUY", "SELL", "HOLD")[i % 3] if shares is None else rng.choices(list(shares), list(shares.values()))[0]
        symbol = rng.choice(list(SYMBOLS))
        setup = want if not noise or rng.random() >= noise else rng.choice([c for c in ("BUY", "SELL", "HOLD") if c != want])
        data, signal, confidence = snapshot(rng, symbol, setup, decide)
        direction, pnl = outcome(rng, want)
        leverage = rng.choice([1, 2, 3])
        entry = data["price"]
        move = (pnl / leverage / 100) * (1 if direction == "long" else -1)
        exit_ = round(entry * (1 + move), 2)
        action = ("BUY" if direction == "long" else "SELL") if rng.random() < 0.8 else \
            ("open_long" if direction == "long" else "open_short")
        trades.append((ts, symbol, entry, exit_, pnl, action, round(rng.uniform(50, 500), 2), leverage,
                       "closed", round(abs(entry * 0.0004), 4)))
        roll = rng.random()
        if roll < 0.1:  # an hour later: a trade still open, or closed but never settled (NULL pnl)
            later = (t + spacing).strftime("%Y-%m-%d %H:%M:%S")
            settled = exit_ if roll < 0.03 else None
            trades.append((later, symbol, entry, settled, None, action, 100.0, leverage,
                           "closed" if roll < 0.03 else "open", 0.0))
            signals.append((later, json.dumps(data, ensure_ascii=False), signal, round(confidence * 100),
                            "deepseek-chat"))
        if rng.random() < 0.05:
            continue  # a trade without a signal row (placed by hand)
        ai_signal = signal if rng.random() < 0.85 else rng.choice(["BUY", "SELL", "HOLD"])
        if rng.random() < 0.1:
            ai_signal = ai_signal.lower()
        sig_conf = None if rng.random() < 0.1 else round(confidence * 100)
        signals.append((ts, json.dumps(data, ensure_ascii=False), ai_signal, sig_conf, "deepseek-chat"))
        if rng.random() < 0.15:  # a signal that was not traded, half an hour later
            extra, _, _ = snapshot(rng, symbol, rng.choice(["BUY", "SELL", "HOLD"]), decide)
            later = (t + spacing / 2).strftime("%Y-%m-%d %H:%M:%S")
            signals.append((later, json.dumps(extra), "HOLD", 55, "deepseek-chat"))

    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    con = sqlite3.connect(out)
    con.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, entry_price REAL, "
                "exit_price REAL, pnl_percent REAL, action_taken TEXT, position_size REAL, leverage REAL, "
                "status TEXT, fee REAL)")
    con.execute("CREATE TABLE signals (id INTEGER PRIMARY KEY, timestamp TEXT, market_data TEXT, ai_signal TEXT, "
                "signal_confidence REAL, provider TEXT)")
    con.executemany("INSERT INTO trades (timestamp, symbol, entry_price, exit_price, pnl_percent, action_taken, "
                    "position_size, leverage, status, fee) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", trades)
    con.executemany("INSERT INTO signals (timestamp, market_data, ai_signal, signal_confidence, provider) "
                    "VALUES (?, ?, ?, ?, ?)", signals)
    con.commit()
    con.execute("VACUUM")
    con.close()
    return f"wrote {len(trades)} trades and {len(signals)} signals to {out}"


def shares_of(text: str | None) -> dict | None:
    """"BUY=0.1,SELL=0.1,HOLD=0.8" -> {"BUY": 0.1, "SELL": 0.1, "HOLD": 0.8}."""
    return None if not text else {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--trades", type=int, default=N_CLOSED, help="closed trades")
    parser.add_argument("--rule", choices=list(RULES), default="indicators")
    parser.add_argument("--shares", help="label shares, e.g. BUY=0.1,SELL=0.1,HOLD=0.8 (default: in turn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.0, help="share of snapshots drawn for another label")
    a = parser.parse_args()
    print(write_trades(a.out, a.trades, rule_name=a.rule, shares=shares_of(a.shares), seed=a.seed, noise=a.noise))
