"""Hostile input: every parser of user data either builds samples the pipeline accepts or raises
one DataError line naming the file; never another exception, never a traceback.

Hypothesis feeds each builder random text and bytes (invalid UTF-8, NULs), truncated and deeply nested
JSON, NaN / Infinity literals, huge numbers, wrong types in every field, ragged CSV, and SQLite rows
with random values in every column, with skip_bad_rows both off and on. The answer parsers get the same
garbage and must always return a result. Bounded (max_examples): the file runs in about half a minute.
"""
import csv
import io
import json
import re
import sqlite3
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from finetune.data import Built, decision_records, finance_news, generic, sentiment, style_corpus, trade_signals
from finetune.data.pipeline import check_sample
from finetune.errors import DataError
from finetune.eval.answers import json_objects, to_confidence
from finetune.tasks.action import parse_action
from finetune.tasks.label import parse_label
from finetune.tasks.signals import SIGNALS, parse_signal

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DELETE = object()  # a mutation that removes the field

# ---- strategies: hostile values, JSON text and files

HUGE_INT = "1" * 5000  # past Python's 4300-digit limit: json.loads raises ValueError, not JSONDecodeError
# lines no JSON reader may take: each of these once escaped json.loads' JSONDecodeError, or lost a line number
MALFORMED = {"huge int": HUGE_INT, "deep": "[" * 50_000 + "]" * 50_000, "deep object": '{"a": ' * 3000,
             "truncated": '{"text": "Apple', "nul": '{"a": 1}\x00', "lone surrogate": '{"text": "\\udfff", "x": 1}',
             "surrogate key": '{"\\ud800": 1}'}
NASTY_JSON = [*MALFORMED.values(), "NaN", "-Infinity", "1e999", "\x00", "[]", "{}", '""', "null",
              '{"signal": "BUY", "confidence": 1' + "0" * 400 + "}", '{"a": 1' + "0" * 400 + "}"]
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from([10 ** 400, -(10 ** 30), 2 ** 63])
           | st.floats() | st.text(max_size=20) | st.sampled_from(["", " ", "\x00", "\ud7ff", "1e999", "NaN", "买入"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # floats give the NaN / Infinity literals Python accepts


json_text = st.one_of(
    json_values.map(dumps),
    st.tuples(json_values.map(dumps), st.integers(0, 40)).map(lambda t: t[0][:t[1]]),  # truncated
    st.sampled_from(NASTY_JSON),
    st.text(max_size=40),
)
sql_values = st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.text(max_size=20),
                       st.binary(max_size=12), st.sampled_from(["", "1e999", HUGE_INT, "NaN", "n/a", "\x00"]))


def mutate(record, changes):
    """Set (or DELETE) the value at each key path; a path through a non-container is left alone."""
    record = json.loads(json.dumps(record))
    for path, value in changes:
        node = record
        for key in path[:-1]:
            node = node[key] if isinstance(node, dict) and key in node or \
                isinstance(node, list) and isinstance(key, int) and key < len(node) else None
            if node is None:
                break
        key = path[-1]
        if isinstance(node, dict) or isinstance(node, list) and isinstance(key, int) and key < len(node):
            if value is DELETE:
                node.pop(key) if isinstance(node, dict) and key in node else None
            else:
                node[key] = value
    return record


def records(base: dict, paths: list[tuple]):
    """A valid record with some fields replaced by hostile values or removed."""
    change = st.tuples(st.sampled_from(paths), json_values | st.just(DELETE))
    return st.tuples(st.just(base), st.lists(change, max_size=3)).map(lambda t: mutate(*t))


def text_file(lines):
    """File bytes: hostile lines, maybe with a BOM, CRLF, invalid UTF-8 or NULs mixed in; or nothing at all."""
    body = st.tuples(st.lists(lines, max_size=5), st.sampled_from(["\n", "\r\n"]),
                     st.sampled_from([b"", b"\xef\xbb\xbf"]), st.sampled_from([b"", b"\n\xff\xfe\n", b"\x00", b"\n\n"]))
    return st.one_of(body.map(lambda t: t[2] + t[1].join(t[0]).encode("utf-8", "surrogatepass") + t[3]),
                     st.binary(max_size=60), st.just(b""))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def fresh_dir(scratch: Path) -> Path:
    # hypothesis runs many examples in one test: each gets a folder of its own
    return Path(tempfile.mkdtemp(dir=scratch))


# ---- the contract

def check_contract(build, path: Path, task: str, **options) -> None:
    """build() gives valid samples or one DataError line naming the file; with both skip_bad_rows values."""
    for skip in (False, True):
        try:
            built = build(path, skip_bad_rows=skip, **options)
        except DataError as e:
            message = str(e)
            assert path.name in message, message
            assert len(message.splitlines()) == 1, message
            continue
        assert isinstance(built, Built) and built.samples
        assert all(isinstance(k, str) and n > 0 for k, n in built.dropped.items()), built.dropped
        assert len({tuple(s["meta"]) for s in built.samples}) == 1, "meta keys differ between samples"
        for sample in built.samples:
            assert check_sample(sample, task) is None, (check_sample(sample, task), sample)
            # what pipeline.write_jsonl does, strictly: NaN, Infinity or a lone surrogate would break it
            json.dumps(sample, ensure_ascii=False, allow_nan=False).encode("utf-8")
            meta = {**sample["meta"], **sample["meta"].get("features", {})}  # the simple model's fields: flat too
            meta.pop("features", None)
            assert all(v is None or isinstance(v, (str, int, float, bool)) for v in meta.values())
            assert sample["timestamp"] is None or datetime.fromisoformat(sample["timestamp"])
            assert sample["label"] is None or isinstance(sample["label"], str)


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def sqlite_db(path: Path, statements, rows: dict) -> Path:
    con = sqlite3.connect(path)
    for statement in statements:
        con.execute(statement)
    for table, (columns, values) in rows.items():
        con.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                        values)
    con.commit()
    con.close()
    return path


