"""Trade signals builder, the crypto trade-log signals use case: SQLite `trades` LEFT JOIN `signals` on timestamp
-> BUY / SELL / HOLD + confidence.

Input schema (a trading bot's log; extra columns are ignored; any name can be changed with `columns`):

    trades(id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, entry_price REAL, exit_price REAL,
           pnl_percent REAL, action_taken TEXT, position_size REAL, leverage REAL, status TEXT, ...)
    signals(id INTEGER PRIMARY KEY, timestamp TEXT, market_data TEXT, ai_signal TEXT,
            signal_confidence REAL, ...)

One sample per closed trade, read with the query

    SELECT ... FROM trades t LEFT JOIN signals s ON t.timestamp = s.timestamp
    WHERE t.pnl_percent IS NOT NULL AND t.status = 'closed'       -- status compared case-insensitively

`market_data` holds the JSON snapshot the signal was made from, nested (indicators under "technical") or flat:

    {"symbol": "BTC/USDT", "price": 50000, "change_percent": 2.5, "volume_ratio": 1.4,
     "technical": {"rsi": 28.4, "macd_state": "golden_cross", "trend_direction": "bullish",
                   "trend_strength": 0.65, "atr_percent": 2.5, "bb_position": 20}}

The prompt is the signals task's (finetune/tasks/signals.py, which the signal provider uses too): each known
indicator (INDICATORS there; looked up in "technical" first, then at the top level) becomes one prompt line; other
keys are ignored. Trend words are normalised (up / 上涨 / 多头 -> bullish, ...).

Labels (`label_rule`):
- pnl (default: a trade is labelled by its outcome): pnl_percent is the trade's own return in percent
  (5.0 = 5 %). Above `profit_threshold` (5) the trade confirms its direction: a long -> BUY, a short -> SELL.
  Below `loss_threshold` (-3) it was on the wrong side of the move: `loss_label: opposite` (default) labels
  the other direction, since that side would have made the money; `loss_label: HOLD` says "do not trade
  this set-up". In between the move did not pay for the risk: HOLD. The direction comes from action_taken
  (BUY / long / open_long / 买入 / 做多 ..., SELL / short / ...), else from the prices (exit above entry
  with a profit is a long); a trade with neither is a bad row ("unknown_direction").
- indicators (a rule on the snapshot, no outcome needed): RSI < rsi_oversold (35) and bullish -> BUY; RSI >
  rsi_overbought (65) and bearish -> SELL; bullish / bearish with trend_strength > strong_trend (0.6) ->
  BUY / SELL; else HOLD. market_data must then carry rsi, trend_direction and trend_strength (a missing
  one is a bad row, "missing_indicator": defaulting to RSI 50 / neutral would invent a HOLD).

Confidence: the signal row's signal_confidence when set and its ai_signal agrees with the label (or is NULL),
as a fraction (a value above 1 is a percentage: 75 -> 0.75); otherwise how strongly the indicators back the
label: the indicator rule's confidence (0.6 + RSI distance past the threshold / 100, or 0.5 + strength / 4,
or 0.55 for HOLD) when the rule gives the same signal, else 0.5. Two decimals, within [0, 1].

Skipped and counted in `dropped` whatever skip_bad_rows says (normal in a live trade log): "not_closed"
(status is not `closed_status`), "null_pnl" (closed, pnl NULL), "no_signal" (no signal row at the trade's
timestamp, or NULL market_data: there is nothing to prompt with, and a label without its market data
teaches nothing). Several signal rows at one timestamp: the first (lowest rowid) is used.
Bad rows (raise DataError naming the file, table, row id and column, or skip and count with
skip_bad_rows=True): "bad_timestamp", "bad_pnl" (not a number, or beyond ±10,000 %), "bad_market_data" (not a
JSON object), "bad_indicator" (e.g. rsi "n/a"), "no_indicators" (none of the known keys), "missing_indicator",
"unknown_direction". The samples come in time order (timestamp, then trade id); `limit` keeps the most
recent ones (ORDER BY timestamp DESC LIMIT). With `stream=True` (what the pipeline asks
for, conf/dataset/trade_signals.yaml) the rows are read in batches of 10,000, in the log's row order, and
each batch is converted where the pipeline runs it (its worker processes, `Built.parts`), so a log of
millions of trades is never held in memory and the conversion runs in parallel.

Preference pairs (`preference=true`, for objective=dpo; label_rule=pnl): each sample also carries `rejected`, the
answer the realised return punished, at the same confidence: for a BUY or SELL label (the move paid more than
profit_threshold, or lost more than loss_threshold) the other direction; for HOLD (the move did not pay for the
risk) the direction the trade took. `move_rejects` chooses what a BUY / SELL label rejects: opposite (the other
direction), hold (not trading the move), or balanced (opposite for an even trade id, HOLD for an odd one). With
opposite alone HOLD is chosen but never rejected, so DPO learns the marginal "answer HOLD" rather than which side
paid (measured in docs/results.md); balanced rejects each answer about as often as it is chosen.

Desirability (`desirability=true`, for objective=kto; label_rule=pnl): the answer is the signal the trade took
(long -> BUY, short -> SELL; label the same) and the sample says "desirable": true when the trade was profitable
after costs (pnl_percent > cost_percent, the round trip in percent: 0.1 = the backtest's 10 bps), false
otherwise. objective=kto learns from both; objective=sft leaves the losing trades out of train and validation
(dataset.undesirable=drop), so it imitates the winning trades only.

meta (every sample): known_at (with columns.exit_timestamp: when the trade closed, so when its return was
known; objective=grpo refuses a train trade that closed after the test window starts), trade_id (the trades
rowid), symbol, pnl_percent, entry_price, exit_price, action_taken,
direction ("long" / "short" / None) and return_percent, the realised return of going long in percent
(pnl_percent for a long, -pnl_percent for a short, None if the direction is unknown): a BUY / SELL backtest
of the answers needs that one, not pnl_percent, whose sign flips for shorts.

Example sample:
    {"messages": [{"role": "system", "content": "You are a crypto trading assistant. ..."},
                  {"role": "user", "content": "Symbol: BTC/USDT\\nPrice: 50000\\nChange 24h: 2.5\\nRSI: 28.4\\n"
                                              "MACD: golden_cross\\nTrend: bullish\\nTrend strength: 0.65\\n"
                                              "ATR%: 2.5\\nBB position: 20\\nVolume ratio: 1.4"},
                  {"role": "assistant", "content": "{\\"signal\\": \\"BUY\\", \\"confidence\\": 0.72}"}],
     "label": "BUY", "timestamp": "2024-03-05T09:00:00",
     "meta": {"trade_id": 17, "symbol": "BTC/USDT", "pnl_percent": 6.1, "entry_price": 50000.0,
              "exit_price": 53050.0, "action_taken": "BUY", "direction": "long", "return_percent": 6.1}}
"""
import heapq
import json
import logging
import sqlite3
from collections import Counter
from functools import partial
from itertools import islice
from pathlib import Path

