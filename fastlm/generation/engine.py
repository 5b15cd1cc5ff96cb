"""Continuous batching: many requests decoded together, joining and leaving between steps.

The engine owns one ``KVCache`` of ``max_batch`` rows (slots) and runs in one worker thread.
Each sequence (one choice of one prompt of one request) takes a free row when one is free:

1. **Join.** Waiting sequences are prefilled together (one forward over their prompts, written
   into their rows only); the logits of each prompt's last token give its first new token.
2. **Step.** Every running sequence chooses its next token with its own options through the
   library's picker (``fastlm.generation.sampling``: greedy rows in one argmax, sampled rows
   each with their own ``torch.Generator``, so a seed gives the same text however the batch is
   made up, and the same as ``fastlm.generation.generate``), text is settled through ``TextStream`` (whole
   UTF-8 characters, stop strings held back until decided), the library's stop rules
   (``fastlm.generation.stopping``) end sequences, and finished sequences leave.
3. **Leave.** A finished or cancelled sequence frees its row at once: the last running row is
   moved into the hole, so the running rows are always rows 0..n-1 and the decode step runs
   one batched forward over that contiguous prefix of the cache (``KVCache.rows``, a view,
   nothing copied).

Requests are submitted from any thread; their events (text deltas, finish reasons) are
delivered by calling ``Request.emit`` from the engine thread, which must not block.

One request cannot fail another: ids the tokenizer cannot decode are masked out of every
choice (found once, at start), a row whose logits hold no finite maximum takes the argmax of
its raw logits, and an error in the work of one row (its options, its text, its prompt's
log-probabilities) ends that row's request alone with an ``("error", message)`` event while
the batch goes on. Only a failure of a batched forward (an out-of-memory) fails the requests
it carried.
"""
from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops
from ..tokenizer import token_bytes_fn
from .cache import KVCache
from .sampling import (SamplingOptions, argmax, choose, process_logits, processes_greedy, row_generator,
                       undecodable_ids)
from .stopping import stop_reason
from .text import TextStream

