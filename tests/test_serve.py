"""The server on the tiny trade-signals run, uvicorn in a thread on a free loopback port: the openai client
against it unchanged, batched answers equal to the Python API's, bad input answered with a 4xx while it goes on
serving, and the API key."""
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from finetune.serving.inference import SignalProvider
from finetune.serve import Limits, http_protocol, main as serve_main, make_app
from test_inference import SNAPSHOTS, one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)

LIMITS = Limits(request_timeout=60.0, body_timeout=2.0, max_tokens=64, batch_size=16, batch_window=0.02)


@pytest.fixture(scope="module")
def provider(cache_dir):
    return SignalProvider.from_run(tiny_signal_run(cache_dir))


def start(app):
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, timeout_keep_alive=2,
                                           http=http_protocol(LIMITS.body_timeout), limit_concurrency=512,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, server.servers[0].sockets[0].getsockname()[1]


@pytest.fixture(scope="module")
def server(provider):
    app = make_app(provider, "tiny-run", limits=LIMITS)
    server, port = start(app)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused-on-loopback", max_retries=0)


def post(url: str, body, headers=None, timeout=30):
    import httpx
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=data, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Symbol: BTC/USDT\nRSI: {20 + i}\nrequest {i}"}]


def test_the_openai_client_lists_models_completes_and_streams(client, provider):
    assert {m.id for m in client.models.list()} == {"tiny-run", "base"}
    messages = chat(1)
    expected = provider.generate([messages])[0]
    answer = client.chat.completions.create(model="tiny-run", messages=messages)
    assert answer.choices[0].message.content == expected and answer.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny-run", messages=messages, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == expected  # token by token, the same answer
    with provider.model.disable_adapter():
        base_expected = provider.generate([messages])[0]
    assert client.chat.completions.create(model="base", messages=messages).choices[0].message.content == base_expected
    text = client.completions.create(model="tiny-run", prompt=messages[0]["content"]).choices[0].text
    system = [{"role": "system", "content": provider.system_prompt}] if provider.system_prompt else []
    assert text == provider.generate([system + messages])[0]


def test_a_json_schema_response_format_is_followed(client):
    schema = {"type": "object", "properties": {"signal": {"enum": ["BUY", "SELL", "HOLD"]}},
              "required": ["signal"], "additionalProperties": False}
    answer = client.chat.completions.create(model="base", messages=chat(2), max_tokens=32,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "s", "schema": schema}})
    assert json.loads(answer.choices[0].message.content)["signal"] in ("BUY", "SELL", "HOLD")


def test_signal_routes_answer_under_the_grammar_and_never_fall_back(server, provider):
    url = server[0]
    free = [provider.generate([provider.signal_prompt(m)])[0] for m in SNAPSHOTS]
    expected = [provider.read_signal(text) for text in free]
    fallbacks = provider.fallbacks
    got = post(f"{url}/signals", {"market_data": SNAPSHOTS}).json()["signals"]
    assert post(f"{url}/signal", {"market_data": SNAPSHOTS[0]}).json() == got[0]
    assert provider.fallbacks == fallbacks  # every constrained answer gave a signal and a confidence
    for text, want, answer in zip(free, expected, got):
        if want != ("HOLD", 0.0):  # a free answer the format allows is the constrained answer too
            assert (answer["signal"], answer["confidence"]) == want
        assert answer["signal"] in ("BUY", "SELL", "HOLD") and 0 <= answer["confidence"] <= 1


def constrained_signals(provider, snapshots: list[dict], base: bool = False) -> list[dict]:
    """The provider's constrained generate_answers answers to `snapshots` (the base's with `base`), as /signal
    gives them: the reference the server's prefix-decoder path must equal."""
    from contextlib import nullcontext
    from finetune import tasks
    from finetune.eval.suite import generate_answers
    from finetune.tasks.signals import parse_signal
    chats = [provider.signal_prompt(m) for m in snapshots]
    with provider.model.disable_adapter() if base else nullcontext():
        texts = generate_answers(provider.model, provider.tokenizer, chats, provider.max_new_tokens, len(chats),
                                 progress=False, grammar=tasks.get(provider.task).grammar(),
                                 **provider.generation)["texts"]
    return [dict(zip(("signal", "confidence"), parse_signal(text))) for text in texts]


def counted(decoder, monkeypatch) -> list[int]:
    """The number of chats in each call of `decoder.answers` from now on."""
    calls, answers = [], decoder.answers
    monkeypatch.setattr(decoder, "answers", lambda chats, tokens: calls.append(len(chats)) or answers(chats, tokens))
    return calls


