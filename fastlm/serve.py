"""``fastlm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, ``pip install fastlm[serve]``).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (plain JSON or
server-sent events with ``"stream": true``), ``GET /health``, ``GET /metrics`` (Prometheus text).
Requests and responses have OpenAI's shapes, so the ``openai`` client, LangChain and
lm-evaluation-harness (``local-completions``: ``echo`` + ``logprobs`` give the prompt's
per-token log-probabilities) work unchanged. Sampling follows OpenAI: a ``temperature`` below
``GREEDY_TEMPERATURE`` (0 included) decodes greedily and the other sampling options are then
unused; otherwise the server samples. Besides OpenAI's ``presence_penalty``,
``frequency_penalty`` and ``logit_bias``, extra sampling fields as vLLM names them:
``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``. Harmless fields that change
nothing here (``user``, ``metadata``, ``store``, ...) are accepted and ignored, and named in
the ``X-Fastlm-Ignored-Fields`` response header; fields whose meaning would be lost
(``tools``, a ``response_format`` other than text, unknown names) get 400.

The model runs in one worker thread, ``fastlm.batching.Engine``: concurrent requests are decoded
together in one batched forward per step, joining and leaving the batch between steps. The
event loop only parses, tokenizes (in a thread pool), queues and formats; the engine hands
tokens back with ``loop.call_soon_threadsafe``. A client that disconnects frees its rows at the
next step.

Requests are validated by ``fastlm.serve_protocol``. Limits (``ServeConfig``): prompt tokens,
``max_tokens``, ``n``, concurrent sequences (cache rows) and waiting queue (beyond it 503 with
``Retry-After``), request body size (413) and nesting depth (400), request time (504, or an
error event in a stream); per connection (``fastlm.serve_net``): open connections (503), the
deadlines for headers (closed), body (408), idle keep-alive (closed), and each write of a
stream (a client that stops reading is dropped and its rows freed, as is one whose unsent
events pile past ``max_stream_events``). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

Security defaults: bound to loopback; the ``Host`` header must name an allowed host (by
default the loopback names, so a web page cannot reach the server by DNS rebinding); JSON
bodies need ``Content-Type: application/json`` (a cross-site form post cannot send it without
a CORS preflight, and CORS is off unless ``cors_origins`` is given). With an API key
(``--api-key`` or ``FASTLM_API_KEY``) every ``/v1`` route requires ``Authorization: Bearer <key>``.

One request cannot fail another (``fastlm.batching``): ids the tokenizer cannot decode are
refused in prompts and never generated, sampling options are bounded, and an error in one
row ends its request alone. A model whose config names an end-of-text id outside its
vocabulary has it dropped with a warning when it loads.

Chat template: the model directory's ``chat_template.jinja`` or the ``chat_template`` of its
``tokenizer_config.json`` (Hugging Face's convention, rendered in a sandboxed Jinja2 with
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``) when present; only the
template's own special tokens are encoded as special tokens, the messages' content always as
ordinary text (a user who types ``<|endoftext|>`` gets those characters, not the control
token). Otherwise the plain template for base models::

    {system message}\\n\\n            (each system/developer message, if any)
    User: {content}\\n\\n
    Assistant: {content}\\n\\n
    ...
    Assistant:

with ``"\\nUser:"`` as an extra stop string, so that a base model does not write the user's turn.
"""
import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .batching import Engine, QueueFull, Request
from .generate import undecodable_ids
from .serve_protocol import (_CHAT_FIELDS, _COMPLETION_FIELDS, APIError, _bad, _check_fields, _disconnected,
                             _get_bool, _get_int, _is_int, _json_body, _messages, _Sampling)

log = logging.getLogger("fastlm.serve")

__all__ = ["ServeConfig", "create_app", "serve", "ServerThread", "ChatTemplate"]


