"""A small HTTP endpoint for a trading loop in another process: one model, loaded once, answers JSON.

    python -m finetune.serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--confidence-threshold 0.7] [--batch-size 64]

    GET  /health                                   -> {"status": "ok", "run": ..., "task": ..., "fallbacks": 0}
    POST /signal   {"market_data": {...}}          -> {"signal": "BUY", "confidence": 0.72}
    POST /signals  {"market_data": [{...}, ...]}   -> {"signals": [{"signal": ..., "confidence": ...}, ...]}
    POST /generate {"messages": [...]}             -> {"text": "..."}     ({"prompt": "..."} works too)

    curl -s localhost:8000/signal -d '{"market_data": {"symbol": "BTC/USDT", "rsi": 28.4, "trend": "up"}}'

The answers are SignalProvider's (finetune/inference.py): same prompts, fallback and threshold, so the
endpoint, `python -m finetune.predict` and the Python API agree. A bad request gets a 4xx and
{"error": "..."} naming the field; the server goes on. Requests are handled in threads, generation one at
a time (the provider's lock): a batch is best sent to /signals. It listens on loopback by default and has
no authentication: put it behind a proxy before opening it to a network. stdlib only (http.server).

Measured on the tests' tiny trade-signals run (2 shared CPU cores, keep-alive client): /signal p50 85-110 ms,
p95 105-155 ms, 9-12 requests/s one client at a time, 16-20/s from 4 clients; /signals with 64 snapshots
120-160 signals/s in batches of 16 (368/s in one batch of 64, in-process). Generation is most of it.
"""
import argparse
import json
import logging
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from finetune.data import safe_json
from finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # 1 MiB: a few thousand snapshots per /signals call


class BadRequest(Exception):
    """A client error: answered with a 4xx status and {"error": message}."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def make_server(provider, host: str = "127.0.0.1", port: int = 8000, run_dir=None) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free one, see server.server_address); call serve_forever()."""

    def health(body):
        return {"status": "ok", "run": None if run_dir is None else str(run_dir), "task": provider.task,
                "fallbacks": provider.fallbacks, "held": provider.held}

    def signal(body):
        market_data = _field(body, "market_data", dict)
        try:
            chat = provider.signal_prompt(market_data, body.get("symbol"))
        except ValueError as e:
            raise BadRequest(f"market_data: {e}") from None
        value, confidence = provider.read_signal(provider.generate([chat])[0])
        return {"signal": value, "confidence": confidence}

    def signals(body):
        snapshots = _field(body, "market_data", list)
        chats = []
        for i, market_data in enumerate(snapshots):
            try:
                chats.append(provider.signal_prompt(market_data, body.get("symbol")))
            except ValueError as e:
                raise BadRequest(f"market_data[{i}]: {e}") from None
        answers = provider.generate(chats) if chats else []
        return {"signals": [dict(zip(("signal", "confidence"), provider.read_signal(a))) for a in answers]}

    def generate(body):
        if "messages" in body:
            messages = _field(body, "messages", list)
            if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in messages):
                raise BadRequest('messages: expected a non-empty list of {"role": str, "content": str}')
        else:
            prompt = _field(body, "prompt", str)
            system = [{"role": "system", "content": provider.system_prompt}] if provider.system_prompt else []
            messages = system + [{"role": "user", "content": prompt}]
        tokens = body.get("max_new_tokens")
        if tokens is not None and (type(tokens) is not int or not 1 <= tokens <= 4096):
            raise BadRequest("max_new_tokens: an integer from 1 to 4096")
        return {"text": provider.generate([messages], tokens)[0]}

    routes = {("GET", "/health"): health, ("POST", "/signal"): signal, ("POST", "/signals"): signals,
              ("POST", "/generate"): generate}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a trading loop reuses its connection

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def _handle(self, method):
            start = time.perf_counter()
            try:
                route = routes.get((method, self.path.split("?")[0]))
                if route is None:
                    known = [p for (m, p) in routes if p == self.path.split("?")[0]]
                    raise BadRequest(f"{method} {self.path}: " + ("method not allowed" if known else
                                     f"no such endpoint (try {', '.join(f'{m} {p}' for m, p in routes)})"),
                                     HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND)
                body = self._body() if method == "POST" else {}
                status, payload = HTTPStatus.OK, route(body)
            except BadRequest as e:
                status, payload = e.status, {"error": str(e)}
            except Exception as e:  # the loop on the other side needs an answer, and the server must live on
                log.exception("%s %s failed", method, self.path)
                status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if status != HTTPStatus.OK:  # an unread or broken body may be left on the connection
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
            log.debug("%s %s %d in %.1f ms", method, self.path, status, (time.perf_counter() - start) * 1000)

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if length > MAX_BODY:
                raise BadRequest(f"body of {length} bytes is over {MAX_BODY}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            raw = self.rfile.read(length)
            try:
                body = safe_json.loads(raw or b"null")  # deep nesting, bad UTF-8: a 400
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"body is not JSON ({e})") from None
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            return body

        def log_message(self, format, *args):  # through logging, not straight to stderr
            log.info("%s " + format, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


def _field(body: dict, name: str, kind: type):
    if name not in body:
        raise BadRequest(f"missing field '{name}' (found: {', '.join(body) or 'no fields'})")
    if not isinstance(body[name], kind):
        names = {dict: "a JSON object", list: "a JSON list", str: "text"}
        raise BadRequest(f"{name}: expected {names[kind]}, got {type(body[name]).__name__}")
    return body[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="weaker BUY / SELL -> HOLD")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="/signals generates this many at a time "
                        "(default: the run's eval.batch_size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from finetune.inference import SignalProvider
    options = {"confidence_threshold": args.confidence_threshold}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.batch_size:
        options["batch_size"] = args.batch_size
    try:
        provider = SignalProvider.from_run(args.run_dir, **options)
        server = make_server(provider, args.host, args.port, args.run_dir)
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach it can query the model (no authentication)", args.host)
    host, port = server.server_address[:2]
    print(f"serving {args.run_dir} on http://{host}:{port} (GET /health, POST /signal /signals /generate)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
