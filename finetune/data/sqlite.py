"""Read-only SQLite access for the SQLite builders (trade_signals, finance_news).

Table and column names cannot be bound as SQL parameters, so every name that comes from the config is
checked twice before it is quoted into a statement: against NAME (letters, digits, _), before the
database is even opened, and against what the database reports (sqlite_master, PRAGMA table_info).
A name such as `trades; DROP TABLE trades` is refused with a ConfigError; the database is opened with
mode=ro, so no statement could change it anyway.
"""
import re
import sqlite3
from pathlib import Path

from finetune.errors import ConfigError, DataError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_names(*names) -> None:
    """Refuse any table or column name that is not letters, digits and _ (whole string: no trailing newline)."""
    for name in names:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"dataset.builder: {name!r} is not a valid table or column name")


def connect(path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found ({path}); set dataset.path to the SQLite database")
    # as_uri() percent-escapes the path, so a '?' or '#' in a file name cannot end it early
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    # a cell that is not UTF-8 would fail the whole query ("Could not decode to UTF-8 column ..."): its bytes are
    # kept as surrogates, and the row check (finetune/data/rows.py) names the row as a bad one
    con.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    return con


def check_columns(con: sqlite3.Connection, name: str, table: str, columns, hint: str = "") -> None:
    """The table exists and has `columns`; else a DataError naming what is missing and what was found."""
    check_names(table, *columns)
    tables = [r[0] for r in con.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")]
    if table not in tables:
        found = _listed(tables) if tables else "none: the database is empty"
        raise DataError(f"{name}: no table '{table}' (found: {found})")
    found = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(f"{name}: table '{table}' has no column '{missing[0]}' (found: {_listed(found)}){hint}")


def _listed(names) -> str:
    # names come from the file: one with a newline or control character is shown quoted, so the error stays one line
    return ", ".join(n if n.isprintable() else repr(n) for n in map(str, names))
