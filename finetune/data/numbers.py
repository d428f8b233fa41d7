"""Numbers from user data: a finite float from a number or numeric text, or None.

    finite_number(43123.5) -> 43123.5      finite_number("28.4") -> 28.4
    finite_number("n/a")   -> None         finite_number(True)   -> None (a bool is not a number)
    finite_number(10**400) -> None (past float range)   finite_number("nan") -> None
"""
import math


def finite_number(value) -> float | None:
    if type(value) is float:  # the common case, first: a builder calls this ~10 times per row
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past float range, 10**400
        return None
    return number if math.isfinite(number) else None