# ---- JSONL builders

DECISION = {"conversation_id": "d-1", "timestamp": "2025-10-31T10:00:00Z",
            "input": {"market_data": {"BTC": {"price": 68500.0, "rsi": 62.5}, "market_regime": "normal"},
                      "account_state": {"balance": 600.0, "positions": []},
                      "recent_history": [{"action": "hold", "symbol": "BTC", "label": "good_decision"}]},
            "output": {"action": "open_long", "symbol": "BTC", "size_usd": 60.0, "leverage": 2,
                       "stop_loss_pct": 0.02, "take_profit_pct": 0.05, "reasoning": "trend up", "confidence": 0.75},
            "result": {"profitable": True, "pnl": 2.5}, "label": "excellent_decision"}
DECISION_PATHS = [("conversation_id",), ("timestamp",), ("input",), ("input", "market_data"),
                  ("input", "market_data", "BTC"), ("input", "market_data", "BTC", "price"),
                  ("input", "account_state"), ("input", "account_state", "balance"), ("input", "recent_history"),
                  ("input", "recent_history", 0), ("output",), ("output", "action"), ("output", "symbol"),
                  ("output", "size_usd"), ("output", "leverage"), ("output", "stop_loss_pct"),
                  ("output", "confidence"), ("output", "reasoning"), ("result",), ("result", "pnl"), ("label",)]


@FUZZ
@given(text_file(records(DECISION, DECISION_PATHS).map(dumps) | json_text))
def test_decision_records(scratch, data):
    path = write(fresh_dir(scratch) / "decisions.jsonl", data)
    check_contract(decision_records.build, path, "action")


SENTIMENT = {"text": "Apple beats estimates, raises guidance", "label": "positive", "ts": "2024-01-05T14:30:00"}


@FUZZ
@given(text_file(records(SENTIMENT, [("text",), ("label",), ("ts",)]).map(dumps) | json_text),
       st.sampled_from([None, "ts"]))
def test_sentiment_jsonl(scratch, data, timestamp_field):
    path = write(fresh_dir(scratch) / "headlines.jsonl", data)
    check_contract(sentiment.build, path, "sentiment", timestamp_field=timestamp_field)


CHAT = {"messages": [{"role": "system", "content": "Trade."}, {"role": "user", "content": "RSI: 28.4"},
                     {"role": "assistant", "content": "BUY"}], "label": "BUY", "timestamp": "2024-01-01",
        "meta": {"symbol": "BTC"}}
ALPACA = {"instruction": "Classify.", "input": "Apple beats", "output": "positive", "label": "positive",
          "timestamp": 1704067200}
PROMPT_COMPLETION = {"prompt": [{"role": "user", "content": "Headline?"}], "completion": "positive"}
GENERIC_PATHS = [("messages",), ("messages", 0), ("messages", 1, "role"), ("messages", 2, "content"), ("label",),
                 ("timestamp",), ("meta",), ("meta", "symbol"), ("instruction",), ("input",), ("output",),
                 ("system",), ("prompt",), ("prompt", 0, "content"), ("completion",)]
generic_records = st.one_of(*(records(base, GENERIC_PATHS) for base in (CHAT, ALPACA, PROMPT_COMPLETION)))


