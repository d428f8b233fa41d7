"""Write data/finance_analysis.db: a news-impact database's `events` + `event_impacts` (long format), ~400 events.

Deterministic (seeded random.Random). Returns follow the headline's wording so the direction is
learnable: positive news moves its tickers up, negative down, neutral stays within +-0.15 %
(the builder's flat threshold is 0.2 %). About half of the non-earnings moves fade by the next day
(the "priced in" reading); earnings reactions carry through the day. Real-data blemishes on
purpose: extra columns, windows the default config does not use (5, 30, 120 min), events with no
impact rows, pairs without the 15-min row, NULL next-day returns for the latest events.

    python scripts/sample_news.py
"""
import random
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "finance_analysis.db"
WINDOWS = (5, 15, 30, 60, 120, 1440)
N_EVENTS = 400

COMPANIES = [("Apple", "AAPL", "MSFT"), ("Microsoft", "MSFT", "GOOGL"), ("Nvidia", "NVDA", "AMD"),
             ("Tesla", "TSLA", "GM"), ("Amazon", "AMZN", "WMT"), ("JPMorgan", "JPM", "BAC"),
             ("Pfizer", "PFE", "MRK"), ("Boeing", "BA", "LMT"), ("Exxon Mobil", "XOM", "CVX"),
             ("Netflix", "NFLX", "DIS"), ("Intel", "INTC", "AMD"), ("Walmart", "WMT", "TGT")]
COMPANIES_ZH = [("贵州茅台", "600519.SH", "000858.SZ"), ("宁德时代", "300750.SZ", "002594.SZ"),
                ("招商银行", "600036.SH", "601166.SH"), ("比亚迪", "002594.SZ", "300750.SZ"),
                ("中国平安", "601318.SH", "601628.SH"), ("隆基绿能", "601012.SH", "600438.SH")]
BROKERS = ["Goldman Sachs", "Morgan Stanley", "UBS", "Barclays", "Jefferies"]

# (polarity, is_earnings, template); {co} company, {n} a number, {q} quarter, {b} broker
TEMPLATES_EN = [
    ("positive", False, "{co} wins ${n}B government contract"),
    ("positive", False, "{co} announces ${n}B share buyback"),
    ("positive", False, "{co} upgraded to Buy at {b}, target raised {n}%"),
    ("positive", False, "Regulators approve {co}'s new product ahead of schedule"),
    ("negative", False, "{co} hit with antitrust probe over pricing"),
    ("negative", False, "{co} downgraded to Sell at {b}, target cut {n}%"),
    ("negative", False, "{co} recalls {n}0,000 units over safety defect"),
    ("negative", False, "{co} CEO resigns abruptly amid accounting review"),
    ("neutral", False, "{co} to present at {b} investor conference"),
    ("neutral", False, "{co} schedules annual shareholder meeting for May {n}"),
    ("neutral", False, "{co} names new independent director to board"),
    ("positive", True, "{co} {q} earnings beat estimates, revenue up {n}%"),
    ("negative", True, "{co} {q} earnings miss estimates, revenue down {n}%"),
    ("neutral", True, "{co} {q} earnings in line with estimates, revenue flat"),
]
TEMPLATES_ZH = [
    ("positive", False, "{co}获得{n}亿元大额订单"),
    ("positive", False, "{co}宣布{n}亿元股份回购计划"),
    ("negative", False, "{co}遭证监会立案调查"),
    ("negative", False, "{co}大股东拟减持{n}%股份"),
    ("neutral", False, "{co}召开{n}号临时股东大会"),
    ("neutral", False, "{co}完成董事会换届选举"),
    ("positive", True, "{co}发布{q}财报，净利润同比增长{n}%"),
    ("negative", True, "{co}发布{q}财报，净利润同比下降{n}%"),
    ("neutral", True, "{co}{q}业绩符合预期，营收基本持平"),
]
QUARTERS = ["Q1", "Q2", "Q3", "Q4"]


