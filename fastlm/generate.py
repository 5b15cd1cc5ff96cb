"""Text generation: a preallocated KV cache, sampling, stop conditions, streaming, scoring.

How a call runs:

1. **Prefill.** The prompts (any lengths) run in one pass without padding: the per-token work
   (norms, projections, MLP) runs on all their tokens packed into one (N, C) matrix, and
   attention runs prompt by prompt over its own keys. Every layer writes its keys and values
   into the cache, row b at positions 0..len_b - 1, and the logits of each prompt's last
   token give its first new token.
2. **Decode.** Each step feeds one token per sequence at position ``lens[b]``: the layers
   write its key/value at that position of their preallocated cache (in place, nothing is
   reallocated) and attend with ``fastlm.ops.decode_attention`` over the valid prefix
   ``cache_lens = lens + 1`` only, so sequences of different lengths share a batch without
   any padding being attended.
3. **Choosing.** Logits pass through Hugging Face's processors in its order (repetition
   penalty, temperature, top-k, top-p, min-p); greedy takes the argmax (also when the
   temperature is below ``GREEDY_TEMPERATURE``, as vLLM rules, where dividing by it would
   overflow). Ids the tokenizer cannot decode (a vocabulary padded past the tokenizer's, holes
   in its ranks) are never chosen, and a row whose processed logits hold no finite maximum
   falls back to the argmax of its raw logits instead of drawing from NaNs.
4. **Stopping.** Each sequence stops on its own: an EOS token, a stop string (matched on the
   decoded text), ``max_new_tokens``, or the model's context (``finish_reason="length"``, with
   a warning; ``context_overflow="slide"`` keeps generating from the last half of the context
   instead, re-encoded).

Text comes out through ``_TextStream``: bytes are decoded incrementally (a character split
across tokens is emitted only when complete) and text that might begin a stop string is held
back until it is decided, so the concatenated deltas of ``stream`` equal the final text.
"""
from __future__ import annotations

import codecs
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from .model import apply_rope
from .tokenizer import token_bytes_fn

__all__ = ["KVCache", "GenerateOutput", "generate", "stream", "score", "loglikelihood", "GREEDY_TEMPERATURE"]

# Temperatures below this decode greedily (vLLM's rule): logits divided by a smaller one can
# overflow to infinity and turn the softmax into NaNs.
GREEDY_TEMPERATURE = 1e-5


# ----------------------------------------------------------------------------- the cache
class _LayerCache:
    """One layer's keys and values: ``k``, ``v`` (B, Hkv, L, D), views of the cache's storage."""

    __slots__ = ("k", "v")

    def __init__(self, cache: "KVCache", i: int):
        self.k, self.v = cache.kv[i, 0], cache.kv[i, 1]  # (B, Hkv, L, D), contiguous views


class KVCache:
    """Keys and values of every layer for B sequences of up to ``max_len`` tokens, allocated
    once as one (n_layer, 2, B, Hkv, max_len, D) tensor; ``lens[b]`` tokens of row b are valid."""

    def __init__(self, model, batch_size: int, max_len: int, dtype=None, device=None):
        cfg = model.config
        if max_len < 1 or max_len > cfg.block_size:
            raise ValueError(f"KVCache: max_len must be in [1, {cfg.block_size}], got {max_len}")
        p = model.transformer.wte.weight
        self.model = model
        self.max_len = max_len
        # Not zeroed: attention reads a row only below its length, whatever lies past it (a
        # batch-8 cache of the small bench model is 12.6 MB, ~3 ms to zero).
        self.kv = torch.empty(cfg.n_layer, 2, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                              dtype=dtype or p.dtype, device=device or p.device)
        self.lens = [0] * batch_size
        self._layers = [_LayerCache(self, i) for i in range(cfg.n_layer)]
        self.decoder = None

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> torch.Tensor:
        """Encode whole prompts into (empty or reset) rows in one pass; returns the logits
        (R, vocab) of each prompt's last token. ``rows`` defaults to all rows."""
        lengths = [len(p) for p in prompts]
        rows = list(range(len(self.lens))) if rows is None else list(rows)
        if len(rows) != len(prompts):
            raise ValueError(f"KVCache.prefill: {len(prompts)} prompts for {len(rows)} rows")
        if min(lengths) < 1 or max(lengths) > self.max_len:
            raise ValueError(f"KVCache.prefill: prompt lengths must be in [1, {self.max_len}], got {lengths}")
        if self.decoder is None:
            self.decoder = _decoder(self.model)
        logits = self.decoder.prefill(prompts, rows, self)
        for r, n in zip(rows, lengths):
            self.lens[r] = n
        return logits

    def decode(self, tokens: torch.Tensor, advance: Sequence[bool]) -> torch.Tensor:
        """Feed one token per row (tokens (B,)) at position lens[b]; returns logits (B, vocab).
        Rows with advance[b] False (finished ones) are computed but their length stays."""
        L = self.max_len
        pos = [min(n, L - 1) for n in self.lens]
        device = self.kv.device
        p = torch.tensor(pos, dtype=torch.long, device=device)
        lens = torch.tensor([q + 1 for q in pos], dtype=torch.long, device=device)
        if self.decoder is None:
            self.decoder = _decoder(self.model)
        logits = self.decoder.step(tokens, p, lens, self)
        for b, a in enumerate(advance):
            if a:
                self.lens[b] += 1
        return logits


