"""Trading signals: a market snapshot in, BUY / SELL / HOLD with a confidence out, scored against the trade's
realised return too. The trade-signals builder (finetune/data/trade_signals.py), the signal provider
(finetune/serving/inference.py), predict, serve and the A/B router all write prompts and read answers with this file.

The prompt: one line per known indicator of the snapshot (INDICATORS; looked up in "technical" first, then at the
top level; trend words normalised, up / 上涨 / 多头 -> bullish), after the system prompt:

    {"symbol": "BTC/USDT", "price": 50000, "technical": {"rsi": 28.4, "trend_direction": "up"}}
    -> system: "You are a crypto trading assistant. ..."
       user:   "Symbol: BTC/USDT\\nPrice: 50000\\nRSI: 28.4\\nTrend: bullish"

The answer, as training writes it (`render`) and as constrained decoding allows it (`grammar`, json.dumps's
spacing, so a tuned model's learnt format is inside the grammar): {"signal": "BUY", "confidence": 0.72}

Reading an answer back (`parse_signal`) accepts free forms too, so a base model that answers in prose still gets a
fair score:

    '{"signal": "BUY", "confidence": 0.72}'        -> ("BUY", 0.72)
    '```json\\n{"signal": "sell", "confidence": "80%"}\\n```' -> ("SELL", 0.8)
    'BUY - 上涨趋势 + RSI健康，建议买入'              -> ("BUY", None)
    '建议 BUY，置信度 75%'                           -> ("BUY", 0.75)
    '信号：SELL，置信度：80%'                         -> ("SELL", 0.8)
    'Signal: hold (confidence 0.6)'                  -> ("HOLD", 0.6)
    'the market is hard to read'                     -> (None, None)

Where the signal is looked for, first hit wins:
1. a JSON object with a "signal" key (anywhere in the text, code fences and prose around it ignored);
2. a labelled signal: `signal:` / `信号：` / `建议` / `recommendation` ... followed by the signal word;
3. a signal word at the very start of the answer (`BUY - ...`);
4. the only signal word in the answer. Two different ones and none of the above -> None, because an
   answer that names BUY and SELL says nothing we can score (negation such as "not BUY" is not read).
Signal words are BUY / SELL / HOLD in any case, and 买入 / 卖出 / 持有 / 观望.

Confidence comes from the JSON "confidence" value or a labelled `confidence` / `置信度` number; a value
with % or above 1 is a percentage (75 and 75% both give 0.75), and the result is clipped to [0, 1].
Nothing here raises: any string (or non-string) gives a result, None where nothing could be read.
"""
import json
import re

from finetune.data.numbers import finite_number
from finetune.eval.answers import json_objects, to_confidence
from finetune.tasks.label import Label

SIGNALS = ("BUY", "SELL", "HOLD")
SYSTEM_PROMPT = "You are a crypto trading assistant. Answer with a JSON signal and confidence."

# ---- the prompt: market data -> one line per indicator

# (prompt label, market_data keys in lookup order, numeric?)
INDICATORS = (
    ("Price", ("price", "current_price", "close"), True),
    ("Change 24h", ("change_percent", "change_24h", "price_change_24h"), True),
    ("RSI", ("rsi", "rsi_14"), True),
    ("MACD", ("macd_state", "macd", "macd_signal"), False),
    ("Trend", ("trend_direction", "trend"), False),
    ("Trend strength", ("trend_strength",), True),
    ("ATR%", ("atr_percent", "atr_pct"), True),
    ("BB position", ("bb_position",), True),
    ("Volume ratio", ("volume_ratio", "vol_ratio"), True),
)
TRENDS = {"bullish": ("bullish", "bull", "up", "uptrend", "上涨", "上升", "多头", "看涨"),
          "bearish": ("bearish", "bear", "down", "downtrend", "下跌", "下降", "空头", "看跌")}
TREND_OF = {word: trend for trend, words in TRENDS.items() for word in words}


