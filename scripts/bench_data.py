"""Data benchmark: time the data build of a generated trade log with N closed trades (docs/benchmarks.md).

    python scripts/bench_data.py --trades 1000000            # build (dry run), then the same again: a cache hit

The log is scripts/sample_trades.py's, N closed trades minutes apart (one signal row per trade, in the
trade_signals builder's schema), written once to --db-dir. Each build is a fresh
`python -m finetune dataset=trade_signals dataset.path=DB dry_run=true` process with an empty cache
(FINETUNE_CACHE) for the first run and the same cache for the second; wall time and the process's peak RSS
(getrusage of the child) are printed as one markdown row per run. Extra arguments go to the command as Hydra
overrides (e.g. `dataset.builder.label_rule=indicators`).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from sample_trades import write_trades  # noqa: E402


def timed(command: list[str], env: dict) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS in GB, exit status and output of one child process (reaped here with wait4, so
    its own rusage is read, not the maximum over every child so far)."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        log.seek(0)
        return seconds, usage.ru_maxrss / 1024 ** 2, os.waitstatus_to_exitcode(status), log.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=100_000)
    parser.add_argument("--db-dir", type=Path, default=Path(tempfile.gettempdir()) / "finetune-bench-data")
    args, overrides = parser.parse_known_args()
    db = args.db_dir / f"trades-{args.trades}.db"
    if not db.exists():
        started = time.perf_counter()
        print(write_trades(db, args.trades, spacing=timedelta(minutes=1)),
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "FINETUNE_CACHE": str(Path(scratch) / "cache"), "HF_HUB_OFFLINE": "1"}
        print("| closed trades | run | wall s | peak RSS GB | samples |\n|---|---|---|---|---|")
        for run in ("build", "cache hit"):
            command = [sys.executable, "-m", "finetune", "dataset=trade_signals", f"dataset.path={db}",
                       "dry_run=true", f"hydra.run.dir={scratch}/run-{run.replace(' ', '-')}", *overrides]
            seconds, peak, code, output = timed(command, env)
            if code != 0:
                sys.exit(f"{' '.join(command)} failed:\n{output[-3000:]}")
            built = next((line for line in output.splitlines() if "samples" in line.lower()), "")
            print(f"| {args.trades:,} | {run} | {seconds:.1f} | {peak:.2f} | {built.strip()[:60]} |", flush=True)


if __name__ == "__main__":
    main()
