"""The server's application: routes, authentication, limits and server-sent events.

``create_app`` builds the FastAPI application; its routes call the methods of one
``Handlers`` object, which holds the app's state (model, tokenizer, config, engine, metrics).
A request's body is read within its deadline and parsed into a plan (``completion_plan``,
``chat_plan``: prompts, validated options, response format), submitted to the engine
(``fastlm.generation.Engine``), and its events are streamed as server-sent events or
collected into one response. See ``fastlm.serve`` for the API and its limits.
"""
import asyncio
import hmac
import logging
import os
import time
import warnings
from contextlib import asynccontextmanager

from ..generation.engine import Engine, QueueFull, Request
from ..generation.sampling import undecodable_ids
from ..tokenizer.chat_template import ChatTemplate, ChatTemplateError, encode_text
from .config import ServeConfig
from .metrics import Metrics, route_label
from .playground import HEADERS as PAGE_HEADERS, load_files as load_playground
from .protocol import (CHAT_FIELDS, COMPLETION_FIELDS, APIError, Sampling, bad, check_fields, disconnected, get_bool,
                       get_int, is_int, json_body, parse_messages)
from .responses import ChatFormat, CompletionFormat, sse

try:  # the server's own dependencies: pip install fastlm[serve]
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from .net import LOOPBACK_NAMES, DeadlineStreamingResponse, HostCheck
except ImportError as e:  # fastlm imports without them; create_app says what is missing
    _MISSING = e
    HTTPRequest = "starlette.requests.Request"
else:
    _MISSING = None

log = logging.getLogger("fastlm.serve")

__all__ = ["create_app", "Handlers"]


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
        return is_int(t) and 0 <= t < self.vocab_size and t not in self.undecodable

    def _end_ids(self, configured, eot) -> list:
        """The ids that end a sequence: the config's, else the tokenizer's end-of-text id. One
        the model cannot generate (outside its vocabulary, or not decodable) is dropped here,
        once, with a warning, instead of failing every request."""
        ids = configured if configured is not None else eot
        ids = [] if ids is None else [ids] if is_int(ids) else list(ids)
        kept = [i for i in ids if self.valid_id(i)]
        if len(kept) < len(ids):
            warnings.warn(f"end-of-text ids {sorted(set(ids) - set(kept))} lie outside the model's {self.vocab_size} "
                          "ids or the tokenizer's vocabulary and are dropped: sequences end by length, stop strings "
                          "or stop ids", UserWarning, stacklevel=3)
        return kept


