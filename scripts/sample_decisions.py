"""Write data/decisions.jsonl: trading-decision records (input -> output -> result -> label), 800 lines.

Deterministic (seeded random.Random). Each record shows one symbol's market data and the account, with an
empty recent_history (a live collector often leaves it empty too). The good decision
follows one rule, so what trains (excellent + good) is learnable from the prompt:

    an open position on the symbol: CLOSE it if the trend turned against it (long & bearish, short &
    bullish), else HOLD it; no position: BUY if bullish, MACD up and RSI < 70; SELL (open a short)
    if bearish, MACD down and RSI > 30; else HOLD.
    size = balance x 5 / 10 / 15 % for permission level L1 / L2 / L3; leverage 1 / 2 / 3, and 1 when the
    market_regime is volatile; stop loss 0.02 and take profit 0.05 (0.03 / 0.08 when volatile).

About 80 % of the records follow the rule and end excellent / good / acceptable_loss; the rest take another
action and end bad or acceptable_loss, so `train_outcomes: [excellent, good]` keeps only rule-following
decisions. A few records are still "pending". About a third of the reasonings are in Chinese.

    python scripts/sample_decisions.py
    python scripts/sample_decisions.py --out rsi.jsonl --rule rsi --shares BUY=0.2,SELL=0.1,HOLD=0.6,CLOSE=0.1 \
        --lucky 0.1 --seed 5

Other logs for checking that a tuned model learns the decision (docs/results.md): `--rule rsi` decides by RSI
alone (no position: BUY below 35, SELL above 65; a position: CLOSE when RSI has run its way, long above 60,
short below 40), `--shares` sets the wanted actions' shares (default: in turn), `--lucky` the share of records
that broke the rule and still ended good (so the good records, which train, do not follow one clean rule), `--seed` the draw.
"""
import argparse
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "decisions.jsonl"
N_RECORDS = 800
SYMBOLS = {"BTC": 68000.0, "ETH": 3500.0, "SOL": 160.0}
LEVELS = {"L1": (0.05, 1), "L2": (0.10, 2), "L3": (0.15, 3)}
SEED_ACTION = {"BUY": "open_long", "SELL": "open_short", "HOLD": "hold", "CLOSE": "close_position"}
REASONS = {  # short: the tiny test model trains on 256-token samples
    "BUY": ("bullish, MACD up", "看涨"),
    "SELL": ("bearish, MACD down", "看跌"),
    "HOLD": ("no clear edge", "观望"),
    "KEEP": ("trend intact", "持有"),
    "CLOSE": ("trend turned", "平仓"),
}


def rsi_action(trend, macd, rsi, position):
    if position:
        ran = (position["side"] == "long" and rsi > 60) or (position["side"] == "short" and rsi < 40)
        return "CLOSE" if ran else "HOLD"
    return "BUY" if rsi < 35 else "SELL" if rsi > 65 else "HOLD"


def good_action(trend, macd, rsi, position):
    if position:
        against = (position["side"] == "long" and trend == "bearish") or \
                  (position["side"] == "short" and trend == "bullish")
        return "CLOSE" if against else "HOLD"
    if trend == "bullish" and macd == "up" and rsi < 70:
        return "BUY"
    if trend == "bearish" and macd == "down" and rsi > 30:
        return "SELL"
    return "HOLD"


def scenario(rng, want, rule=None):
    rule = rule or good_action
    while True:  # draw until the rule gives the wanted action, so the actions come out balanced
        symbol = rng.choice(list(SYMBOLS))
        trend = rng.choice(["bullish", "bearish", "neutral"])
        macd = rng.choice(["up", "down"])
        rsi = round(rng.uniform(20, 80))
        position = None
        if rng.random() < (0.7 if want in ("CLOSE", "HOLD") else 0.2):
            position = {"symbol": symbol, "side": rng.choice(["long", "short"]),
                        "size_usd": rng.choice([40, 60, 90])}
        if rule(trend, macd, rsi, position) == want:
            return symbol, trend, macd, rsi, position


