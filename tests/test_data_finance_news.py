"""finance_news builder: long-format impacts, the three kinds, the mix, and a wide schema refused."""
import logging
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from finetune.data.finance_news import build
from finetune.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "finance_analysis.db"
EVENTS = "CREATE TABLE events (event_id TEXT PRIMARY KEY, ts TEXT, content TEXT, star INTEGER, source TEXT)"
IMPACTS = ("CREATE TABLE event_impacts (event_id TEXT, ticker TEXT, window_min INTEGER, ret REAL, "
           "volume_ratio REAL)")


def make_db(path, events=(), impacts=(), schema=(EVENTS, IMPACTS)):
    con = sqlite3.connect(path)
    for statement in schema:
        con.execute(statement)
    con.executemany("INSERT INTO events VALUES (?, ?, ?, 3, 'wire')", events)
    con.executemany("INSERT INTO event_impacts VALUES (?, ?, ?, ?, 1.0)", impacts)
    con.commit()
    con.close()
    return path


def impacts_for(event_id, ticker, rets):
    return [(event_id, ticker, w, r) for w, r in rets.items()]


def test_news_impact_sample_from_long_format(tmp_path):
    db = make_db(tmp_path / "n.db",
                 [("E1", "2024-03-05 09:31:00", "Apple beats  Q3 estimates")],
                 impacts_for("E1", "AAPL", {5: 0.001, 15: 0.0082, 60: 0.011, 1440: 0.0195})
                 + impacts_for("E1", "MSFT", {15: -0.0001, 60: 0.0003}))
    built = build(db, mix={"news_impact": 1})
    assert [s["label"] for s in built.samples] == ["up", "flat"]
    aapl = built.samples[0]
    assert aapl["messages"][1] == {"role": "user",
                                   "content": "News: Apple beats Q3 estimates\nTicker: AAPL\nDirection over 15m?"}
    # window 5 is not configured, so it is not shown
    assert aapl["messages"][2]["content"] == "up\n15m +0.82% | 1h +1.10% | 1d +1.95%"
    assert aapl["timestamp"] == "2024-03-05T09:31:00"
    assert aapl["meta"] == {"event_id": "E1", "ticker": "AAPL", "kind": "news_impact",
                            "window_min": 15, "ret": 0.0082}
    assert built.samples[1]["meta"].keys() == aapl["meta"].keys()


def test_market_analysis_readings(tmp_path):
    db = make_db(tmp_path / "m.db",
                 [("E1", "2024-01-01T10:00", "good news"), ("E2", "2024-01-02T10:00", "bad news"),
                  ("E3", "2024-01-03T10:00", "dull news")],
                 impacts_for("E1", "A", {15: 0.01, 60: 0.012, 1440: 0.02})     # extends
                 + impacts_for("E2", "B", {15: -0.01, 1440: 0.003})           # reverses
                 + impacts_for("E3", "C", {15: 0.001, 1440: 0.03}))           # no first reaction
    built = build(db, mix={"market_analysis": 1})
    answers = [s["messages"][2]["content"] for s in built.samples]
    assert answers == ["follow_through\nThe 15m move of +1.00% extended to +2.00% by 1d.",
                       "priced_in\nThe 15m move of -1.00% faded to +0.30% by 1d.",
                       "wait_and_see\nNo clear reaction within 15m (+0.10%)."]
    assert built.samples[0]["messages"][1]["content"] == \
        "News: good news\nTicker: A\n15m: +1.00%\n1h: +1.20%\n1d: +2.00%\nRead the price reaction."


def test_earnings_qa_uses_longest_window_and_short_pool_falls_back(tmp_path, caplog):
    db = make_db(tmp_path / "e.db",
                 [("E1", "2024-01-01T10:00", "贵州茅台发布年报，净利润同比增长19%"),
                  ("E2", "2024-01-02T10:00", "Board takes next steps")],  # "steps" is not EPS
                 impacts_for("E1", "600519.SH", {15: 0.004, 60: -0.001, 1440: -0.012})
                 + impacts_for("E2", "X", {15: -0.004}))
    with caplog.at_level(logging.WARNING):
        built = build(db, mix={"earnings_qa": 1})
    assert "only 1 earnings_qa candidates for a quota of 2" in caplog.text
    earnings, news = built.samples
    assert earnings["meta"]["kind"] == "earnings_qa" and news["meta"]["kind"] == "news_impact"
    assert earnings["label"] == "down" and earnings["meta"]["window_min"] == 1440
    assert earnings["meta"]["ret"] == -0.012
    assert earnings["messages"][2]["content"] == "down\n600519.SH -1.20% over 1d after the report."
    assert "净利润" in earnings["messages"][1]["content"]


def test_mix_quotas_add_up(tmp_path):
    events = [(f"E{i}", f"2024-01-{i + 1:02d}T10:00", f"Acme earnings update {i}") for i in range(10)]
    impacts = [row for i in range(10) for row in impacts_for(f"E{i}", "ACME", {15: 0.01, 1440: 0.02})]
    built = build(make_db(tmp_path / "x.db", events, impacts))
    assert Counter(s["meta"]["kind"] for s in built.samples) == \
        {"news_impact": 6, "market_analysis": 2, "earnings_qa": 2}
    assert len(build(tmp_path / "x.db", num_samples=5).samples) == 5
    assert build(tmp_path / "x.db").samples == built.samples  # deterministic


