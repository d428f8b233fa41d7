"""An OpenAI-compatible HTTP server for a run's adapter: the `openai` client, a trading loop or an agent calls it.

    python -m finetune.serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--api-key-env FINETUNE_API_KEY] [--merge]
                                [--dtype bfloat16] [--static]

    GET  /v1/models                     the run's adapter (model id: the run dir's name; "base-run" for a run dir
                                        named base) and its base ("base")
    POST /v1/chat/completions           {"model", "messages", "max_tokens", "stream", "stream_options",
                                         "response_format", "temperature", "top_p", "seed", "n", "stop"}
    POST /v1/completions                {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "n", "stop"}
    (any other field that asks for something, e.g. tools or logprobs, gets a 400 naming it)
    GET  /health                        {"status": "ok", "run", "task", "fallbacks", "held", "queued", "batches"}
    POST /signal   {"market_data": {...}}       -> {"signal": "BUY", "confidence": 0.72}   ("model": "base" too)
    POST /signals  {"market_data": [{...}]}     -> {"signals": [{"signal": ..., "confidence": ...}, ...]}
    POST /generate {"messages": [...]}          -> {"text": "..."}     ({"prompt": "..."} works too)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": "..."}])

Batching: every request joins one queue; a worker takes what arrived within `--batch-window` seconds (up to
`--batch-size`) and answers requests for the same model, token budget and grammar in one generate() call.
Greedy answers are the same batched or alone (the tests check it). A streamed chat completion (server-sent
events) is generated on its own, token by token.

Signals fast: the /signal and /signals jobs of one batch (under the task's grammar, greedy) are answered in one
call of the prefix decoder (finetune/eval/fast_decode.py: the signal prompt's shared start cached once per served
model, the tokens the grammar forces run in one pass), the same answers generate() gives. Not for `--free`, a run
whose eval.generation samples, or a prompt-learning adapter (its virtual tokens live in the cache): those take
generate(). `--merge` folds the adapter into the base weights at load, so each step runs the base's matmuls only
(a QLoRA run's into its dequantized 4-bit weights: finetune.serving.inference.merged); the base model is then no
longer there to serve ("base" requests get a 404 that says so). `--dtype bfloat16` casts the model after loading (on a CPU with bf16 instructions a step takes about half a float32 one; answers can differ
where two tokens are near-tied: measure on the run's held-out prompts, scripts/signal_latency.py). `--static` (for a
GPU): generate() with transformers' static KV cache, its decode step compiled on CUDA, warmed before the server
listens (SignalProvider.warm); signals then take generate() instead of the prefix decoder.

Answers that parse: the signal routes decode under the task's grammar (finetune/tasks/), so a
signal is always read and the ("HOLD", 0.0) fallback is for a model without one (`--free` turns it off);
chat completions take OpenAI's `response_format` ({"type": "json_schema", "json_schema": {"schema": ...}} or
{"type": "json_object"}) the same way.

Limits, each answered with a 4xx / 503 and the server goes on: a body over `--max-body` bytes (413), a body
that does not arrive within `--body-timeout` (408, connection closed), malformed JSON or wrong types (400 /
422), an unknown model (404), max_tokens over `--max-tokens` (400), a full queue (503), a request that waited
longer than `--request-timeout` (504), more than `--max-prompts` prompts in one request (400), a prompt over
`--max-prompt-tokens` or past the model's positions with its max_tokens (400), a request whose answers do not all
fit the queue (503, none of them queued). A request that times out or whose client hangs up is abandoned: its
queued answers are dropped and its rows stop generating at the next token (a signal batch already in the prefix
decoder runs to its end, a few passes, and the abandoned answer is thrown away). A connection idle after an answer
closes after 5 s, one that sends no whole request head within `--body-timeout` is closed; more than
`--max-connections` at once get 503. Binding to anything but loopback needs an API key: the bearer token in the
environment variable `--api-key-env` names (the scheme in any case, the key compared in constant time); without it
the server refuses to start.
"""
import argparse
import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import safe_json
from finetune.errors import ConfigError, DataError
from finetune.rundir.logs import log_to

log = logging.getLogger(__name__)

BASE = "base"  # the model id of the run's base model, the adapter switched off


