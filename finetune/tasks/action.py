"""The decision-records builder's answers: one JSON decision, its "action" the label, its "confidence" the
confidence. Written compact, as the builder writes it: `{"action":"BUY","symbol":"BTC","size":60,"confidence":0.75}`.

    parse_action('好的：```json\\n{"action": "buy", "symbol": "BTC", "size": 60, "confidence": 0.75}\\n```')
    -> {"action": "BUY", "symbol": "BTC", "size": 60, "confidence": 0.75}

The action is open JSON (any further keys), so it has no answer grammar.
"""
import json

from finetune.eval.answers import json_objects, to_confidence
from finetune.tasks.label import Label


def parse_action(text) -> dict | None:
    """The first JSON object with an "action" key, its action upper-cased (`"buy"` -> `"BUY"`); else None."""
    if not isinstance(text, str):
        return None
    for obj in json_objects(text):
        if "action" in obj:
            action = obj["action"]
            return {**obj, "action": action.strip().upper() if isinstance(action, str) else action}
    return None


class Action(Label):
    """A JSON decision {"action": BUY / SELL / HOLD / CLOSE, ...}."""

    name = "action"
    labels = ("BUY", "SELL", "HOLD", "CLOSE")
    json_layout = (",", ":")  # the builder's compact JSON

    def read(self, text, labels):
        action = parse_action(text)
        return (action["action"], to_confidence(action.get("confidence"))) if action else (None, None)

    def check(self, answer):
        return None if parse_action(answer) is not None else f"answer is not a JSON action: {answer!r:.60}"

    def fields(self, text) -> dict:
        return {"action": parse_action(text)}

    def render(self, label, confidence=None):
        return json.dumps({"action": label, "confidence": None if confidence is None else round(confidence, 2)})
