"""Finance news builder, the finance news-impact use case: SQLite `events` + `event_impacts` -> news-impact,
market-analysis and earnings Q&A samples in a configurable mix (default 60 / 20 / 20).

Input schema (extra columns are ignored; the event text and time column names are options):

    events(event_id TEXT, ts TEXT, content TEXT, ...)          -- one row per news item
    event_impacts(event_id, ticker, window_min INTEGER, ret REAL, ...)
        -- long format: one row per event x ticker x window; `ret` is the ticker's return
        -- over `window_min` minutes after the event (a fraction, 0.0042 = +0.42 %, or
        -- percent with ret_unit=percent). A wide table (`ret_post_15m` columns) is an
        -- error naming the missing and the found columns.

How samples are formed. A *candidate* is one (event, ticker) pair with a non-NULL `ret` for the
main window (`main_window`, default the first of `windows`); every return of the configured
`windows` the pair has is shown. Each candidate becomes at most one sample, of one kind:

- news_impact: the news and the ticker -> the direction of the main-window return.
      user:      "News: Apple beats Q3 estimates\\nTicker: AAPL\\nDirection over 15m?"
      assistant: "up\\n15m +0.82% | 1h +1.10% | 1d +1.95%"         label "up"
- market_analysis: the news, the ticker and its returns over every window it has -> how the
  reaction developed from the main window to the longest one, which must be longer (a
  "priced in" / "wait and see" reading): wait_and_see if the main-window move is flat;
  follow_through if the longest-window return has the same sign and at least the same size;
  else priced_in.
      assistant: "priced_in\\nThe 15m move of +0.82% faded to -0.20% by 1d."
- earnings_qa: only events whose text contains one of `earnings_keywords`; the question asks how
  the ticker traded over its longest available window; the answer is that window's direction.
      assistant: "up\\nAAPL +1.95% over 1d after the report."

Directions use `flat_threshold` (same unit as `ret`): up if ret > t, down if ret < -t, else flat.
The answer's first line is always the label, so an eval can score every kind by its first line.
Quotas: `round(mix[kind] * total)`, total = all candidates or `num_samples`. Candidates are
shuffled with `seed`; earnings_qa is filled first (rarest pool), then market_analysis, then
news_impact; a kind whose pool runs short is filled with news_impact and a warning says so.

Skipped and counted in `dropped` whatever skip_bad_rows says (they are normal in real data):
"no_impacts" (events with no impact row for the configured windows), "no_main_window" (event x
ticker pairs lacking the main window), "null_ret" (impact rows with NULL ret).
Bad rows (raise, or skip and count with skip_bad_rows=True): empty content, bad or NULL time,
NULL ticker, a ret that is not a finite number, a window_min that is not a whole number, a
duplicate event_id or (event, ticker, window) row.

Example sample:
    {"messages": [{"role": "system", "content": "You are a financial news analyst. ..."},
                  {"role": "user",
                   "content": "News: 贵州茅台发布年报，净利润同比增长19%\\nTicker: 600519.SH\\nDirection over 15m?"},
                  {"role": "assistant", "content": "up\\n15m +0.64% | 1h +0.91% | 1d +1.32%"}],
     "label": "up", "timestamp": "2024-03-05T09:31:00",
     "meta": {"event_id": "E0042", "ticker": "600519.SH", "kind": "news_impact",
              "window_min": 15, "ret": 0.0064}}
meta.ret is the return over meta.window_min, the window the label was read from.
"""
import logging
import math
import random
import re
import sqlite3
from functools import partial
from pathlib import Path

from finetune.data import Built
from finetune.data.rows import BadRow, BadRows, SkipRow
from finetune.data.sqlite import check_columns, check_names, connect
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("news_impact", "market_analysis", "earnings_qa")
IMPACT_COLUMNS = ("event_id", "ticker", "window_min", "ret")
SYSTEM_PROMPT = "You are a financial news analyst. Answer with the label on the first line."
EARNINGS_KEYWORDS = ("earnings", "revenue", "EPS", "quarterly results", "财报", "营收", "净利润", "业绩")


