"""A/B test of two adapters on live traffic, then a report from the trades' outcomes.

    router = ABRouter(SignalProvider.from_run(run_a), SignalProvider.from_run(run_b), split=0.5, seed=7,
                      log_path="decisions.jsonl")
    decision = router.get_signal(market_data, request_id="2024-06-01T10:00:00-BTC")   # -> a dict, below
    ab_report(read_jsonl("decisions.jsonl"), {"2024-06-01T10:00:00-BTC": 2.5, ...})  # once trades close

    python -m finetune.ab route RUN_A RUN_B --input snapshots.jsonl --log decisions.jsonl [--split 0.5] [--seed 0]
    python -m finetune.ab report --decisions decisions.jsonl --outcomes outcomes.jsonl [--json]

Routing: request id -> arm by a hash of (seed, id): sha256 -> a number u in [0, 1); u < split goes to arm
"b" (split: the share of traffic for the new model), else "a".
The same id always lands in the same arm, in any process, and a new seed reshuffles. No id: a random one (uuid4), logged.

Decision log, one JSON line per request, appended and flushed at once (a crash loses nothing):
    {"id": "r1", "arm": "b", "input": {...market_data...}, "signal": "BUY", "confidence": 0.72,
     "time": "2024-06-01T10:00:00.123+00:00"}
Outcomes, one JSON line per closed trade: {"id": "r1", "pnl": 2.5} (any unit: percent or money, one for all).

Per arm: decisions (logged), count (with an outcome),
pending (no outcome yet), wins (pnl > 0), win_rate = wins / count, total_pnl, mean_pnl, std_pnl (sample,
ddof=1), and sharpe = mean / std * sqrt(periods_per_year), one decision taken as one period like
finetune/eval/backtest.py (252 by default; 1 gives the raw per-decision ratio); None when std
is 0 or count < 2.
Comparison, b minus a: win_rate_diff, total_pnl_diff, mean_pnl_diff, sharpe_diff, and Welch's two-sided
t-test of the mean PnL (unequal variances): t = (mean_b - mean_a) / sqrt(var_a/n_a + var_b/n_b), df by
Welch-Satterthwaite, p = I_{df/(df+t^2)}(df/2, 1/2), the regularized incomplete beta computed here by its
continued fraction (no scipy); significant = p < alpha (0.05). p is None when an arm has fewer than 2
outcomes or both arms have zero variance. Outcomes for ids that were never logged are counted (unmatched).
"""
import argparse
import hashlib
import json
import math
import statistics
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from finetune.data import safe_json
from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import log_to

ARMS = ("a", "b")


