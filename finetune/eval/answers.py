"""Read a model's generated answer back into a label: signal + confidence, sentiment label, or JSON action.

The answer formats our builders train on come first; free forms (prose, Chinese) are accepted too, so a base
model that answers in prose still gets a fair score:

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
import math
import re

SIGNALS = ("BUY", "SELL", "HOLD")
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


def json_objects(text: str):
    """Every JSON object in `text`, in order; prose, code fences and broken JSON around them are skipped."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting in garbage
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            yield value
        start = text.find("{", end)


def to_confidence(value, percent: bool = False) -> float | None:
    """0.72 -> 0.72; 72, "72%" and 72 with percent=True -> 0.72 (above 1 means a percentage); junk -> None."""
    if isinstance(value, str):
        text = value.strip()
        percent = percent or text.endswith(("%", "％"))
        try:
            value = float(text.rstrip("%％").strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer past float range is no confidence
        return None
    if not math.isfinite(value):
        return None
    if percent or value > 1:
        value = value / 100
    return min(max(value, 0.0), 1.0)


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


def parse_label(text, labels) -> str | None:
    """The one label of `labels` the answer gives (case-insensitive), else None.

    Tried in order: the whole answer is a label (`Positive.`); a JSON object's "label" or "sentiment";
    the answer starts with a label; exactly one distinct label is mentioned.
    """
    if not isinstance(text, str):
        return None
    canonical = {str(label).lower(): label for label in labels}
    if not canonical:
        return None
    bare = text.strip().strip(" \t\r\n.。!！\"'`*").lower()
    if bare in canonical:
        return canonical[bare]
    for obj in json_objects(text):
        for key in ("label", "sentiment"):
            if isinstance(obj.get(key), str) and obj[key].strip().lower() in canonical:
                return canonical[obj[key].strip().lower()]
    names = "|".join(re.escape(name) for name in sorted(canonical, key=len, reverse=True))
    pattern = re.compile(r"(?<![A-Za-z])(" + names + r")(?![A-Za-z])", re.IGNORECASE)
    hits = [m for m in pattern.finditer(text)]
    if hits and not text[:hits[0].start()].strip(" \t\r\n*#>`\"'[(-"):
        return canonical[hits[0].group(1).lower()]
    found = {m.group(1).lower() for m in hits}
    return canonical[found.pop()] if len(found) == 1 else None


def parse_action(text) -> dict | None:
    """The first JSON object with an "action" key, its action upper-cased (`"buy"` -> `"BUY"`); else None.

    '好的：```json\\n{"action": "buy", "symbol": "BTC", "size": 60, "confidence": 0.75}\\n```'
    -> {"action": "BUY", "symbol": "BTC", "size": 60, "confidence": 0.75}
    """
    if not isinstance(text, str):
        return None
    for obj in json_objects(text):
        if "action" in obj:
            action = obj["action"]
            return {**obj, "action": action.strip().upper() if isinstance(action, str) else action}
    return None
