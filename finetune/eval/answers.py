"""What reading any task's answer needs: the JSON objects in a generated answer, and a confidence from a number or a
percentage. Each task's own reading (a signal's words, a label, a JSON action) is its file's in finetune/tasks/.

    list(json_objects('Sure: ```json {"signal": "BUY"} ``` and {"n": 1}')) -> [{"signal": "BUY"}, {"n": 1}]
    to_confidence("72%") -> 0.72;  to_confidence(72) -> 0.72;  to_confidence(0.72) -> 0.72;  to_confidence("n/a") -> None

Nothing here raises: any string (or non-string) gives a result, None where nothing could be read.
"""
import json
import math


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
