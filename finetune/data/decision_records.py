"""Decision records builder, the trading-decision records use case: JSONL of trading decisions with outcome
labels -> JSON actions.

One JSON object per line, a decision collector's `training_data` export (extra keys are ignored):

    {"conversation_id": "d-0042", "timestamp": "2025-10-31T10:00:00Z",
     "input": {"market_data": {"BTC": {"price": 68500.0, "change_24h": 0.025, "trend": "bullish",
                                       "rsi": 62.5, "macd_signal": "positive"},
                               "market_regime": "normal"},
               "account_state": {"balance": 600.0, "positions": [], "permission_level": "L2"},
               "recent_history": [{"action": "hold", "symbol": "BTC", "label": "good_decision"}]},
     "output": {"action": "open_long", "symbol": "BTC", "size_usd": 60.0, "leverage": 2,
                "stop_loss_pct": 0.02, "take_profit_pct": 0.05, "reasoning": "...", "confidence": 0.75},
     "result": {"profitable": true, "pnl": 2.5, "duration_hours": 6, "exit_reason": "take_profit"},
     "label": "excellent_decision"}

Outcome labels: excellent / good / acceptable_loss / bad, with or without a "_decision"
suffix; "neutral" and "pending" (not yet closed) are known too. `train_outcomes` picks the records that
become samples, default excellent + good: SFT imitates every sample's output, so training on bad
decisions too would teach the model the decisions that lost money. Records
with another outcome are skipped and counted as "outcome_<label>" (e.g. "outcome_bad"), whatever
skip_bad_rows says, unless `undesirable_outcomes` names it (e.g. [bad]): then its record becomes a sample with
"desirable": false (and the train_outcomes ones "desirable": true), which objective=kto learns to avoid, and
objective=sft leaves out of train and validation (dataset.undesirable=drop; the test split keeps it, so the
outcome metric can say how often a model repeats a decision that went badly). acceptable_loss goes in
either list, or neither.

The sample: input -> user prompt, one line per part; nested values are written as compact JSON; only
the last `history_items` entries of recent_history (taken as oldest first) are shown, and no History line
when it is empty:

    user: "BTC: price 68500, change_24h 0.025, trend bullish, rsi 62.5, macd_signal positive
           market_regime: normal
           Account: balance 600, positions [], permission_level L2
           History: action hold, symbol BTC, label good_decision"
    assistant: {"action":"BUY","symbol":"BTC","size":60,"leverage":2,"stop_loss":0.02,"take_profit":0.05,
                "confidence":0.75,"reasoning":"..."}        (compact JSON, one line; label "BUY")

Actions are normalised: open_long / long / buy / 买入 / 做多 -> BUY; open_short / short / sell / 卖出 / 做空
-> SELL (open a short); hold / wait / 观望 -> HOLD; close / close_long / close_short / 平仓 -> CLOSE.
size is output.size_usd (or size), stop_loss / take_profit are stop_loss_pct / take_profit_pct (or the
bare names), fractions as given. Keys without a value are left out (a HOLD is just
{"action":"HOLD","confidence":0.6,"reasoning":"..."}): fewer tokens to learn and to generate.
A confidence above 1 is a percentage (75 -> 0.75).
The reasoning is cut to `max_reasoning_chars` (null: kept whole) so answers stay short.

Bad records (raise DataError naming the file, line and field, or skip and count with skip_bad_rows=True):
"malformed_json" (incl. a line that is not an object), "missing_field" (timestamp, input.market_data,
input.account_state, output.action, label; output.symbol for BUY / SELL / CLOSE and output.size_usd for
BUY / SELL), "unknown_outcome", "unknown_action", "bad_value" (a non-number where a number belongs, a
market_data or account_state that is not an object), "bad_timestamp". Blank lines are ignored.

Example sample:
    {"messages": [{"role": "system", "content": "You are a crypto trading AI. Reply with one JSON decision."},
                  {"role": "user", "content": "BTC: price 68500, ...\\nAccount: balance 600, ..."},
                  {"role": "assistant", "content": "{\\"action\\":\\"BUY\\",\\"symbol\\":\\"BTC\\",...}"}],
     "label": "BUY", "timestamp": "2025-10-31T10:00:00",
     "meta": {"line": 1, "conversation_id": "d-0042", "symbol": "BTC", "outcome": "excellent", "pnl": 2.5,
              "known_at": "2025-10-31T16:00:00"}}      (known_at: the timestamp + result.duration_hours)
"""
import json
import math
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from finetune.data import Built
from finetune.data.numbers import finite_number
from finetune.data.rows import BadRow, BadRows, SkipRow, jsonl_records
from finetune.data.timestamps import parse_timestamp
from finetune.errors import ConfigError, DataError