@dataclass
class Limits:
    max_body: int = 1 << 20        # bytes: a few thousand snapshots per /signals call
    max_tokens: int = 512          # the most tokens one answer may ask for
    request_timeout: float = 60.0  # seconds a request waits for its answer (the queue and the generation)
    body_timeout: float = 10.0     # seconds to receive a request's body (a stalled client is cut off)
    max_queue: int = 256           # requests waiting for the model; more get 503
    batch_size: int = 16           # answers per generate() call
    batch_window: float = 0.01     # seconds the worker waits for more requests to batch with the first
    max_connections: int = 512     # open connections and requests at once (uvicorn's limit_concurrency)
    max_prompts: int = 64          # prompts in one request (/v1/completions' list, /signals' snapshots)
    max_prompt_tokens: int = 4096  # tokens of one prompt (chat template included); the model's positions cap it too


class ApiError(Exception):
    """A client error: answered with `status` and OpenAI's {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class Job:
    chat: list[dict]
    model: str
    max_tokens: int
    grammar: str | None = None
    stream: "queue.Queue | None" = None   # text pieces as they are generated, then None
    sampling: tuple = ()                  # generate() keywords (do_sample, temperature, top_p) as sorted pairs
    seed: int | None = None               # a seeded request's answers are generated alone, after torch.manual_seed
    stop: tuple = ()                      # the answer ends before the first of these strings
    group: int | None = None              # a seeded request's jobs: generated together and with no other
    signal: bool = False                  # a signal route's job: the prefix decoder may answer it
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # its client timed out or went away: the worker drops it, or stops its generation

    def abandon(self) -> None:
        self.abandoned = True
        self.future.cancel()  # not yet running: never generated (running: the worker's Abandoned stops its row;
        #                       a signal batch in the prefix decoder runs to its end, a few passes)


class Batcher:
    """One worker thread owns the model: it takes the first queued job, gathers what arrives within the window,
    and answers each group of compatible jobs with one generate() call."""

    def __init__(self, provider, limits: Limits):
        self.provider, self.limits = provider, limits
        self.jobs: queue.Queue = queue.Queue(limits.max_queue)
        self.batches: list[int] = []  # the size of each generate() call (health, tests)
        self.steps = 0  # decoding steps taken, all generate() calls together (tests count them)
        self.decoders: dict = {}  # (model id, grammar) -> the PrefixDecoder answering its signal jobs
        self.submitting = threading.Lock()
        self.thread = threading.Thread(target=self.loop, name="finetune-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.submit_all([job])
        return job

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: a request that does not fit gets 503 and leaves nothing queued."""
        with self.submitting:  # only submitters fill the queue, so the room seen here is there for the puts
            if self.jobs.qsize() + len(jobs) > self.limits.max_queue:
                raise ApiError(503, f"the server is busy ({self.jobs.qsize()} of {self.limits.max_queue} answers "
                                    f"waiting, this request needs {len(jobs)}); retry later", "server_busy")
            for job in jobs:
                self.jobs.put_nowait(job)

    def loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.limits.batch_window
            while first.stream is None and len(batch) < self.limits.batch_size:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if batch[-1] is None:
                    batch.pop()
                    self.jobs.put(None)
                    break
            groups: dict = {}
            for job in batch:
                key = (job.model, job.max_tokens, job.grammar, job.sampling, job.group, job.signal,
                       id(job) if job.stream else None)
                groups.setdefault(key, []).append(job)
            for jobs in groups.values():
                self.answer(jobs)

    def answer(self, jobs: list[Job]) -> None:
        from finetune.eval.suite import generate_answers
        jobs = [j for j in jobs if not j.abandoned and j.future.set_running_or_notify_cancel()]  # gave up: dropped
        if not jobs:
            return
        provider, first = self.provider, jobs[0]
        streamer = Pieces(provider.tokenizer, first.stream) if first.stream is not None else None
        try:
            if first.seed is not None:  # its group is generated alone: the same seed, the same answers
                import torch
                torch.manual_seed(first.seed)
            with provider.model.disable_adapter() if first.model == BASE else nullcontext():
                if self.fast(first):
                    out = self.fast_answers(jobs)
                else:
                    out = generate_answers(provider.model, provider.tokenizer, [j.chat for j in jobs],
                                           first.max_tokens, len(jobs), progress=False, grammar=first.grammar,
                                           streamer=streamer, **{**provider.generation, **dict(first.sampling)},
                                           stopping_criteria=[Abandoned(jobs, self)])
            self.batches.append(len(jobs))
            for i, job in enumerate(jobs):
                job.future.set_result(cut_at_stop({k: out[k][i] for k in ("texts", "tokens", "stopped",
                                                                          "prompt_tokens")}, job.stop))
        except Exception as err:  # every waiting request gets the error, and the worker lives on
            log.exception("generation failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
        finally:
            if first.stream is not None:
                first.stream.put(None)

    def fast(self, job: Job) -> bool:
        """Whether `job`'s group goes to the prefix decoder: a signal job under a grammar, decoded greedily (no
        sampling, seed, stream or stop string; the run's eval.generation empty), on a model whose cache holds only
        the prompt (`provider.fast`: not prompt-learning)."""
        greedy = not job.sampling and job.seed is None and job.stream is None and not job.stop
        return job.signal and job.grammar is not None and greedy and self.provider.fast

    def fast_answers(self, jobs: list[Job]) -> dict:
        """The jobs' answers from their model's prefix decoder, in generate_answers' layout. Called under the
        model's own adapter context: a decoder is built there on first use, so the prefix cache it keeps was
        computed with the weights it is used with (the base's under disable_adapter). Its call has no stopping
        hook: a job abandoned while its batch runs is answered with the others (a few passes) and the answer
        dropped."""
        first = jobs[0]
        key = (first.model, first.grammar)
        if key not in self.decoders:
            self.decoders[key] = self.provider.prefix_decoder(first.grammar)
        answers = self.decoders[key].answers([job.chat for job in jobs], first.max_tokens)
        self.steps += max(a["passes"] for a in answers)  # each pass runs the whole batch, as one generate() step
        return {"texts": [a["text"] for a in answers], **{k: [a[k] for a in answers]
                                                          for k in ("tokens", "stopped", "prompt_tokens")}}

    def close(self) -> None:
        self.jobs.put(None)


class Abandoned:
    """A generate() stopping criterion: the rows of jobs whose client gave up are finished at the next token (a
    timed-out or disconnected request stops costing the model), and each decoding step is counted."""

    def __init__(self, jobs: list[Job], batcher: Batcher):
        self.jobs, self.batcher = jobs, batcher

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        self.batcher.steps += 1
        return torch.tensor([job.abandoned for job in self.jobs], device=input_ids.device)


class Pieces:
    """A generate() streamer for one answer: decoded text pieces into a queue as tokens arrive (the prompt and
    the stop token left out)."""

    def __init__(self, tokenizer, out: queue.Queue):
        self.tokenizer, self.out, self.tokens, self.sent, self.prompt_seen = tokenizer, out, [], "", False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            return
        if len(text) > len(self.sent):
            self.out.put(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


def http_protocol(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol, and a connection that has not sent a whole request head within
    `header_timeout` seconds of opening (or of its last answer) is closed. uvicorn itself arms its keep-alive
    timer only after a first answer and disarms it at the first byte: a client that connects and says nothing,
    or sends half a request line, would hold its connection for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        header_timer = None

        def waiting(self) -> bool:  # no request in progress: before the first, or after an answer
            return self.cycle is None or self.cycle.response_complete

        def arm(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(header_timeout, self.cut_off)

        def cut_off(self) -> None:
            self.header_timer = None
            if self.waiting() and not self.transport.is_closing():
                self.transport.close()
            elif not self.transport.is_closing():
                self.arm()  # a request is being answered: look again later

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.waiting():
                self.arm()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return Guarded


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(provider, run_name: str = "adapter", api_key: str | None = None, limits: Limits | None = None,
             constrained: bool = True, merged: bool = False):
    """The FastAPI app serving `provider` (a SignalProvider: its adapter as `run_name`, its base as "base"; with
    `merged`, the adapter folded into the base's weights, the base is not served)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from finetune import tasks
    limits = limits or Limits(batch_size=provider.batch_size)
    batcher = Batcher(provider, limits)
    task_grammar = tasks.get(provider.task).grammar() if constrained else None
    if run_name == BASE:  # the adapter's id would be the base model's, and every request would go to the base
        log.warning("the run dir is named %r, the base model's id: its adapter is served as %r", BASE, f"{BASE}-run")
        run_name = f"{BASE}-run"
    # method=full, or an adapter merged into the base weights: no base left to serve
    models = [run_name] + ([BASE] if hasattr(provider.model, "disable_adapter") and not merged else [])
    app = FastAPI(title="finetune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error(err.status, str(err), err.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{where or 'body'}: {first.get('msg', 'invalid')}")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # the scheme is case-insensitive (RFC 7235); the key compared in constant time, so the time an answer
            # takes tells nothing of how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error")
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body):
                return error(413, f"body of {declared} bytes is over {limits.max_body}")
            try:
                body = await asyncio.wait_for(read_body(request, limits.max_body), limits.body_timeout)
            except TimeoutError:
                response = error(408, f"the body did not arrive within {limits.body_timeout:g} s")
                response.headers["Connection"] = "close"
                return response
            except ApiError as err:
                return error(err.status, str(err))
            request.state.json = body
            # the client hanging up while its answer is generated: seen here, on the connection's own receive
            request.state.gone = gone = asyncio.Event()
            watcher = asyncio.create_task(watch_disconnect(request, gone))
            try:
                return await call_next(request)
            finally:
                watcher.cancel()
        return await call_next(request)

    positions = getattr(getattr(provider.model, "config", None), "max_position_embeddings", None)

    def check_prompts(jobs: list[Job]) -> None:
        """Each prompt within --max-prompt-tokens, and prompt + answer within the model's positions."""
        if len(jobs) > limits.max_prompts:
            raise ApiError(400, f"{len(jobs)} prompts in one request; at most {limits.max_prompts} (--max-prompts)")
        tokenizer = provider.tokenizer
        for i, job in enumerate(jobs):
            text = tokenizer.apply_chat_template(job.chat, tokenize=False, add_generation_prompt=True)
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            most = limits.max_prompt_tokens if positions is None else min(limits.max_prompt_tokens,
                                                                            positions - job.max_tokens)
            if length > most:
                raise ApiError(400, f"prompt {i}: {length} tokens, over the {most} this server takes (--max-prompt-"
                                    f"tokens {limits.max_prompt_tokens}; the model has {positions} positions for "
                                    f"prompt and max_tokens {job.max_tokens} together)")

    async def answer_all(jobs: list[Job], request) -> list[dict]:
        """The answers to one request's jobs. Checked, then queued all or none; when the request times out (504)
        or its client goes away, its jobs are abandoned: dropped from the queue, their generation stopped."""
        await asyncio.to_thread(check_prompts, jobs)  # a long prompt's tokenization does not hold the event loop
        batcher.submit_all(jobs)
        waiting = [asyncio.wrap_future(job.future) for job in jobs]
        deadline = jobs[0].queued + limits.request_timeout
        try:
            while True:
                _, pending = await asyncio.wait(waiting, timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                if not pending:
                    return [w.result() for w in waiting]
                if time.monotonic() >= deadline:
                    raise ApiError(504, f"no answer within {limits.request_timeout:g} s (the queue is long); retry",
                                   "timeout")
                if request is not None and getattr(request.state, "gone", asyncio.Event()).is_set():
                    raise ApiError(499, "the client closed the request")
        finally:
            for job in jobs:
                if not job.future.done():
                    job.abandon()

    async def answer(job: Job, request=None) -> dict:
        return (await answer_all([job], request))[0]

    def model_of(body: dict) -> str:
        name = body.get("model") or run_name
        if merged and name == BASE:
            raise ApiError(404, f"model {BASE!r} is not served: the server was started with --merge (the adapter is "
                                f"folded into the base weights); start it without --merge to serve {BASE!r} too",
                           "model_not_found")
        if not isinstance(name, str) or name not in models:
            raise ApiError(404, f"model {name!r} does not exist; this server has {', '.join(models)}",
                           "model_not_found")
        return name

    def budget(body: dict) -> int:
        tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if tokens is None:
            return min(provider.max_new_tokens, limits.max_tokens)
        if type(tokens) is not int or not 1 <= tokens <= limits.max_tokens:
            raise ApiError(400, f"max_tokens: an integer from 1 to {limits.max_tokens}, got {tokens!r}")
        return tokens

    def completion(kind: str, model: str, choices: list[dict], usage: dict) -> dict:
        return {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind, "created": int(time.time()), "model": model, "choices": choices, "usage": usage}

    def usage(outs: list[dict], n: int = 1) -> dict:
        """Token counts; with `n` answers a prompt, each prompt is counted once (as OpenAI counts it)."""
        prompt, done = sum(o["prompt_tokens"] for o in outs[::n]), sum(o["tokens"] for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": run_name, "task": provider.task, "fallbacks": provider.fallbacks,
                "held": provider.held, "queued": batcher.jobs.qsize(), "batches": len(batcher.batches)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "finetune"}
                                           for m in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = json_object(request)
        n, options = request_options(body, CHAT_FIELDS)
        model, tokens = model_of(body), budget(body)
        chat = messages_of(body.get("messages"))
        grammar = response_grammar(body.get("response_format"), provider.task)
        if body.get("stream"):
            if n > 1 or options["stop"]:
                raise ApiError(400, f"{'n' if n > 1 else 'stop'}: not with stream=true here (a stream is one "
                                    "answer, sent as it is generated); leave it out, or stream=false")
            job = Job(chat, model, tokens, grammar, stream=queue.Queue(), **options)
            await asyncio.to_thread(check_prompts, [job])
            batcher.submit(job)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_chat(job, include_usage), media_type="text/event-stream")
        outs = await answer_all([Job(chat, model, tokens, grammar, **options) for _ in range(n)], request)
        choices = [{"index": i, "message": {"role": "assistant", "content": out["texts"]},
                    "finish_reason": "stop" if out["stopped"] else "length"} for i, out in enumerate(outs)]
        return completion("chat.completion", model, choices, usage(outs, n))

    async def stream_chat(job: Job, include_usage: bool = False):
        """The events of a streamed answer, `job` checked and queued already (so a refusal is a plain 4xx / 503)."""
        try:
            async for event in stream_events(job, include_usage):
                yield event
        finally:  # the client went away mid-stream (Starlette cancels this generator): stop generating for it
            if not job.future.done():
                job.abandon()

    async def stream_events(job: Job, include_usage: bool):
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": job.model}

        def event(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta,
                                                               "finish_reason": finish}]}) + "\n\n"
        yield event({"role": "assistant", "content": ""})
        while True:
            piece = await asyncio.to_thread(job.stream.get, True, limits.request_timeout)
            if piece is None:
                break
            yield event({"content": piece})
        try:
            out = job.future.result(timeout=limits.request_timeout)
            yield event({}, "stop" if out["stopped"] else "length")
            if include_usage:  # stream_options.include_usage: OpenAI's last chunk, no choices, the usage
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage([out])}) + "\n\n"
        except Exception as err:
            yield "data: " + json.dumps({"error": {"message": f"{type(err).__name__}: {err}"}}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = json_object(request)
        n, options = request_options(body, COMPLETION_FIELDS)
        model, tokens = model_of(body), budget(body)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ApiError(400, "prompt: a non-empty string or list of strings")
        jobs = [Job(prompt_chat(p), model, tokens, **options) for p in prompts for _ in range(n)]
        outs = await answer_all(jobs, request)
        choices = [{"index": i, "text": o["texts"], "finish_reason": "stop" if o["stopped"] else "length",
                    "logprobs": None} for i, o in enumerate(outs)]
        return completion("text_completion", model, choices, usage(list(outs), n))

    @app.post("/signal")
    async def signal(request: Request):
        body = json_object(request)
        chat = signal_chat(body, body_field(body, "market_data", dict))
        out = await answer(Job(chat, model_of(body), provider.max_new_tokens, task_grammar, signal=True), request)
        value, confidence = provider.read_signal(out["texts"])
        return {"signal": value, "confidence": confidence}

    @app.post("/signals")
    async def signals(request: Request):
        body = json_object(request)
        chats = [signal_chat(body, m, f"market_data[{i}]")
                 for i, m in enumerate(body_field(body, "market_data", list))]
        model = model_of(body)
        outs = await answer_all([Job(c, model, provider.max_new_tokens, task_grammar, signal=True) for c in chats],
                                request)
        return {"signals": [dict(zip(("signal", "confidence"), provider.read_signal(o["texts"]))) for o in outs]}

    @app.post("/generate")
    async def generate(request: Request):
        body = json_object(request)
        if "messages" in body:
            chat = messages_of(body["messages"])
        else:
            chat = prompt_chat(body_field(body, "prompt", str))
        tokens = body.get("max_new_tokens")
        if tokens is not None and (type(tokens) is not int or not 1 <= tokens <= limits.max_tokens):
            raise ApiError(400, f"max_new_tokens: an integer from 1 to {limits.max_tokens}")
        out = await answer(Job(chat, run_name, tokens or provider.max_new_tokens), request)
        return {"text": out["texts"]}

    def prompt_chat(prompt: str) -> list[dict]:
        """A bare prompt as the run's chats are: its system prompt, then the prompt as the user's turn."""
        system = [{"role": "system", "content": provider.system_prompt}] if provider.system_prompt else []
        return system + [{"role": "user", "content": prompt}]

    def signal_chat(body: dict, market_data, where: str = "market_data") -> list[dict]:
        try:
            return provider.signal_prompt(market_data, body.get("symbol"))
        except ValueError as e:
            raise ApiError(400, f"{where}: {e}") from None

    return app


async def watch_disconnect(request, gone: asyncio.Event) -> None:
    """Set `gone` when the client closes the connection before its answer was sent."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def read_body(request, max_body: int):
    """The request's JSON body, read chunk by chunk up to `max_body` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"body over {max_body} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return safe_json.loads(raw or b"null")  # deep nesting, bad UTF-8: a 400
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not JSON ({e})") from None


def json_object(request) -> dict:
    body = request.state.json
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def body_field(body: dict, name: str, kind: type):
    if name not in body:
        raise ApiError(400, f"missing field '{name}' (found: {', '.join(body) or 'no fields'})")
    if not isinstance(body[name], kind):
        names = {dict: "a JSON object", list: "a JSON list", str: "text"}
        raise ApiError(400, f"{name}: expected {names[kind]}, got {type(body[name]).__name__}")
    return body[name]


def messages_of(messages) -> list[dict]:
    """OpenAI chat messages as the chat template takes them; content given as a list of text parts is joined."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, 'messages: expected a non-empty list of {"role": str, "content": str}')
    chat = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(p for p in parts if isinstance(p, str)) if len(parts) == len(content) else None
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                content, str):
            raise ApiError(400, f'messages[{i}]: expected {{"role": system | user | assistant, "content": text}}')
        chat.append({"role": m["role"], "content": content})
    return chat


CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
               "response_format", "temperature", "top_p", "seed", "n", "stop", "user", "metadata", "store"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "user"}


def request_options(body: dict, fields: set) -> tuple[int, dict]:
    """(n, the Job keywords) from OpenAI's sampling fields; a field this server does not honour (tools, logprobs,
    penalties, ...) is refused with a 400 naming it, unless it asks for nothing (null, false, 0, empty)."""
    for key, value in body.items():
        if key not in fields and value not in (None, False, 0, [], {}, ""):
            raise ApiError(400, f"{key}: not supported by this server (it honours {', '.join(sorted(fields))})")
    if body.get("stream") is not None and type(body["stream"]) is not bool:  # "yes" would stream, "false" too
        raise ApiError(400, f"stream: true or false, got {body['stream']!r}")
    temperature, top_p, seed, n, stop = (body.get(k) for k in ("temperature", "top_p", "seed", "n", "stop"))
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if temperature is not None and not (number(temperature) and 0 <= temperature <= 2):
        raise ApiError(400, f"temperature: a number from 0 to 2, got {temperature!r}")
    if top_p is not None and not (number(top_p) and 0 < top_p <= 1):
        raise ApiError(400, f"top_p: a number above 0 and at most 1, got {top_p!r}")
    if seed is not None and type(seed) is not int:
        raise ApiError(400, f"seed: an integer, got {seed!r}")
    n = 1 if n is None else n
    if type(n) is not int or not 1 <= n <= 16:
        raise ApiError(400, f"n: an integer from 1 to 16, got {n!r}")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop: a non-empty string or a list of at most 4")
    sampling = {}  # greedy, as without these fields, unless a temperature above 0 or a top_p below 1 asks
    if temperature != 0 and (temperature is not None or (top_p is not None and top_p < 1)):
        sampling = {"do_sample": True, "temperature": float(1.0 if temperature is None else temperature),
                    "top_p": float(1.0 if top_p is None else top_p)}
    return n, {"sampling": tuple(sorted(sampling.items())), "seed": seed, "stop": tuple(stop),
               "group": uuid.uuid4().int if seed is not None else None}


def cut_at_stop(out: dict, stop: tuple) -> dict:
    """An answer ended before the first stop string in it (the string left out, as OpenAI does)."""
    ends = [i for i in (out["texts"].find(s) for s in stop) if i >= 0]
    if ends:
        out = {**out, "texts": out["texts"][:min(ends)], "stopped": True}
    return out


def response_grammar(response_format, task: str = "text") -> str | None:
    """OpenAI's response_format as a llguidance grammar: a JSON schema, any JSON object, or None (free text). The
    JSON is laid out as the task's training answers are (finetune/tasks/: `json_layout`), so the model
    writes what it learnt instead of a layout it never saw."""
    if response_format is None or response_format == {"type": "text"}:
        return None
    import llguidance
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema", {})
    else:
        raise ApiError(400, "response_format: {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}")
    try:
        from finetune import tasks
        items, keys = tasks.get(task).json_layout
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={
            "whitespace_flexible": False, "item_separator": items, "key_separator": keys})
        problem = llguidance.LLMatcher.validate_grammar(grammar)  # "" when usable
    except (TypeError, ValueError) as err:
        problem = str(err)
    if problem:
        raise ApiError(400, f"response_format: the schema is not usable ({problem})")
    return grammar


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="loopback by default; another address needs an API key")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default="FINETUNE_API_KEY",
                        help="the environment variable holding the bearer token clients must send")
    parser.add_argument("--confidence-threshold", type=float, default=0.0, help="weaker BUY / SELL -> HOLD")
    parser.add_argument("--free", action="store_true", help="signal routes without the answer grammar")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base weights at load (faster answers; the base is not served)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="cast the model after loading (default: the run's dtype)")
    parser.add_argument("--static", action="store_true",
                        help="generate() with a static KV cache, its decode step compiled on CUDA, warmed before "
                             "serving (not the fast decoder; for a GPU)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model's own code from its folder (a run dir's setting is never used)")
    defaults = Limits()
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--batch-window", type=float, default=defaults.batch_window)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--max-body", type=int, default=defaults.max_body)
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue)
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections)
    parser.add_argument("--max-prompts", type=int, default=defaults.max_prompts)
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout)
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout)
    args = parser.parse_args(argv)
    log_to(args.run_dir)  # library lines and warnings into the run's finetune.log, not the console
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and not is_loopback(args.host):
        print(f"error: --host {args.host} opens the server to the network: set {args.api_key_env} to the API key "
              f"clients must send (Authorization: Bearer <key>), or serve on 127.0.0.1", file=sys.stderr)
        sys.exit(1)
    from finetune.serving.inference import SignalProvider
    try:
        # unmerged (the default): the "base" model is the same weights with the adapter switched off
        provider = SignalProvider.from_run(args.run_dir, args.trust_remote_code, merge=args.merge, dtype=args.dtype,
                                           confidence_threshold=args.confidence_threshold, static=args.static)
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if args.static:
        print(f"static KV cache: warmed in {provider.warm():.1f} s", flush=True)
    limits = Limits(max_body=args.max_body, max_tokens=args.max_tokens, request_timeout=args.request_timeout,
                    body_timeout=args.body_timeout, max_queue=args.max_queue,
                    batch_size=args.batch_size or provider.batch_size, batch_window=args.batch_window,
                    max_connections=args.max_connections, max_prompts=args.max_prompts,
                    max_prompt_tokens=args.max_prompt_tokens)
    app = make_app(provider, Path(args.run_dir).resolve().name, api_key, limits, constrained=not args.free,
                   merged=args.merge and not hasattr(provider.model, "disable_adapter"))  # not folded: base served
    import uvicorn
    print(f"serving {args.run_dir} on http://{args.host}:{args.port} (/v1/chat/completions, /v1/completions, "
          f"/v1/models, /signal, /signals, /generate, /health)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, timeout_keep_alive=5, http=http_protocol(args.body_timeout),
                limit_concurrency=args.max_connections, log_level="info")


if __name__ == "__main__":
    main()
