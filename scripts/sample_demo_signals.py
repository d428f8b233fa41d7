"""Write data/demo_signals.jsonl: the default run's chat data, market snapshots -> BUY/SELL/HOLD + confidence.

The prompts are written by the signals task's `market_prompt` (finetune/tasks/signals.py, which the trade-signals
builder uses too), so an adapter trained on this data answers `SignalProvider.get_signal(market_data)` with the
prompt it was trained on.

Labels follow the trade_signals indicator rule (RSI < 35 and bullish -> BUY, RSI > 65 and
bearish -> SELL, trend strength > 0.6 -> follow the trend, else HOLD), so a model can learn them from the prompt alone.
Deterministic: `python scripts/sample_demo_signals.py` always writes the same file.
"""
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

from sample_trades import rule as label  # label_rule=indicators' rule, the same as the trade log's

from finetune.tasks.signals import SYSTEM_PROMPT, market_prompt
SYMBOLS = ["BTC-USDT", "ETH-USDT", "SOL-USDT", "BNB-USDT"]
BASE_PRICE = {"BTC-USDT": 43000.0, "ETH-USDT": 2300.0, "SOL-USDT": 95.0, "BNB-USDT": 310.0}


def snapshot(rng: random.Random, want: str) -> dict:
    # Draw until the rule gives the wanted class, so the three classes come out balanced.
    while True:
        trend = rng.choice(["bullish", "bearish", "neutral"])
        snap = {"rsi": round(rng.uniform(15, 85), 1), "trend": trend,
                "strength": round(rng.uniform(0, 1), 2)}
        if label(snap["rsi"], trend, snap["strength"])[0] == want:
            return snap


def main(out: Path = Path(__file__).resolve().parents[1] / "data" / "demo_signals.jsonl", n: int = 600) -> None:
    rng = random.Random(0)
    start = datetime(2024, 1, 1)
    rows = []
    for i in range(n):
        want = ("BUY", "SELL", "HOLD")[i % 3]
        snap = snapshot(rng, want)
        symbol = rng.choice(SYMBOLS)
        price = round(BASE_PRICE[symbol] * rng.uniform(0.9, 1.1), 2)
        macd = rng.choice(["golden_cross", "death_cross", "flat"])
        signal, confidence = label(snap["rsi"], snap["trend"], snap["strength"])
        market_data = {"symbol": symbol, "price": price, "technical": {
            "rsi": snap["rsi"], "macd_state": macd, "trend_direction": snap["trend"],
            "trend_strength": snap["strength"]}}
        answer = json.dumps({"signal": signal, "confidence": round(min(confidence, 0.95), 2)})
        messages = market_prompt(market_data, system_prompt=SYSTEM_PROMPT)
        rows.append({"messages": messages + [{"role": "assistant", "content": answer}],
                     "label": signal, "timestamp": (start + timedelta(hours=i)).isoformat()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} samples to {out}")


if __name__ == "__main__":
    main()