from finetune import data
from finetune.data import Built, safe_json
from finetune.data.numbers import finite_number
from finetune.data.rows import BadRow, BadRows, SkipRow
from finetune.data.sqlite import check_columns, check_names, connect
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError
from finetune.tasks.signals import INDICATORS, SYSTEM_PROMPT, Signals, indicators, prompt_messages

log = logging.getLogger(__name__)
SIGNALS_TASK = Signals()  # writes each answer as the signals task reads it

# logical name -> default column: TRADE_COLUMNS live in the trades table, SIGNAL_COLUMNS in the signals table
COLUMNS = {"timestamp": "timestamp", "symbol": "symbol", "entry_price": "entry_price", "exit_price": "exit_price",
           "pnl_percent": "pnl_percent", "action_taken": "action_taken", "exit_timestamp": None, "status": "status",
           "signal_timestamp": "timestamp", "market_data": "market_data", "ai_signal": "ai_signal",
           "signal_confidence": "signal_confidence"}
MAX_PNL_PERCENT = 10_000.0  # a trade's return in percent beyond which the cell is taken for corrupt
TRADE_COLUMNS = ("timestamp", "symbol", "entry_price", "exit_price", "pnl_percent", "action_taken", "exit_timestamp",
                 "status")
SIGNAL_COLUMNS = ("signal_timestamp", "market_data", "ai_signal", "signal_confidence")
OPTIONAL = {"entry_price", "exit_price", "action_taken", "exit_timestamp", "ai_signal",  # may be null
            "signal_confidence"}