def build(path, *, skip_bad_rows=False, events_table="events", impacts_table="event_impacts",
          text_column="content", time_column="ts", windows=(15, 60, 1440), main_window=None,
          flat_threshold=0.002, ret_unit="fraction", mix=None, num_samples=None,
          earnings_keywords=EARNINGS_KEYWORDS, seed=42, system_prompt=SYSTEM_PROMPT) -> Built:
    windows, main_window, mix = _check_options(windows, main_window, ret_unit, mix, num_samples,
                                               events_table, impacts_table, text_column, time_column)
    name = Path(path).name
    event_rows, impact_rows = _read(path, name, events_table, impacts_table, text_column, time_column)
    bad = BadRows(name, skip_bad_rows, "fix the row or set dataset.skip_bad_rows=true")
    impacts, windows_found = _impacts(impact_rows, impacts_table, windows, bad)
    candidates = _candidates(event_rows, impacts, events_table, text_column, time_column, main_window,
                             earnings_keywords, bad)
    if not candidates:
        raise DataError(
            f"{name}: no samples left: no (event, ticker) pair of {len(event_rows)} events has a usable "
            f"'{impacts_table}' row with window_min {main_window} (window_min values found: "
            f"{', '.join(map(str, sorted(windows_found))) or 'none'}; dropped: {dict(bad.dropped)}); "
            "check dataset.builder.windows")
    fmt = _formatter(ret_unit)
    samples = [_sample(c, kind, main_window, fmt, flat_threshold, system_prompt)
               for c, kind in _assign_kinds(candidates, mix, num_samples, main_window, seed, name)]
    samples.sort(key=lambda s: (s["timestamp"] or "", s["meta"]["event_id"], s["meta"]["ticker"]))
    return Built(samples, bad.dropped)


def _check_options(windows, main_window, ret_unit, mix, num_samples, events_table, impacts_table,
                   text_column, time_column):
    """(windows sorted, main window, mix as shares); a ConfigError for a bad option or name, before any SQL."""
    windows = sorted({_window_option(w) for w in windows})
    main_window = windows[0] if main_window is None else _window_option(main_window)
    if main_window not in windows:
        raise ConfigError(f"dataset.builder.main_window={main_window} is not in windows {windows}")
    if ret_unit not in ("fraction", "percent"):
        raise ConfigError(f"dataset.builder.ret_unit={ret_unit!r}: choose fraction or percent")
    mix = _mix_option(mix)
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise ConfigError(f"dataset.builder.num_samples={num_samples!r}: a positive integer, or null for all")
    # every name checked here, then against the schema in _read, before it reaches SQL
    check_names(events_table, impacts_table, *_event_columns(text_column, time_column))
    return windows, main_window, mix


def _event_columns(text_column, time_column) -> list[str]:
    return [text_column] + ([time_column] if time_column is not None else [])  # "" is refused


# ---- reading (read-only)

def _read(path, name, events_table, impacts_table, text_column, time_column):
    """(event rows: event_id, text[, time]; impact rows: event_id, ticker, window_min, ret)."""
    event_cols = _event_columns(text_column, time_column)
    con = connect(path)
    try:
        check_columns(con, name, events_table, ["event_id"] + event_cols)
        check_columns(con, name, impacts_table, IMPACT_COLUMNS)
        select = ", ".join(f'"{c}"' for c in ["event_id"] + event_cols)
        event_rows = con.execute(f'SELECT {select} FROM "{events_table}"').fetchall()
        impact_rows = con.execute(
            f'SELECT event_id, ticker, window_min, ret FROM "{impacts_table}"').fetchall()
    except sqlite3.DatabaseError as e:  # e.g. a file that is not a database
        raise DataError(f"{name}: cannot read the database ({e}); is dataset.path an SQLite file?") from e
    finally:
        con.close()
    if not event_rows:
        raise DataError(f"{name}: table '{events_table}' is empty")
    return event_rows, impact_rows


# ---- rows -> candidates: one per (event, ticker) with a main-window return

def _impacts(impact_rows, table, windows, bad):
    """({event_id: {ticker: {window: ret}}} for the configured windows, every window_min found)."""
    impacts, windows_found = {}, set()
    bad.each(enumerate(impact_rows, 1), partial(_add_impact, impacts, windows_found, table, windows))
    return impacts, windows_found


