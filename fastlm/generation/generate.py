"""Text generation: ``generate`` (Hugging Face's parameters) and ``stream`` (text as it settles).

How a call runs:

1. **Prefill.** The prompts (any lengths) are encoded into a ``KVCache`` in one pass
   (``fastlm.models.decode``), and the logits of each prompt's last token give its first
   new token.
2. **Decode.** Each step feeds one token per sequence at the end of its row of the cache;
   sequences of different lengths share a batch without any padding being attended.
3. **Choosing.** ``fastlm.generation.sampling``: the processors in Hugging Face's order, then
   the argmax or a draw, each row from its own generator (``seed`` with the row's index, as
   the server's engine draws, so the same seeded request gives the same tokens through
   either). Ids the tokenizer cannot decode are never chosen.
4. **Stopping.** ``fastlm.generation.stopping``: each sequence stops on its own, on an EOS
   token, a stop string, ``max_new_tokens``, or the model's context (``finish_reason=
   "length"``, with a warning; ``context_overflow="slide"`` keeps generating from the last
   half of the context instead, re-encoded).

Text comes out through ``TextStream`` (``fastlm.generation.text``), so the concatenated
deltas of ``stream`` equal the final text.
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..tokenizer import token_bytes_fn
from .cache import KVCache, kv_cache_dtype
from .sampling import (GREEDY_TEMPERATURE, SamplingOptions, choose, process_logits, row_generator, sampling_options,
                       undecodable_ids, warn_unused_sampling)
from .stopping import stop_reason
from .text import TextStream

__all__ = ["GenerateOutput", "generate", "stream", "encode_prompt", "GREEDY_TEMPERATURE"]


def _prompts(model, input_ids, attention_mask):
    """Normalise input ids to a list of token lists; returns (prompts, kind)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.dim() == 1:
            kind, rows = "tensor1", [input_ids.tolist()]
        elif input_ids.dim() == 2:
            kind, rows = "tensor2", input_ids.tolist()
        else:
            raise ValueError(f"input_ids must have shape (T,) or (B, T), got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).reshape(len(rows), -1).tolist()
            if len(mask[0]) != len(rows[0]):
                raise ValueError("attention_mask must have the shape of input_ids")
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
    elif isinstance(input_ids, (list, tuple)):
        if len(input_ids) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            kind, rows = "list1", [list(input_ids)]
        elif len(input_ids) > 0 and all(isinstance(r, (list, tuple)) for r in input_ids):
            kind, rows = "list2", [list(r) for r in input_ids]
        else:
            raise ValueError("input_ids must be a non-empty list of token ids or a list of such lists")
    else:
        raise TypeError(f"input_ids must be a tensor or a list of token ids, got {type(input_ids).__name__}")
    V = model.config.vocab_size
    for r in rows:
        if len(r) == 0:
            raise ValueError("empty prompt: every sequence needs at least one token")
        if not all(isinstance(t, int) and 0 <= t < V for t in r):
            raise ValueError(f"token ids must be integers in [0, {V})")
    return rows, kind


# ----------------------------------------------------------------------------- the loop
@dataclass
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns."""

    sequences: object  # as generate() returns without the dict
    tokens: list  # new token ids per sequence
    finish_reasons: list  # "stop" (EOS or stop string) or "length", per sequence
    texts: list | None = None  # decoded new text per sequence (with a tokenizer)
    logprobs: list | None = None  # per sequence: log-probability of each new token
    top_logprobs: list | None = None  # per sequence, per token: [(token id, log-probability), ...]


@dataclass
class _Row:
    prompt: list
    tokens: list = field(default_factory=list)
    done: bool = False
    reason: str | None = None
    text: TextStream | None = None
    logprobs: list = field(default_factory=list)
    top: list = field(default_factory=list)
    context: list | None = None  # the tokens in the cache (sliding window only)


class _Generation:
    """Runs the prefill/decode loop one step at a time (each step under inference_mode, so
    that a paused stream never leaks the mode to the caller)."""

    def __init__(self, model, prompts, opts: SamplingOptions, seed, tokenizer, kv_dtype=None):
        self.model, self.opts = model, opts
        self.kv_dtype = kv_cache_dtype(kv_dtype, model)  # checked before any work
        cfg = model.config
        self.block = cfg.block_size
        self.keep = max(1, cfg.block_size // 2)
        if opts.overflow == "stop":
            longest = max(len(p) for p in prompts)
            if longest > self.block:
                raise ValueError(f"prompt of {longest} tokens exceeds the model's context of {self.block} tokens "
                                 "(use context_overflow='slide' to keep its end)")
            self.max_len = min(self.block, longest + max(opts.max_new_tokens, 1))
        else:
            self.max_len = self.block
        tb = token_bytes_fn(tokenizer) if tokenizer is not None else None
        self.rows = [_Row(list(p), text=TextStream(tb, opts.stop_strings) if tb else None) for p in prompts]
        self.device = model.transformer.wte.weight.device
        # One generator per row (None: torch's global one), as the server's engine draws.
        self.generators = [None if seed is None else row_generator(seed, b, self.device) for b in range(len(prompts))]
        self.seen = None
        self.cache = None
        self.logits = None
        self.warned = False
        bad = undecodable_ids(tokenizer, cfg.vocab_size) if tokenizer is not None else []
        self.banned = torch.tensor(bad, dtype=torch.long, device=self.device) if bad else None

    @torch.inference_mode()
    def start(self):
        rows = self.rows
        if self.opts.overflow == "slide":
            for r in rows:
                r.context = list(r.prompt[-self.keep:] if len(r.prompt) > self.block else r.prompt)
        self.cache = KVCache(self.model, len(rows), self.max_len, dtype=self.kv_dtype)
        self.logits = self.cache.prefill([r.context or r.prompt for r in rows]).float()
        if self.opts.repetition_penalty != 1.0:
            V = self.model.config.vocab_size
            self.seen = torch.zeros(len(rows), V, dtype=torch.bool, device=self.device)
            for b, r in enumerate(rows):
                self.seen[b, torch.as_tensor(r.prompt, device=self.device)] = True

    @torch.inference_mode()
    def step(self) -> list:
        """Choose one token per unfinished row; returns, per row, (token, text delta) or None."""
        opts, rows = self.opts, self.rows
        raw = self.logits if self.banned is None else self.logits.index_fill(-1, self.banned, float("-inf"))
        logits = process_logits(raw, self.seen, opts)
        tok = choose(logits, opts, self.generators, raw)
        if self.seen is not None:
            self.seen[torch.arange(len(rows), device=self.device), tok] = True
        if opts.logprobs:
            lp = torch.log_softmax(self.logits, dim=-1)  # the model's own, before any processing
            chosen = lp.gather(-1, tok.view(-1, 1)).squeeze(-1).tolist()
            if opts.top_logprobs:
                if self.banned is not None:
                    lp = lp.index_fill(-1, self.banned, float("-inf"))
                tv, ti = torch.topk(lp, min(opts.top_logprobs, lp.shape[-1]), dim=-1)
                tv, ti = tv.tolist(), ti.tolist()
        toks = tok.tolist()
        events = []
        for b, r in enumerate(rows):
            if r.done:
                events.append(None)
                continue
            t = toks[b]
            r.tokens.append(t)
            if opts.logprobs:
                r.logprobs.append(chosen[b])
                if opts.top_logprobs:
                    r.top.append(list(zip(ti[b], tv[b])))
            if r.context is not None:
                r.context.append(t)
            full = opts.overflow == "stop" and len(r.prompt) + len(r.tokens) >= self.block
            r.reason, delta = stop_reason(opts, r.tokens, r.text, full)
            r.done = r.reason is not None
            if r.reason == "length" and len(r.tokens) < opts.max_new_tokens and not self.warned:
                self.warned = True
                warnings.warn(f"generation reached the model's context of {self.block} tokens before "
                              f"max_new_tokens; finish_reason='length' (context_overflow='slide' keeps going)",
                              stacklevel=4)
            events.append((t, delta))
        if all(r.done for r in rows):
            self.logits = None
            return events
        advance = [not r.done for r in rows]
        slid = []
        if opts.overflow == "slide":
            for b, r in enumerate(rows):
                if advance[b] and self.cache.lens[b] >= self.max_len:
                    advance[b] = False
                    r.context = r.context[-self.keep:]
                    slid.append(b)
        logits = self.cache.decode(tok, advance)
        if slid:
            logits[torch.as_tensor(slid)] = self.cache.prefill([rows[b].context for b in slid], rows=slid)
        self.logits = logits.float()
        return events

    @property
    def finished(self) -> bool:
        return self.cache is not None and all(r.done for r in self.rows)


def _steps(gen: _Generation) -> Iterator[list]:
    training = gen.model.training
    gen.model.eval()
    try:
        gen.start()
        if gen.opts.max_new_tokens == 0:
            for r in gen.rows:
                r.done, r.reason = True, "length"
            return
        while not gen.finished:
            yield gen.step()
    finally:
        gen.model.train(training)


# ----------------------------------------------------------------------------- public API
def generate(model, input_ids, max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0, stop=None,
             eos_token_id=None, seed: int | None = None, streamer=None, *, max_length: int | None = None,
             attention_mask=None, pad_token_id: int | None = None, tokenizer=None, logprobs: bool = False,
             top_logprobs: int = 0, context_overflow: str = "stop", return_dict_in_generate: bool = False,
             min_p: float | None = None, kv_dtype=None):
    """Continue ``input_ids`` with ``model`` (a ``fastlm.GPT``), Hugging Face style.

    input_ids: a (T,) or (B, T) integer tensor (with ``attention_mask`` marking real tokens
    when rows are padded), a list of ids, or a list of lists of different lengths. Returns
    the same kind: prompt + new tokens (a (B, T + n) tensor padded with ``pad_token_id``, or
    lists without padding), or a ``GenerateOutput`` with ``return_dict_in_generate=True``
    (new tokens, finish reasons, texts, log-probabilities).

    max_new_tokens (default 20; or ``max_length`` = prompt + new), do_sample, temperature
    (below ``GREEDY_TEMPERATURE``, 0 included, greedy), top_k, top_p, min_p,
    repetition_penalty: as in transformers, which also decides that the options of sampling
    given with ``do_sample=False`` are not used (with a warning). With a ``tokenizer``, ids it
    cannot decode are never chosen. ``eos_token_id``
    (int or list; default the model's) and ``stop`` (strings, which need ``tokenizer``, or
    token-id sequences) end a sequence with finish_reason "stop"; each sequence of a batch
    stops on its own. ``seed`` makes sampling reproducible (its own torch.Generator).
    ``streamer``: an object with ``put(token_ids)``/``end()`` (transformers' protocol).
    ``logprobs``/``top_logprobs=k``: log-probabilities of each chosen token and its k
    most likely alternatives under the model (before any processing).
    ``context_overflow``: "stop" (default: finish_reason "length" with a warning when the
    context is full) or "slide" (keep the last half of the context, re-encoded, and go on).
    ``kv_dtype``: the KV cache's storage type (None: the model's; "bf16" / "fp16" store a
    float32 model's keys and values in half the bytes; see ``KVCache``).
    """
    prompts, kind = _prompts(model, input_ids, attention_mask)
    opts = sampling_options(model, [len(p) for p in prompts], max_new_tokens, max_length, do_sample, temperature, top_k,
                    top_p, repetition_penalty, stop, eos_token_id, tokenizer, logprobs, top_logprobs,
                    context_overflow, min_p=min_p)
    warn_unused_sampling(do_sample, temperature, top_k, top_p, min_p)
    gen = _Generation(model, prompts, opts, seed, tokenizer, kv_dtype)
    if streamer is not None:
        streamer.put(input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(prompts[0]))
    with _no_cyclic_gc():
        for events in _steps(gen):
            if streamer is not None:
                streamer.put(torch.tensor([e[0] if e else (pad_token_id or 0) for e in events]))
    if streamer is not None:
        streamer.end()
    return _result(gen, input_ids, kind, pad_token_id, return_dict_in_generate, tokenizer)


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off for the loop: a decode step allocates a few hundred
    short-lived objects, which refcounting frees, yet they trigger collections that walk every
    object the program holds (the model's modules and tensors), about a tenth of a small model's
    step. Cycles made meanwhile are collected once it is back on."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _result(gen, input_ids, kind, pad_token_id, as_dict, tokenizer):
    rows = gen.rows
    if kind == "tensor2":
        if pad_token_id is None:
            pad_token_id = min(gen.opts.eos) if gen.opts.eos else 0
        n = max(len(r.tokens) for r in rows)
        new = torch.full((len(rows), n), pad_token_id, dtype=input_ids.dtype)
        for b, r in enumerate(rows):
            new[b, :len(r.tokens)] = torch.tensor(r.tokens, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids.cpu(), new], dim=1).to(input_ids.device)
    elif kind == "tensor1":
        sequences = torch.cat([input_ids.cpu(), torch.tensor(rows[0].tokens, dtype=input_ids.dtype)]).to(input_ids.device)
    elif kind == "list1":
        sequences = rows[0].prompt + rows[0].tokens
    else:
        sequences = [r.prompt + r.tokens for r in rows]
    if not as_dict:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        tokens=[r.tokens for r in rows],
        finish_reasons=[r.reason for r in rows],
        texts=[r.text.text for r in rows] if tokenizer is not None else None,
        logprobs=[r.logprobs for r in rows] if gen.opts.logprobs else None,
        top_logprobs=[r.top for r in rows] if gen.opts.top_logprobs else None,
    )


def encode_prompt(tokenizer, text) -> list:
    """The ids of a prompt string, which must encode to at least one token."""
    if not isinstance(text, str):
        raise TypeError(f"prompts must be strings, got {type(text).__name__}")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("empty prompt: the text encodes to no tokens")
    return ids


def _is_ids(prompt) -> bool:
    """Whether ``prompt`` is one prompt of token ids: a non-empty list or tuple of ints."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in prompt)


def stream(model, tokenizer, prompt, max_new_tokens: int | None = None, **kwargs) -> Iterator:
    """Generate and yield text as it is settled: ``for delta in stream(model, tok, "Hi"): ...``

    A multi-byte character split across tokens is yielded only whole, and text that could be
    the start of a stop string is held back until decided, so ``"".join(deltas)`` equals the
    final text. ``prompt`` a list of strings: yields, per step, a list of deltas (one per
    prompt, "" when nothing new); a list of token ids is one prompt already encoded (a chat
    prompt whose template's special tokens are ids). Keyword arguments are those of
    ``generate`` (``eos_token_id`` defaults to the tokenizer's ``eot_token``, then the model's)."""
    if _is_ids(prompt):
        batch, prompts = False, _prompts(model, list(prompt), None)[0]  # checked against the vocabulary
    else:
        batch = not isinstance(prompt, str)
        texts = list(prompt) if batch else [prompt]
        if not texts:
            raise ValueError("stream: no prompts given")
        prompts = [encode_prompt(tokenizer, t) for t in texts]
    eot = getattr(tokenizer, "eot_token", None)
    if kwargs.get("eos_token_id") is None and model.config.eos_token_id is None and eot is not None \
            and 0 <= eot < model.config.vocab_size:  # an id past the model's vocabulary is never generated
        kwargs["eos_token_id"] = eot
    gen_args = dict(kwargs)
    seed = gen_args.pop("seed", None)
    kv_dtype = gen_args.pop("kv_dtype", None)
    for bad in ("streamer", "attention_mask", "return_dict_in_generate", "pad_token_id", "tokenizer"):
        if bad in gen_args:
            raise TypeError(f"stream() does not take {bad!r}")
    sampling = {k: gen_args.pop(k, d) for k, d in (("do_sample", False), ("temperature", 1.0), ("top_k", None),
                                                     ("top_p", None), ("min_p", None))}
    opts = sampling_options(model, [len(p) for p in prompts], max_new_tokens, gen_args.pop("max_length", None),
                    sampling["do_sample"], sampling["temperature"], sampling["top_k"], sampling["top_p"],
                    gen_args.pop("repetition_penalty", 1.0), gen_args.pop("stop", None),
                    gen_args.pop("eos_token_id", None), tokenizer, gen_args.pop("logprobs", False),
                    gen_args.pop("top_logprobs", 0), gen_args.pop("context_overflow", "stop"), min_p=sampling["min_p"])
    if gen_args:
        raise TypeError(f"stream() got unexpected keyword arguments {sorted(gen_args)}")
    warn_unused_sampling(*sampling.values())
    gen = _Generation(model, prompts, opts, seed, tokenizer, kv_dtype)
    for events in _steps(gen):
        deltas = [e[1] if e else "" for e in events]
        if batch:
            if any(deltas):
                yield deltas
        elif deltas[0]:
            yield deltas[0]