DIRECTIONS = {"long": ("buy", "long", "open_long", "close_long", "买入", "做多", "开多"),
              "short": ("sell", "short", "open_short", "close_short", "卖出", "做空", "开空")}
SIGNAL_OF = {"long": "BUY", "short": "SELL"}
OPPOSITE = {"BUY": "SELL", "SELL": "BUY"}
DIRECTION_OF = {word: direction for direction, words in DIRECTIONS.items() for word in words}


def build(path, *, skip_bad_rows=False, trades_table="trades", signals_table="signals", columns=None,
          closed_status="closed", label_rule="pnl", profit_threshold=5.0, loss_threshold=-3.0,
          loss_label="opposite", rsi_oversold=35.0, rsi_overbought=65.0, strong_trend=0.6,
          system_prompt=SYSTEM_PROMPT, limit=None, stream=False, preference=False, move_rejects="opposite",
          desirability=False, cost_percent=0.1) -> Built:
    cols = _check_options(columns, label_rule, loss_label, profit_threshold, loss_threshold, limit,
                          trades_table, signals_table)
    if preference and label_rule != "pnl":
        raise ConfigError("dataset.builder.preference=true pairs the answer the realised return rewarded with the one "
                          "it punished: it needs label_rule=pnl")
    if move_rejects not in ("opposite", "hold", "balanced"):
        raise ConfigError(f"dataset.builder.move_rejects={move_rejects!r}: choose opposite, hold or balanced")
    if desirability and (preference or label_rule != "pnl"):
        raise ConfigError("dataset.builder.desirability=true judges the signal each trade took by its realised "
                          "return: it needs label_rule=pnl and preference=false")
    if finite_number(cost_percent) is None or cost_percent < 0:
        raise ConfigError(f"dataset.builder.cost_percent={cost_percent!r}: a round-trip cost in percent, 0 or more")
    name = Path(path).name
    con, total, dropped = _open(path, name, trades_table, signals_table, cols, closed_status)
    to_sample = partial(_sample, cols=cols, trades_table=trades_table, signals_table=signals_table,
                        label_rule=label_rule, pnl_rule=(profit_threshold, loss_threshold, loss_label),
                        rule={"oversold": rsi_oversold, "overbought": rsi_overbought, "strong": strong_trend},
                        system_prompt=system_prompt, preference=preference and move_rejects,
                        cost=cost_percent if desirability else None)
    hint = (f"check closed_status={closed_status!r} and that '{signals_table}' rows share the trades' timestamps")

    def parts():  # the rows read here in batches, each converted by whoever runs it: a log is never held whole
        extra = Counter()
        try:
            rows = _rows(con, name, trades_table, signals_table, cols, closed_status, extra)
            while batch := list(islice(rows, data.CHUNK)):
                yield partial(_convert, batch, to_sample, name, skip_bad_rows)
        finally:
            con.close()
        if extra["signals"]:
            log.warning("%s: %d trades matched more than one '%s' row at their timestamp; used the first",
                        name, extra["signals"], signals_table)

    def finish(count):
        if not count:
            raise DataError(f"{name}: no samples left from {total} trades in '{trades_table}' (dropped: "
                            f"{dict(dropped) or 'none'}); {hint}")
    if stream:  # the pipeline's way: converted in its worker processes, in the log's row order
        return Built(None, dropped, parts=parts(), finish=finish)

    def samples():
        count = 0
        for part in parts():
            converted, lost = part()
            dropped.update(lost)
            count += len(converted)
            yield from converted
        finish(count)
    in_time = (lambda s: (s["timestamp"], s["meta"]["trade_id"]))
    if limit:  # the most recent, oldest first; only `limit` samples are held
        return Built(heapq.nlargest(limit, samples(), key=in_time)[::-1], dropped)
    return Built(sorted(samples(), key=in_time), dropped)


