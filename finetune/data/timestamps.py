"""The one timestamp parser of the builders: whatever a source stores as a time -> naive ISO text (UTC) or None.

    parse_timestamp("2024-01-05 14:30")           -> "2024-01-05T14:30:00"
    parse_timestamp("2024-01-05T14:30:00+08:00")  -> "2024-01-05T06:30:00"   (zoned: converted to UTC)
    parse_timestamp("2024/01/05")                 -> "2024-01-05T00:00:00"
    parse_timestamp(1704465000)                   -> "2024-01-05T14:30:00"   (epoch seconds, or ms)
    parse_timestamp("yesterday"), parse_timestamp(2024) -> None
"""
import math
from datetime import date, datetime, timezone

# besides ISO 8601: the slashed and Chinese dates that exports (WeChat, Excel) write
DATE_LAYOUTS = ("%Y/%m/%d", "%Y/%m/%d %H:%M", "%Y/%m/%d %H:%M:%S", "%Y年%m月%d日", "%Y年%m月%d日 %H:%M")


def parse_timestamp(value) -> str | None:
    """ISO text ('2024-01-05', '2024-01-05 14:30', with T, Z or an offset), one of DATE_LAYOUTS, a datetime,
    or epoch seconds (or milliseconds) -> naive ISO text, in UTC when it carries a zone; else None."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        if not text:
            return None
        parsed = _from_text(text)
        if parsed is None:
            try:
                seconds = float(text)
            except ValueError:
                return None
            if not math.isfinite(seconds):
                return None
            if abs(seconds) < 1e8:  # 2024 or 20240105 are not epoch seconds in 1970
                return None
            seconds = seconds / 1000 if abs(seconds) > 1e11 else seconds
            try:
                return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None).isoformat()
            except (OverflowError, OSError, ValueError):
                return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed.isoformat()


def _from_text(text) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        pass
    for layout in DATE_LAYOUTS:
        try:
            return datetime.strptime(text, layout)
        except ValueError:
            pass
    return None
