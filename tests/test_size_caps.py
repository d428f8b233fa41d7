"""One huge cell (a 50 MB field) is refused with its row named, or cut when dataset.oversize=cut, and the build
stays small (it took gigabytes: split into words and tokens)."""
import json
import shutil
import sqlite3

import pytest

from conftest import ROOT, forked_cli

HUGE = 50 * 2**20
NEWS = "股价 " * (HUGE // len("股价 ".encode()))  # 50 MB of UTF-8


@pytest.fixture(scope="module")
def huge_chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "chats.jsonl"
    lines = (ROOT / "data" / "demo_signals.jsonl").read_text().splitlines()[:40]
    big = json.loads(lines[1])
    big["messages"][1]["content"] = "RSI up " * (HUGE // 7)
    lines[1] = json.dumps(big)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def huge_news(tmp_path_factory):
    db = tmp_path_factory.mktemp("huge") / "news.db"
    shutil.copy(ROOT / "data" / "finance_analysis.db", db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE events SET content = ? WHERE rowid = (SELECT min(rowid) FROM events)", (NEWS,))
    return db


@pytest.fixture(scope="module")
def dry_runs(huge_chat, huge_news, tmp_path_factory) -> dict:
    """{case: (its command's result with its peak memory, its run dir)}: each case's dry run as a user types it,
    in a child forked from one process that imported the training stack once (conftest.forked_cli)."""
    cases = {
        "chat refused": ["dataset=generic", f"dataset.path={huge_chat}"],
        "chat cut": ["dataset=generic", f"dataset.path={huge_chat}", "dataset.oversize=cut",
                     "dataset.max_field_chars=20000"],
        "news refused": ["dataset=finance_news", f"dataset.path={huge_news}", "eval=news"],
    }
    run_dirs = [tmp_path_factory.mktemp("dry") / "run" for _ in cases]
    results = forked_cli(*(["dry_run=true", "cpu_threads=1", f"hydra.run.dir={run_dir}", *overrides]
                           for overrides, run_dir in zip(cases.values(), run_dirs)))
    return {case: (result, run_dir) for case, result, run_dir in zip(cases, results, run_dirs)}


def test_a_50_mb_chat_field_is_refused_naming_its_line_in_little_memory(dry_runs):
    out, _ = dry_runs["chat refused"]
    assert out.returncode == 1
    assert (f"chats.jsonl: line 2, field messages[1].content: {len('RSI up ' * (HUGE // 7)):,} characters, over "
            "dataset.max_field_chars=1,000,000") in out.stderr, out.stderr[-2000:]
    assert out.peak_mib < 1024, out.peak_mib


def test_with_oversize_cut_the_field_is_cut_and_the_build_goes_on(dry_runs):
    out, run_dir = dry_runs["chat cut"]
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["built"] == 40 and out.peak_mib < 1024, out.peak_mib


def test_a_50_mb_news_content_is_refused_naming_its_row_in_little_memory(dry_runs):
    out, _ = dry_runs["news refused"]
    assert out.returncode == 1
    assert f"news.db: row 1, field column 2: {len(NEWS):,} characters" in out.stderr, out.stderr[-2000:]
    assert out.peak_mib < 1024, out.peak_mib
