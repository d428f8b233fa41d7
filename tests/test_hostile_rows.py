"""Rows a careless or hostile source holds: each is one bad row, named, that skip_bad_rows can skip; none spoils the
rest of its file or is trained on."""
import json
import shutil
import sqlite3

import pytest

from finetune.data import generic, style_corpus, trade_signals
from finetune.errors import DataError
from test_data_trade_signals import make_db, snap
from conftest import ROOT


def test_a_post_linked_out_of_the_corpus_is_not_read(tmp_path):
    corpus = tmp_path / "essays"
    shutil.copytree(ROOT / "data" / "essays", corpus)
    outside = tmp_path / "private.md"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n" * 200)
    post = next(p for p in sorted(corpus.iterdir()) if p.is_dir())
    (post / "index.md").unlink()
    (post / "index.md").symlink_to(outside)
    with pytest.raises(DataError, match=rf"{post.name}/index.md: a link to \S*private.md, outside essays/"):
        style_corpus.build(corpus)
    built = style_corpus.build(corpus, skip_bad_rows=True)
    assert built.dropped["outside_corpus"] == 1
    assert not any("root:x:0:0" in m["content"] for s in built.samples for m in s["messages"])


def trades_db(path, pnl=6.1, market_data=None):
    db = make_db(path, [("2024-03-05 09:00:00", "BTC/USDT", 50000, 53050, pnl, "BUY", "closed"),
                        ("2024-03-05 10:00:00", "ETH/USDT", 3000, 3200, 6.6, "BUY", "closed")],
                 [("2024-03-05 09:00:00", snap(28.4, "bullish", 0.65), "BUY", 72),
                  ("2024-03-05 10:00:00", snap(30.0, "bullish", 0.6), "BUY", 70)])
    if market_data is not None:
        with sqlite3.connect(db) as con:
            con.execute("UPDATE signals SET market_data = CAST(? AS TEXT) WHERE id = 1", (market_data,))
    return db


def test_a_non_utf8_sqlite_cell_is_one_named_bad_row(tmp_path):
    db = trades_db(tmp_path / "trades.db", market_data=b'{"rsi": "28\xff"}')
    with pytest.raises(DataError, match=r"trades.db: row 1, field column \d+: not UTF-8 text \(byte 0xff"):
        trade_signals.build(db)
    built = trade_signals.build(db, skip_bad_rows=True)
    assert built.dropped == {"bad_text": 1} and len(built.samples) == 1


def test_an_absurd_pnl_is_a_bad_row(tmp_path):
    db = trades_db(tmp_path / "trades.db", pnl=9.2e18)
    with pytest.raises(DataError, match=r"row id 1, column 'pnl_percent': 9.2e\+18 is no return in percent"):
        trade_signals.build(db)
    built = trade_signals.build(db, skip_bad_rows=True)
    assert built.dropped == {"bad_pnl": 1} and len(built.samples) == 1


def test_one_bad_byte_spoils_its_line_of_a_jsonl_not_the_file(tmp_path):
    lines = (ROOT / "data" / "demo_signals.jsonl").read_bytes().splitlines()[:6]
    lines[2] = lines[2].replace(b"Symbol", b"Sym\xffbol")
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"chats.jsonl: line 3, not utf-8(-sig)? text \(invalid start byte at byte \d+"):
        generic.build(path)
    built = generic.build(path, skip_bad_rows=True)
    assert len(built.samples) == 5 and sum(built.dropped.values()) == 1
