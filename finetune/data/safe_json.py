"""json.loads for user data: every way a text fails to be usable JSON is a json.JSONDecodeError.

json.loads itself also raises RecursionError (deeply nested arrays), a plain ValueError (an integer
of more than 4300 digits, Python's limit) and UnicodeDecodeError (bytes that are not UTF-8), and it
accepts "\\ud800", half a surrogate pair, which later cannot be written as UTF-8. Here all of them
are JSONDecodeErrors with a position, so a builder's `except json.JSONDecodeError as e` names the
file, line and column for every one.

    loads('{"rsi": 28.4}')   -> {"rsi": 28.4}
    loads("[" * 100000)      -> JSONDecodeError("nested too deeply", ...)
"""
import json
import re
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import DataError

_LONG_NUMBER = re.compile(r"\d{4300}")
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def loads(text: str | bytes):
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise json.JSONDecodeError(f"not UTF-8 text ({e.reason} at byte {e.start})", "", 0) from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # int("1" * 5000) inside the decoder
        match = _LONG_NUMBER.search(text)
        raise json.JSONDecodeError("a number with too many digits", text, match.start() if match else 0) from None
    if "\\u" in text:  # the only way to a lone surrogate; checked by encoding, the regex only finds where
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", text, 0) from None
        except UnicodeEncodeError:
            match = _LONE_SURROGATE.search(text)
            raise json.JSONDecodeError("a \\u escape that is half a surrogate pair, not a character", text,
                                       match.start() if match else 0) from None
    return value


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; DataError naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; give a JSONL file, one JSON object per line")
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name}: line {number}: invalid JSON ({e.msg} at char {e.pos}); "
                                "write one object per line") from e
            if not isinstance(row, dict):
                raise DataError(f"{path.name}: line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row