@FUZZ
@given(text_file(generic_records.map(dumps) | json_text), st.sampled_from(["auto", "chat", "alpaca"]))
def test_generic_jsonl(scratch, data, format):
    path = write(fresh_dir(scratch) / "chat.jsonl", data)
    check_contract(generic.build, path, "text", format=format, meta_fields=("symbol",))


@FUZZ
@given(st.one_of(st.lists(generic_records, max_size=4).map(dumps), json_text,
                 st.lists(json_values, max_size=3).map(dumps)).map(lambda s: s.encode("utf-8", "surrogatepass"))
       | st.binary(max_size=40))
def test_generic_json_list(scratch, data):
    path = write(fresh_dir(scratch) / "records.json", data)
    check_contract(generic.build, path, "text", meta_fields=("symbol",))


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("build, file, good, task", [
    (decision_records.build, "decisions.jsonl", dumps(DECISION), "action"),
    (sentiment.build, "headlines.jsonl", dumps(SENTIMENT), "sentiment"),
    (generic.build, "chat.jsonl", dumps(CHAT), "text"),
], ids=["decision_records", "sentiment", "generic"])
def test_malformed_json_line_is_named_or_skipped(scratch, build, file, good, task, line):
    path = write(fresh_dir(scratch) / file, f"{line}\n{good}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(file)}: line 1, malformed JSON \("):
        build(path)
    built = build(path, skip_bad_rows=True)
    assert built.dropped == {"malformed_json": 1} and len(built.samples) == 1
    check_contract(build, path, task)


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_file_or_column_is_named(scratch, text):
    with pytest.raises(DataError, match=r"^records\.json: (invalid JSON at line|line 1, malformed JSON)"):
        generic.build(write(fresh_dir(scratch) / "records.json", "[" + text))
    root = fresh_dir(scratch) / "posts"
    write(root / "p" / "index.md", "Hello there. More text.")
    write(root / "p" / "meta.json", text)
    with pytest.raises(DataError, match=r"^posts/p/meta\.json: invalid JSON at line 1 column \d+ \("):
        style_corpus.build(root, min_tokens=1)
    schema = ["CREATE TABLE trades (timestamp, symbol, entry_price, exit_price, pnl_percent, action_taken, status)",
              "CREATE TABLE signals (timestamp, market_data, ai_signal, signal_confidence)"]
    db = sqlite_db(fresh_dir(scratch) / "trades.db", schema, {
        "trades": (["timestamp", "pnl_percent", "action_taken", "status"], [("2024-01-01", 6.0, "BUY", "closed")]),
        "signals": (["timestamp", "market_data"], [("2024-01-01", text)])})
    with pytest.raises(DataError, match=r"^trades\.db: table 'signals' row id 1 \(trade id 1\), column "
                                        r"'market_data': invalid JSON \("):
        trade_signals.build(db)
    with pytest.raises(DataError, match=r"^trades\.db: no samples left .*'bad_market_data': 1"):
        trade_signals.build(db, skip_bad_rows=True)


# ---- CSV builders

cells = st.one_of(st.text(max_size=12), st.sampled_from(["positive", "bearish", "2024-01-05", "1704067200", "",
                                                         "a,b", 'say "hi"', "two\nlines", "\x00", "NaN"]))
csv_headers = st.lists(st.sampled_from(["text", "label", "ts", "instruction", "output", "input", "messages",
                                        "prompt", "completion", "timestamp"]) | st.text(max_size=6),
                       min_size=1, max_size=5)


def csv_text(header, rows, quoted):
    """Rows may be ragged; unquoted, cells are joined with bare commas, so quotes and newlines break them."""
    if not quoted:
        return "\n".join(",".join(row) for row in [header, *rows])
    out = io.StringIO()
    csv.writer(out).writerows([header, *rows])
    return out.getvalue()


csv_files = st.one_of(
    st.builds(csv_text, csv_headers, st.lists(st.lists(cells, max_size=6), max_size=5), st.booleans())
    .map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.just(("text,label\n" + "x" * 140_000 + ",positive\n").encode()),  # past csv's field size limit
    st.just(b"text,label\n\xff\xfe,positive\n"),
    st.binary(max_size=40),
)


@FUZZ
@given(csv_files, st.sampled_from([None, "ts"]))
def test_sentiment_csv(scratch, data, timestamp_field):
    path = write(fresh_dir(scratch) / "headlines.csv", data)
    check_contract(sentiment.build, path, "sentiment", timestamp_field=timestamp_field)