def decision(rng, action, symbol, trend, macd, rsi, position, balance, level, regime):
    pct, leverage = LEVELS[level]
    volatile = regime == "volatile"
    english, chinese = REASONS["KEEP" if action == "HOLD" and position else action]
    reasoning = chinese if rng.random() < 0.33 else english
    out = {"action": SEED_ACTION[action], "symbol": symbol if action != "HOLD" else None,
           "size_usd": None, "leverage": None, "stop_loss_pct": None, "take_profit_pct": None,
           "reasoning": reasoning}
    if action in ("BUY", "SELL"):
        out.update(size_usd=round(balance * pct), leverage=1 if volatile else leverage,
                   stop_loss_pct=0.03 if volatile else 0.02, take_profit_pct=0.08 if volatile else 0.05)
        out["confidence"] = round(0.6 + min(abs(rsi - 50), 20) / 100, 2)
    else:
        out["confidence"] = 0.8 if action == "CLOSE" else 0.6
    return out


def result(rng, label, size):
    """The record's result block; pnl in USD. A HOLD without a position trades nothing: the move it sat out."""
    ranges = {"excellent": (0.05, 0.12), "good": (0.005, 0.05), "acceptable_loss": (-0.03, -0.005),
              "bad": (-0.10, -0.03)}
    if label == "pending":
        return None
    share = rng.uniform(*ranges[label])
    if not size:
        return {"profitable": None, "pnl": 0.0, "duration_hours": 24, "exit_reason": "no_trade",
                "missed_move_pct": round(-share, 3)}
    return {"profitable": share > 0, "pnl": round(size * share, 2), "duration_hours": rng.randint(1, 48),
            "exit_reason": "take_profit" if share > 0.05 else "stop_loss" if share < -0.02 else "signal"}


RULES = {"trend": good_action, "rsi": rsi_action}


def write_decisions(path: Path = OUT, n: int = N_RECORDS, rule: str = "trend", shares: dict | None = None,
                    lucky: float = 0.0, seed: int = 2) -> str:
    rng = random.Random(seed)
    t = datetime(2025, 6, 1, 0, 0)
    lines = []
    for i in range(n):
        t += timedelta(hours=rng.randint(2, 9))
        want = ("BUY", "SELL", "HOLD", "CLOSE")[i % 4] if shares is None else \
            rng.choices(list(shares), list(shares.values()))[0]
        symbol, trend, macd, rsi, position = scenario(rng, want, RULES[rule])
        follows = rng.random() < 0.8
        action = want if follows else rng.choice([a for a in ("BUY", "SELL", "HOLD", "CLOSE") if a != want])
        if action == "CLOSE" and position is None:
            action = "HOLD" if want != "HOLD" else "BUY"  # nothing to close: another wrong move
        balance = round(rng.uniform(400, 2000))
        level = rng.choice(list(LEVELS))
        regime = "volatile" if rng.random() < 0.25 else "normal"
        price = round(SYMBOLS[symbol] * rng.uniform(0.9, 1.1), 1 if symbol == "SOL" else 0)
        if rng.random() < 0.03:
            label = "pending"
        elif follows or (lucky and rng.random() < lucky):
            label = rng.choices(["excellent", "good", "acceptable_loss"], [45, 40, 15])[0]
        else:
            label = rng.choices(["bad", "acceptable_loss"], [70, 30])[0]
        out = decision(rng, action, symbol, trend, macd, rsi, position, balance, level, regime)
        record = {
            "conversation_id": f"d-{i:04d}",
            "timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "input": {"market_data": {symbol: {"price": price, "trend": trend, "rsi": rsi, "macd": macd},
                                      "market_regime": regime},
                      "account_state": {"balance": balance, "positions": [position] if position else [],
                                        "permission_level": level},
                      "recent_history": []},   # empty, as a live collector often leaves it
            "output": out,
            "result": result(rng, label, out["size_usd"] or (position or {}).get("size_usd")),
            "label": f"{label}_decision" if label in ("excellent", "good", "bad") else label,
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"wrote {len(lines)} decision records to {path}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--records", type=int, default=N_RECORDS)
    parser.add_argument("--rule", choices=list(RULES), default="trend")
    parser.add_argument("--shares", help="action shares, e.g. BUY=0.4,SELL=0.4,CLOSE=0.1,HOLD=0.1 (default: in turn)")
    parser.add_argument("--lucky", type=float, default=0.0, help="share of rule-breaking records that ended good")
    parser.add_argument("--seed", type=int, default=2)
    a = parser.parse_args()
    shares = None if not a.shares else {k: float(v) for k, v in (p.split("=") for p in a.shares.split(","))}
    print(write_decisions(a.out, a.records, a.rule, shares, a.lucky, a.seed))
