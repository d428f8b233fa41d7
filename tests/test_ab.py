"""A/B between two adapters: seeded routing, the decision log, and a report whose
per-arm figures and Welch t-test are worked out by hand below."""
import json
import math

import pytest

from finetune.ab import ABRouter, ab_report, assign, betainc, main as ab_main, welch
from finetune.tasks.signals import SIGNALS
from test_inference import SNAPSHOTS, one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)


class Fixed:
    """A provider that always answers the same signal."""

    def __init__(self, signal, confidence):
        self.answer = (signal, confidence)

    def get_signal(self, market_data):
        return self.answer


def test_routing_is_deterministic_per_request_id_and_follows_the_split():
    ids = [f"req-{i}" for i in range(4000)]
    arms = [assign(i, 0.3, seed=7) for i in ids]
    assert arms == [assign(i, 0.3, seed=7) for i in ids]            # same id, same arm, every time
    assert abs(arms.count("b") / len(ids) - 0.3) < 0.03              # 30 % of the traffic to b
    assert arms != [assign(i, 0.3, seed=8) for i in ids]            # another seed reshuffles
    assert {assign(i, 0.0) for i in ids} == {"a"} and {assign(i, 1.0) for i in ids} == {"b"}


def test_router_logs_every_decision(tmp_path):
    log = tmp_path / "decisions.jsonl"
    router = ABRouter(Fixed("BUY", 0.8), Fixed("SELL", 0.6), split=0.5, seed=1, log_path=log)
    decisions = [router.get_signal(m, request_id=f"r{i}") for i, m in enumerate(SNAPSHOTS)]
    decisions.append(router.get_signal(SNAPSHOTS[0]))  # no id: a fresh uuid
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged == decisions and len(logged) == len(SNAPSHOTS) + 1
    for d in logged:
        assert (d["signal"], d["confidence"]) == {"a": ("BUY", 0.8), "b": ("SELL", 0.6)}[d["arm"]]
        assert d["arm"] == assign(d["id"], 0.5, 1) and d["time"].endswith("+00:00")
    assert logged[0]["input"] == SNAPSHOTS[0] and len(logged[-1]["id"]) == 36
    with pytest.raises(Exception, match="split"):
        ABRouter(None, None, split=1.5)


# Arm a: a1..a4 closed with PnL 2, -1, 3, 0; a5 still open (pending).   Arm b: b1..b3 with 1, 1, -2.
DECISIONS = [{"id": f"a{i}", "arm": "a"} for i in range(1, 6)] + [{"id": f"b{i}", "arm": "b"} for i in range(1, 4)]
OUTCOMES = {"a1": 2.0, "a2": -1.0, "a3": 3.0, "a4": 0.0, "b1": 1.0, "b2": 1.0, "b3": -2.0, "x9": 5.0}


def test_report_reproduces_the_hand_computed_figures():
    report = ab_report(DECISIONS, OUTCOMES, periods_per_year=1)
    a, b, c = report["arms"]["a"], report["arms"]["b"], report["comparison"]
    # a: 4 outcomes, wins 2 (2 and 3; a flat 0 is no win) -> 0.5; total 2 - 1 + 3 + 0 = 4; mean 1.0;
    #    sample variance ((2-1)^2 + (-1-1)^2 + (3-1)^2 + (0-1)^2) / 3 = 10/3, std 1.8257; Sharpe 1 / 1.8257 = 0.5477
    assert (a["decisions"], a["count"], a["pending"], a["wins"]) == (5, 4, 1, 2)
    assert (a["win_rate"], a["total_pnl"], a["mean_pnl"]) == (0.5, 4.0, 1.0)
    assert a["std_pnl"] == pytest.approx(math.sqrt(10 / 3)) and a["sharpe"] == pytest.approx(0.5477225575)
    # b: 3 outcomes, wins 2 -> 2/3; total 1 + 1 - 2 = 0; mean 0; variance (1 + 1 + 4) / 2 = 3; Sharpe 0 / sqrt(3) = 0
    assert (b["decisions"], b["count"], b["pending"], b["wins"]) == (3, 3, 0, 2)
    assert (b["win_rate"], b["total_pnl"], b["mean_pnl"], b["sharpe"]) == (pytest.approx(2 / 3), 0.0, 0.0, 0.0)
    assert b["std_pnl"] == pytest.approx(math.sqrt(3))
    # b - a: win rate 2/3 - 1/2 = 1/6; total 0 - 4 = -4; mean 0 - 1 = -1; Sharpe 0 - 0.5477
    assert c["win_rate_diff"] == pytest.approx(1 / 6) and c["total_pnl_diff"] == -4.0 and c["mean_pnl_diff"] == -1.0
    assert c["sharpe_diff"] == pytest.approx(-0.5477225575)
    # Welch: var_a/n_a = (10/3)/4 = 5/6, var_b/n_b = 3/3 = 1; t = (0 - 1) / sqrt(5/6 + 1) = -0.73855;
    # df = (11/6)^2 / ((5/6)^2 / 3 + 1^2 / 2) = 3.36111 / 0.73148 = 4.59494; p = 0.49614 (scipy's ttest_ind agrees)
    assert c["t"] == pytest.approx(-0.7385489459) and c["df"] == pytest.approx(4.5949367089)
    assert c["p_value"] == pytest.approx(0.4961420665, abs=1e-9) and c["significant"] is False
    assert report["unmatched_outcomes"] == 1  # x9 was never logged
    # annualised Sharpe (periods_per_year 252): times sqrt(252) = 15.8745 -> 0.5477 * 15.8745 = 8.6948
    assert ab_report(DECISIONS, OUTCOMES)["arms"]["a"]["sharpe"] == pytest.approx(8.6948260477)