@settings(FUZZ, max_examples=12)  # each call goes through datasets (about 0.1 s)
@given(csv_files)
def test_generic_csv(scratch, data):
    path = write(fresh_dir(scratch) / "table.csv", data)
    check_contract(generic.build, path, "text")


# ---- SQLite builders: random values in every column, typed and untyped schemas

SNAPSHOT = {"symbol": "BTC/USDT", "price": 50000, "technical": {"rsi": 28.4, "macd_state": "golden_cross",
                                                                "trend_direction": "bullish", "trend_strength": 0.7}}
SNAPSHOT_PATHS = [("price",), ("technical",), ("technical", "rsi"), ("technical", "trend_direction"),
                  ("technical", "trend_strength"), ("technical", "macd_state"), ("rsi",), ("symbol",)]
TIMES = ["2024-01-01T00:00:00", "2024-01-02 10:00", 1704067200]


def plausible(*values):
    return st.sampled_from(values) | sql_values


trade_rows = st.lists(st.tuples(plausible(*TIMES), plausible("BTC/USDT"), plausible(50000.0), plausible(53050.0),
                                plausible(6.1, -4.0, 0.5), plausible("BUY", "short", "买入"),
                                plausible("closed", "CLOSED", "open")), max_size=5)
signal_rows = st.lists(st.tuples(plausible(*TIMES),
                                 records(SNAPSHOT, SNAPSHOT_PATHS).map(dumps) | json_text | sql_values,
                                 plausible("BUY", "HOLD"), plausible(72, 0.6)), max_size=5)



@FUZZ
@given(trade_rows, signal_rows, st.booleans(), st.sampled_from(["pnl", "indicators"]))
def test_trade_signals(scratch, trades, signals, typed, label_rule):
    t = dict(real=" REAL", text=" TEXT") if typed else dict(real="", text="")  # untyped: values stored as given
    schema = [f"CREATE TABLE trades (id INTEGER PRIMARY KEY, timestamp{t['text']}, symbol{t['text']}, "
              f"entry_price{t['real']}, exit_price{t['real']}, pnl_percent{t['real']}, action_taken{t['text']}, "
              f"status{t['text']})",
              f"CREATE TABLE signals (id INTEGER PRIMARY KEY, timestamp{t['text']}, market_data{t['text']}, "
              f"ai_signal{t['text']}, signal_confidence{t['real']})"]
    db = sqlite_db(fresh_dir(scratch) / "trades.db", schema, {
        "trades": (["timestamp", "symbol", "entry_price", "exit_price", "pnl_percent", "action_taken", "status"],
                   trades),
        "signals": (["timestamp", "market_data", "ai_signal", "signal_confidence"], signals)})
    check_contract(trade_signals.build, db, "signals", label_rule=label_rule)


event_rows = st.lists(st.tuples(plausible("E1", "E2", 3), plausible(*TIMES),
                                plausible("Apple beats Q3 earnings", "贵州茅台发布年报")), max_size=4)
impact_rows = st.lists(st.tuples(plausible("E1", "E2", 3), plausible("AAPL", "600519.SH"),
                                 plausible(15, 60, 1440, "15"), plausible(0.01, -0.004, 0.0)), max_size=6)


@FUZZ
@given(event_rows, impact_rows, st.booleans())
def test_finance_news(scratch, events, impacts, typed):
    t = dict(real=" REAL", int=" INTEGER", text=" TEXT") if typed else dict(real="", int="", text="")
    schema = [f"CREATE TABLE events (event_id{t['text']}, ts{t['text']}, content{t['text']})",
              f"CREATE TABLE event_impacts (event_id{t['text']}, ticker{t['text']}, window_min{t['int']}, "
              f"ret{t['real']})"]
    db = sqlite_db(fresh_dir(scratch) / "news.db", schema, {"events": (["event_id", "ts", "content"], events),
                                                     "event_impacts": (["event_id", "ticker", "window_min", "ret"],
                                                                       impacts)})
    check_contract(finance_news.build, db, "text")


@FUZZ
@given(st.binary(max_size=200) | st.sampled_from([b"", b"SQLite format 3\x00" + b"\x00" * 100]))
def test_sqlite_builders_on_files_that_are_not_databases(scratch, data):
    path = write(fresh_dir(scratch) / "junk.db", data)
    check_contract(trade_signals.build, path, "signals")
    check_contract(finance_news.build, path, "text")


# ---- style corpus: Markdown, front matter and meta.json