@dataclass
class ServeConfig:
    model_name: str = "fastlm"
    max_batch: int = 32  # sequences decoded together (cache rows)
    max_queue: int = 256  # sequences allowed to wait for a row
    max_model_len: int | None = None  # tokens per row (prompt + completion); default the model's context
    max_prompt_tokens: int | None = None  # default max_model_len - 1
    max_tokens_cap: int = 4096  # largest max_tokens accepted
    max_n: int = 16  # largest n (choices per prompt)
    max_prompts: int = 64  # prompts in one completions request
    max_body_bytes: int = 1 << 20  # request body size
    max_json_depth: int = 32  # nesting of arrays and objects in a request body
    request_timeout: float = 600.0  # seconds from arrival to the last token
    api_key: str | None = None
    prefill_tokens: int = 2048
    latency_buckets: tuple = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    # connections (fastlm.serve_net)
    max_connections: int = 512  # open connections; past it 503 and closed
    header_timeout: float = 10.0  # seconds to deliver a request's headers (from connecting or the last response)
    body_timeout: float = 30.0  # seconds from the request's arrival to the end of its body (408)
    idle_timeout: float = 5.0  # seconds a keep-alive connection may wait idle for its next request
    send_timeout: float = 30.0  # seconds one write of a stream may wait for the client to read
    send_buffer_bytes: int = 1 << 17  # each socket's send buffer (the kernel doubles it)
    max_stream_events: int = 4096  # events waiting for one request's client before it counts as not reading
    allowed_hosts: tuple | None = None  # Host names answered to; None: the loopback names; ("*",): any
    cors_origins: tuple = ()  # origins allowed by CORS (browsers); empty: no CORS headers at all


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics through ``prometheus_client`` (its registry and text format, which
    escapes label values), one registry per application. Requests are labelled by route
    template (``/v1/completions``; ``unmatched`` for any path no route serves), never by the
    raw path, so the label set stays fixed whatever clients send."""

    def __init__(self, buckets, state):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("fastlm_requests", "HTTP requests by route template and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("fastlm_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.completion_tokens = Counter("fastlm_generation_tokens", "generated tokens", registry=r)
        Gauge("fastlm_queue_depth", "sequences waiting for a batch row", registry=r).set_function(
            lambda: state.engine.queue_depth if state.engine else 0)
        Gauge("fastlm_running_sequences", "sequences in the running batch", registry=r).set_function(
            lambda: state.engine.n_running if state.engine else 0)
        self.ttft = Histogram("fastlm_time_to_first_token_seconds", "time from request arrival to its first token",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("fastlm_time_per_output_token_seconds", "time between consecutive tokens of a sequence",
                              buckets=buckets, registry=r)
        self.e2e = Histogram("fastlm_request_duration_seconds", "time from request arrival to its last token",
                             buckets=tuple(buckets) + (30.0, 60.0, 120.0, 300.0), registry=r)

    def request(self, route: str, status: int):
        self.requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _route_label(request) -> str:
    """The template of the route that matched ``request`` (``unmatched`` when none did)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


