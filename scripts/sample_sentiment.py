"""Write data/headlines.csv: labelled financial headlines for finance sentiment, 150 per class, with timestamps.

Deterministic (seeded random.Random). The label follows from the wording (beats / surges / upgraded
-> positive, misses / plunges / probe -> negative, schedules / names / announces date -> neutral),
so a small model can learn it. About a quarter are Chinese; many contain commas, so the CSV quotes
them — the builder must read it with the csv module.

    python scripts/sample_sentiment.py
"""
import csv
import random
from datetime import datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "headlines.csv"
PER_CLASS = 150

COMPANIES = ["Apple", "Microsoft", "Nvidia", "Tesla", "Amazon", "JPMorgan", "Pfizer", "Boeing",
             "Exxon Mobil", "Netflix", "Intel", "Walmart", "Coinbase", "Shopify", "Airbnb"]
COMPANIES_ZH = ["贵州茅台", "宁德时代", "招商银行", "比亚迪", "中国平安", "隆基绿能", "腾讯控股", "美的集团"]
TEMPLATES = {
    "positive": [
        "{co} beats quarterly estimates, raises full-year guidance",
        "{co} shares surge {n}% on record revenue",
        "{co} upgraded to Buy as demand outlook improves",
        "{co} wins ${n} billion contract, stock rallies",
        "{co} posts strong profit growth of {n}%",
        "{co}净利润同比大增{n}%，超出市场预期",
        "{co}获得{n}亿元大额订单，股价大涨",
    ],
    "negative": [
        "{co} misses quarterly estimates, cuts full-year guidance",
        "{co} shares plunge {n}% after weak sales",
        "{co} downgraded to Sell on falling margins",
        "{co} faces regulatory probe, stock tumbles",
        "{co} reports {n}% drop in profit, warns of layoffs",
        "{co}净利润同比下滑{n}%，低于市场预期",
        "{co}遭监管立案调查，股价暴跌",
    ],
    "neutral": [
        "{co} schedules quarterly earnings call for next week",
        "{co} names new chief financial officer",
        "{co} to present at industry conference on March {d}",
        "{co} completes previously announced board changes",
        "{co} files annual report with regulators, no changes to outlook",
        "{co}将于{d}日召开年度股东大会",
        "{co}完成董事会换届，经营计划不变",
    ],
}


def main():
    rng = random.Random(4)
    rows, seen = [], set()
    for label, templates in TEMPLATES.items():
        count = 0
        while count < PER_CLASS:
            template = rng.choice(templates)
            zh = any("\u4e00" <= ch <= "\u9fff" for ch in template)
            company = rng.choice(COMPANIES_ZH if zh else COMPANIES)
            text = template.format(co=company, n=rng.randint(2, 60), d=rng.randint(1, 28))
            if text not in seen:
                seen.add(text)
                rows.append([text, label])
                count += 1
    rng.shuffle(rows)  # interleave the classes in time, so a temporal split keeps all three
    t = datetime(2024, 1, 2, 8, 0)
    for row in rows:
        t += timedelta(minutes=rng.randint(60, 1200))
        row.append(t.strftime("%Y-%m-%dT%H:%M:%S"))

    OUT.parent.mkdir(exist_ok=True)
    with open(OUT, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "timestamp"])
        writer.writerows(rows)
    print(f"wrote {OUT} ({len(rows)} headlines)")


if __name__ == "__main__":
    main()
