"""One huge cell (a 50 MB field) is refused with its row named, or cut when dataset.oversize=cut, and the build
stays small (it took gigabytes: split into words and tokens)."""
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT

HUGE = 50 * 2**20
NEWS = "股价 " * (HUGE // len("股价 ".encode()))  # 50 MB of UTF-8
# the command as a user types it, run in a process that reports its own peak memory when it exits
# VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child forked from a large pytest process would
# report the parent's size
MEASURED = """
import atexit, sys
def peak():
    kib = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"peak_rss_mib {int(kib) / 1024:.0f}", file=sys.stderr)
atexit.register(peak)
sys.argv = ["finetune", *sys.argv[1:]]
from finetune.runner import main
main()
"""


def dry_run(tmp_path, *overrides) -> tuple[subprocess.CompletedProcess, float]:
    out = subprocess.run([sys.executable, "-c", MEASURED, "dry_run=true", "cpu_threads=1",
                          f"hydra.run.dir={tmp_path / 'run'}", *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    peak = float(out.stderr.rsplit("peak_rss_mib ", 1)[1].split()[0])
    return out, peak


@pytest.fixture(scope="module")
def huge_chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "chats.jsonl"
    lines = (ROOT / "data" / "demo_signals.jsonl").read_text().splitlines()[:40]
    big = json.loads(lines[1])
    big["messages"][1]["content"] = "RSI up " * (HUGE // 7)
    lines[1] = json.dumps(big)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_50_mb_chat_field_is_refused_naming_its_line_in_little_memory(huge_chat, tmp_path):
    out, peak = dry_run(tmp_path, "dataset=generic", f"dataset.path={huge_chat}")
    assert out.returncode == 1
    assert (f"chats.jsonl: line 2, field messages[1].content: {len('RSI up ' * (HUGE // 7)):,} characters, over "
            "dataset.max_field_chars=1,000,000") in out.stderr, out.stderr[-2000:]
    assert peak < 1024, peak


def test_with_oversize_cut_the_field_is_cut_and_the_build_goes_on(huge_chat, tmp_path):
    out, peak = dry_run(tmp_path, "dataset=generic", f"dataset.path={huge_chat}", "dataset.oversize=cut",
                        "dataset.max_field_chars=20000")
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["built"] == 40 and peak < 1024, peak


def test_a_50_mb_news_content_is_refused_naming_its_row_in_little_memory(tmp_path):
    db = tmp_path / "news.db"
    shutil.copy(ROOT / "data" / "finance_analysis.db", db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE events SET content = ? WHERE rowid = (SELECT min(rowid) FROM events)", (NEWS,))
    out, peak = dry_run(tmp_path, "dataset=finance_news", f"dataset.path={db}", "eval=news")
    assert out.returncode == 1
    assert f"news.db: row 1, field column 2: {len(NEWS):,} characters" in out.stderr, out.stderr[-2000:]
    assert peak < 1024, peak