# ----------------------------------------------------------------------------- the decode step
class _Decoder:
    """One decode step (one token per sequence) written out with the model's weights, lean for
    the per-token loop, the op implementations chosen once. The projection weights are kept in
    the layout their product reads fastest: packed into column panels for the CPU kernel
    of ``ops.decode_linear`` (one sequential read of each weight for all rows), else
    transposed, (in, out), for BLAS. It computes exactly the model's forward (checked in tests
    against the full forward). Built lazily per model, rebuilt when its weights change."""

    def __init__(self, model):
        cfg = model.config
        self.cfg = cfg
        t = model.transformer
        w = t.wte.weight
        self.dtype, self.device = w.dtype, w.device
        backend, self._linear = ops.resolve("decode_linear", w.device, w.dtype)
        self.packed = backend != "reference"
        self.wte = w
        self.wpe = t["wpe"].weight if "wpe" in t else None
        self.rope = (model.rope_cos, model.rope_sin) if cfg.pos == "rope" else None
        self.head = self._weights(model.lm_head)
        self.layers = []
        for blk in t.h:
            a, m = blk.attn, blk.mlp
            lin = self._weights
            self.layers.append((
                _norm_args(blk.ln_1), lin(a.c_attn), lin(a.c_proj), _norm_args(blk.ln_2),
                lin(m.c_fc), lin(m.c_gate) if cfg.mlp == "swiglu" else None, lin(m.c_proj),
            ))
        self.ln_f = _norm_args(t.ln_f)
        norm = "layer_norm" if cfg.norm == "layernorm" else "rms_norm"
        self._norm = ops.resolve(norm, w.device, w.dtype)[1]
        self._gelu = ops.resolve("gelu", w.device, w.dtype)[1]
        self._attend = ops.resolve("decode_attention", w.device, w.dtype)[1]
        self._write_kv = ops.resolve("kv_cache_write", w.device, w.dtype)[1]
        self.key = _weights_key(model)

    def _weights(self, linear):
        """(weight in the layout ``linear`` reads, bias or None, out features)."""
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if self.packed:
            return ops.pack_decode_weight(weight), bias, weight.shape[0]
        return weight.t().contiguous(), bias, weight.shape[0]

    def norm(self, args, x, residual=None):
        weight, bias, eps = args
        if self.cfg.norm == "layernorm":
            return self._norm(x, weight, bias, eps, residual)
        return self._norm(x, weight, eps, residual)

    def block_input(self, args, h, delta):
        """The norm that opens a block (or the final one) over the residual stream h + delta
        (delta None before the first block): (normed input, the new stream)."""
        if delta is None:
            return self.norm(args, h), h
        return self.norm(args, delta, h)

    def linear(self, x, wb):
        w, b, n = wb
        if self.packed:
            return self._linear(x, w, b, n)
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)

    def prefill(self, prompts, rows, cache: KVCache):
        """Prompts of any lengths in one pass, without padding: the per-token work runs on all
        their tokens packed into one (N, C) matrix; attention runs prompt by prompt
        (``ops.attention``, causal) and each prompt's keys and values go to its cache row at
        positions 0..len - 1. Returns the logits (R, vocab) of each prompt's last token."""
        cfg, device = self.cfg, self.device
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        nq, nk = H * D, Hkv * D
        lengths = [len(p) for p in prompts]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        x = F.embedding(ids, self.wte)
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        segments = list(zip(rows, starts, lengths))
        h, delta = x, None
        for i, (ln1, qkv_w, proj_w, ln2, fc_w, gate_w, out_w) in enumerate(self.layers):
            y, h = self.block_input(ln1, h, delta)
            qkv = self.linear(y, qkv_w)
            att = torch.empty(qkv.shape[0], nq, dtype=qkv.dtype, device=device)
            lc = cache._layers[i]
            for row, s0, n in segments:
                seg = qkv[s0:s0 + n]
                q = seg[:, :nq].view(n, H, D).transpose(0, 1).unsqueeze(0)
                k = seg[:, nq:nq + nk].view(n, Hkv, D).transpose(0, 1).unsqueeze(0)
                v = seg[:, nq + nk:].view(n, Hkv, D).transpose(0, 1).unsqueeze(0)
                if self.rope is not None:
                    cos, sin = self.rope[0][:n], self.rope[1][:n]
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                lc.k[row, :, :n] = k[0]
                lc.v[row, :, :n] = v[0]
                att[s0:s0 + n].view(n, H, D).copy_(ops.attention(q, k, v, causal=True)[0].transpose(0, 1))
            y, h = self.norm(ln2, self.linear(att, proj_w), h)
            if gate_w is not None:
                hid = F.silu(self.linear(y, gate_w)) * self.linear(y, fc_w)
            else:
                hid = self._gelu(self.linear(y, fc_w))
            delta = self.linear(hid, out_w)
        last = torch.tensor([s0 + n - 1 for _, s0, n in segments], device=device)
        y = self.block_input(self.ln_f, h[last], None if delta is None else delta[last])[0]
        return self.linear(y, self.head)

    def step(self, tokens, positions, attend_lens, cache: KVCache):
        cfg = self.cfg
        B = tokens.shape[0]
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        nq, nk = H * D, Hkv * D
        x = F.embedding(tokens, self.wte)
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        if self.rope is not None:
            cos, sin = self.rope[0][positions].unsqueeze(1), self.rope[1][positions].unsqueeze(1)
        h, delta = x, None
        for i, (ln1, qkv_w, proj_w, ln2, fc_w, gate_w, out_w) in enumerate(self.layers):
            y, h = self.block_input(ln1, h, delta)
            qkv = self.linear(y, qkv_w)
            q = qkv[:, :nq].view(B, H, 1, D)
            k = qkv[:, nq:nq + nk].view(B, Hkv, D)
            v = qkv[:, nq + nk:].view(B, Hkv, D)
            if self.rope is not None:
                q = apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1))
                k = apply_rope(k, cos, sin)
            lc = cache._layers[i]
            self._write_kv(lc.k, lc.v, k, v, positions)
            att = self._attend(q, lc.k, lc.v, attend_lens)
            y, h = self.norm(ln2, self.linear(att.view(B, nq), proj_w), h)
            if gate_w is not None:
                hid = F.silu(self.linear(y, gate_w)) * self.linear(y, fc_w)
            else:
                hid = self._gelu(self.linear(y, fc_w))
            delta = self.linear(hid, out_w)
        return self.linear(self.block_input(self.ln_f, h, delta)[0], self.head)


