"""The server under a flood: refusals come at once and leave nothing queued, a normal client is then served in its
usual time, and a request whose client gave up (or timed out) stops costing the model."""
import statistics
import time

import httpx
import pytest

from finetune.serving.inference import SignalProvider
from finetune.serve import Limits, make_app
from test_inference import one_thread, tiny_signal_run  # noqa: F401  (one_thread: autouse)
from test_serve import chat, post, start


@pytest.fixture(scope="module")
def provider(cache_dir):
    return SignalProvider.from_run(tiny_signal_run(cache_dir))


@pytest.fixture(scope="module")
def server(provider):
    limits = Limits(request_timeout=30.0, body_timeout=2.0, max_tokens=512, batch_size=16, batch_window=0.02,
                    max_queue=4, max_prompts=8)
    app = make_app(provider, "tiny-run", limits=limits)
    server, port = start(app)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True


def usual(url: str) -> float:
    """The median time of a normal chat request."""
    times = []
    for i in range(3):
        began = time.perf_counter()
        answer = post(f"{url}/v1/chat/completions", {"model": "tiny-run", "max_tokens": 8, "messages": chat(i)})
        assert answer.status_code == 200, answer.text
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def test_floods_are_refused_within_a_second_leave_nothing_queued_and_normal_requests_go_on(server):
    url, app = server
    batcher = app.state.batcher
    before = usual(url)
    batches = len(batcher.batches)
    floods = {  # each: what it sends, the status it must get, words of the message
        "300 prompts in one request": ({"model": "tiny-run", "prompt": [f"prompt {i} " * 20 for i in range(300)]},
                                       400, "300 prompts in one request; at most 8"),
        "a 300 KB prompt": ({"model": "tiny-run", "prompt": "price up " * 34000}, 400, "over the"),
        "a prompt past the model's positions": ({"model": "tiny-run", "prompt": "up " * 700, "max_tokens": 400}, 400,
                                                "1024 positions"),
        "more answers than the queue holds": ({"model": "tiny-run", "prompt": ["a", "b", "c", "d", "e", "f"]}, 503,
                                              "this request needs 6"),
    }
    for name, (body, status, words) in floods.items():
        began = time.perf_counter()
        answer = post(f"{url}/v1/completions", body)
        seconds = time.perf_counter() - began
        assert answer.status_code == status and words in answer.json()["error"]["message"], (name, answer.text)
        assert seconds < 1.0, (name, seconds)
        assert batcher.jobs.qsize() == 0 and len(batcher.batches) == batches, name  # nothing queued or generated
    after = usual(url)
    assert after <= 2 * before, (before, after)


def test_a_run_dir_named_base_does_not_hide_its_adapter(provider):
    from fastapi.testclient import TestClient
    client = TestClient(make_app(provider, "base"))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base-run", "base"]
    messages = chat(3)
    tuned = provider.generate([messages])[0]
    with provider.model.disable_adapter():
        base = provider.generate([messages])[0]
    assert tuned != base  # the test can tell them apart
    answers = {model: client.post("/v1/chat/completions", json={"model": model, "messages": messages})
               .json()["choices"][0]["message"]["content"] for model in ("base-run", "base")}
    assert answers == {"base-run": tuned, "base": base}
    assert client.post("/generate", json={"messages": messages}).json()["text"] == tuned  # the adapter's route


def steps_of(batcher, send) -> int:
    """Decoding steps taken for one request `send` makes (the worker is idle before and after)."""
    before = batcher.steps
    send()
    time.sleep(0.5)  # a row still generating would go on counting here
    taken = batcher.steps - before
    time.sleep(0.3)
    assert batcher.steps - before == taken  # stopped
    return taken


def test_a_request_its_client_abandons_or_that_times_out_stops_generating(provider):
    limits = Limits(request_timeout=30.0, max_tokens=512, batch_window=0.0)
    app = make_app(provider, "tiny-run", limits=limits)
    server, port = start(app)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": "base", "max_tokens": 512, "messages": chat(4)}  # the random base never stops by itself
    try:
        began = time.perf_counter()
        full = steps_of(app.state.batcher, lambda: post(url, body))
        seconds = time.perf_counter() - began - 0.8
        assert full >= 511, full  # the whole budget, when the client waits

        def give_up():
            with pytest.raises(httpx.TimeoutException):
                post(url, body, timeout=seconds / 5)
        abandoned = steps_of(app.state.batcher, give_up)
        assert abandoned < full / 2, (abandoned, full)
        limits.request_timeout = seconds / 5
        timed_out = steps_of(app.state.batcher, lambda: post(url, body).status_code == 504 or pytest.fail("no 504"))
        assert timed_out < full / 2, (timed_out, full)
    finally:
        server.should_exit = True


def test_the_api_key_scheme_is_case_insensitive_and_a_wrong_key_is_refused(provider):
    from fastapi.testclient import TestClient
    client = TestClient(make_app(provider, "tiny-run", api_key="key-5e6f7a8b"))
    for header, status in (("Bearer key-5e6f7a8b", 200), ("bearer key-5e6f7a8b", 200), ("BEARER  key-5e6f7a8b", 200),
                           ("Bearer key-5e6f7a8c", 401), ("Basic key-5e6f7a8b", 401), ("", 401)):
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == status, header


def test_stream_must_be_a_boolean(provider):
    from fastapi.testclient import TestClient
    client = TestClient(make_app(provider, "tiny-run"))
    for value in ("yes", "false", 1):
        answer = client.post("/v1/chat/completions", json={"messages": chat(5), "stream": value, "max_tokens": 4})
        assert answer.status_code == 400 and "stream: true or false" in answer.json()["error"]["message"], value
    answer = client.post("/v1/chat/completions", json={"messages": chat(5), "stream": False, "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"