def assign(request_id, split: float, seed: int = 0) -> str:
    """'a' or 'b' for this request id, the same every time (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return "b" if int.from_bytes(digest[:8], "big") / 2 ** 64 < split else "a"


class ABRouter:
    """Routes each request to provider `a` or `b` and logs the decision. A provider is anything with
    get_signal(market_data) -> (signal, confidence): a SignalProvider, an Ensemble, a remote API client."""

    def __init__(self, a, b, *, split: float = 0.5, seed: int = 0, log_path=None):
        if not 0.0 <= split <= 1.0:
            raise ConfigError(f"split={split}: the share of traffic for arm b, in [0, 1]")
        self.providers = {"a": a, "b": b}
        self.split, self.seed = split, seed
        self.log_path = None if log_path is None else Path(log_path)
        self._lock = threading.Lock()

    def arm(self, request_id) -> str:
        return assign(request_id, self.split, self.seed)

    def get_signal(self, market_data: dict, request_id=None) -> dict:
        return self.get_signals([market_data], [request_id])[0]

    def get_signals(self, market_data: list[dict], request_ids: list | None = None) -> list[dict]:
        """One decision per snapshot, in order; each arm answers its snapshots in one batched call (a provider
        with get_signals, as SignalProvider and Ensemble have; one by one otherwise)."""
        ids = [str(uuid.uuid4()) if i is None else i for i in (request_ids or [None] * len(market_data))]
        arms = [self.arm(i) for i in ids]
        answers: list = [None] * len(ids)
        for arm in ARMS:
            mine = [k for k, a in enumerate(arms) if a == arm]
            if not mine:
                continue
            provider = self.providers[arm]
            snapshots = [market_data[k] for k in mine]
            got = provider.get_signals(snapshots) if hasattr(provider, "get_signals") else [
                provider.get_signal(m) for m in snapshots]
            for k, answer in zip(mine, got):
                answers[k] = answer
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        decisions = [{"id": i, "arm": arm, "input": m, "signal": signal, "confidence": confidence, "time": now}
                     for i, arm, m, (signal, confidence) in zip(ids, arms, market_data, answers)]
        if self.log_path is not None:
            with self._lock, self.log_path.open("a", encoding="utf-8") as log:
                log.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in decisions))
        return decisions


# ---- report

def ab_report(decisions, outcomes, *, alpha: float = 0.05, periods_per_year: float = 252) -> dict:
    """Per-arm figures and the b-minus-a comparison; `outcomes` maps decision id -> PnL, or is a list of
    {"id", "pnl"}. ValueError for a decision logged twice or an arm other than a / b."""
    if not isinstance(outcomes, dict):
        outcomes = {o["id"]: o["pnl"] for o in outcomes}
    arm_of = {}
    for decision in decisions:
        if decision["arm"] not in ARMS:
            raise ValueError(f"decision {decision['id']!r}: arm {decision['arm']!r} is not 'a' or 'b'")
        if decision["id"] in arm_of:
            raise ValueError(f"decision {decision['id']!r} is logged twice")
        arm_of[decision["id"]] = decision["arm"]
    logged = {arm: [i for i, a in arm_of.items() if a == arm] for arm in ARMS}
    pnls = {arm: [float(outcomes[i]) for i in ids if i in outcomes] for arm, ids in logged.items()}
    arms = {arm: {"decisions": len(logged[arm]), "pending": len(logged[arm]) - len(pnls[arm]),
                  **_figures(pnls[arm], periods_per_year)} for arm in ARMS}
    a, b = arms["a"], arms["b"]
    t, df, p = welch(pnls["a"], pnls["b"])
    comparison = {"win_rate_diff": _diff(b["win_rate"], a["win_rate"]),
                  "total_pnl_diff": b["total_pnl"] - a["total_pnl"],
                  "mean_pnl_diff": _diff(b["mean_pnl"], a["mean_pnl"]), "sharpe_diff": _diff(b["sharpe"], a["sharpe"]),
                  "test": "Welch's t-test, two-sided, on per-decision PnL", "t": t, "df": df, "p_value": p,
                  "alpha": alpha, "significant": None if p is None else p < alpha}
    return {"arms": arms, "comparison": comparison, "unmatched_outcomes": len(set(outcomes) - set(arm_of))}


def _figures(pnls: list[float], periods_per_year: float) -> dict:
    n = len(pnls)
    std = statistics.stdev(pnls) if n >= 2 else None
    wins = sum(p > 0 for p in pnls)
    return {"count": n, "wins": wins, "win_rate": wins / n if n else None, "total_pnl": math.fsum(pnls),
            "mean_pnl": statistics.fmean(pnls) if n else None, "std_pnl": std,
            "sharpe": statistics.fmean(pnls) / std * math.sqrt(periods_per_year) if std else None}


def _diff(b, a):
    return None if a is None or b is None else b - a


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None, float | None]:
    """(t, df, two-sided p) of Welch's t-test for mean(b) - mean(a); (None, None, None) when undefined."""
    if len(a) < 2 or len(b) < 2:
        return None, None, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None, None, None
    t = (statistics.fmean(b) - statistics.fmean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, betainc(df / 2, 0.5, df / (df + t * t))


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b) (Numerical Recipes 6.4: continued fraction, Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast here; else use the symmetry I_x(a,b) = 1 - I_1-x(b,a)
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(v):
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / nonzero(1.0 + even * d)
        c = nonzero(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / nonzero(1.0 + odd * d)
        c = nonzero(1.0 + odd / c)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


# ---- files and command line

def read_lines(path: Path, required: dict) -> list[dict]:
    """JSONL rows with the `required` fields ({name: check}); DataError naming the file, line and field."""
    rows = []
    for number, row in safe_json.jsonl_objects(path):
        for name, (check, what) in required.items():
            if name not in row or not check(row[name]):
                raise DataError(f"{path.name}: line {number}, field '{name}': expected {what}, "
                                f"got {row.get(name, 'nothing')!r}")
        row["_line"] = number
        rows.append(row)
    return rows


def _is_id(v):
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_report_inputs(decisions_path: Path, outcomes_path: Path) -> tuple[list[dict], dict]:
    decisions = read_lines(decisions_path, {"id": (_is_id, "a text or integer id"),
                                            "arm": (lambda v: v in ARMS, "'a' or 'b'")})
    seen = {}
    for d in decisions:
        if d["id"] in seen:
            raise DataError(f"{decisions_path.name}: line {d['_line']}, field 'id': {d['id']!r} is already "
                            f"logged on line {seen[d['id']]}")
        seen[d["id"]] = d["_line"]
    outcomes = {}
    for o in read_lines(outcomes_path, {"id": (_is_id, "a text or integer id"), "pnl": (_is_number, "a number")}):
        if o["id"] in outcomes:
            raise DataError(f"{outcomes_path.name}: line {o['_line']}, field 'id': a second outcome for {o['id']!r}")
        outcomes[o["id"]] = o["pnl"]
    return decisions, outcomes


def format_report(report: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    keys = ("decisions", "count", "pending", "win_rate", "total_pnl", "mean_pnl", "sharpe")
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(cell(figures[k]) for k in keys) + " |"
              for arm, figures in report["arms"].items()]
    c = report["comparison"]
    verdict = ("not testable (each arm needs 2 outcomes and some spread)" if c["p_value"] is None else
               f"{'significant' if c['significant'] else 'not significant'} at alpha {c['alpha']}")
    lines += ["", f"b - a: win rate {cell(c['win_rate_diff'])}, total PnL {cell(c['total_pnl_diff'])}, "
                  f"mean PnL {cell(c['mean_pnl_diff'])}, Sharpe {cell(c['sharpe_diff'])}",
              f"{c['test']}: t = {cell(c['t'])}, df = {cell(c['df'])}, p = {cell(c['p_value'])}: {verdict}"]
    if report["unmatched_outcomes"]:
        lines.append(f"{report['unmatched_outcomes']} outcomes have no logged decision (ignored)")
    return "\n".join(lines)


def read_snapshots(path: Path) -> list[dict]:
    """A JSONL of {"id"?, "market_data": {...}} for `route`, every snapshot checked before a model loads."""
    from finetune.tasks.signals import market_prompt
    rows = read_lines(path, {"market_data": (lambda v: isinstance(v, dict), "a JSON object")})
    for row in rows:
        try:
            market_prompt(row["market_data"])
        except ValueError as e:  # no indicator the prompt can show
            raise DataError(f"{path.name}: line {row['_line']}, field 'market_data': {e}") from e
    return rows


def route_all(router: ABRouter, rows: list[dict], batch: int = 64) -> None:
    """Every snapshot through the router, `batch` lines per call (each arm answers its share in batches of its
    provider's batch_size); the request id is the line's `id`, else its line number."""
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        router.get_signals([r["market_data"] for r in chunk], [r.get("id", r["_line"]) for r in chunk])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.ab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    route = commands.add_parser("route", help="answer a JSONL of market_data with two runs, logging decisions")
    route.add_argument("run_a", type=Path)
    route.add_argument("run_b", type=Path)
    route.add_argument("--input", type=Path, required=True)
    route.add_argument("--log", type=Path, required=True, help="decision log (JSONL, appended)")
    route.add_argument("--split", type=float, default=0.5, help="share of requests for run_b")
    route.add_argument("--seed", type=int, default=0)
    report = commands.add_parser("report", help="per-arm win rate, PnL, Sharpe and a Welch t-test")
    report.add_argument("--decisions", type=Path, required=True)
    report.add_argument("--outcomes", type=Path, required=True, help='JSONL: {"id": ..., "pnl": ...}')
    report.add_argument("--alpha", type=float, default=0.05)
    report.add_argument("--periods-per-year", type=float, default=252)
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            decisions, outcomes = read_report_inputs(args.decisions, args.outcomes)
            result = ab_report(decisions, outcomes, alpha=args.alpha, periods_per_year=args.periods_per_year)
            print(json.dumps(result, indent=2) if args.json else format_report(result))
        else:
            from finetune.serving.inference import SignalProvider
            log_to(args.run_a)  # library lines and warnings into run A's finetune.log, not the console
            rows = read_snapshots(args.input)
            router = ABRouter(SignalProvider.from_run(args.run_a), SignalProvider.from_run(args.run_b),
                              split=args.split, seed=args.seed, log_path=args.log)
            route_all(router, rows)
            print(f"{len(rows)} decisions appended to {args.log}")
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