def test_wide_schema_names_missing_and_found_columns(tmp_path):
    wide = ("CREATE TABLE events (event_id TEXT, ts TEXT, content TEXT, star INTEGER, source TEXT)",
            "CREATE TABLE event_impacts (event_id TEXT, ticker TEXT, ret_post_15m REAL, ret_pre_120m REAL, x REAL)")
    db = make_db(tmp_path / "finance_analysis.db", schema=wide)
    with pytest.raises(DataError) as e:
        build(db)
    assert str(e.value).startswith("finance_analysis.db: table 'event_impacts' has no column 'window_min'")
    assert "found: event_id, ticker, ret_post_15m, ret_pre_120m, x" in str(e.value)


def test_missing_table_empty_db_not_a_db_missing_file(tmp_path):
    db = tmp_path / "a.db"
    sqlite3.connect(db).execute(EVENTS).connection.close()
    with pytest.raises(DataError, match=r"a\.db: no table 'event_impacts' \(found: events\)"):
        build(db)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(DataError, match="no table 'events' .found: none: the database is empty"):
        build(empty)
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite at all " * 100)
    with pytest.raises(DataError, match="junk.db: cannot read the database"):
        build(junk)
    with pytest.raises(DataError, match="nope.db: file not found"):
        build(tmp_path / "nope.db")
    with pytest.raises(DataError, match="table 'events' is empty"):
        build(make_db(tmp_path / "noevents.db"))


def test_configured_columns_are_validated(tmp_path):
    db = make_db(tmp_path / "c.db", [("E1", "2024-01-01", "x")], impacts_for("E1", "A", {15: 0.01}))
    with pytest.raises(ConfigError, match="not a valid table or column name"):
        build(db, events_table="events; DROP TABLE events")
    found = r"\(found: event_id, ts, content, star, source\)"
    with pytest.raises(DataError, match=r"table 'events' has no column 'published_at' " + found):
        build(db, time_column="published_at")
    with pytest.raises(ConfigError, match="main_window=30 is not in windows"):
        build(db, main_window=30)
    with pytest.raises(ConfigError, match="unknown kind 'news'"):
        build(db, mix={"news": 1})
    assert build(db, time_column=None).samples[0]["timestamp"] is None


def test_events_without_configured_windows_are_skipped_and_counted(tmp_path):
    db = make_db(tmp_path / "w.db",
                 [("E1", "2024-01-01T10:00", "a"), ("E2", "2024-01-02T10:00", "b"),
                  ("E3", "2024-01-03T10:00", "c"), ("E4", "2024-01-04T10:00", "d")],
                 impacts_for("E1", "A", {15: 0.01, 1440: None})
                 + impacts_for("E2", "B", {5: 0.01, 30: 0.02})       # only unconfigured windows
                 + impacts_for("E3", "C", {60: 0.01}))               # no main window
    built = build(db)
    assert [s["meta"]["event_id"] for s in built.samples] == ["E1"]
    assert built.dropped == {"no_impacts": 2, "no_main_window": 1, "null_ret": 1}
    with pytest.raises(DataError) as e:
        build(db, windows=[10, 120])
    assert "no samples left" in str(e.value) and "window_min values found: 5, 15, 30, 60, 1440" in str(e.value)


def test_bad_rows_raise_with_place_or_are_skipped(tmp_path):
    db = make_db(tmp_path / "b.db",
                 [("E1", "2024-01-01T10:00", "fine"), ("E2", "2024-01-02T10:00", None),
                  ("E3", "yesterday", "bad time"), ("E4", 1704196800, "epoch time")],
                 [("E1", "A", 15, 0.01), ("E1", "B", 15, "n/a"), ("E2", "A", 15, 0.01),
                  ("E3", "A", 15, 0.01), ("E4", "A", 15, -0.01)])
    where = r"b\.db: event_impacts row 2 \(event_id 'E1'\), column 'ret'"
    with pytest.raises(DataError, match=where + ": 'n/a' is not a number"):
        build(db)
    built = build(db, skip_bad_rows=True)
    assert built.dropped == {"bad_ret": 1, "empty_content": 1, "bad_time": 1}
    assert [(s["meta"]["event_id"], s["timestamp"]) for s in built.samples] == \
        [("E1", "2024-01-01T10:00:00"), ("E4", "2024-01-02T12:00:00")]
    db2 = make_db(tmp_path / "b2.db", [("E1", "2024-01-01T10:00", "  ")], [("E1", "A", 15, 0.01)])
    with pytest.raises(DataError, match=r"events row 1 \(event_id 'E1'\), column 'content' is empty"):
        build(db2)


def test_percent_returns_and_threshold(tmp_path):
    db = make_db(tmp_path / "p.db", [("E1", "2024-01-01T10:00+08:00", "x")],
                 impacts_for("E1", "A", {15: 0.15, 60: 0.5}))
    sample = build(db, ret_unit="percent", flat_threshold=0.2, mix={"news_impact": 1}).samples[0]
    assert sample["label"] == "flat" and sample["messages"][2]["content"] == "flat\n15m +0.15% | 1h +0.50%"
    assert sample["timestamp"] == "2024-01-01T02:00:00"  # zoned times become UTC


def test_sample_data_builds_all_three_kinds():
    built = build(SAMPLE)
    kinds = Counter(s["meta"]["kind"] for s in built.samples)
    assert set(kinds) == {"news_impact", "market_analysis", "earnings_qa"}
    assert abs(kinds["news_impact"] / len(built.samples) - 0.6) < 0.02
    news = Counter(s["label"] for s in built.samples if s["meta"]["kind"] == "news_impact")
    assert set(news) == {"up", "down", "flat"} and min(news.values()) > 0.25 * sum(news.values())
    assert all(s["timestamp"] for s in built.samples) and built.dropped["no_impacts"] > 0