class Handlers:
    """The routes of one application, as methods over its state ``st``."""

    def __init__(self, st: _State):
        self.st, self.cfg = st, st.cfg

    # -- the frame every route shares
    def error_response(self, e: APIError, route: str):
        self.st.metrics.request(route, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(self, request):
        if self.cfg.api_key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, key = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    async def read_json(self, request, arrived):
        """The body as JSON: Content-Type application/json, at most max_body_bytes, all of it
        within body_timeout of the request's arrival."""
        cfg = self.cfg
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
                raise disconnected() from None
            size += len(c)
            if size > cfg.max_body_bytes:
                raise too_large
            chunks.append(c)
        return json_body(b"".join(chunks), cfg.max_json_depth)

    def check_model(self, body):
        m = body.get("model")
        if not isinstance(m, str):
            raise bad("'model' is required and must be a string", "model",
                      "invalid_type" if m is not None else "missing")
        if m != self.cfg.model_name:
            raise APIError(404, f"The model '{m[:200]}' does not exist (this server serves '{self.cfg.model_name}')",
                           "invalid_request_error", "model", "model_not_found")

    async def encode(self, text: str) -> list:
        tokenizer = self.st.tokenizer
        if len(text) < 2048:
            return encode_text(tokenizer, text)
        return await asyncio.get_running_loop().run_in_executor(None, encode_text, tokenizer, text)

    async def encode_chat(self, messages) -> list:
        st = self.st
        try:
            if sum(len(m["content"]) for m in messages) < 2048:
                return st.chat.encode(messages, st.tokenizer)
            return await asyncio.get_running_loop().run_in_executor(None, st.chat.encode, messages, st.tokenizer)
        except ChatTemplateError as e:  # the template refused these messages (raise_exception) or failed on them
            raise bad(str(e), "messages", "invalid_value") from None

    def check_lengths(self, prompts, max_tokens, param):
        st = self.st
        for p in prompts:
            if not p:
                raise bad("the prompt is empty (no tokens)", param, "invalid_value")
            if not all(st.valid_id(t) for t in p):
                raise bad(f"token ids must be integers in [0, {st.vocab_size}) that the tokenizer can decode",
                          param, "invalid_value")
            if len(p) > st.max_prompt:
                raise bad(f"the prompt has {len(p)} tokens; this server accepts at most {st.max_prompt}", param,
                          "context_length_exceeded")
            if len(p) + max_tokens > st.max_len:
                raise bad(f"This model's maximum context length is {st.max_len} tokens; the prompt has {len(p)} "
                          f"and max_tokens is {max_tokens}", "max_tokens", "context_length_exceeded")

    def start(self, prompts, opts, sampling: Sampling, prompt_logprobs, abort):
        """Submit to the engine; returns (request, queue of its events). Events waiting for
        the client past max_stream_events mean it stopped reading: its rows are freed, its
        connection dropped (``abort``) and the queue closed with a ``("stalled",)`` event."""
        st, cfg = self.st, self.cfg
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

    async def events(self, req, queue, arrived):
        """Engine events, batched (all already queued), until every sequence is finished;
        raises APIError(504) past the request timeout. Records latency metrics."""
        cfg = self.cfg
        deadline = arrived + cfg.request_timeout
        last = {}
        left = req.size
        m = self.st.metrics
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
                    raise disconnected()
            if tokens:
                m.completion_tokens.inc(tokens)
            yield batch

    async def run_request(self, request, route, body_fn):
        """Common frame: auth, body, parse (body_fn returns a plan), then stream or not."""
        st, cfg = self.st, self.cfg
        arrived = time.monotonic()
        abort = (request.scope.get("extensions") or {}).get("fastlm.abort")
        try:
            self.check_auth(request)
            body = await self.read_json(request, arrived)
            plan = await body_fn(body)
            req, queue = self.start(plan["prompts"], plan["opts"], plan["sampling"],
                                    plan.get("prompt_logprobs", False), abort)
        except APIError as e:
            return self.error_response(e, route)
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

            return DeadlineStreamingResponse(self.stream_body(req, queue, arrived, plan), cfg.send_timeout, on_stall,
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                      **headers})
        watcher = asyncio.ensure_future(_watch_disconnect(request, req, queue, st.engine))
        try:
            fmt = plan["format"]
            async for batch in self.events(req, queue, arrived):
                for ev in batch:
                    fmt.event(ev)
            st.metrics.request(route, 200)
            return JSONResponse(fmt.final(), headers=headers)
        except APIError as e:
            st.engine.cancel(req)
            return self.error_response(e, route)
        except BaseException:
            st.engine.cancel(req)
            raise
        finally:
            watcher.cancel()

    async def stream_body(self, req, queue, arrived, plan):
        fmt = plan["format"]
        try:
            for chunk in fmt.start():
                yield sse(chunk)
            async for batch in self.events(req, queue, arrived):
                out = []
                for ev in batch:
                    for chunk in fmt.event(ev):
                        out.append(sse(chunk))
                if out:
                    yield "".join(out)
            if plan["sampling"].include_usage:
                yield sse(fmt.usage_chunk())
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            self.st.engine.cancel(req)  # a no-op when finished; frees the rows of a client that went away

    async def completion_plan(self, body):
        st, cfg = self.st, self.cfg
        ignored = check_fields(body, COMPLETION_FIELDS)
        self.check_model(body)
        max_tokens = get_int(body, "max_tokens", 16, 0, cfg.max_tokens_cap)
        s = Sampling(body, cfg, max_tokens, st.valid_id)
        echo = get_bool(body, "echo", False)
        logprobs = get_int(body, "logprobs", None, 0, 20)
        if body.get("suffix") is not None:
            raise bad("'suffix' is not supported", "suffix", "unsupported_parameter")
        best_of = get_int(body, "best_of", None, 1, cfg.max_n)
        if best_of is not None and best_of != s.n:
            raise bad("'best_of' must equal 'n' (no server-side ranking)", "best_of", "unsupported_parameter")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            texts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
            texts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            if not all(p and all(is_int(t) for t in p) for p in prompt):
                raise bad("'prompt' lists of token ids must be non-empty lists of integers", "prompt", "invalid_type")
            texts = [list(p) for p in prompt]
        else:
            raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt", "invalid_type" if prompt is not None else "missing")
        if len(texts) > cfg.max_prompts:
            raise bad(f"at most {cfg.max_prompts} prompts in one request", "prompt", "invalid_value")
        if len(texts) * s.n > cfg.max_queue + cfg.max_batch:
            raise bad("too many sequences (prompts x n) in one request", "n", "invalid_value")
        prompts = []
        for t in texts:
            prompts.append(await self.encode(t) if isinstance(t, str) else t)
        if any(isinstance(t, str) and not t for t in texts) and not echo:
            raise bad("the prompt is empty", "prompt", "invalid_value")
        self.check_lengths(prompts, max_tokens, "prompt")
        opts = s.options(st.model, st.eos, [len(p) for p in prompts], st.tokenizer, logprobs is not None,
                         logprobs or 0, max_tokens)
        fmt = CompletionFormat(st, s, prompts, texts, echo, logprobs)
        return {"prompts": prompts, "opts": opts, "sampling": s, "format": fmt, "ignored": ignored,
                "prompt_logprobs": echo and logprobs is not None}

    async def chat_plan(self, body):
        st, cfg = self.st, self.cfg
        ignored = check_fields(body, CHAT_FIELDS)
        self.check_model(body)
        if body.get("tools"):
            raise bad("'tools' are not supported", "tools", "unsupported_parameter")
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise bad("'tool_choice' must be 'none' or 'auto' (no tools are supported)", "tool_choice",
                       "unsupported_parameter")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise bad("only 'response_format' {'type': 'text'} is supported", "response_format",
                       "unsupported_parameter")
        messages = parse_messages(body.get("messages"))
        ids = await self.encode_chat(messages)
        limit = st.max_len - len(ids)
        mt = get_int(body, "max_completion_tokens", None, 0, cfg.max_tokens_cap)
        if mt is None:
            mt = get_int(body, "max_tokens", None, 0, cfg.max_tokens_cap)
        if mt is None:
            mt = max(1, min(cfg.max_tokens_cap, limit))
        s = Sampling(body, cfg, mt, st.valid_id, extra_stop=st.chat.stop)
        logprobs = get_bool(body, "logprobs", False)
        top = get_int(body, "top_logprobs", None, 0, 20)
        if top is not None and not logprobs:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        self.check_lengths([ids], mt, "messages")
        opts = s.options(st.model, st.eos, [len(ids)], st.tokenizer, logprobs, top or 0, mt)
        fmt = ChatFormat(st, s, [ids], logprobs)
        return {"prompts": [ids], "opts": opts, "sampling": s, "format": fmt, "ignored": ignored}

    # -- the routes
    def page(self, path: str, data: bytes, ctype: str):
        """The route of one file of the playground (``fastlm.serve.playground``): open like
        ``/health``, since the page holds no secret; its API calls carry the key."""
        async def route():
            self.st.metrics.request(path, 200)
            return Response(data, media_type=ctype, headers=PAGE_HEADERS)

        return route

    async def health(self):
        st = self.st
        ok = st.engine is not None and st.engine._thread.is_alive()
        st.metrics.request("/health", 200 if ok else 503)
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    async def metrics(self):
        data, ctype = self.st.metrics.render()
        return Response(data, media_type=ctype)

    async def models(self, request: HTTPRequest):
        st = self.st
        try:
            self.check_auth(request)
        except APIError as e:
            return self.error_response(e, "/v1/models")
        st.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "created": st.created,
                                            "owned_by": "fastlm", "max_model_len": st.max_len}]}

    async def completions(self, request: HTTPRequest):
        return await self.run_request(request, "/v1/completions", self.completion_plan)

    async def chat_completions(self, request: HTTPRequest):
        return await self.run_request(request, "/v1/chat/completions", self.chat_plan)

    # -- errors FastAPI raises before a route runs
    async def http_error(self, request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return self.error_response(APIError(exc.status_code, str(exc.detail), kind, None, None,
                                            dict(exc.headers or {})), route_label(request))

    async def validation_error(self, request, exc):
        return self.error_response(bad(str(exc.errors())[:500]), route_label(request))

    async def internal_error(self, request, exc):
        log.exception("internal error on %s", route_label(request))
        return self.error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"),
                                   route_label(request))