__all__ = ["Engine", "Request", "QueueFull"]


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later."""


@dataclass
class _Seq:
    req: "Request"
    index: int  # choice index within the request
    prompt: list
    generator: torch.Generator | None
    text: TextStream | None
    tokens: list = field(default_factory=list)
    cache_len: int = 0
    seen: torch.Tensor | None = None  # (V,) bool: ids of the prompt and output (repetition penalty)
    counts: torch.Tensor | None = None  # (V,) float: times each id was generated (presence/frequency)
    bias: torch.Tensor | None = None  # (V,) float: the request's logit_bias
    done: bool = False
    first_token_at: float | None = None


class Request:
    """One API request: ``prompts`` (lists of token ids) times ``n`` choices, each sequence
    ``index = prompt_index * n + j``. ``emit(event)`` is called from the engine thread with
    ``("token", index, token_id, text_delta, logprob, top)`` (logprob/top None unless asked),
    ``("prompt_logprobs", index, [logprob or None, ...], [top or None, ...])`` (echo),
    ``("finish", index, reason)`` and ``("error", message)``. With ``emit_many``, the events of
    one engine step arrive together in one call of it (a list) instead."""

    def __init__(self, prompts: list, opts: SamplingOptions, emit: Callable, n: int = 1, seed: int | None = None,
                 prompt_logprobs: bool = False, emit_many: Callable | None = None):
        self.prompts, self.opts, self.emit, self.n, self.seed = prompts, opts, emit, n, seed
        self.emit_many = emit_many
        self.prompt_logprobs = prompt_logprobs
        self.cancelled = False
        self.failed = False
        self.finished = 0
        self._prompt_lp: dict = {}  # prompt index -> its log-probabilities, shared by its n choices
        self.created = time.monotonic()

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n


class Engine:
    """Continuous-batching generation over ``model`` in one worker thread (see the module doc).

    max_batch: rows of the cache (sequences decoded together); max_len: tokens per row
    (default the model's context); max_queue: sequences allowed to wait for a row (beyond it
    ``submit`` raises ``QueueFull``); prefill_tokens: prompt tokens prefilled in one forward
    (bounds the pause that joining sequences cause to the running ones); kv_dtype: the
    cache's storage type (None: the model's; "bf16" / "fp16": see ``KVCache``)."""

    def __init__(self, model, tokenizer=None, max_batch: int = 32, max_len: int | None = None,
                 max_queue: int = 256, prefill_tokens: int = 2048, on_step: Callable | None = None, kv_dtype=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len or model.config.block_size
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.cache = KVCache(model, max_batch, self.max_len, dtype=kv_dtype)
        p = model.transformer.wte.weight
        # The reference decode attention computes over every cache position it is given, so the
        # view is cut to the longest running row (rounded up to 64); the native kernels read only
        # the valid prefix of a contiguous cache, so they get whole rows (a slice would be copied).
        self._cut_length = ops.resolve("decode_attention", p.device, p.dtype)[0] == "reference"
        self._token_bytes = token_bytes_fn(tokenizer) if tokenizer is not None else None
        bad = undecodable_ids(tokenizer, model.config.vocab_size) if tokenizer is not None else []
        self.banned = torch.tensor(bad, dtype=torch.long, device=p.device) if bad else None
        self.running: list[_Seq] = []  # running[i] owns cache row i
        self.logits: torch.Tensor | None = None  # (len(running), V): next-token logits of each row
        self.waiting: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self.on_step = on_step  # called after each step with (n_running, n_waiting)
        self.steps = 0
        self._out: dict = {}  # id(request) -> (request, [events of this step])
        self._thread = threading.Thread(target=self._loop, name="fastlm-engine", daemon=True)
        self._thread.start()

    # -- from any thread
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            if len(self.waiting) + req.size > self.max_queue + self.max_batch - len(self.running):
                raise QueueFull(f"{len(self.waiting)} sequences already wait for one of {self.max_batch} rows")
            for i, p in enumerate(req.prompts):
                for j in range(req.n):
                    self.waiting.append((req, i * req.n + j, p))
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """Drop the request's sequences: waiting ones at once, running ones before the next step."""
        with self._cv:
            req.cancelled = True
            if any(r is req for r, _, _ in self.waiting):
                self.waiting = collections.deque(w for w in self.waiting if w[0] is not req)
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.running)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the worker thread
    def _loop(self):
        while True:
            with self._cv:
                while not self._stop and not self.running and not self.waiting:
                    self._cv.wait()
                if self._stop:
                    break
                joining = self._take_waiting()
            try:
                with torch.inference_mode():
                    self._leave([b for b, s in enumerate(self.running) if s.req.cancelled])
                    if joining:
                        try:
                            self._join(joining)
                        except Exception as e:  # the joint prefill (out of memory): its requests fail
                            traceback.print_exc()
                            for r in {id(r): r for r, _, _ in joining}.values():
                                self._fail(r, e)
                        self._leave([b for b, s in enumerate(self.running) if s.req.cancelled])
                    if self.running:
                        self._step()
                self.steps += 1
                self._flush()
            except Exception as e:  # the batched forward itself (out of memory): fail the rows in flight
                traceback.print_exc()
                for r in {id(s.req): s.req for s in self.running}.values():
                    self._fail(r, e)
                self._flush()
                self.running, self.logits = [], None
            if self.on_step is not None:
                self.on_step(len(self.running), len(self.waiting))
        for s in self.running:
            s.req.emit(("error", "the server is shutting down"))
        for r, _, _ in self.waiting:
            r.emit(("error", "the server is shutting down"))

    def _take_waiting(self):
        free = self.max_batch - len(self.running)
        out, tokens = [], 0
        while self.waiting and len(out) < free:
            req, index, prompt = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            if out and tokens + len(prompt) > self.prefill_tokens:
                break
            self.waiting.popleft()
            out.append((req, index, prompt))
            tokens += len(prompt)
        return out

    def _fail(self, req: Request, e: Exception) -> None:
        """End ``req`` with an error event (once); its rows leave before the next step."""
        req.cancelled = True
        if not req.failed:
            req.failed = True
            self._send(req, ("error", f"generation failed: {type(e).__name__}: {e}"))

    def _join(self, joining):
        rows = list(range(len(self.running), len(self.running) + len(joining)))
        logits = self.cache.prefill([p for _, _, p in joining], rows=rows).float()
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        for req, index, prompt in joining:
            s = _Seq(req, index, list(prompt), None, None, cache_len=len(prompt))
            self.running.append(s)
            try:
                self._setup(s)
            except Exception as e:  # this request's options or prompt: it alone fails (its row leaves)
                traceback.print_exc()
                self._fail(req, e)
        if any(s.req.opts.max_new_tokens == 0 for s in self.running):
            self._finish_zero()

    def _setup(self, s: _Seq) -> None:
        """A joining sequence's own state: generator, text stream, penalty and bias vectors, and
        its prompt's log-probabilities (computed once per prompt, shared by its n choices)."""
        req, opts = s.req, s.req.opts
        V = self.model.config.vocab_size
        device = self.cache.kv.device
        if opts.sampling:
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            s.generator = row_generator(seed, s.index, device)
        if self._token_bytes:
            s.text = TextStream(self._token_bytes, opts.stop_strings)
        if opts.repetition_penalty != 1.0:
            s.seen = torch.zeros(V, dtype=torch.bool, device=device)
            s.seen[torch.as_tensor(s.prompt, device=device)] = True
        if opts.presence_penalty or opts.frequency_penalty:
            s.counts = torch.zeros(V, dtype=torch.float32, device=device)
        if opts.logit_bias:
            s.bias = torch.zeros(V, dtype=torch.float32, device=device)
            s.bias[torch.tensor(list(opts.logit_bias), device=device)] = torch.tensor(
                list(opts.logit_bias.values()), dtype=torch.float32, device=device)
        if req.prompt_logprobs:
            p = s.index // req.n
            if p not in req._prompt_lp:
                req._prompt_lp[p] = self._prompt_logprobs(s.prompt, opts.top_logprobs)
            self._send(req, ("prompt_logprobs", s.index) + req._prompt_lp[p])

    def _finish_zero(self):
        gone = []
        for b, s in enumerate(self.running):
            if s.req.opts.max_new_tokens == 0:
                self._end(s, "length")
                gone.append(b)
        self._leave(gone)

    def _prompt_logprobs(self, prompt, k):
        """log p(prompt[i] | prompt[:i]) for i >= 1 (None for the first token), with the top k."""
        if len(prompt) < 2:
            return [None], [None] if k else None
        logits = self.model(torch.tensor([prompt], device=self.cache.kv.device))[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(prompt[1:], device=lp.device)
        chosen = [None] + lp.gather(-1, tgt.view(-1, 1)).squeeze(-1).tolist()
        top = None
        if k:
            if self.banned is not None:  # the alternatives shown are tokens the tokenizer can write
                lp = lp.index_fill(-1, self.banned, float("-inf"))
            tv, ti = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
            top = [None] + [list(zip(a, b)) for a, b in zip(ti.tolist(), tv.tolist())]
        return chosen, top

    def _choose(self) -> list:
        """One token per running row: rows of equal options in one batched pass (greedy ones in
        one argmax), rows with their own penalty or bias vectors alone; sampled rows drawn each
        with their own generator. A group that fails ends its rows' requests alone (their
        tokens are placeholders: the rows leave before the next forward)."""
        logits, running = self.logits, self.running
        if self.banned is not None:
            logits = logits.index_fill(-1, self.banned, float("-inf"))
        toks = [0] * len(running)
        groups: dict = {}
        for b, s in enumerate(running):
            o = s.req.opts
            if s.seen is not None or s.counts is not None or s.bias is not None:
                key = ("row", b)
            else:  # the sampling options matter only to sampled rows
                key = (True, o.temperature, o.top_k, o.top_p, o.min_p) if o.sampling else (False,)
            groups.setdefault(key, []).append(b)
        for rows in groups.values():
            try:
                chosen = self._choose_rows(logits, rows)
            except Exception as e:
                traceback.print_exc()
                for b in rows:
                    self._fail(running[b].req, e)
                continue
            for b, t in zip(rows, chosen):
                toks[b] = t
                s = running[b]
                if s.seen is not None:
                    s.seen[t] = True
                if s.counts is not None:
                    s.counts[t] += 1
        return toks

    def _choose_rows(self, logits, rows) -> list:
        running = self.running
        s0 = running[rows[0]]
        opts = s0.req.opts
        raw = logits if len(rows) == len(running) else logits.index_select(0, torch.tensor(rows, device=logits.device))
        lg = raw
        if opts.sampling or processes_greedy(opts):
            view = (lambda t: None if t is None else t.view(1, -1))
            lg = process_logits(raw, view(s0.seen), opts, view(s0.counts), view(s0.bias))
        if not opts.sampling:
            return argmax(lg).tolist()
        return choose(lg, opts, [running[b].generator for b in rows], raw).tolist()

    def _step(self):
        toks = self._choose()
        want_lp = [b for b, s in enumerate(self.running) if s.req.opts.logprobs]
        lp_rows = {}
        if want_lp:
            lp = torch.log_softmax(self.logits[want_lp], dim=-1)
            for i, b in enumerate(want_lp):
                k = self.running[b].req.opts.top_logprobs
                top = None
                if k:
                    row = lp[i] if self.banned is None else lp[i].index_fill(-1, self.banned, float("-inf"))
                    tv, ti = torch.topk(row, min(k, lp.shape[-1]))
                    top = list(zip(ti.tolist(), tv.tolist()))
                lp_rows[b] = (float(lp[i, toks[b]]), top)
        now = time.monotonic()
        gone = []
        for b, s in enumerate(self.running):
            if s.req.cancelled:  # failed while choosing: it leaves without a token
                gone.append(b)
                continue
            try:
                reason = self._advance(s, toks[b], lp_rows.get(b, (None, None)), now)
            except Exception as e:  # its text or its stop rules: this request alone fails
                traceback.print_exc()
                self._fail(s.req, e)
                reason = "error"
            if reason is not None:
                gone.append(b)
        tokens = toks
        if gone:
            tokens = self._leave(gone, toks)
        if not self.running:
            return
        length = self.max_len
        if self._cut_length:
            length = min(self.max_len, -(-(max(s.cache_len for s in self.running) + 1) // 64) * 64)
        view = self.cache.rows(len(self.running), length)
        view.lens = [s.cache_len for s in self.running]
        logits = view.decode(torch.tensor(tokens, dtype=torch.long, device=self.cache.kv.device),
                             [True] * len(self.running))
        for s in self.running:
            s.cache_len += 1
        self.logits = logits.float()

    def _advance(self, s: _Seq, t: int, lp, now: float) -> str | None:
        """Append token ``t`` to ``s``, send its text, and end it if it is finished; returns the
        finish reason or None."""
        s.tokens.append(t)
        if s.first_token_at is None:
            s.first_token_at = now
        # the row is full when prompt and output reach the model's context (or --max-model-len)
        reason, delta = stop_reason(s.req.opts, s.tokens, s.text, s.cache_len + 1 >= self.max_len)
        self._send(s.req, ("token", s.index, t, delta) + tuple(lp))
        if reason is not None:
            self._end(s, reason)
        return reason

    def _end(self, s: _Seq, reason: str):
        s.done = True
        s.req.finished += 1
        self._send(s.req, ("finish", s.index, reason))

    def _send(self, req: Request, ev):
        entry = self._out.get(id(req))
        if entry is None:
            entry = self._out[id(req)] = (req, [])
        entry[1].append(ev)

    def _flush(self):
        """Deliver the step's events: one call per request."""
        out, self._out = self._out, {}
        for req, evs in out.values():
            if req.emit_many is not None:
                req.emit_many(evs)
            else:
                for ev in evs:
                    req.emit(ev)

    def _leave(self, gone: list, toks: list | None = None):
        """Free rows ``gone``: the last running row moves into each hole (its cache prefix is
        copied), so the running rows stay 0..n-1. Returns ``toks`` permuted alike."""
        if not gone:
            return toks
        running = self.running
        order = list(range(len(running)))
        kv = self.cache.kv
        for b in sorted(gone, reverse=True):
            last = len(order) - 1
            if b != last:
                src = order[last]
                n = running[src].cache_len
                kv[:, :, b, :, :n] = kv[:, :, last, :, :n]
                order[b] = src
            order.pop()
        self.running = [running[i] for i in order]
        if self.logits is not None:
            self.logits = self.logits[order] if order else None
        return None if toks is None else [toks[i] for i in order]