def _norm_args(norm):
    return (norm.weight.detach(), None if norm.bias is None else norm.bias.detach(), norm.eps)


def _weights_key(model):
    return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder(model) -> _Decoder:
    d = _DECODERS.get(model)
    if d is None or d.key != _weights_key(model):
        d = _DECODERS[model] = None  # free the stale copy before building the new one
        d = _DECODERS[model] = _Decoder(model)
    return d


# ----------------------------------------------------------------------------- choosing tokens
def _process_logits(logits, seen, opts, counts=None, bias=None):
    """The processors in order: ``bias`` added to the raw logits (OpenAI's logit_bias), the
    repetition penalty over the ids in ``seen`` (Hugging Face's: prompt and output), the
    presence and frequency penalties over ``counts`` (OpenAI's: how often each id was
    generated), then, for sampling, temperature, top-k, top-p and min-p (Hugging Face's order)."""
    if bias is not None:
        logits = logits + bias
    if opts.repetition_penalty != 1.0:
        pen = torch.where(logits > 0, logits / opts.repetition_penalty, logits * opts.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if counts is not None and (opts.presence_penalty or opts.frequency_penalty):
        logits = logits - opts.frequency_penalty * counts - opts.presence_penalty * (counts > 0).to(logits.dtype)
    if not opts.sampling:
        return logits
    if opts.temperature != 1.0:
        logits = logits / opts.temperature
    if opts.top_k is not None and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - opts.top_p
        drop[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if opts.min_p:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < opts.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def _processes_greedy(opts) -> bool:
    """Whether any processor changes the logits of a greedy choice (the sampling-only ones do not)."""
    return (opts.repetition_penalty != 1.0 or bool(opts.presence_penalty) or bool(opts.frequency_penalty)
            or bool(opts.logit_bias))


def _argmax(logits):
    """Row-wise argmax, the first index on ties, NaNs counted as -inf. On the CPU numpy's
    vectorised argmax serves (torch's takes ~10x longer over a (8, 8192) batch of logits: 57
    against 6 microseconds). An argmax stops at the first NaN of its row, so a NaN among the
    chosen values shows the rows to take again without their NaNs."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        a = logits.numpy()
        idx = a.argmax(-1)
        if np.isnan(np.take_along_axis(a, idx[..., None], -1)).any():
            idx = np.nan_to_num(a, nan=-np.inf).argmax(-1)
        return torch.from_numpy(idx)
    idx = logits.argmax(dim=-1)
    if torch.isnan(logits.gather(-1, idx.unsqueeze(-1))).any():
        idx = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
    return idx


def _unusable_rows(total):
    """Rows whose probabilities cannot be drawn from: their sum (``total``) is NaN, as the
    softmax makes it of a row with a NaN, a +inf, or nothing but -inf."""
    return ~torch.isfinite(total) | (total <= 0)


def _choose(logits, opts, generator, raw=None):
    """One id per row of processed ``logits``: the argmax, or a draw from their softmax; a row
    that cannot be drawn from takes the argmax of its ``raw`` logits (default ``logits``)."""
    if not opts.sampling:
        return _argmax(logits)
    probs = torch.softmax(logits, dim=-1)
    bad = _unusable_rows(probs.sum(dim=-1))
    if bad.any():
        fallback = _argmax((logits if raw is None else raw)[bad]).to(probs.device)
        probs[bad] = F.one_hot(fallback, probs.shape[-1]).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_UNDECODABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def undecodable_ids(tokenizer, vocab_size: int) -> list:
    """The ids in [0, vocab_size) that ``tokenizer`` cannot turn into bytes: a model vocabulary
    padded past the tokenizer's, or holes in its ranks. Generation never chooses them (their
    text could not be shown). Probed once per tokenizer and size (a 100k vocabulary takes
    under a tenth of a second)."""
    try:
        cache = _UNDECODABLE.setdefault(tokenizer, {})
    except TypeError:  # an object that takes no weak reference: probed on every call
        cache = {}
    if vocab_size not in cache:
        token_bytes = token_bytes_fn(tokenizer)
        bad = []
        for i in range(vocab_size):
            try:
                token_bytes(i)
            except Exception:  # each tokenizer has its own error for an unknown id
                bad.append(i)
        cache[vocab_size] = bad
    return cache[vocab_size]


# ----------------------------------------------------------------------------- text
class _TextStream:
    """Incremental detokenizer for one sequence: UTF-8 completed before emission, text that may
    start a stop string held back until decided. ``push`` returns the newly settled text."""

    def __init__(self, token_bytes, stop: Sequence[str] = ()):
        self._bytes = token_bytes
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""  # decoded, not yet emitted
        self.pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(self._bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._dec.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, hold = self._pending, 0
        if self._stop:
            hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if hits:
                out = text[:min(hits)]
                self._pending, self.stopped = "", True
                self.pieces.append(out)
                return out
            if not final:  # longest tail of the text that begins some stop string
                for s in self._stop:
                    for k in range(min(len(s) - 1, len(text)), hold, -1):
                        if text.endswith(s[:k]):
                            hold = k
                            break
        out = text[:len(text) - hold]
        self._pending = text[len(text) - hold:]
        if out:
            self.pieces.append(out)
        return out


# ----------------------------------------------------------------------------- options
@dataclass
class _Options:
    max_new_tokens: int
    sampling: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    eos: frozenset
    stop_strings: tuple
    stop_token_seqs: tuple
    logprobs: bool
    top_logprobs: int
    overflow: str
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None  # {token id: value added to its logit}


def _as_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _options(model, prompt_lens, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
             repetition_penalty, stop, eos_token_id, tokenizer, logprobs, top_logprobs, context_overflow, *,
             min_p=None, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None):
    if max_new_tokens is None:
        max_new_tokens = 20 if max_length is None else max(0, _as_int("max_length", max_length, 1) - max(prompt_lens))
    max_new_tokens = _as_int("max_new_tokens", max_new_tokens, 0)
    if not _finite(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None:
        top_k = _as_int("top_k", top_k, 0) or None  # 0 disables top-k, as in Hugging Face
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _finite(repetition_penalty) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be a number > 0, got {repetition_penalty!r}")
    if min_p is not None and (not _finite(min_p) or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    for name, v in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _finite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if context_overflow not in ("stop", "slide"):
        raise ValueError(f"context_overflow must be 'stop' or 'slide', got {context_overflow!r}")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    V = model.config.vocab_size
    for e in eos:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < V:
            raise ValueError(f"eos_token_id must be token ids in [0, {V}), got {eos_token_id!r}")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    stop_strings = tuple(s for s in stop if isinstance(s, str))
    stop_seqs = tuple(tuple(s) for s in stop if not isinstance(s, str))
    if any(s == "" for s in stop_strings) or any(len(s) == 0 for s in stop_seqs):
        raise ValueError("stop strings and stop token sequences must not be empty")
    if any(not all(isinstance(t, int) for t in s) for s in stop_seqs):
        raise TypeError("stop must be strings or sequences of token ids")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=...)")
    top_logprobs = _as_int("top_logprobs", top_logprobs or 0, 0)
    if logit_bias:
        if not isinstance(logit_bias, dict) or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k < V and _finite(v)
                for k, v in logit_bias.items()):
            raise ValueError(f"logit_bias must map token ids in [0, {V}) to finite numbers")
        logit_bias = {int(k): float(v) for k, v in logit_bias.items()}
    return _Options(max_new_tokens, bool(do_sample) and temperature >= GREEDY_TEMPERATURE, float(temperature), top_k,
                    None if top_p is None else float(top_p), float(repetition_penalty), frozenset(eos),
                    stop_strings, stop_seqs, bool(logprobs) or top_logprobs > 0, top_logprobs, context_overflow,
                    float(min_p) if min_p else None, float(presence_penalty), float(frequency_penalty),
                    logit_bias or None)


def _warn_unused_sampling(do_sample, temperature, top_k, top_p, min_p=None):
    """transformers' rule: options of sampling given with do_sample=False are not used, and a
    warning says so (a temperature of 0 asks for greedy decoding and is not warned about)."""
    if do_sample:
        return
    unused = [f"{name}={v!r}" for name, v, neutral in (("temperature", temperature, (0, 1)),
                                                        ("top_k", top_k, (None, 0)), ("top_p", top_p, (None, 1)),
                                                        ("min_p", min_p, (None, 0)))
              if v not in neutral]
    if unused:
        warnings.warn(f"do_sample is False, so {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: "
                      "decoding is greedy. Pass do_sample=True to sample with them.", UserWarning, stacklevel=3)


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
    text: _TextStream | None = None
    logprobs: list = field(default_factory=list)
    top: list = field(default_factory=list)
    context: list | None = None  # the tokens in the cache (sliding window only)


class _Generation:
    """Runs the prefill/decode loop one step at a time (each step under inference_mode, so
    that a paused stream never leaks the mode to the caller)."""

    def __init__(self, model, prompts, opts: _Options, seed, tokenizer):
        self.model, self.opts = model, opts
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
        self.rows = [_Row(list(p), text=_TextStream(tb, opts.stop_strings) if tb else None) for p in prompts]
        self.device = model.transformer.wte.weight.device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
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
        self.cache = KVCache(self.model, len(rows), self.max_len)
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
        logits = _process_logits(raw, self.seen, opts)
        tok = _choose(logits, opts, self.generator, raw)
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
            delta = ""
            if t in opts.eos:
                r.done, r.reason = True, "stop"
            else:
                if r.text is not None:
                    delta = r.text.push(t)
                    if r.text.stopped:
                        r.done, r.reason = True, "stop"
                if not r.done and any(len(r.tokens) >= len(s) and tuple(r.tokens[-len(s):]) == s
                                      for s in opts.stop_token_seqs):
                    r.done, r.reason = True, "stop"
            if not r.done and len(r.tokens) >= opts.max_new_tokens:
                r.done, r.reason = True, "length"
            if not r.done and opts.overflow == "stop" and len(r.prompt) + len(r.tokens) >= self.block:
                r.done, r.reason = True, "length"
                if not self.warned:
                    self.warned = True
                    warnings.warn(f"generation reached the model's context of {self.block} tokens before "
                                  f"max_new_tokens; finish_reason='length' (context_overflow='slide' keeps going)",
                                  stacklevel=4)
            if r.done and r.text is not None:
                delta += r.text.finish()
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
             min_p: float | None = None):
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
    """
    prompts, kind = _prompts(model, input_ids, attention_mask)
    opts = _options(model, [len(p) for p in prompts], max_new_tokens, max_length, do_sample, temperature, top_k,
                    top_p, repetition_penalty, stop, eos_token_id, tokenizer, logprobs, top_logprobs,
                    context_overflow, min_p=min_p)
    _warn_unused_sampling(do_sample, temperature, top_k, top_p, min_p)
    gen = _Generation(model, prompts, opts, seed, tokenizer)
    if streamer is not None:
        streamer.put(input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(prompts[0]))
    for events in _steps(gen):
        if streamer is not None:
            streamer.put(torch.tensor([e[0] if e else (pad_token_id or 0) for e in events]))
    if streamer is not None:
        streamer.end()
    return _result(gen, input_ids, kind, pad_token_id, return_dict_in_generate, tokenizer)


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


def _encode(tokenizer, text):
    if not isinstance(text, str):
        raise TypeError(f"prompts must be strings, got {type(text).__name__}")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("empty prompt: the text encodes to no tokens")
    return ids


def stream(model, tokenizer, prompt, max_new_tokens: int | None = None, **kwargs) -> Iterator:
    """Generate and yield text as it is settled: ``for delta in stream(model, tok, "Hi"): ...``

    A multi-byte character split across tokens is yielded only whole, and text that could be
    the start of a stop string is held back until decided, so ``"".join(deltas)`` equals the
    final text. ``prompt`` a list of strings: yields, per step, a list of deltas (one per
    prompt, "" when nothing new). Keyword arguments are those of ``generate`` (``eos_token_id``
    defaults to the tokenizer's ``eot_token``, then the model's)."""
    batch = not isinstance(prompt, str)
    texts = list(prompt) if batch else [prompt]
    if not texts:
        raise ValueError("stream: no prompts given")
    prompts = [_encode(tokenizer, t) for t in texts]
    eot = getattr(tokenizer, "eot_token", None)
    if kwargs.get("eos_token_id") is None and model.config.eos_token_id is None and eot is not None \
            and 0 <= eot < model.config.vocab_size:  # an id past the model's vocabulary is never generated
        kwargs["eos_token_id"] = eot
    gen_args = dict(kwargs)
    seed = gen_args.pop("seed", None)
    for bad in ("streamer", "attention_mask", "return_dict_in_generate", "pad_token_id", "tokenizer"):
        if bad in gen_args:
            raise TypeError(f"stream() does not take {bad!r}")
    sampling = {k: gen_args.pop(k, d) for k, d in (("do_sample", False), ("temperature", 1.0), ("top_k", None),
                                                     ("top_p", None), ("min_p", None))}
    opts = _options(model, [len(p) for p in prompts], max_new_tokens, gen_args.pop("max_length", None),
                    sampling["do_sample"], sampling["temperature"], sampling["top_k"], sampling["top_p"],
                    gen_args.pop("repetition_penalty", 1.0), gen_args.pop("stop", None),
                    gen_args.pop("eos_token_id", None), tokenizer, gen_args.pop("logprobs", False),
                    gen_args.pop("top_logprobs", 0), gen_args.pop("context_overflow", "stop"), min_p=sampling["min_p"])
    if gen_args:
        raise TypeError(f"stream() got unexpected keyword arguments {sorted(gen_args)}")
    _warn_unused_sampling(*sampling.values())
    gen = _Generation(model, prompts, opts, seed, tokenizer)
    for events in _steps(gen):
        deltas = [e[1] if e else "" for e in events]
        if batch:
            if any(deltas):
                yield deltas
        elif deltas[0]:
            yield deltas[0]


# ----------------------------------------------------------------------------- scoring
def _ids(tokenizer, x):
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer (pass tokenizer=...)")
        return list(tokenizer.encode(x))
    return [int(t) for t in x]


@torch.inference_mode()
def _token_logprobs(model, context: list, targets: list) -> tuple[list, list]:
    """log p(targets[i] | context + targets[:i]) and whether each target is the argmax; the
    input is cut from the left to the model's context when too long."""
    seq = (context + targets)[:-1]
    n = len(targets)
    block = model.config.block_size
    if len(seq) > block:
        if n > block:
            raise ValueError(f"continuation of {n} tokens exceeds the model's context of {block}")
        seq = seq[-block:]
    logits = model(torch.tensor([seq], device=model.device))[0, -n:].float()
    lp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(targets, device=lp.device)
    return lp.gather(-1, tgt.view(-1, 1)).squeeze(-1).tolist(), (lp.argmax(-1) == tgt).tolist()


def loglikelihood(model, context, continuation, tokenizer=None) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it), as the
    evaluation harnesses define it. context/continuation: strings (with ``tokenizer``) or ids;
    an empty context is the tokenizer's ``eot_token`` (or the model's BOS/EOS)."""
    ctx, cont = _ids(tokenizer, context), _ids(tokenizer, continuation)
    if not cont:
        raise ValueError("loglikelihood: the continuation is empty")
    if not ctx:
        ctx = [_start_token(model, tokenizer)]
    lps, greedy = _token_logprobs(model, ctx, cont)
    return float(sum(lps)), bool(all(greedy))


def _start_token(model, tokenizer):
    for t in (getattr(tokenizer, "eot_token", None), model.config.bos_token_id, model.config.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("an empty context needs a start token: the tokenizer's eot_token or the model's bos/eos id")


@dataclass
class Score:
    """What ``score`` returns: the tokens of the text and the log-probability of each."""

    token_ids: list
    logprobs: list

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total / max(len(self.logprobs), 1))


def score(model, text, tokenizer=None) -> Score:
    """Log-probability of every token of ``text`` (a string with ``tokenizer``, or ids), the
    first conditioned on the start token (the tokenizer's eot_token), texts longer than the
    context in consecutive windows (each token sees the tokens of its window before it)."""
    ids = _ids(tokenizer, text)
    if not ids:
        raise ValueError("score: the text is empty")
    start = _start_token(model, tokenizer)
    block = model.config.block_size
    out = []
    for i in range(0, len(ids), block):
        ctx = [start] if i == 0 else [ids[i - 1]]
        out += _token_logprobs(model, ctx, ids[i:i + block])[0]
    return Score(ids, out)
