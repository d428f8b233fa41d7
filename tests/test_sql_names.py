"""SQL injection through config names: a table or column name from the options that is not a plain
identifier is refused with a ConfigError before the database is opened, and the database is unchanged.

Both SQLite builders (trade_signals, finance_news) take table and column names as options; SQL cannot bind
names as parameters, so they are checked (finetune/data/sqlite.py) and only then quoted into statements.
"""
import hashlib
import json
import sqlite3

import pytest

from finetune.data import finance_news, sqlite, trade_signals
from finetune.errors import ConfigError, DataError

HOSTILE = ["trades; DROP TABLE trades", 'x" OR 1=1 --', 'trades"--', '"', "", " trades", "trades\n", "trades\x00",
           "trаdes",  # Cyrillic а: looks like a name, is not ASCII
           "t.timestamp", "1trades", "[trades]", "trades/*", "`trades`", "events; DELETE FROM events", 5, ["trades"]]


def make_trades(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp TEXT, symbol TEXT, entry_price REAL, "
                "exit_price REAL, pnl_percent REAL, action_taken TEXT, status TEXT)")
    con.execute("CREATE TABLE signals (id INTEGER PRIMARY KEY, timestamp TEXT, market_data TEXT, ai_signal TEXT, "
                "signal_confidence REAL)")
    con.execute("INSERT INTO trades VALUES (1, '2024-01-01', 'BTC', 100, 110, 10.0, 'BUY', 'closed')")
    con.execute("INSERT INTO signals VALUES (1, '2024-01-01', ?, 'BUY', 0.7)",
                (json.dumps({"rsi": 28.0, "trend_direction": "bullish", "trend_strength": 0.7}),))
    con.commit()
    con.close()
    return path


def make_news(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE events (event_id TEXT, ts TEXT, content TEXT)")
    con.execute("CREATE TABLE event_impacts (event_id TEXT, ticker TEXT, window_min INTEGER, ret REAL)")
    con.execute("INSERT INTO events VALUES ('E1', '2024-01-01 09:30', 'Apple beats estimates')")
    con.execute("INSERT INTO event_impacts VALUES ('E1', 'AAPL', 15, 0.01)")
    con.commit()
    con.close()
    return path


def option(key):
    return lambda name: {key: name}


def column(key):
    return lambda name: {"columns": {key: name}}


TRADE_COLUMNS = ("timestamp", "pnl_percent", "status", "symbol", "signal_timestamp", "market_data", "ai_signal")
OPTIONS = [  # (builder, database maker, name -> the options that carry it)
    *(pytest.param(trade_signals.build, make_trades, option(k), id=k) for k in ("trades_table", "signals_table")),
    *(pytest.param(trade_signals.build, make_trades, column(k), id=f"columns.{k}") for k in TRADE_COLUMNS),
    *(pytest.param(finance_news.build, make_news, option(k), id=k)
      for k in ("events_table", "impacts_table", "text_column", "time_column")),
]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    """One of each, built once: nothing may write to them, which each test checks by their bytes."""
    folder = tmp_path_factory.mktemp("sql-names")
    return {make: make(folder / f"{make.__name__}.db") for make in (make_trades, make_news)}


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
@pytest.mark.parametrize("build, make, options", OPTIONS)
def test_hostile_name_is_refused_before_the_database_is_opened(databases, monkeypatch, build, make, options, name):
    db = databases[make]
    before = digest(db)
    monkeypatch.setattr(sqlite.sqlite3, "connect", lambda *a, **k: pytest.fail("the database was opened"))
    with pytest.raises(ConfigError, match=r"^dataset\.builder: .* is not a valid table or column name$"):
        build(db, **options(name))
    assert digest(db) == before


def test_the_databases_still_build_after_every_attempt(databases):
    # runs after the parametrized attempts above (file order): the tables and rows are all still there
    assert len(trade_signals.build(databases[make_trades]).samples) == 1
    assert len(finance_news.build(databases[make_news]).samples) == 1


def test_name_check_is_the_whole_string():
    # `re.match(r"^...$")` accepts "trades\n" ($ matches before a final newline); fullmatch does not
    sqlite.check_names("trades", "_x1", "pnl_percent")
    for name in ("trades\n", "trades\r\n", "trades "):
        with pytest.raises(ConfigError, match="not a valid table or column name"):
            sqlite.check_names(name)


def test_a_valid_name_not_in_the_database_names_what_was_found(tmp_path):
    db = make_trades(tmp_path / "t.db")
    with pytest.raises(DataError, match=r"^t\.db: no table 'sqlite_master' \(found: signals, trades\)$"):
        trade_signals.build(db, trades_table="sqlite_master")
    with pytest.raises(DataError, match=r"^t\.db: table 'trades' has no column 'pnl' \(found: id, timestamp, symbol, "):
        trade_signals.build(db, columns={"pnl_percent": "pnl"})


def test_a_table_whose_own_name_is_hostile_is_still_refused(tmp_path):
    # the name is checked itself, not only looked up: a table really named `x"; DROP TABLE trades; --` is refused
    db = make_trades(tmp_path / "t.db")
    con = sqlite3.connect(db)
    con.execute('CREATE TABLE "x""; DROP TABLE trades; --" (timestamp TEXT)')
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="not a valid table or column name"):
        trade_signals.build(db, signals_table='x"; DROP TABLE trades; --')
    with pytest.raises(DataError, match=r"""^t\.db: no table 'missing' \(found: signals, trades, x"; DROP TABLE """):
        trade_signals.build(db, signals_table="missing")
    assert len(trade_signals.build(db).samples) == 1


def test_the_database_is_opened_read_only_even_with_odd_characters_in_its_path(tmp_path):
    # a '?' or '#' in the file name once ended the URI early: "a?b#c.db?mode=ro" opened "a", read-write
    db = make_trades(tmp_path / "a?b#c 1%20.db")
    before = digest(db)
    assert len(trade_signals.build(db).samples) == 1
    con = sqlite.connect(db)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("DROP TABLE trades")
    con.close()
    assert digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a?b#c 1%20.db"]
