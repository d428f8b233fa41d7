"""The HTTP endpoint on the tiny trade-signals run, in a thread on a free loopback port: the same answers as
the Python API, JSON errors with 4xx for bad requests, and the server lives on after them."""
import http.client
import json
import re
import threading

import pytest

from finetune.inference import SignalProvider
from finetune.serve import main as serve_main, make_server
from test_inference import SNAPSHOTS, one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)


@pytest.fixture(scope="module")
def provider(cache_dir):
    return SignalProvider.from_run(tiny_signal_run(cache_dir))


@pytest.fixture(scope="module")
def server(provider):
    server = make_server(provider, "127.0.0.1", 0, run_dir="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def call(server, method, path, body=None):
    """(status, JSON answer); `body` is sent as JSON, or as it is when it is bytes."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    assert response.getheader("Content-Type").startswith("application/json")
    return response.status, payload


def test_listens_on_loopback_and_reports_health(server):
    assert server.server_address[0] == "127.0.0.1"
    status, body = call(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["task"] == "signals" and body["run"] == "tiny"


def test_endpoint_gives_the_python_api_answers(server, provider):
    expected = provider.get_signals(SNAPSHOTS)
    for market_data, (signal, confidence) in zip(SNAPSHOTS, expected):
        assert call(server, "POST", "/signal", {"market_data": market_data}) == (
            200, {"signal": signal, "confidence": confidence})
    status, body = call(server, "POST", "/signals", {"market_data": SNAPSHOTS})
    assert status == 200 and [(s["signal"], s["confidence"]) for s in body["signals"]] == expected
    messages = [{"role": "user", "content": "Symbol: BTC/USDT\nRSI: 28"}]
    assert call(server, "POST", "/generate", {"messages": messages}) == (
        200, {"text": provider.generate([messages])[0]})
    prompt = [{"role": "system", "content": provider.system_prompt}, messages[0]]
    assert call(server, "POST", "/generate", {"prompt": messages[0]["content"]}) == (
        200, {"text": provider.generate([prompt])[0]})


@pytest.mark.parametrize("method, path, body, status, error", [
    ("POST", "/signal", b"[1, 2]", 400, "body must be a JSON object"),
    ("POST", "/signal", b"{not json", 400, "body is not JSON"),
    ("POST", "/signal", {"data": {}}, 400, "missing field 'market_data' \\(found: data\\)"),
    ("POST", "/signal", {"market_data": [1]}, 400, "market_data: expected a JSON object, got list"),
    ("POST", "/signal", {"market_data": {"colour": "red"}}, 400, "market_data: .*no known indicator"),
    ("POST", "/signals", {"market_data": [SNAPSHOTS[0], {"colour": "red"}]}, 400, "market_data\\[1\\]: "),
    ("POST", "/generate", {"messages": [{"role": "user"}]}, 400, "messages: expected a non-empty list"),
    ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("GET", "/signal", None, 405, "method not allowed"),
    ("POST", "/trade", {}, 404, "no such endpoint"),
])
def test_bad_requests_get_a_json_error_and_the_server_lives_on(server, method, path, body, status, error):
    got_status, payload = call(server, method, path, body)
    assert got_status == status and re.search(error, payload["error"]), payload
    assert call(server, "GET", "/health")[0] == 200


def test_concurrent_requests_get_their_own_answers(server, provider):
    expected = provider.get_signals(SNAPSHOTS)
    results = [None] * len(SNAPSHOTS)

    def ask(i):
        results[i] = call(server, "POST", "/signal", {"market_data": SNAPSHOTS[i]})[1]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(SNAPSHOTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(r["signal"], r["confidence"]) for r in results] == expected


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main([str(tmp_path), "--port", "0"])
    assert exit_.value.code == 1 and "not a run directory" in capsys.readouterr().err