OUTCOMES = ("excellent", "good", "acceptable_loss", "bad", "neutral", "pending")
ACTIONS = {
    "BUY": ("buy", "long", "open_long", "买入", "做多", "开多"),
    "SELL": ("sell", "short", "open_short", "卖出", "做空", "开空"),
    "HOLD": ("hold", "wait", "none", "no_action", "观望", "持有"),
    "CLOSE": ("close", "close_long", "close_short", "close_all", "close_position", "平仓"),
}
# answer key -> the record's output keys, in lookup order (the export's own name first)
NUMBERS = {"size": ("size_usd", "size"), "leverage": ("leverage",),
           "stop_loss": ("stop_loss_pct", "stop_loss"), "take_profit": ("take_profit_pct", "take_profit"),
           "confidence": ("confidence",)}
SYSTEM_PROMPT = "You are a crypto trading AI. Reply with one JSON decision."


def build(path, *, skip_bad_rows=False, train_outcomes=("excellent", "good"), undesirable_outcomes=(),
          history_items=3, max_reasoning_chars=200, system_prompt=SYSTEM_PROMPT, encoding="utf-8-sig") -> Built:
    path = Path(path)
    train = _check_options(train_outcomes, history_items, max_reasoning_chars)
    avoid = _outcomes("undesirable_outcomes", undesirable_outcomes, empty=True)
    if train & avoid:
        raise ConfigError(f"dataset.builder: {sorted(train & avoid)[0]} is in both train_outcomes and "
                          "undesirable_outcomes; a decision is desirable or not")
    records = _read(path, encoding)
    bad = BadRows(path.name, skip_bad_rows, "fix the record or set dataset.skip_bad_rows=true")
    samples = bad.each(records, partial(_sample, train=train, avoid=avoid, history_items=history_items,
                                        max_reasoning_chars=max_reasoning_chars, system_prompt=system_prompt))
    if not samples:
        raise DataError(f"{path.name}: no samples left from {len(records)} records (dropped: "
                        f"{dict(bad.dropped) or 'none, the file is empty'}); train_outcomes={sorted(train)}")
    samples.sort(key=lambda s: (s["timestamp"], s["meta"]["line"]))
    return Built(samples, bad.dropped)


def _check_options(train_outcomes, history_items, max_reasoning_chars) -> set[str]:
    """The outcomes that train; a ConfigError for a bad option, before the file is read."""
    train = _outcomes("train_outcomes", train_outcomes, empty=False)
    if type(history_items) is not int or history_items < 0:
        raise ConfigError(f"dataset.builder.history_items={history_items!r}: a number of entries, 0 or more")
    if max_reasoning_chars is not None and (type(max_reasoning_chars) is not int or max_reasoning_chars < 1):
        raise ConfigError(f"dataset.builder.max_reasoning_chars={max_reasoning_chars!r}: a positive integer or null")
    return train