def test_welch_p_value_against_closed_forms_and_a_clear_difference():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b; Student t with df = 2: p = 1 - |t| / sqrt(2 + t^2)
    assert betainc(2.5, 1, 0.3) == pytest.approx(0.3 ** 2.5) and betainc(1, 4, 0.2) == pytest.approx(1 - 0.8 ** 4)
    for t in (0.5, 2.0, 7.0):
        assert betainc(1.0, 0.5, 2 / (2 + t * t)) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    # a clear difference: b's mean 1.833 against a's -0.107, t = 3.5714, df = 10.4255, p = 0.004763 (scipy)
    t, df, p = welch([-1, 0.5, -0.5, 0, 1, -2, 0.25], [0.5, 1.5, 2.5, 3.5, 1.0, 2.0])
    assert (t, df) == (pytest.approx(3.5714285714), pytest.approx(10.4255319149)) and p == pytest.approx(0.0047629186)
    assert welch([1.0], [1.0, 2.0]) == (None, None, None) and welch([1.0, 1.0], [2.0, 2.0]) == (None, None, None)


def test_report_cli(tmp_path, capsys):
    decisions, outcomes = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    decisions.write_text("".join(json.dumps({**d, "signal": "BUY", "confidence": 0.7}) + "\n" for d in DECISIONS))
    outcomes.write_text("".join(json.dumps({"id": k, "pnl": v}) + "\n" for k, v in OUTCOMES.items()))
    ab_main(["report", "--decisions", str(decisions), "--outcomes", str(outcomes), "--json", "--periods-per-year", "1"])
    expected = ab_report(DECISIONS, OUTCOMES, periods_per_year=1)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(expected))
    ab_main(["report", "--decisions", str(decisions), "--outcomes", str(outcomes)])
    table = capsys.readouterr().out
    assert "| a | 5 | 4 | 1 | 0.5 | 4 | 1 | 8.695 |" in table and "p = 0.4961: not significant at alpha 0.05" in table
    for text, error in [('{"id": "a1", "pnl": 1}\n{"id": "a2", "pnl": "n/a"}\n', "o.jsonl: line 2, field 'pnl'"),
                        ('{"id": "a1", "pnl": 1}\n{"id": "a1", "pnl": 2}\n', "o.jsonl: line 2, field 'id': a second"),
                        ('{"id": "a1" "pnl": 1}\n', "o.jsonl: line 1: invalid JSON")]:
        outcomes.write_text(text)
        with pytest.raises(SystemExit):
            ab_main(["report", "--decisions", str(decisions), "--outcomes", str(outcomes)])
        assert error in capsys.readouterr().err
    decisions.write_text('{"id": "a1", "arm": "a"}\n{"id": "a1", "arm": "b"}\n')
    with pytest.raises(SystemExit):
        ab_main(["report", "--decisions", str(decisions), "--outcomes", str(outcomes)])
    assert "d.jsonl: line 2, field 'id': 'a1' is already logged on line 1" in capsys.readouterr().err


def test_route_cli_answers_with_two_runs_and_logs(cache_dir, tmp_path, capsys):
    run_dir = tiny_signal_run(cache_dir)  # both arms on the same run: this checks the routing and the log
    snapshots = tmp_path / "in.jsonl"
    snapshots.write_text("".join(json.dumps({"id": f"r{i}", "market_data": m}) + "\n"
                                 for i, m in enumerate(SNAPSHOTS[:3])))
    ab_main(["route", str(run_dir), str(run_dir), "--input", str(snapshots), "--log", str(tmp_path / "log.jsonl"),
             "--split", "0.5", "--seed", "3"])
    assert "3 decisions appended" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(d["id"], d["arm"]) for d in logged] == [(f"r{i}", assign(f"r{i}", 0.5, 3)) for i in range(3)]
    assert all(d["signal"] in SIGNALS and 0 <= d["confidence"] <= 1 for d in logged)
    snapshots.write_text('{"market_data": {"rsi": 30}}\n{"market_data": {"colour": "red"}}\n')
    with pytest.raises(SystemExit):
        ab_main(["route", str(run_dir), str(run_dir), "--input", str(snapshots), "--log", str(tmp_path / "x.jsonl")])
    assert "in.jsonl: line 2, field 'market_data'" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_routing_a_file_asks_each_arm_once_per_batch_in_order():
    from finetune.ab import route_all

    class Counting:
        def __init__(self, name):
            self.name, self.calls = name, []

        def get_signals(self, snapshots):
            self.calls.append(len(snapshots))
            return [(self.name, m["n"] / 100) for m in snapshots]
    a, b = Counting("BUY"), Counting("SELL")
    rows = [{"market_data": {"n": n}, "_line": n + 1} for n in range(10)]
    router = ABRouter(a, b, split=0.5, seed=3)
    decisions = router.get_signals([r["market_data"] for r in rows], [r["_line"] for r in rows])
    assert [d["id"] for d in decisions] == list(range(1, 11))
    assert all(d["arm"] == assign(d["id"], 0.5, 3) and d["signal"] == ("BUY" if d["arm"] == "a" else "SELL")
               and d["confidence"] == d["input"]["n"] / 100 for d in decisions)
    assert len(a.calls) == len(b.calls) == 1 and sum(a.calls + b.calls) == 10
    route_all(router, rows * 10, batch=64)  # 100 lines: two calls per arm
    assert len(a.calls) == len(b.calls) == 3