def _add_impact(impacts, windows_found, table, windows, row) -> None:
    i, (event_id, ticker, window, ret) = row
    where = f"{table} row {i} (event_id {event_id!r})"
    try:
        minutes = float(window)  # 15, 15.0 and '15' are all 15 minutes
    except (TypeError, ValueError, OverflowError):
        minutes = math.nan
    if not minutes.is_integer():  # also NaN and inf, which int() would crash on
        raise BadRow("bad_window", f"{where}, column 'window_min': {window!r} is not an integer")
    window = int(minutes)
    windows_found.add(window)
    if window not in windows:
        return
    if ticker is None or str(ticker).strip() == "":
        raise BadRow("null_ticker", f"{where}, column 'ticker' is empty")
    if ret is None:
        raise SkipRow("null_ret")
    if not isinstance(ret, (int, float)) or not math.isfinite(ret):  # loose typing: text in a REAL column
        raise BadRow("bad_ret", f"{where}, column 'ret': {ret!r} is not a number")
    per_window = impacts.setdefault(str(event_id), {}).setdefault(str(ticker).strip(), {})
    if window in per_window:
        raise BadRow("duplicate_impact", f"{where}: a second row for ticker {ticker!r}, window_min {window}")
    per_window[window] = float(ret)


def _candidates(event_rows, impacts, table, text_column, time_column, main_window, earnings_keywords, bad):
    seen = set()
    per_event = bad.each(enumerate(event_rows, 1), partial(
        _event_candidates, impacts=impacts, seen=seen, table=table, text_column=text_column,
        time_column=time_column, main_window=main_window, earnings_keywords=earnings_keywords,
        dropped=bad.dropped))
    return [candidate for candidates in per_event for candidate in candidates]


def _event_candidates(row, *, impacts, seen, table, text_column, time_column, main_window, earnings_keywords,
                      dropped) -> list[dict]:
    """One event row -> its candidates, one per ticker with a main-window return (others counted in dropped)."""
    i, (event_id, content, *time) = row
    where = f"{table} row {i} (event_id {event_id!r})"
    tickers = impacts.get(str(event_id))
    if str(event_id) in seen:
        raise BadRow("duplicate_event", f"{where}: event_id appears twice in '{table}'")
    seen.add(str(event_id))
    if not tickers:
        raise SkipRow("no_impacts")
    if content is None or str(content).strip() == "":
        raise BadRow("empty_content", f"{where}, column '{text_column}' is empty")
    timestamp = None
    if time_column is not None:
        timestamp = parse_timestamp(time[0])
        if timestamp is None:
            raise BadRow("bad_time", f"{where}, column '{time_column}': {time[0]!r} is not a date-time")
    text = " ".join(str(content).split())
    # a keyword must start a word, so "EPS" does not match "steps"; Chinese has no spaces to need it
    is_earnings = any(re.search(rf"(?<![a-z]){re.escape(k.lower())}", text.lower()) for k in earnings_keywords)
    candidates = []
    for ticker in sorted(tickers):
        rets = tickers[ticker]
        if main_window not in rets:
            dropped["no_main_window"] += 1
            continue
        candidates.append({"event_id": str(event_id), "ticker": ticker, "text": text,
                           "timestamp": timestamp, "rets": rets, "earnings": is_earnings})
    return candidates


def _assign_kinds(candidates, mix, num_samples, main_window, seed, name) -> list[tuple[dict, str]]:
    """(candidate, kind) pairs reaching the mix, rarest pool first, over the candidates shuffled with `seed`."""
    rng = random.Random(seed)
    rng.shuffle(candidates)
    total = len(candidates) if num_samples is None else min(num_samples, len(candidates))
    if total < (num_samples or 0):
        log.warning("%s: num_samples=%d but only %d (event, ticker) pairs; using them all", name, num_samples, total)
    quota = _quotas(mix, total)
    eligible = {"earnings_qa": lambda c: c["earnings"],
                "market_analysis": lambda c: max(c["rets"]) > main_window}
    kinds, free = {}, list(range(len(candidates)))
    for kind in ("earnings_qa", "market_analysis"):
        pool = [j for j in free if eligible[kind](candidates[j])][:quota[kind]]
        if len(pool) < quota[kind]:
            log.warning("%s: only %d %s candidates for a quota of %d; filled with news_impact",
                        name, len(pool), kind, quota[kind])
            quota["news_impact"] += quota[kind] - len(pool)
        kinds.update({j: kind for j in pool})
        free = [j for j in free if j not in kinds]
    kinds.update({j: "news_impact" for j in free[:quota["news_impact"]]})
    return [(candidates[j], kind) for j, kind in kinds.items()]