def _outcomes(option: str, given, empty: bool) -> set[str]:
    chosen = {_outcome(o) for o in ([given] if isinstance(given, str) else given)}
    if not (chosen or empty) or not chosen <= set(OUTCOMES):
        raise ConfigError(f"dataset.builder.{option}={list(given)}: choose from {', '.join(OUTCOMES)}")
    return chosen


def _read(path, encoding) -> list[tuple[int, dict | str]]:
    """(line, record) for every non-blank line, the whole file read before any record is checked."""
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path}); set dataset.path to the decisions JSONL file")
    try:
        return list(jsonl_records(path, encoding))
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not {encoding} text ({e.reason} at byte {e.start}); "
                        "re-save it as UTF-8") from e


# ---- one record -> one sample

def _sample(item, *, train, avoid, history_items, max_reasoning_chars, system_prompt) -> dict:
    line, record = item
    if isinstance(record, str):  # a line that is no JSON object: record holds why
        raise BadRow("malformed_json", f"line {line}, {record}")
    outcome = _train_outcome(line, record, train | avoid)
    given, output = record.get("input"), record.get("output")
    fields, timestamp, action = _required(line, record, given, output)
    answer = _answer(line, output, action, max_reasoning_chars)
    history = given.get("recent_history") or []
    history = history[-history_items:] if isinstance(history, list) and history_items else []
    user = "\n".join([*(f"{k}: {_render(v)}" for k, v in fields["input.market_data"].items()),
                      f"Account: {_render(fields['input.account_state'])}",
                      *(["History: " + " | ".join(_render(h) for h in history)] if history else [])])
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False, separators=(",", ":"))}]
    result = record.get("result") if isinstance(record.get("result"), dict) else {}
    return {"messages": messages, "label": action, "timestamp": timestamp,
            **({"desirable": outcome in train} if avoid else {}),
            "meta": {"line": line, "conversation_id": _scalar(record.get("conversation_id")),
                     "symbol": _scalar(answer.get("symbol")), "outcome": outcome,
                     "pnl": _number(result.get("pnl")), "known_at": _known_at(timestamp, result),
                     "features": _features(fields)}}


def _known_at(timestamp: str, result: dict) -> str | None:
    """When the decision's outcome was known: its time + result.duration_hours (None without one). A reward that
    reads the outcome of a train decision known after the test window starts would learn from the test period
    (finetune/train/grpo.py refuses it)."""
    hours = _number(result.get("duration_hours"))
    if hours is None or not 0 <= hours < 1e5:  # no duration, or none a decision lasts (11 years and more)
        return None
    return (datetime.fromisoformat(timestamp) + timedelta(hours=hours)).isoformat()


