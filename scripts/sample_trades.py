"""Write data/trades.db: the crypto trade log's `trades` + `signals` tables, ~600 closed trades over six months.

Deterministic (seeded random.Random). Every closed trade's market snapshot is drawn so that the indicator rule of
the crypto trade-log design note gives the wanted class (BUY / SELL / HOLD in turn, so the classes are balanced),
and its outcome agrees with that class, so `label_rule: pnl` and `label_rule: indicators` give the same, learnable
labels: a BUY set-up is mostly a winning long (pnl > 5 %), sometimes a losing short (pnl < -3 %, the
opposite side); SELL mirrors it; a HOLD set-up is a long or short that moved too little (-3 % .. 5 %).
Real-log blemishes on purpose: extra columns, open trades, closed trades with NULL pnl, trades with no
signal row at their timestamp, signal rows without a trade, NULL signal_confidence, lower-case ai_signal.

    python scripts/sample_trades.py
"""
import json
import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "trades.db"
N_CLOSED = 600
SYMBOLS = {"BTC/USDT": 43000.0, "ETH/USDT": 2300.0, "SOL/USDT": 95.0, "BNB/USDT": 310.0}


def rule(rsi, trend, strength):
    """The design note's indicator rule with its confidence (the builder's, so signal_confidence agrees)."""
    if rsi < 35 and trend == "bullish":
        return "BUY", 0.6 + (35 - rsi) / 100
    if rsi > 65 and trend == "bearish":
        return "SELL", 0.6 + (rsi - 65) / 100
    if trend == "bullish" and strength > 0.6:
        return "BUY", 0.5 + strength / 4
    if trend == "bearish" and strength > 0.6:
        return "SELL", 0.5 + strength / 4
    return "HOLD", 0.55


def snapshot(rng, symbol, want):
    while True:  # draw until the rule gives the wanted class
        trend = rng.choice(["bullish", "bearish", "neutral"])
        rsi, strength = round(rng.uniform(15, 85), 1), round(rng.uniform(0, 1), 2)
        signal, confidence = rule(rsi, trend, strength)
        if signal == want:
            break
    macd = {"bullish": "golden_cross", "bearish": "death_cross"}.get(trend, "flat")
    if rng.random() < 0.25:  # MACD lags the trend now and then
        macd = rng.choice(["golden_cross", "death_cross", "flat"])
    price = round(SYMBOLS[symbol] * rng.uniform(0.85, 1.15), 2)
    data = {"symbol": symbol, "price": price, "change_percent": round(rng.uniform(-6, 6), 2),
            "volume_ratio": round(rng.uniform(0.5, 2.5), 2),
            "technical": {"rsi": rsi, "macd_state": macd, "trend_direction": trend, "trend_strength": strength,
                          "atr_percent": round(rng.uniform(0.8, 4.5), 2), "bb_position": round(rng.uniform(0, 100))}}
    return data, signal, confidence


def outcome(rng, want):
    """(direction, pnl %) consistent with the wanted label under the pnl rule (loss_label: opposite)."""
    if want == "HOLD":
        return rng.choice(["long", "short"]), round(rng.uniform(-2.5, 4.5), 2)
    right = "long" if want == "BUY" else "short"
    if rng.random() < 0.8:
        return right, round(rng.uniform(5.5, 14.0), 2)
    return ("short" if right == "long" else "long"), round(-rng.uniform(3.5, 10.0), 2)


def write_trades(out: Path, n_closed: int = N_CLOSED, spacing: timedelta = timedelta(hours=1)) -> str:
    """The trade log with `n_closed` closed trades, 3-11 `spacing`s apart (scripts/bench_data.py: minutes)."""
    rng = random.Random(0)
    trades, signals = [], []
    t = datetime(2024, 1, 1, 8)
    for i in range(n_closed):
        t += rng.randint(3, 11) * spacing
        ts = t.strftime("%Y-%m-%d %H:%M:%S")
        want = ("BUY", "SELL", "HOLD")[i % 3]
        symbol = rng.choice(list(SYMBOLS))
        data, signal, confidence = snapshot(rng, symbol, want)
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
            extra, _, _ = snapshot(rng, symbol, rng.choice(["BUY", "SELL", "HOLD"]))
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


if __name__ == "__main__":
    print(write_trades(OUT))