def path_returns(rng, polarity, follows):
    """Returns per window for one ticker, shaped by the news polarity."""
    if polarity == "neutral":
        return {w: round(rng.uniform(-0.0015, 0.0015), 5) for w in WINDOWS}
    sign = 1 if polarity == "positive" else -1
    r15 = sign * rng.uniform(0.004, 0.015)
    r1d = r15 * (rng.uniform(1.3, 2.5) if follows else rng.uniform(-0.8, 0.6))
    # in between, move smoothly from the 15-min return towards the next-day one
    shape = {5: 0.6 * r15, 15: r15, 30: r15 * 1.05, 60: r15 + 0.3 * (r1d - r15),
             120: r15 + 0.6 * (r1d - r15), 1440: r1d}
    return {w: round(v * rng.uniform(0.95, 1.05), 5) for w, v in shape.items()}


def main():
    rng = random.Random(1)
    headlines, events = set(), []
    t = datetime(2024, 1, 2, 9, 30)
    while len(events) < N_EVENTS:
        zh = rng.random() < 0.3
        polarity, earnings, template = rng.choice(TEMPLATES_ZH if zh else TEMPLATES_EN)
        name, ticker, peer = rng.choice(COMPANIES_ZH if zh else COMPANIES)
        quarter = rng.choice(["一季度", "半年度", "三季度", "年度"]) if zh else rng.choice(QUARTERS)
        text = template.format(co=name, n=rng.randint(2, 40), q=quarter, b=rng.choice(BROKERS))
        if text in headlines:
            continue
        headlines.add(text)
        t += timedelta(minutes=rng.randint(120, 1300))
        if t.hour >= 16 or t.hour < 9:  # keep news in trading hours
            t = t.replace(hour=9, minute=rng.randint(30, 59)) + timedelta(days=1)
        events.append((f"E{len(events) + 1:04d}", t.strftime("%Y-%m-%d %H:%M:%S"), text,
                       rng.randint(1, 5), "newswire_zh" if zh else "newswire", polarity, earnings,
                       ticker, peer))

    impacts = []
    for i, (event_id, _, _, _, _, polarity, earnings, ticker, peer) in enumerate(events):
        if i % 37 == 5:  # no impact rows at all: the builder skips and counts these
            continue
        follows = earnings or rng.random() < 0.5
        tickers = [(ticker, 1.0)] + ([(peer, rng.uniform(0.6, 0.9))] if rng.random() < 0.3 else [])
        for symbol, scale in tickers:
            rets = path_returns(rng, polarity, follows)
            for w in WINDOWS:
                if w == 15 and i % 53 == 7:  # the 15-min bar is missing for this pair
                    continue
                ret = None if (w == 1440 and i >= N_EVENTS - 4) else round(rets[w] * scale, 5)
                impacts.append((event_id, symbol, w, ret, round(rng.uniform(0.5, 4.0), 2)))

    OUT.parent.mkdir(exist_ok=True)
    OUT.unlink(missing_ok=True)
    con = sqlite3.connect(OUT)
    con.executescript("""
        CREATE TABLE events (event_id TEXT PRIMARY KEY, ts TEXT NOT NULL, content TEXT NOT NULL,
                             star INTEGER, source TEXT);
        CREATE TABLE event_impacts (event_id TEXT NOT NULL, ticker TEXT NOT NULL,
                                    window_min INTEGER NOT NULL, ret REAL, volume_ratio REAL,
                                    PRIMARY KEY (event_id, ticker, window_min));
    """)
    con.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", [e[:5] for e in events])
    con.executemany("INSERT INTO event_impacts VALUES (?, ?, ?, ?, ?)", impacts)
    con.commit()
    con.close()
    print(f"wrote {OUT} ({len(events)} events, {len(impacts)} impact rows)")


if __name__ == "__main__":
    main()