# YAML aliases: nine lists of nine references, 9**9 strings once expanded ("billion laughs")
LAUGHS = "---\na0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)) + "title: *a8\ndate: *a8\n---\nHi. Ho."
MARKDOWN_PIECES = list("ab 中文。.!?\n\t#*_`~[]()!<>|-:/\\&;") + ["```", "    ", "http://x.y", "---\n", "<!--", "-->"]
markdown = st.one_of(
    st.lists(st.sampled_from(MARKDOWN_PIECES), max_size=80).map("".join),
    st.text(max_size=80),
    st.sampled_from(["---\ndate: 2024-13-45\n---\nHello there. More text.", f"---\ntitle: {HUGE_INT}\n---\nHi.",
                     "---\ntitle: " + "[" * 1000 + "\n---\nHi.", LAUGHS, "---\ndate: [1, 2]\n---\nHi. Ho.",
                     "---\n? [a]\n: b\n---\nHi.", "---\ndate: 99999-01-01\n---\nHi. Ho."]),
)
meta_json = st.one_of(records({"title": "Slow mornings", "date": "2024-03-02"}, [("title",), ("date",)]).map(dumps),
                      json_text)
posts = st.lists(st.tuples(markdown.map(str.encode) | st.binary(max_size=20) | st.none(),
                           meta_json.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=20)
                           | st.none()), min_size=1, max_size=3)


@FUZZ
@given(posts, st.integers(1, 30))
def test_style_corpus(scratch, folders, max_tokens):
    root = fresh_dir(scratch) / "posts"
    root.mkdir()
    for i, (index, meta) in enumerate(folders):
        (root / f"post-{i}").mkdir()
        if index is not None:
            write(root / f"post-{i}" / "index.md", index)
        if meta is not None:
            write(root / f"post-{i}" / "meta.json", meta)
    check_contract(style_corpus.build, root, "text", min_tokens=1, max_tokens=max_tokens)


@settings(FUZZ, max_examples=100)
@given(markdown)
def test_clean_markdown_gives_paragraphs(text):
    paragraphs = style_corpus.clean_markdown(text)
    assert all(isinstance(p, str) and p == p.strip() and re.search(r"\w", p) for p in paragraphs)


@pytest.mark.parametrize("text", ["[" * 30_000, "![" * 15_000, "[^" * 15_000, "`" * 30_000 + "a", "<http:" * 5000,
                                  "_a" * 15_000, "*a " * 2000 + "*"], ids=lambda text: repr(text[:6]))
def test_clean_markdown_is_fast_on_long_pathological_lines(text):
    # link, image and footnote patterns were quadratic: "[" * 20000 took 8 s. Emphasis still is (a paragraph
    # of 12k chars of "**a " takes ~1 s), which only a machine-made line reaches.
    start = time.perf_counter()
    style_corpus.clean_markdown(text)
    assert time.perf_counter() - start < 1.5


# ---- answer parsers: any input gives a result, never an exception

answers = st.one_of(st.text(max_size=60), json_text, json_values.map(dumps),
                    st.builds(lambda s, c: dumps({"signal": s, "confidence": c}) + " ```",
                              json_values | st.sampled_from(["buy", "SELL", " hold "]), json_values),
                    st.builds(lambda a: "ok: " + dumps({"action": a, "size": 1}), json_values),
                    st.sampled_from(["信号：SELL，置信度：" + HUGE_INT + "%", "confidence " + "9" * 400, "{" * 10_000]),
                    json_values)


@settings(FUZZ, max_examples=150)
@given(answers, st.lists(st.text(max_size=8) | st.integers(), max_size=4))
@example('{"signal": "BUY", "confidence": 1e999}', ["BUY"])
@example("{" * 10_000 + '"signal": "BUY"}', [])
@example("信号：SELL，置信度：" + HUGE_INT + "%", ["SELL"])
def test_answer_parsers_never_raise(text, labels):
    signal, confidence = parse_signal(text)
    assert signal in (*SIGNALS, None)
    assert confidence is None or 0.0 <= confidence <= 1.0
    label = parse_label(text, labels)
    assert label is None or label in labels
    action = parse_action(text)
    assert action is None or "action" in action
    if isinstance(text, str):
        assert all(isinstance(obj, dict) for obj in json_objects(text))


@pytest.mark.parametrize("answer", ['{"signal": "BUY", "confidence": 1' + "0" * 400 + "}", 10 ** 400])
def test_huge_confidence_is_none_not_a_crash(answer):
    assert (parse_signal(answer)[1] if isinstance(answer, str) else to_confidence(answer)) is None


@settings(FUZZ, max_examples=100)
@given(json_values, st.booleans())
def test_to_confidence_is_a_fraction_or_none(value, percent):
    confidence = to_confidence(value, percent)
    assert confidence is None or 0.0 <= confidence <= 1.0