def market_prompt(market_data: dict, symbol=None, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The prompt messages for one market snapshot, exactly as the trade-signals builder writes them for training:
    what a signal provider sends to the tuned model. ValueError when the snapshot has no usable indicator."""
    lines, _ = indicators(market_data)
    if not lines:
        raise ValueError("market_data has no known indicator (e.g. rsi, trend_direction, price)")
    return prompt_messages(lines, symbol if symbol is not None else market_data.get("symbol"), system_prompt)


def prompt_messages(lines: list[str], symbol, system_prompt: str | None) -> list[dict]:
    user = "\n".join(([f"Symbol: {symbol}"] if symbol is not None else []) + lines)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}]


def indicators(snapshot: dict) -> tuple[list[str], dict]:
    """(prompt lines, {rsi, trend_direction, ...}: each indicator's value under its first key); ValueError names a
    bad value."""
    technical = snapshot.get("technical")
    sources = (technical, snapshot) if isinstance(technical, dict) else (snapshot,)
    lines, values = [], {}
    for label, keys, numeric in INDICATORS:
        key, value = first_present(keys, *sources)
        if value is None:
            continue
        if numeric:
            number = finite_number(value)
            if number is None:
                raise ValueError(f"'{key}' is {value!r}, not a number")
            value, text = number, _fmt(number)
        elif isinstance(value, (dict, list)):
            raise ValueError(f"'{key}' is {json.dumps(value, ensure_ascii=False)[:40]}, not a single value")
        else:
            text = str(value).strip()
            if label == "Trend":
                text = TREND_OF.get(text.lower(), text)
                value = text
        values[keys[0]] = value
        lines.append(f"{label}: {text}")
    return lines, values


def first_present(keys, *sources):
    """(key, value) of the first of `keys` set (not None) in the first source that has one; (keys[0], None)."""
    for source in sources:
        for key in keys:
            value = source.get(key)
            if value is not None:
                return key, value
    return keys[0], None


def _fmt(number):
    """43123.45 -> '43123.45', 45.0 -> '45': short and exact enough for a prompt."""
    return f"{number:.4f}".rstrip("0").rstrip(".")


# ---- the answer: its grammar, and reading one back

CONFIDENCE = r"(0(\.[0-9]{1,4})?|1(\.0{1,4})?)"
ANSWER = r'\{"signal": "(BUY|SELL|HOLD)", "confidence": ' + CONFIDENCE + r"\}"  # llguidance's regex syntax

_SIGNAL_WORDS = {"buy": "BUY", "sell": "SELL", "hold": "HOLD",
                 "买入": "BUY", "卖出": "SELL", "持有": "HOLD", "观望": "HOLD"}
# Latin words must not be part of a longer word ("buyer", "holding"); Chinese ones have no boundaries.
_WORD = r"(?<![A-Za-z])(buy|sell|hold)(?![A-Za-z])|(买入|卖出|持有|观望)"
_SEP = r"\s*[\"']?\s*[:：=]?\s*[\"']?\s*"
_LABELLED_SIGNAL = re.compile(
    r"(?<![A-Za-z])(?:signal|recommendation|suggestion|decision|action|信号|建议|操作)" + _SEP + r"(?:" + _WORD + ")",
    re.IGNORECASE)
_ANY_SIGNAL = re.compile(_WORD, re.IGNORECASE)
_LEADING_SIGNAL = re.compile(r"^[\s*#>`\"'\[(-]*(?:" + _WORD + ")", re.IGNORECASE)
_LABELLED_CONFIDENCE = re.compile(
    r"(?<![A-Za-z])(?:confidence|conf|置信度|信心)" + _SEP + r"(?:of\s*)?(-?\d+(?:\.\d+)?)\s*([%％])?",
    re.IGNORECASE)


def _signal_of(match) -> str:
    return _SIGNAL_WORDS[(match.group(1) or match.group(2)).lower()]


def parse_signal(text) -> tuple[str | None, float | None]:
    """(signal in BUY/SELL/HOLD or None, confidence in [0, 1] or None); see the module docstring."""
    if not isinstance(text, str):
        return None, None
    signal, confidence = None, None
    for obj in json_objects(text):
        if "signal" in obj:
            raw = obj["signal"]
            signal = _SIGNAL_WORDS.get(raw.strip().lower()) if isinstance(raw, str) else None
            confidence = to_confidence(obj.get("confidence"))
            break
    if signal is None:
        match = _LABELLED_SIGNAL.search(text) or _LEADING_SIGNAL.search(text)
        if match:
            signal = _signal_of(match)
        else:
            found = {_signal_of(m) for m in _ANY_SIGNAL.finditer(text)}
            signal = found.pop() if len(found) == 1 else None
    if confidence is None:
        match = _LABELLED_CONFIDENCE.search(text)
        if match:
            confidence = to_confidence(float(match.group(1)), percent=bool(match.group(2)))
    return signal, confidence


class Signals(Label):
    """A trading signal with its confidence; scored against the trade's realised return too."""

    name = "signals"
    labels = SIGNALS
    scores_returns = True

    def read(self, text, labels):
        return parse_signal(text)

    def check(self, answer):
        return None if parse_signal(answer)[0] is not None else f"answer is not a signal: {answer!r:.60}"

    def render(self, label, confidence=None):
        """json.dumps({"signal": label, "confidence": confidence to 2 decimals}) to the character (a finite float's
        JSON is its repr), at a third of the cost: the builder writes one per trade."""
        value = "null" if confidence is None else repr(round(float(confidence), 2))
        return f'{{"signal": "{label}", "confidence": {value}}}'

    def grammar(self):
        import llguidance  # only constrained decoding needs it
        return llguidance.LLMatcher.grammar_from_regex(ANSWER)