# ---- candidate -> sample

def _sample(c, kind, main_window, fmt, flat_threshold, system_prompt) -> dict:
    if kind == "news_impact":
        window, user, answer = _news_impact(c, main_window, fmt, flat_threshold)
    elif kind == "market_analysis":
        window, user, answer = _market_analysis(c, main_window, fmt, flat_threshold)
    else:
        window, user, answer = _earnings_qa(c, fmt, flat_threshold)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "label": answer.split("\n", 1)[0], "timestamp": c["timestamp"],
            "meta": {"event_id": c["event_id"], "ticker": c["ticker"], "kind": kind,
                     "window_min": window, "ret": c["rets"][window]}}


# ---- the three task kinds: each returns (label window, user prompt, answer)

def _news_impact(c, main, fmt, t):
    user = f"News: {c['text']}\nTicker: {c['ticker']}\nDirection over {_w(main)}?"
    moves = " | ".join(f"{_w(w)} {fmt(r)}" for w, r in sorted(c["rets"].items()))
    return main, user, f"{_direction(c['rets'][main], t)}\n{moves}"


def _market_analysis(c, main, fmt, t):
    longest = max(c["rets"])
    short, long = c["rets"][main], c["rets"][longest]
    if _direction(short, t) == "flat":
        reading, why = "wait_and_see", f"No clear reaction within {_w(main)} ({fmt(short)})."
    elif short * long > 0 and abs(long) >= abs(short):
        reading, why = "follow_through", f"The {_w(main)} move of {fmt(short)} extended to {fmt(long)} by {_w(longest)}."
    else:
        reading, why = "priced_in", f"The {_w(main)} move of {fmt(short)} faded to {fmt(long)} by {_w(longest)}."
    moves = "\n".join(f"{_w(w)}: {fmt(r)}" for w, r in sorted(c["rets"].items()))
    user = f"News: {c['text']}\nTicker: {c['ticker']}\n{moves}\nRead the price reaction."
    return main, user, f"{reading}\n{why}"


def _earnings_qa(c, fmt, t):
    longest = max(c["rets"])
    ret = c["rets"][longest]
    user = f"Earnings news: {c['text']}\nHow did {c['ticker']} trade over {_w(longest)} after the report?"
    return longest, user, f"{_direction(ret, t)}\n{c['ticker']} {fmt(ret)} over {_w(longest)} after the report."


def _direction(ret, threshold):
    return "up" if ret > threshold else "down" if ret < -threshold else "flat"


def _w(minutes):
    """15 -> '15m', 60 -> '1h', 1440 -> '1d': short labels keep prompts small."""
    if minutes % 1440 == 0:
        return f"{minutes // 1440}d"
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


def _formatter(ret_unit):
    scale = 100.0 if ret_unit == "fraction" else 1.0
    return lambda r: f"{r * scale:+.2f}%"


# ---- options, schema and values

def _window_option(value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"dataset.builder.windows: {value!r} is not a positive number of minutes")
    return value


def _mix_option(mix):
    mix = dict(mix or {"news_impact": 0.6, "market_analysis": 0.2, "earnings_qa": 0.2})
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise ConfigError(f"dataset.builder.mix: unknown kind {unknown[0]!r} (choices: {', '.join(KINDS)})")
    if any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(f"dataset.builder.mix: weights must be >= 0 and not all 0 (got {mix})")
    return {k: mix.get(k, 0) / sum(mix.values()) for k in KINDS}


def _quotas(mix, total):
    """Largest-remainder rounding, so the quotas add up to `total` exactly."""
    raw = {k: mix[k] * total for k in KINDS}
    quota = {k: int(v) for k, v in raw.items()}
    for k in sorted(KINDS, key=lambda k: raw[k] - quota[k], reverse=True)[:total - sum(quota.values())]:
        quota[k] += 1
    return quota