def test_eight_concurrent_signal_clients_are_answered_in_batches_by_the_prefix_decoder(server, provider,
                                                                                       monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from finetune import tasks
    url, app = server
    batcher = app.state.batcher
    snapshots = [{**SNAPSHOTS[i % 4], "price": SNAPSHOTS[i % 4]["price"] + 100 * i} for i in range(8)]
    expected = constrained_signals(provider, snapshots)
    assert post(f"{url}/signal", {"market_data": snapshots[0]}).json() == expected[0]  # builds the decoder
    calls = counted(batcher.decoders[("tiny-run", tasks.get(provider.task).grammar())], monkeypatch)
    before = len(batcher.batches)
    gate = threading.Barrier(8)

    def client(market_data: dict) -> dict:
        gate.wait()  # the 8 requests arrive together, as 8 trading loops' would
        return post(f"{url}/signal", {"market_data": market_data}).json()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(client, snapshots))
    assert got == expected
    assert calls == batcher.batches[before:] and sum(calls) == 8 and len(calls) < 8, calls  # batched, fast path


def test_a_base_signal_through_the_prefix_decoder_is_the_base_models_constrained_answer(server, provider,
                                                                                        monkeypatch):
    from finetune import tasks
    url, app = server
    base, tuned = constrained_signals(provider, SNAPSHOTS, base=True), constrained_signals(provider, SNAPSHOTS)
    assert base != tuned  # the test can tell them apart
    assert post(f"{url}/signals", {"model": "base", "market_data": SNAPSHOTS}).json()["signals"] == base
    calls = counted(app.state.batcher.decoders[("base", tasks.get(provider.task).grammar())], monkeypatch)
    assert post(f"{url}/signal", {"model": "base", "market_data": SNAPSHOTS[1]}).json() == base[1]
    assert calls == [1]
    assert post(f"{url}/signals", {"market_data": SNAPSHOTS}).json()["signals"] == tuned  # the adapter's decoder


