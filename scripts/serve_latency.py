"""/signal latency of `python -m finetune.serve` under concurrent clients, on a run's held-out prompts.

    python scripts/serve_latency.py outputs/<run> --clients 8 --requests 7
    python scripts/serve_latency.py outputs/<run> --clients 1 --requests 20 --threads 2 -- --merge
    python scripts/serve_latency.py outputs/<run> --clients 8 --requests 7 --interval 2   # 8 loops, one ask / 2 s

The server runs as its own process (`python -m finetune.serve RUN --port P`, the options after `--` added), so the
clients do not share its interpreter. Each client keeps one connection and asks /signal for one snapshot after
another, as a trading loop does; one untimed request per client first (the server's prefix cache, the grammar).
Prints one JSON line: p50 / p90 milliseconds per /signal, signals per second over the timed requests, and the
server's batched calls for them (its /health "batches"; fewer than the requests when concurrent ones were batched).

Snapshots come from the held-out prompts (RUN/data/test.jsonl): each prompt's indicator lines read back into a
market_data dict ("RSI: 31.5" -> {"rsi": 31.5}); a prompt the dict does not rebuild exactly is left out ("skipped").
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from finetune.data.pipeline import read_jsonl
from finetune.tasks.signals import INDICATORS, market_prompt


def snapshot_of(prompt: str) -> tuple[dict, str | None]:
    """(market_data, symbol) that `market_prompt` turns back into the user turn `prompt`."""
    keys = {label: (names[0], numeric) for label, names, numeric in INDICATORS}
    market_data, symbol = {}, None
    for line in prompt.splitlines():
        label, _, text = line.partition(": ")
        if label == "Symbol":
            symbol = text
        elif label in keys:
            key, numeric = keys[label]
            market_data[key] = float(text) if numeric else text
    return market_data, symbol


def held_out_snapshots(run: Path) -> tuple[list[dict], int]:
    """(the /signal bodies of the run's held-out prompts, how many prompts could not be rebuilt)."""
    bodies, skipped = [], 0
    for sample in read_jsonl(run / "data" / "test.jsonl"):
        user = next(m["content"] for m in sample["messages"] if m["role"] == "user")
        market_data, symbol = snapshot_of(user)
        try:
            rebuilt = market_prompt(market_data, symbol, None)[-1]["content"]
        except ValueError:  # no indicator line: not a trade-signals prompt
            rebuilt = None
        if rebuilt == user:
            bodies.append({"market_data": market_data, "symbol": symbol})
        else:
            skipped += 1
    return bodies, skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, options: list[str], threads: int | None, log) -> subprocess.Popen:
    """`python -m finetune.serve` on `port`, once /health answers (its console into `log`)."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    server = subprocess.Popen([sys.executable, "-m", "finetune.serve", str(run), "--port", str(port), *options],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"error: the server stopped (exit {server.returncode}):\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] == "ok":
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    server.terminate()
    sys.exit("error: the server did not answer /health within 600 s")


def client(url: str, bodies: list[dict], first: int, requests: int, interval: float = 0.0,
           offset: float = 0.0) -> list[float]:
    """Seconds per /signal for `requests` snapshots from index `first` on: one after another, or with `interval`
    one every `interval` seconds from `offset` on (at once when the last answer came later than that)."""
    seconds = []
    begin = time.perf_counter() + offset
    with httpx.Client(timeout=300) as http:  # one keep-alive connection, as a trading loop keeps
        for n, i in enumerate(range(first, first + requests)):
            body = bodies[i % len(bodies)]
            if interval:
                time.sleep(max(0.0, begin + n * interval - time.perf_counter()))
            start = time.perf_counter()
            answer = http.post(url, json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"/signal {body}: {answer.status_code} {answer.text[:300]}")
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=7, help="timed /signal requests per client")
    parser.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: inherited)")
    parser.add_argument("--interval", type=float, default=0.0,
                        help="seconds between one client's requests, the clients' starts spread over it (a trading "
                             "loop per client asking on a clock); 0: back to back, the worst case")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows `--` is the server's
    a = parser.parse_args(argv[:cut])
    a.server_options = argv[cut + 1:]
    bodies, skipped = held_out_snapshots(a.run)
    if not bodies:
        sys.exit(f"error: {a.run / 'data' / 'test.jsonl'}: no held-out prompt reads back into a market snapshot "
                 f"(a trade-signals run is needed)")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_server(a.run, port, a.server_options, a.threads, log)
        try:
            url = f"http://127.0.0.1:{port}"
            with ThreadPoolExecutor(a.clients) as pool:  # warm-up, untimed: one request per client, all at once
                list(pool.map(lambda c: client(f"{url}/signal", bodies, c, 1), range(a.clients)))
            batches = httpx.get(f"{url}/health").json().get("batches")  # a server before this count: None
            start = time.perf_counter()
            with ThreadPoolExecutor(a.clients) as pool:
                seconds = [s for each in pool.map(lambda c: client(f"{url}/signal", bodies, c * a.requests,
                                                                   a.requests, a.interval,
                                                                   c * a.interval / a.clients), range(a.clients))
                           for s in each]
            wall = time.perf_counter() - start
            health = httpx.get(f"{url}/health").json().get("batches")
            batches = health - batches if health is not None else None
        finally:
            server.terminate()
            server.wait(30)
    ms = sorted(1000 * s for s in seconds)
    print(json.dumps({"run": str(a.run), "server_options": a.server_options, "threads": a.threads,
                      "clients": a.clients, "interval_s": a.interval, "requests": len(ms), "snapshots": len(bodies), "skipped": skipped,
                      "p50_ms": round(statistics.median(ms), 1), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
                      "signals_per_s": round(len(ms) / wall, 2), "batches": batches}), flush=True)


if __name__ == "__main__":
    main()