# ----------------------------------------------------------------------------- chat template
class ChatTemplate:
    """Messages to prompt text: the model directory's template (Jinja2) or the plain one."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None
        if source is not None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise ValueError(msg)

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(source)

    @property
    def stop(self) -> list:
        return [] if self.source is not None else ["\nUser:"]

    @classmethod
    def from_dir(cls, path, eos_token: str = ""):
        path = Path(path)
        f = path / "chat_template.jinja"
        if f.is_file():
            return cls(f.read_text(), eos_token=eos_token)
        cfg = path / "tokenizer_config.json"
        if cfg.is_file():
            try:
                t = json.loads(cfg.read_text()).get("chat_template")
            except (ValueError, AttributeError):
                t = None
            if isinstance(t, str):
                return cls(t, eos_token=eos_token)
        return cls(None, eos_token=eos_token)

    def render(self, messages: list) -> str:
        if self._template is not None:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        parts = []
        for m in messages:
            role, content = m["role"], m["content"]
            if role in ("system", "developer"):
                parts.append(f"{content}\n\n")
            elif role == "user":
                parts.append(f"User: {content}\n\n")
            else:
                parts.append(f"Assistant: {content}\n\n")
        parts.append("Assistant:")
        return "".join(parts)

    def encode(self, messages: list, tokenizer) -> list:
        """The prompt's token ids. The messages' content is always ordinary text; of the
        special-token text in the rendered prompt only the template's own becomes special
        tokens. Special-token text inside a message is hidden behind a placeholder while the
        template renders (digits between private-use characters, which no case or whitespace
        filter changes) and restored afterwards as ordinary text. The text between the
        template's special tokens is encoded in one piece, so the tokens are those of
        ``encode(prompt, allowed_special="all")`` whenever no message holds special-token text."""
        if self.source is None:
            return _encode_text(tokenizer, self.render(messages))
        specials = _special_tokens(tokenizer)
        if not specials:
            return _encode_text(tokenizer, self.render(messages))
        find = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        nonce = str(secrets.randbelow(10 ** 12))
        hidden: dict = {}

        def hide(m):
            key = f"\ue000{nonce}.{len(hidden)}\ue001"
            hidden[key] = m.group(0)
            return key

        text = self.render([{**m, "content": find.sub(hide, m["content"])} for m in messages])
        placeholder = re.compile("\ue000" + nonce + r"\.\d+\ue001")

        def ordinary(piece):
            if hidden:
                piece = placeholder.sub(lambda k: hidden.get(k.group(0), k.group(0)), piece)
            return _encode_text(tokenizer, piece) if piece else []

        ids, pos = [], 0
        for m in find.finditer(text):
            ids += ordinary(text[pos:m.start()])
            ids.append(specials[m.group(0)])
            pos = m.end()
        return ids + ordinary(text[pos:])


def _special_tokens(tokenizer) -> dict:
    """{text: id} of the tokenizer's special tokens (fastlm's ``special_tokens``, or tiktoken's
    ``special_tokens_set`` with ``encode_single_token``)."""
    sp = getattr(tokenizer, "special_tokens", None)
    if isinstance(sp, dict):
        return dict(sp)
    names = getattr(tokenizer, "special_tokens_set", None) or ()
    single = getattr(tokenizer, "encode_single_token", None)
    return {t: single(t) for t in names} if callable(single) else {}


# ----------------------------------------------------------------------------- the app
class _State:
    def __init__(self, model, tokenizer, cfg: ServeConfig, chat_template: ChatTemplate):
        self.model, self.tokenizer, self.cfg, self.chat = model, tokenizer, cfg, chat_template
        self.max_len = min(cfg.max_model_len or model.config.block_size, model.config.block_size)
        self.max_prompt = min(cfg.max_prompt_tokens or self.max_len - 1, self.max_len - 1)
        self.vocab_size = V = model.config.vocab_size
        self.undecodable = frozenset(undecodable_ids(tokenizer, V))
        self.eos = self._end_ids(model.config.eos_token_id, getattr(tokenizer, "eot_token", None))
        self.metrics = Metrics(cfg.latency_buckets, self)
        self.engine: Engine | None = None
        self.created = int(time.time())

    def valid_id(self, t) -> bool:
        """A token id of the model that the tokenizer can decode."""
        return _is_int(t) and 0 <= t < self.vocab_size and t not in self.undecodable

    def _end_ids(self, configured, eot) -> list:
        """The ids that end a sequence: the config's, else the tokenizer's end-of-text id. One
        the model cannot generate (outside its vocabulary, or not decodable) is dropped here,
        once, with a warning, instead of failing every request."""
        ids = configured if configured is not None else eot
        ids = [] if ids is None else [ids] if _is_int(ids) else list(ids)
        kept = [i for i in ids if self.valid_id(i)]
        if len(kept) < len(ids):
            warnings.warn(f"end-of-text ids {sorted(set(ids) - set(kept))} lie outside the model's {self.vocab_size} "
                          "ids or the tokenizer's vocabulary and are dropped: sequences end by length, stop strings "
                          "or stop ids", UserWarning, stacklevel=3)
        return kept


def create_app(model, tokenizer, config: ServeConfig | None = None, chat_template: ChatTemplate | None = None):
    """The FastAPI application serving ``model`` (a ``fastlm.GPT``) with ``tokenizer``. The
    engine thread starts with the app (its lifespan) and stops with it. Serve it with
    ``serve``/``ServerThread`` (uvicorn with the connection limits of ``fastlm.serve_net``)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from .serve_net import LOOPBACK_NAMES, DeadlineStreamingResponse, HostCheck

    cfg = config or ServeConfig()
    if cfg.api_key is None:
        cfg.api_key = os.environ.get("FASTLM_API_KEY") or None
    st = _State(model, tokenizer, cfg, chat_template or ChatTemplate(None))

    @asynccontextmanager
    async def lifespan(app):
        st.engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_len=st.max_len, max_queue=cfg.max_queue,
                           prefill_tokens=cfg.prefill_tokens)
        try:
            yield
        finally:
            st.engine.stop()

    app = FastAPI(title="fastlm", lifespan=lifespan, openapi_url=None)
    app.state.fastlm = st
    if cfg.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostCheck, allowed=tuple(cfg.allowed_hosts or LOOPBACK_NAMES),
                       on_reject=lambda status: st.metrics.request("invalid_host", status))

    def error_response(e: APIError, route: str):
        st.metrics.request(route, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, None, None,
                                       dict(exc.headers or {})), _route_label(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(_bad(str(exc.errors())[:500]), _route_label(request))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error on %s", _route_label(request))
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"),
                              _route_label(request))

    def check_auth(request):
        if cfg.api_key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, key = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def read_json(request, arrived):
        """The body as JSON: Content-Type application/json, at most max_body_bytes, all of it
        within body_timeout of the request's arrival."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' (got "
                                f"{ctype[:60]!r})", "invalid_request_error", None, "unsupported_media_type")
        too_large = APIError(413, f"request body larger than {cfg.max_body_bytes} bytes", "invalid_request_error",
                             None, "request_too_large")
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > cfg.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        body = request.stream().__aiter__()
        while True:
            try:
                c = await asyncio.wait_for(body.__anext__(), arrived + cfg.body_timeout - time.monotonic())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {cfg.body_timeout} s",
                               "invalid_request_error", None, "request_timeout", {"Connection": "close"}) from None
            except ClientDisconnect:
                raise _disconnected() from None
            size += len(c)
            if size > cfg.max_body_bytes:
                raise too_large
            chunks.append(c)
        return _json_body(b"".join(chunks), cfg.max_json_depth)

    def check_model(body):
        m = body.get("model")
        if not isinstance(m, str):
            raise _bad("'model' is required and must be a string", "model",
                       "invalid_type" if m is not None else "missing")
        if m != cfg.model_name:
            raise APIError(404, f"The model '{m[:200]}' does not exist (this server serves '{cfg.model_name}')",
                           "invalid_request_error", "model", "model_not_found")

    async def encode(text: str) -> list:
        if len(text) < 2048:
            return _encode_text(tokenizer, text)
        return await asyncio.get_running_loop().run_in_executor(None, _encode_text, tokenizer, text)

    async def encode_chat(messages) -> list:
        if sum(len(m["content"]) for m in messages) < 2048:
            return st.chat.encode(messages, tokenizer)
        return await asyncio.get_running_loop().run_in_executor(None, st.chat.encode, messages, tokenizer)

    def check_lengths(prompts, max_tokens, param):
        for p in prompts:
            if not p:
                raise _bad("the prompt is empty (no tokens)", param, "invalid_value")
            if not all(st.valid_id(t) for t in p):
                raise _bad(f"token ids must be integers in [0, {st.vocab_size}) that the tokenizer can decode",
                           param, "invalid_value")
            if len(p) > st.max_prompt:
                raise _bad(f"the prompt has {len(p)} tokens; this server accepts at most {st.max_prompt}", param,
                           "context_length_exceeded")
            if len(p) + max_tokens > st.max_len:
                raise _bad(f"This model's maximum context length is {st.max_len} tokens; the prompt has {len(p)} "
                           f"and max_tokens is {max_tokens}", "max_tokens", "context_length_exceeded")

    def start(prompts, opts, sampling: _Sampling, prompt_logprobs, abort):
        """Submit to the engine; returns (request, queue of its events). Events waiting for
        the client past max_stream_events mean it stopped reading: its rows are freed, its
        connection dropped (``abort``) and the queue closed with a ``("stalled",)`` event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stalled = []

        def put_all(evs):
            if stalled:
                return
            for ev in evs:
                queue.put_nowait(ev)
            if queue.qsize() > cfg.max_stream_events:
                stalled.append(True)
                st.engine.cancel(req)
                queue.put_nowait(("stalled",))
                if abort is not None:
                    abort()

        def emit(ev):
            emit_many([ev])

        def emit_many(evs):
            try:
                loop.call_soon_threadsafe(put_all, evs)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        req = Request(prompts, opts, emit, n=sampling.n, seed=sampling.seed, prompt_logprobs=prompt_logprobs,
                      emit_many=emit_many)
        try:
            st.engine.submit(req)
        except QueueFull:
            raise APIError(503, "The server is overloaded: too many requests wait; retry later", "server_error", None,
                           "server_overloaded", {"Retry-After": "1"}) from None
        st.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return req, queue

    async def events(req, queue, arrived):
        """Engine events, batched (all already queued), until every sequence is finished;
        raises APIError(504) past the request timeout. Records latency metrics."""
        deadline = arrived + cfg.request_timeout
        last = {}
        left = req.size
        m = st.metrics
        while left:
            remaining = deadline - time.monotonic()
            try:
                ev = await asyncio.wait_for(queue.get(), max(remaining, 0.0)) if queue.empty() else queue.get_nowait()
            except asyncio.TimeoutError:
                raise APIError(504, f"the request took longer than {cfg.request_timeout} s", "timeout_error",
                               None, "timeout") from None
            batch = [ev]
            while not queue.empty():
                batch.append(queue.get_nowait())
            now = time.monotonic()
            tokens = 0
            for ev in batch:
                if ev[0] == "token":
                    tokens += 1
                    i = ev[1]
                    if i in last:
                        m.tpot.observe(now - last[i])
                    else:
                        m.ttft.observe(now - arrived)
                    last[i] = now
                elif ev[0] == "finish":
                    left -= 1
                    if left == 0:
                        m.e2e.observe(now - arrived)
                elif ev[0] == "error":
                    raise APIError(500, ev[1], "server_error", None, "generation_failed")
                elif ev[0] in ("disconnected", "stalled"):
                    raise _disconnected()
            if tokens:
                m.completion_tokens.inc(tokens)
            yield batch

    async def run_request(request, route, body_fn):
        """Common frame: auth, body, parse (body_fn returns a plan), then stream or not."""
        arrived = time.monotonic()
        abort = (request.scope.get("extensions") or {}).get("fastlm.abort")
        try:
            check_auth(request)
            body = await read_json(request, arrived)
            plan = await body_fn(body)
            req, queue = start(plan["prompts"], plan["opts"], plan["sampling"], plan.get("prompt_logprobs", False),
                               abort)
        except APIError as e:
            return error_response(e, route)
        headers = {}
        if plan["ignored"]:
            headers["X-Fastlm-Ignored-Fields"] = ", ".join(plan["ignored"])
            log.info("%s: ignored fields %s", route, ", ".join(plan["ignored"]))
        if plan["sampling"].stream:
            st.metrics.request(route, 200)

            def on_stall():  # a write waited past send_timeout: the client stopped reading
                st.engine.cancel(req)
                if abort is None:
                    raise RuntimeError("the client stopped reading")
                abort()

            return DeadlineStreamingResponse(stream_body(req, queue, arrived, plan), cfg.send_timeout, on_stall,
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                      **headers})
        watcher = asyncio.ensure_future(_watch_disconnect(request, req, queue, st.engine))
        try:
            result = Collector(plan)
            async for batch in events(req, queue, arrived):
                result.add(batch)
            st.metrics.request(route, 200)
            return JSONResponse(result.response(), headers=headers)
        except APIError as e:
            st.engine.cancel(req)
            return error_response(e, route)
        except BaseException:
            st.engine.cancel(req)
            raise
        finally:
            watcher.cancel()

    async def stream_body(req, queue, arrived, plan):
        fmt = plan["format"]
        try:
            for chunk in fmt.start():
                yield _sse(chunk)
            async for batch in events(req, queue, arrived):
                out = []
                for ev in batch:
                    for chunk in fmt.event(ev):
                        out.append(_sse(chunk))
                if out:
                    yield "".join(out)
            if plan["sampling"].include_usage:
                yield _sse(fmt.usage_chunk())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            st.engine.cancel(req)  # a no-op when finished; frees the rows of a client that went away

    # -- routes
    @app.get("/health")
    async def health():
        ok = st.engine is not None and st.engine._thread.is_alive()
        st.metrics.request("/health", 200 if ok else 503)
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        data, ctype = st.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        try:
            check_auth(request)
        except APIError as e:
            return error_response(e, "/v1/models")
        st.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": st.created,
                                            "owned_by": "fastlm", "max_model_len": st.max_len}]}

    async def completion_plan(body):
        ignored = _check_fields(body, _COMPLETION_FIELDS)
        check_model(body)
        max_tokens = _get_int(body, "max_tokens", 16, 0, cfg.max_tokens_cap)
        s = _Sampling(body, cfg, max_tokens, st.valid_id)
        echo = _get_bool(body, "echo", False)
        logprobs = _get_int(body, "logprobs", None, 0, 20)
        if body.get("suffix") is not None:
            raise _bad("'suffix' is not supported", "suffix", "unsupported_parameter")
        best_of = _get_int(body, "best_of", None, 1, cfg.max_n)
        if best_of is not None and best_of != s.n:
            raise _bad("'best_of' must equal 'n' (no server-side ranking)", "best_of", "unsupported_parameter")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            texts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            if not all(p and all(_is_int(t) for t in p) for p in prompt):
                raise _bad("'prompt' lists of token ids must be non-empty lists of integers", "prompt", "invalid_type")
            texts = [list(p) for p in prompt]
        else:
            raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt", "invalid_type" if prompt is not None else "missing")
        if len(texts) > cfg.max_prompts:
            raise _bad(f"at most {cfg.max_prompts} prompts in one request", "prompt", "invalid_value")
        if len(texts) * s.n > cfg.max_queue + cfg.max_batch:
            raise _bad("too many sequences (prompts x n) in one request", "n", "invalid_value")
        prompts = []
        for t in texts:
            prompts.append(await encode(t) if isinstance(t, str) else t)
        if any(isinstance(t, str) and not t for t in texts) and not echo:
            raise _bad("the prompt is empty", "prompt", "invalid_value")
        check_lengths(prompts, max_tokens, "prompt")
        opts = s.options(model, st.eos, [len(p) for p in prompts], tokenizer, logprobs is not None, logprobs or 0,
                         max_tokens)
        fmt = _CompletionFormat(st, s, prompts, texts, echo, logprobs)
        return {"prompts": prompts, "opts": opts, "sampling": s, "format": fmt, "ignored": ignored,
                "prompt_logprobs": echo and logprobs is not None}

    async def chat_plan(body):
        ignored = _check_fields(body, _CHAT_FIELDS)
        check_model(body)
        if body.get("tools"):
            raise _bad("'tools' are not supported", "tools", "unsupported_parameter")
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise _bad("'tool_choice' must be 'none' or 'auto' (no tools are supported)", "tool_choice",
                       "unsupported_parameter")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise _bad("only 'response_format' {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")
        messages = _messages(body.get("messages"))
        ids = await encode_chat(messages)
        limit = st.max_len - len(ids)
        mt = _get_int(body, "max_completion_tokens", None, 0, cfg.max_tokens_cap)
        if mt is None:
            mt = _get_int(body, "max_tokens", None, 0, cfg.max_tokens_cap)
        if mt is None:
            mt = max(1, min(cfg.max_tokens_cap, limit))
        s = _Sampling(body, cfg, mt, st.valid_id, extra_stop=st.chat.stop)
        logprobs = _get_bool(body, "logprobs", False)
        top = _get_int(body, "top_logprobs", None, 0, 20)
        if top is not None and not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        check_lengths([ids], mt, "messages")
        opts = s.options(model, st.eos, [len(ids)], tokenizer, logprobs, top or 0, mt)
        fmt = _ChatFormat(st, s, [ids], logprobs)
        return {"prompts": [ids], "opts": opts, "sampling": s, "format": fmt, "ignored": ignored}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await run_request(request, "/v1/completions", completion_plan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await run_request(request, "/v1/chat/completions", chat_plan)

    class Collector:
        def __init__(self, plan):
            self.fmt = plan["format"]

        def add(self, batch):
            for ev in batch:
                self.fmt.event(ev)

        def response(self):
            return self.fmt.final()

    return app


async def _watch_disconnect(request, req, queue, engine):
    """Cancel a non-streamed request whose client went away (and stop waiting for it)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                engine.cancel(req)
                queue.put_nowait(("disconnected",))
                return
    except asyncio.CancelledError:
        pass


def _encode_text(tokenizer, text):
    """Token ids of ``text`` as ordinary text: special-token text is encoded as its characters."""
    try:
        return list(tokenizer.encode(text, disallowed_special=()))
    except TypeError:
        return list(tokenizer.encode(text))


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# ----------------------------------------------------------------------------- response shapes
class _Format:
    def __init__(self, st: _State, sampling: _Sampling, prompts):
        self.st, self.s, self.prompts = st, sampling, prompts
        self.id = self.prefix + secrets.token_hex(12)
        self.created = int(time.time())
        n = len(prompts) * sampling.n
        self.texts = [[] for _ in range(n)]
        self.tokens = [[] for _ in range(n)]
        self.lps = [[] for _ in range(n)]
        self.tops = [[] for _ in range(n)]
        self.reasons = [None] * n
        self.prompt_lp = [None] * n

    def prompt_of(self, i):
        return self.prompts[i // self.s.n]

    def usage(self):
        p = sum(len(q) for q in self.prompts)
        c = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def record(self, ev):
        if ev[0] == "token":
            _, i, t, delta, lp, top = ev
            self.tokens[i].append(t)
            self.texts[i].append(delta)
            self.lps[i].append(lp)
            self.tops[i].append(top)
        elif ev[0] == "finish":
            self.reasons[ev[1]] = ev[2]
        elif ev[0] == "prompt_logprobs":
            self.prompt_lp[ev[1]] = (ev[2], ev[3])

    def tok_str(self, t):
        return self.st.tokenizer.decode([t])

    def start(self):
        return []

    def usage_chunk(self):
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.st.cfg.model_name,
                "choices": [], "usage": self.usage()}


class _CompletionFormat(_Format):
    prefix = "cmpl-"
    chunk_object = "text_completion"

    def __init__(self, st, sampling, prompts, texts, echo, logprobs):
        super().__init__(st, sampling, prompts)
        self.echo, self.k = echo, logprobs
        self.prompt_texts = [t if isinstance(t, str) else st.tokenizer.decode(t) for t in texts]
        self.echoed = set()

    def logprobs_obj(self, i, prompt_part: bool, tokens, lps, tops, offset0):
        if self.k is None:
            return None
        toks, tlp, ttop, offs = [], [], [], []
        off = offset0
        seq = []
        if prompt_part:
            plp, ptop = self.prompt_lp[i] or ([None] * len(self.prompt_of(i)), None)
            seq += [(t, plp[j], ptop[j] if ptop else None) for j, t in enumerate(self.prompt_of(i))]
        seq += list(zip(tokens, lps, tops))
        for t, lp, top in seq:
            s = self.tok_str(t)
            toks.append(s)
            tlp.append(lp)
            ttop.append(None if top is None else {self.tok_str(a): b for a, b in top} if self.k else None)
            offs.append(off)
            off += len(s)
        return {"tokens": toks, "token_logprobs": tlp, "top_logprobs": ttop, "text_offset": offs}

    def event(self, ev):
        self.record(ev)
        if not self.s.stream or ev[0] == "prompt_logprobs":
            return []
        i = ev[1]
        chunks = []
        text, lp_obj = "", None
        if self.echo and i not in self.echoed:
            self.echoed.add(i)
            text = self.prompt_texts[i // self.s.n]
            lp_obj = self.logprobs_obj(i, True, [], [], [], 0) if self.k is not None else None
            if lp_obj is not None or text:
                chunks.append(self.chunk(i, text, lp_obj, None))
        if ev[0] == "token":
            lp = self.logprobs_obj(i, False, [ev[2]], [ev[4]], [ev[5]], 0) if self.k is not None else None
            chunks.append(self.chunk(i, ev[3], lp, None))
        elif ev[0] == "finish":
            chunks.append(self.chunk(i, "", None, ev[2]))
        return chunks

    def chunk(self, i, text, lp, reason):
        c = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.st.cfg.model_name,
             "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        if self.s.include_usage:
            c["usage"] = None
        return c

    def final(self):
        choices = []
        for i in range(len(self.texts)):
            text = "".join(self.texts[i])
            if self.echo:
                text = self.prompt_texts[i // self.s.n] + text
            choices.append({"index": i, "text": text, "finish_reason": self.reasons[i],
                            "logprobs": self.logprobs_obj(i, self.echo, self.tokens[i], self.lps[i], self.tops[i], 0)})
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.st.cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}


class _ChatFormat(_Format):
    prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def __init__(self, st, sampling, prompts, logprobs):
        super().__init__(st, sampling, prompts)
        self.want_lp = logprobs

    def lp_entries(self, tokens, lps, tops):
        out = []
        for t, lp, top in zip(tokens, lps, tops):
            s = self.tok_str(t)
            b = list(self.st.tokenizer.decode_bytes([t]))
            out.append({"token": s, "logprob": lp, "bytes": b,
                        "top_logprobs": [{"token": self.tok_str(a), "logprob": v,
                                          "bytes": list(self.st.tokenizer.decode_bytes([a]))} for a, v in (top or [])]})
        return out

    def start(self):
        return [self.chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(len(self.texts))]

    def event(self, ev):
        self.record(ev)
        if not self.s.stream:
            return []
        i = ev[1]
        if ev[0] == "token":
            lp = {"content": self.lp_entries([ev[2]], [ev[4]], [ev[5]])} if self.want_lp else None
            if not ev[3] and lp is None:
                return []
            return [self.chunk(i, {"content": ev[3]}, lp, None)]
        if ev[0] == "finish":
            return [self.chunk(i, {}, None, ev[2])]
        return []

    def chunk(self, i, delta, lp, reason):
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.st.cfg.model_name, "system_fingerprint": None,
             "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}
        if self.s.include_usage:
            c["usage"] = None
        return c

    def final(self):
        choices = []
        for i in range(len(self.texts)):
            lp = {"content": self.lp_entries(self.tokens[i], self.lps[i], self.tops[i])} if self.want_lp else None
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(self.texts[i])},
                            "logprobs": lp, "finish_reason": self.reasons[i]})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.st.cfg.model_name,
                "system_fingerprint": None, "choices": choices, "usage": self.usage()}


# ----------------------------------------------------------------------------- running it
def load(model_dir, tokenizer=None, dtype=None, device=None):
    """(model, tokenizer, chat template) from a checkpoint directory."""
    from .model import GPT
    from .pipelines import load_tokenizer

    model = GPT.from_pretrained(model_dir, dtype=dtype, device=device)
    tok = load_tokenizer(tokenizer or model_dir)
    eot = getattr(tok, "eot_token", None)
    eos_text = tok.decode([eot]) if eot is not None else ""
    return model, tok, ChatTemplate.from_dir(model_dir, eos_token=eos_text)


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, tokenizer=None, config: ServeConfig | None = None,
          log_level: str = "info", dtype=None, device=None):
    """Load a checkpoint directory (onto ``device``, in ``dtype``) and serve it until interrupted.
    Bound to loopback, the server answers only to the loopback names unless
    ``config.allowed_hosts`` widens them; bound elsewhere, to any name unless it narrows them."""
    import uvicorn

    from .serve_net import is_loopback

    model, tok, chat = load(model_dir, tokenizer, dtype=dtype, device=device)
    cfg = config or ServeConfig(model_name=Path(model_dir).resolve().name)
    if cfg.allowed_hosts is None and not is_loopback(host):
        cfg.allowed_hosts = ("*",)
    if not is_loopback(host) and not (cfg.api_key or os.environ.get("FASTLM_API_KEY")):
        log.warning("serving on %s without an API key: anyone who reaches this address can use the model", host)
    app = create_app(model, tok, cfg, chat)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **_uvicorn_options(cfg))


def _uvicorn_options(cfg: ServeConfig) -> dict:
    """uvicorn's settings for the connection limits and deadlines of ``cfg`` (``fastlm.serve_net``)."""
    from .serve_net import protocol_class

    return dict(http=protocol_class(cfg.max_connections, cfg.header_timeout, cfg.send_buffer_bytes),
                limit_concurrency=cfg.max_connections + 1, timeout_keep_alive=cfg.idle_timeout)


class ServerThread:
    """Serve an app from a background thread on a loopback port (tests, benchmarks, notebooks):
    ``with ServerThread(app) as s: openai.OpenAI(base_url=s.url + "/v1", ...)``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        st = getattr(app.state, "fastlm", None)
        options = _uvicorn_options(st.cfg if st is not None else ServeConfig())
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