def create_app(model, tokenizer, config: ServeConfig | None = None, chat_template: ChatTemplate | None = None):
    """The FastAPI application serving ``model`` (a ``fastlm.GPT``) with ``tokenizer``. The
    engine thread starts with the app (its lifespan) and stops with it. Serve it with
    ``serve``/``ServerThread`` (uvicorn with the connection limits of ``fastlm.serve.net``)."""
    if _MISSING is not None:
        raise ImportError(f"the server needs fastapi and uvicorn (pip install fastlm[serve]): {_MISSING}")

    cfg = config or ServeConfig()
    if cfg.api_key is None:
        cfg.api_key = os.environ.get("FASTLM_API_KEY") or None
    st = _State(model, tokenizer, cfg, chat_template or ChatTemplate(None))
    h = Handlers(st)

    @asynccontextmanager
    async def lifespan(app):
        st.engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_len=st.max_len, max_queue=cfg.max_queue,
                           prefill_tokens=cfg.prefill_tokens, kv_dtype=cfg.kv_dtype)
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
    app.add_exception_handler(StarletteHTTPException, h.http_error)
    app.add_exception_handler(RequestValidationError, h.validation_error)
    app.add_exception_handler(Exception, h.internal_error)
    if cfg.playground:
        for path, (data, ctype) in load_playground().items():
            app.api_route(path, methods=["GET", "HEAD"], include_in_schema=False)(h.page(path, data, ctype))
    app.get("/health")(h.health)
    app.get("/metrics")(h.metrics)
    app.get("/v1/models")(h.models)
    app.post("/v1/completions")(h.completions)
    app.post("/v1/chat/completions")(h.chat_completions)
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