def _features(fields: dict) -> dict:
    """The record's plain fields, for the simple-model baseline (finetune/eval/simple_model.py): each symbol's
    market data under `market` (one symbol a record, as the collector writes), the other market keys, the account's
    scalars, and the side of its first open position."""
    market, account = fields["input.market_data"], fields["input.account_state"]
    found = {}
    for key, value in market.items():
        if isinstance(value, dict):
            found.update({f"market.{k}": _scalar(v) for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list):
            found[key] = _scalar(value)
    found.update({f"account.{k}": _scalar(v) for k, v in account.items() if not isinstance(v, (dict, list))})
    positions = account.get("positions") if isinstance(account.get("positions"), list) else []
    found["positions"] = len(positions)
    found["position_side"] = str(positions[0].get("side")) if positions and isinstance(positions[0], dict) else "none"
    return found


def _train_outcome(line, record, train) -> str:
    """The record's outcome, read first: records that will not train are counted, not checked further."""
    if record.get("label") is None:
        raise BadRow("missing_field",
                     f"line {line}, field 'label' is missing (excellent / good / acceptable_loss / bad)")
    outcome = _outcome(record["label"])
    if outcome not in OUTCOMES:
        raise BadRow("unknown_outcome", f"line {line}, field 'label': unknown outcome {record['label']!r} "
                     f"(known: {', '.join(OUTCOMES)}, with or without '_decision')")
    if outcome not in train:
        raise SkipRow(f"outcome_{outcome}")
    return outcome


def _required(line, record, given, output) -> tuple[dict, str, str]:
    """(the required fields by dotted name, the timestamp, the normalised action); BadRow if one is unusable."""
    fields = {"timestamp": record.get("timestamp"),
              "input.market_data": given.get("market_data") if isinstance(given, dict) else None,
              "input.account_state": given.get("account_state") if isinstance(given, dict) else None,
              "output.action": output.get("action") if isinstance(output, dict) else None}
    missing = [k for k, v in fields.items() if v is None or v == "" or v == {}]
    if missing:
        raise BadRow("missing_field", f"line {line}, field '{missing[0]}' is missing")
    timestamp = parse_timestamp(fields["timestamp"])
    if timestamp is None:
        raise BadRow("bad_timestamp", f"line {line}, field 'timestamp': {fields['timestamp']!r} is not a date-time")
    not_object = [k for k in ("input.market_data", "input.account_state") if not isinstance(fields[k], dict)]
    if not_object:
        raise BadRow("bad_value", f"line {line}, field '{not_object[0]}' must be a JSON object, "
                     f"got {type(fields[not_object[0]]).__name__}")
    action = _action(fields["output.action"])
    if action is None:
        raise BadRow("unknown_action", f"line {line}, field 'output.action': unknown action "
                     f"{fields['output.action']!r} (known: "
                     + ", ".join(w for words in ACTIONS.values() for w in words) + ")")
    return fields, timestamp, action


def _answer(line, output, action, max_reasoning_chars) -> dict:
    """The JSON answer: action, symbol, the numbers and the reasoning, keys without a value left out."""
    answer = {"action": action, "symbol": output.get("symbol")}
    for key, sources in NUMBERS.items():
        source = next((s for s in sources if output.get(s) is not None), sources[0])
        value = output.get(source)
        number = _number(value)
        if value is not None and number is None:
            raise BadRow("bad_value", f"line {line}, field 'output.{source}': {value!r} is not a number")
        answer[key] = number
    need = ["symbol"] * (action != "HOLD") + ["size"] * (action in ("BUY", "SELL"))
    absent = [k for k in need if answer[k] in (None, "")]
    if absent:
        field = "size_usd" if absent[0] == "size" else "symbol"
        raise BadRow("missing_field",
                     f"line {line}, field 'output.{field}' is missing, which a {action} decision needs")
    if answer["confidence"] is not None:
        confidence = answer["confidence"] / 100 if answer["confidence"] > 1 else answer["confidence"]
        answer["confidence"] = round(min(max(confidence, 0.0), 1.0), 4)
    answer["reasoning"] = _short(output.get("reasoning"), max_reasoning_chars)
    return {k: v for k, v in answer.items() if v not in (None, "")}  # a HOLD needs no size: fewer tokens


def _outcome(label):
    text = str(label).strip().lower()
    return text[:-len("_decision")] if text.endswith("_decision") else text


def _action(value):
    word = str(value).strip().lower()
    return next((action for action, words in ACTIONS.items() if word in words), None)


def _render(value):
    """A dict as 'key value, key value' (nested values as compact JSON); anything else as one short line."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_render_leaf(v)}" for k, v in value.items())
    return _render_leaf(value)


def _render_leaf(value):
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):  # exact, and no float overflow for 10**400
        return str(value)
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return " ".join(str(value).split())


def _short(text, limit):
    text = " ".join(str(text).split()) if text is not None else ""
    return text if limit is None or len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _number(value):
    """A finite number (int kept int, 60.0 -> 60) from a number or numeric text; None otherwise."""
    number = finite_number(value)
    if number is None:
        return None
    return int(number) if number.is_integer() else round(number, 6)


def _scalar(value):
    if isinstance(value, float) and not math.isfinite(value):  # meta must stay strict JSON
        return None
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