def _convert(rows, to_sample, name, skip_bad_rows) -> tuple[list[dict], Counter]:
    """One batch of rows -> (samples, dropped); a bad row raises, or is counted with skip_bad_rows."""
    bad = BadRows(name, skip_bad_rows, "fix the row or set dataset.skip_bad_rows=true")
    return bad.each(rows, to_sample), bad.dropped


def _check_options(columns, label_rule, loss_label, profit_threshold, loss_threshold, limit,
                   trades_table, signals_table) -> dict:
    """The column map; a ConfigError for a bad option or name, before the database is opened."""
    cols = _columns_option(columns)
    if label_rule not in ("pnl", "indicators"):
        raise ConfigError(f"dataset.builder.label_rule={label_rule!r}: choose pnl or indicators")
    if loss_label not in ("opposite", "HOLD"):
        raise ConfigError(f"dataset.builder.loss_label={loss_label!r}: choose opposite or HOLD")
    if not loss_threshold < profit_threshold:
        raise ConfigError(f"dataset.builder: loss_threshold={loss_threshold} must be below "
                          f"profit_threshold={profit_threshold}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ConfigError(f"dataset.builder.limit={limit!r}: a positive integer, or null for all trades")
    # every name checked here, then against the schema in _read, before it reaches SQL
    check_names(trades_table, signals_table, *_trade_columns(cols), *_signal_columns(cols))
    return cols


def _trade_columns(cols) -> list[str]:
    return [cols[k] for k in TRADE_COLUMNS if cols[k] is not None]  # null: no such column; "" is refused


def _signal_columns(cols) -> list[str]:
    return [cols[k] for k in SIGNAL_COLUMNS if cols[k] is not None]


# ---- reading (read-only)

def _open(path, name, trades_table, signals_table, cols, closed_status):
    """(the open connection, the trades' count, dropped so far): the schema checked before any row is read."""
    con = connect(path)
    try:
        hint = "; map it with dataset.builder.columns"
        check_columns(con, name, trades_table, _trade_columns(cols), hint)
        check_columns(con, name, signals_table, _signal_columns(cols), hint)
        pnl, status = f't."{cols["pnl_percent"]}"', f't."{cols["status"]}"'
        total, not_closed, null_pnl = con.execute(
            f'SELECT COUNT(*), COALESCE(SUM(LOWER({status}) IS NOT LOWER(?)), 0), '
            f'COALESCE(SUM(LOWER({status}) = LOWER(?) AND {pnl} IS NULL), 0) FROM "{trades_table}" t',
            (closed_status, closed_status)).fetchone()
    except sqlite3.DatabaseError as e:  # e.g. a file that is not a database
        con.close()
        raise DataError(f"{name}: cannot read the database ({e}); is dataset.path an SQLite file?") from e
    except BaseException:
        con.close()
        raise
    if total == 0:
        con.close()
        raise DataError(f"{name}: table '{trades_table}' is empty")
    return con, total, Counter({k: v for k, v in (("not_closed", not_closed), ("null_pnl", null_pnl)) if v})


def _rows(con, name, trades_table, signals_table, cols, closed_status, extra: Counter, batch: int = 10_000):
    """One row per closed trade with a pnl, in the log's row order, fetched `batch` at a time.

    A row: trade rowid, signal rowid, then TRADE_COLUMNS but status, then SIGNAL_COLUMNS but signal_timestamp
    (NULL for a column mapped to null); the signal columns are NULL for a trade with no signal row. Several
    signal rows at one timestamp: the first (lowest rowid) is used, the others counted in `extra`. The query
    orders by the trade only (the scan's own order: an ORDER BY on the signal as well sorts every joined row
    before the first comes back, 3 s and the whole log in SQLite's temp store at 1M trades).
    """
    pnl, status = f't."{cols["pnl_percent"]}"', f't."{cols["status"]}"'
    select = [f't."{cols[k]}"' if cols[k] is not None else "NULL" for k in TRADE_COLUMNS[:-1]]
    select += [f's."{cols[k]}"' if cols[k] is not None else "NULL" for k in SIGNAL_COLUMNS[1:]]
    try:
        cursor = con.execute(
            f'SELECT t.rowid, s.rowid, {", ".join(select)} FROM "{trades_table}" t '
            f'LEFT JOIN "{signals_table}" s ON t."{cols["timestamp"]}" = s."{cols["signal_timestamp"]}" '
            f'WHERE {pnl} IS NOT NULL AND LOWER({status}) = LOWER(?) ORDER BY t.rowid', (closed_status,))
        held = None  # rows of one trade are adjacent (ORDER BY t.rowid): the one with the lowest signal rowid
        while rows := cursor.fetchmany(batch):
            for row in rows:
                if held is not None and row[0] == held[0]:
                    extra["signals"] += 1
                    if row[1] < held[1]:
                        held = row
                    continue
                if held is not None:
                    yield held
                held = row
        if held is not None:
            yield held
    except sqlite3.DatabaseError as e:
        raise DataError(f"{name}: cannot read the database ({e}); is dataset.path an SQLite file?") from e


# ---- one closed trade -> one sample

def _sample(row, *, cols, trades_table, signals_table, label_rule, pnl_rule, rule, system_prompt,
            preference=False, cost=None) -> dict:
    (trade_id, signal_id, ts, symbol, entry, exit_, raw_pnl, action, exit_ts,
     market_data, ai_signal, signal_confidence) = row
    at = f"table '{trades_table}' row id {trade_id}"
    pnl_value = finite_number(raw_pnl)
    if pnl_value is None:  # SQLite's loose typing lets text into a REAL column
        raise BadRow("bad_pnl", f"{at}, column '{cols['pnl_percent']}': {raw_pnl!r} is not a number")
    if abs(pnl_value) > MAX_PNL_PERCENT:  # a corrupt cell (9.2e18) would rule every backtest and threshold
        raise BadRow("bad_pnl", f"{at}, column '{cols['pnl_percent']}': {raw_pnl!r} is no return in percent "
                                f"(over {MAX_PNL_PERCENT:,.0f} %, a 100x move)")
    timestamp = parse_timestamp(ts)
    if timestamp is None:
        raise BadRow("bad_timestamp", f"{at}, column '{cols['timestamp']}': {ts!r} is not a date-time")
    if signal_id is None or market_data is None:
        raise SkipRow("no_signal")
    at_signal = f"table '{signals_table}' row id {signal_id} (trade id {trade_id}), column '{cols['market_data']}'"
    snapshot, lines, values = _market_data(market_data, at_signal)
    ruled = _rule(values, rule)
    direction = _direction(action, entry, exit_, pnl_value)
    if label_rule == "indicators":
        if ruled is None:
            missing = [k for k in ("rsi", "trend_direction", "trend_strength") if values.get(k) is None]
            raise BadRow("missing_indicator", f"{at_signal}: no '{missing[0]}', which label_rule=indicators needs")
        label = ruled[0]
    else:
        if direction is None:
            raise BadRow("unknown_direction", f"{at}, column '{cols['action_taken']}': {action!r} is neither a buy "
                         "nor a sell, and the prices do not tell the direction")
        label = _pnl_label(pnl_value, direction, *pnl_rule) if cost is None else SIGNAL_OF[direction]
    confidence = _confidence(label, ai_signal, signal_confidence, ruled)
    symbol = symbol if symbol is not None else snapshot.get("symbol")
    messages = prompt_messages(lines, symbol, system_prompt)
    messages.append({"role": "assistant", "content": SIGNALS_TASK.render(label, confidence)})
    sign = {"long": 1, "short": -1}.get(direction)
    sample = {"messages": messages, "label": label, "timestamp": timestamp}
    if preference:  # the answer the outcome punished: the other side of (or no trade on) a move that paid, the
        # trade taken otherwise; `preference` is the builder's move_rejects
        hold = preference == "hold" or preference == "balanced" and trade_id % 2
        rejected = SIGNAL_OF[direction] if label == "HOLD" else "HOLD" if hold else OPPOSITE[label]
        sample["rejected"] = SIGNALS_TASK.render(rejected, confidence)
    if cost is not None:  # desirability: was the trade taken worth it after costs?
        sample["desirable"] = pnl_value > cost
    known = {}  # columns.exit_timestamp: when the move was realised, what objective=grpo's leakage check reads
    if cols["exit_timestamp"] is not None:
        known["known_at"] = parse_timestamp(exit_ts)
        if known["known_at"] is None and exit_ts is not None:
            raise BadRow("bad_timestamp", f"{at}, column '{cols['exit_timestamp']}': {exit_ts!r} is not a date-time")
    return {**sample,
            "meta": {**known, "trade_id": trade_id, "symbol": None if symbol is None else str(symbol),
                     "pnl_percent": pnl_value, "entry_price": finite_number(entry),
                     "exit_price": finite_number(exit_), "action_taken": None if action is None else str(action),
                     "direction": direction, "return_percent": None if sign is None else sign * pnl_value}}


def _market_data(market_data, at_signal):
    """(snapshot, prompt lines, values the rules read) of a signal row's market_data; BadRow if unusable."""
    try:
        snapshot = safe_json.loads(market_data) if isinstance(market_data, (str, bytes)) else market_data
    except json.JSONDecodeError as e:
        raise BadRow("bad_market_data", f"{at_signal}: invalid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(snapshot, dict):
        raise BadRow("bad_market_data", f"{at_signal}: expected a JSON object, got {type(snapshot).__name__}")
    try:
        lines, values = indicators(snapshot)
    except ValueError as e:
        raise BadRow("bad_indicator", f"{at_signal}: {e}") from None
    if not lines:
        raise BadRow("no_indicators", f"{at_signal}: no known indicator (keys looked for: "
                     + ", ".join(k for _, keys, _ in INDICATORS for k in keys) + ")")
    return snapshot, lines, values


def _rule(values, t):
    """The indicator rule (label_rule=indicators) -> (signal, confidence), or None without rsi / trend / strength."""
    rsi, trend, strength = values.get("rsi"), values.get("trend_direction"), values.get("trend_strength")
    if rsi is None or trend is None or strength is None:
        return None
    if rsi < t["oversold"] and trend == "bullish":
        return "BUY", 0.6 + (t["oversold"] - rsi) / 100
    if rsi > t["overbought"] and trend == "bearish":
        return "SELL", 0.6 + (rsi - t["overbought"]) / 100
    if trend in ("bullish", "bearish") and strength > t["strong"]:
        return ("BUY" if trend == "bullish" else "SELL"), 0.5 + strength / 4
    return "HOLD", 0.55


def _pnl_label(pnl, direction, profit, loss, loss_label):
    if pnl > profit:
        return SIGNAL_OF[direction]
    if pnl < loss:
        return OPPOSITE[SIGNAL_OF[direction]] if loss_label == "opposite" else "HOLD"
    return "HOLD"


def _direction(action, entry, exit_, pnl):
    word = str(action).strip().lower() if action is not None else ""
    if word in DIRECTION_OF:
        return DIRECTION_OF[word]
    entry, exit_ = finite_number(entry), finite_number(exit_)
    if entry is None or exit_ is None or entry == exit_ or pnl == 0:
        return None
    return "long" if (exit_ > entry) == (pnl > 0) else "short"


def _confidence(label, ai_signal, signal_confidence, ruled):
    given = finite_number(signal_confidence)
    agrees = ai_signal is None or _signal_word(ai_signal) == label
    if given is not None and given >= 0 and agrees:
        value = given / 100 if given > 1 else given
    else:
        value = ruled[1] if ruled is not None and ruled[0] == label else 0.5
    return round(min(max(value, 0.0), 1.0), 2)


def _signal_word(value):
    word = str(value).strip().lower()
    if word in DIRECTION_OF:
        return SIGNAL_OF[DIRECTION_OF[word]]
    return "HOLD" if word in ("hold", "wait", "观望", "持有") else word.upper()




# ---- options and schema

def _columns_option(columns):
    unknown = sorted(set(columns or {}) - set(COLUMNS))
    if unknown:
        raise ConfigError(f"dataset.builder.columns: unknown key {unknown[0]!r} (choices: {', '.join(COLUMNS)})")
    cols = {**COLUMNS, **dict(columns or {})}
    for key, value in cols.items():
        if value is None and key not in OPTIONAL:
            raise ConfigError(f"dataset.builder.columns.{key} is required (only {', '.join(sorted(OPTIONAL))} "
                              "may be null)")
    return cols