def test_serve_merge_folds_the_adapter_in_and_refuses_the_base_naming_merge(cache_dir, provider, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    run_dir = tiny_signal_run(cache_dir)
    serve_main([str(run_dir), "--merge", "--port", "0"])
    client = TestClient(apps[0])
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [run_dir.name]
    refused = client.post("/signal", json={"model": "base", "market_data": SNAPSHOTS[0]})
    assert refused.status_code == 404 and "--merge" in refused.json()["error"]["message"], refused.text
    merged = client.post("/signals", json={"market_data": SNAPSHOTS}).json()["signals"]
    assert merged == constrained_signals(provider, SNAPSHOTS)


def test_serve_static_warms_before_listening_and_answers_the_same(cache_dir, provider, monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient
    from finetune.serving.inference import SignalProvider
    apps, warmed = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    warm = SignalProvider.warm
    monkeypatch.setattr(SignalProvider, "warm", lambda self, *a: warmed.append(self) or warm(self, *a))
    serve_main([str(tiny_signal_run(cache_dir)), "--merge", "--static", "--port", "0"])
    served = apps[0].state.batcher.provider
    assert warmed == [served] and served.generation["cache_implementation"] == "static" and not served.fast
    assert "static KV cache: warmed in" in capsys.readouterr().out
    signals = TestClient(apps[0]).post("/signals", json={"market_data": SNAPSHOTS}).json()["signals"]
    assert signals == constrained_signals(provider, SNAPSHOTS)


def test_serve_dtype_casts_the_served_model_and_its_signals_still_parse(cache_dir, monkeypatch):
    import torch
    import uvicorn
    from fastapi.testclient import TestClient
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    serve_main([str(tiny_signal_run(cache_dir)), "--dtype", "bfloat16", "--port", "0"])
    client = TestClient(apps[0])
    assert apps[0].state.batcher.provider.model.dtype == torch.bfloat16
    for model in ("base", None):
        answer = client.post("/signal", json={"model": model, "market_data": SNAPSHOTS[0]}).json()
        assert answer["signal"] in ("BUY", "SELL", "HOLD") and 0 <= answer["confidence"] <= 1, answer


def test_the_latency_script_reads_every_held_out_prompt_back_into_its_snapshot(cache_dir, provider):
    import importlib.util
    from finetune.data.pipeline import read_jsonl
    path = Path(__file__).resolve().parent.parent / "scripts" / "serve_latency.py"
    spec = importlib.util.spec_from_file_location("serve_latency", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run_dir = tiny_signal_run(cache_dir)
    bodies, skipped = script.held_out_snapshots(run_dir)
    prompts = [s["messages"][:-1] for s in read_jsonl(run_dir / "data" / "test.jsonl")]
    assert skipped == 0 and len(bodies) == len(prompts) > 0
    assert [provider.signal_prompt(b["market_data"], b["symbol"]) for b in bodies] == prompts


LOAD = """
import json, sys, time, httpx
from concurrent.futures import ThreadPoolExecutor
url, clients, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def client(c):
    out = []
    with httpx.Client(timeout=120) as http:  # one keep-alive connection per client, as a trading loop keeps
        for i in range(c * each, (c + 1) * each):
            start = time.perf_counter()
            r = http.post(url, json={"model": "tiny-run", "max_tokens": 8, "messages": [
                {"role": "user", "content": f"Symbol: BTC/USDT\\nRSI: {20 + i}\\nrequest {i}"}]})
            out.append([i, r.status_code, r.json()["choices"][0]["message"]["content"], time.perf_counter() - start])
    return out
start = time.perf_counter()
with ThreadPoolExecutor(clients) as pool:
    rows = [row for rows in pool.map(client, range(clients)) for row in rows]
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows}))
"""


def load(url: str, clients: int, each: int) -> dict:
    """`clients` concurrent clients sending `each` requests one after another, from another process (a client
    in the server's process would share its interpreter lock)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", LOAD, f"{url}/v1/chat/completions", str(clients), str(each)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_eight_clients_are_batched_three_times_faster_than_one_and_none_is_lost(server, provider):
    url, app = server
    expected = dict(enumerate(provider.generate([chat(i) for i in range(200)], 8)))
    alone = load(url, 1, 25)
    one_client = 25 / alone["seconds"]
    batches_before = len(app.state.batcher.batches)
    together = load(url, 8, 25)
    eight_clients = 200 / together["seconds"]
    sizes = app.state.batcher.batches[batches_before:]
    latencies = sorted(row[3] for row in together["rows"])
    print(f"one client {one_client:.1f} req/s (p50 {statistics.median(r[3] for r in alone['rows']) * 1000:.0f} ms);"
          f" 8 clients {eight_clients:.1f} req/s, p50 {latencies[99] * 1000:.0f} ms, p99 {latencies[197] * 1000:.0f}"
          f" ms; {len(sizes)} batches, mean size {200 / len(sizes):.1f}")
    rows = alone["rows"] + together["rows"]
    assert all(status == 200 for _, status, _, _ in rows)
    assert sorted(i for i, _, _, _ in together["rows"]) == list(range(200))  # every request answered once
    assert all(text == expected[i] for i, _, text, _ in rows)  # each its own answer, batched or alone
    assert max(sizes) > 1 and eight_clients >= 3 * one_client, (one_client, eight_clients)


@pytest.mark.parametrize("path, body, status, error", [
    ("/v1/chat/completions", b"{not json", 400, "body is not JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "body must be a JSON object"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": 5}, 400, "messages: expected a non-empty list"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": 3}]}, 400,
     "messages\\[0\\]"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": chat(0), "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": chat(0), "max_tokens": 10 ** 9}, 400,
     "max_tokens: an integer from 1 to 64"),
    ("/v1/chat/completions", {"model": "gpt-5", "messages": chat(0)}, 404, "model 'gpt-5' does not exist"),
    ("/v1/chat/completions", {"model": "base", "messages": chat(0), "response_format": {"type": "yaml"}}, 400,
     "response_format"),
    ("/v1/completions", {"model": "base", "prompt": 7}, 400, "prompt: a non-empty string"),
    ("/signal", {"market_data": {"colour": "red"}}, 400, "market_data: .*no known indicator"),
    ("/signals", {"market_data": [SNAPSHOTS[0], {"colour": "red"}]}, 400, "market_data\\[1\\]: "),
    ("/signal", {"data": {}}, 400, "missing field 'market_data' \\(found: data\\)"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ("/v1/chat/completions", b"x" * (10 << 20), 413, "over 1048576"),
])
def test_bad_requests_get_a_4xx_and_the_server_goes_on(server, path, body, status, error):
    import re
    out = post(server[0] + path, body)
    assert out.status_code == status and re.search(error, out.json()["error"]["message"]), out.text
    assert post(server[0] + "/v1/chat/completions", {"model": "base", "messages": chat(0), "max_tokens": 2}
                ).status_code == 200


def test_a_stalled_request_is_closed_after_the_timeout_and_idle_connections_do_not_block(server):
    host, port = "127.0.0.1", int(server[0].rsplit(":", 1)[1])
    stalled = socket.create_connection((host, port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 200\r\n\r\n{\"model\": ")  # half a body, then nothing
    sent = time.monotonic()
    idle = [socket.create_connection((host, port)) for _ in range(200)]
    try:
        assert post(server[0] + "/v1/chat/completions", {"model": "base", "messages": chat(0), "max_tokens": 2}
                    ).status_code == 200  # while 201 connections hang
        stalled.settimeout(LIMITS.body_timeout + 5)
        reply = chunk = stalled.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - sent < LIMITS.body_timeout + 2
        while chunk:  # the rest of the answer, then the server closes the connection (recv gives b"")
            chunk = stalled.recv(4096)
            reply += chunk
        assert b"the body did not arrive within 2 s" in reply
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""  # a connection that never sends a request is closed after the timeout
        half = socket.create_connection((host, port))
        half.sendall(b"POST /v1/chat/comp")  # half a request line, then nothing
        half.settimeout(10)
        assert half.recv(1) == b""
        half.close()
    finally:
        stalled.close()
        for s in idle:
            s.close()
    assert post(server[0] + "/v1/chat/completions", {"model": "base", "messages": chat(0), "max_tokens": 2}
                ).status_code == 200


def test_an_api_key_is_required_off_loopback_and_checked(provider, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FINETUNE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        serve_main([str(tmp_path), "--host", "0.0.0.0", "--port", "0"])
    assert exit_.value.code == 1 and "set FINETUNE_API_KEY" in capsys.readouterr().err
    server, port = start(make_app(provider, "tiny-run", api_key="k-123456", limits=LIMITS))
    try:
        url, body = f"http://127.0.0.1:{port}/v1/chat/completions", {"model": "base", "messages": chat(0),
                                                                     "max_tokens": 2}
        assert post(url, body).status_code == 401
        assert post(url, body, {"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, body, {"Authorization": "Bearer k-123456"}).status_code == 200
    finally:
        server.should_exit = True


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main([str(tmp_path), "--port", "0"])
    assert exit_.value.code == 1 and "not a run directory" in capsys.readouterr().err


def test_openai_sampling_fields_are_honoured(client):
    messages = chat(3)
    two = client.chat.completions.create(model="base", messages=messages, max_tokens=12, n=2, temperature=1.5,
                                         seed=7)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].message.content != two.choices[1].message.content
    again = client.chat.completions.create(model="base", messages=messages, max_tokens=12, n=2, temperature=1.5,
                                           seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]  # seed reproduces
    greedy = client.chat.completions.create(model="base", messages=messages, max_tokens=12).choices[0].message.content
    assert client.chat.completions.create(model="base", messages=messages, max_tokens=12, temperature=0
                                          ).choices[0].message.content == greedy
    stop = greedy.split()[1]  # the tiny base babbles: stop at its second word
    cut = client.chat.completions.create(model="base", messages=messages, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == greedy[:greedy.index(stop)] and cut.finish_reason == "stop"
    texts = client.completions.create(model="base", prompt=["a", "b"], max_tokens=4, n=2, temperature=1.0, seed=1)
    assert len(texts.choices) == 4
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("extra, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"n": 0}, "n"),
    ({"temperature": 3}, "temperature"), ({"stream": True, "n": 2}, "n"),
])
def test_a_field_the_server_cannot_honour_gets_a_400_naming_it(server, extra, field):
    out = post(server[0] + "/v1/chat/completions", {"model": "base", "messages": chat(0), "max_tokens": 2, **extra})
    assert out.status_code == 400 and out.json()["error"]["message"].startswith(f"{field}: "), out.text


def test_a_json_response_format_is_laid_out_as_the_task_trained(client, provider):
    # the signals task trains on json.dumps's layout: {"signal": "BUY", "confidence": 0.7}, spaces after , and :
    schema = {"type": "object", "properties": {"signal": {"enum": ["BUY", "SELL", "HOLD"]},
                                               "confidence": {"type": "number"}},
              "required": ["signal", "confidence"], "additionalProperties": False}
    answer = client.chat.completions.create(model="tiny-run", messages=chat(4), max_tokens=24,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "s", "schema": schema}})
    text = answer.choices[0].message.content
    assert provider.task == "signals" and text.startswith('{"signal": "') and '", "confidence": ' in text, text
