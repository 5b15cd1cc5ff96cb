"""Choosing tokens: the validated options of a request and the one token picker.

Generation (``fastlm.generation.generate``) and the server's engine
(``fastlm.generation.engine``) both choose through ``process_logits`` and ``choose``:

1. **Processing.** ``logit_bias`` (OpenAI's) added to the raw logits, the repetition penalty
   (Hugging Face's, over the ids of prompt and output), the presence and frequency penalties
   (OpenAI's, over the generated ids), then, for sampling, temperature, top-k, top-p and
   min-p, in Hugging Face's order.
2. **Choosing.** Greedy takes the argmax (also when the temperature is below
   ``GREEDY_TEMPERATURE``, as vLLM rules, where dividing by it would overflow). Sampling draws
   by inverse CDF: one uniform number per row from that row's own ``torch.Generator``
   (``row_generator``: the request's seed and the row's index within it), then one batched
   search, so a seed gives the same tokens whatever else shares the batch. A row whose
   processed logits hold no finite maximum falls back to the argmax of its raw logits
   instead of drawing from NaNs. Ids the tokenizer cannot decode (``undecodable_ids``) are
   masked out by the callers before processing.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..tokenizer import token_bytes_fn

__all__ = ["GREEDY_TEMPERATURE", "SamplingOptions", "sampling_options", "warn_unused_sampling", "process_logits",
           "processes_greedy", "argmax", "choose", "row_generator", "undecodable_ids"]

# Temperatures below this decode greedily (vLLM's rule): logits divided by a smaller one can
# overflow to infinity and turn the softmax into NaNs.
GREEDY_TEMPERATURE = 1e-5


# ----------------------------------------------------------------------------- options
@dataclass
class SamplingOptions:
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


def sampling_options(model, prompt_lens, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
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
    return SamplingOptions(max_new_tokens, bool(do_sample) and temperature >= GREEDY_TEMPERATURE, float(temperature), top_k,
                    None if top_p is None else float(top_p), float(repetition_penalty), frozenset(eos),
                    stop_strings, stop_seqs, bool(logprobs) or top_logprobs > 0, top_logprobs, context_overflow,
                    float(min_p) if min_p else None, float(presence_penalty), float(frequency_penalty),
                    logit_bias or None)


def warn_unused_sampling(do_sample, temperature, top_k, top_p, min_p=None):
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


# ----------------------------------------------------------------------------- choosing
def process_logits(logits, seen, opts, counts=None, bias=None):
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


def processes_greedy(opts) -> bool:
    """Whether any processor changes the logits of a greedy choice (the sampling-only ones do not)."""
    return (opts.repetition_penalty != 1.0 or bool(opts.presence_penalty) or bool(opts.frequency_penalty)
            or bool(opts.logit_bias))


def argmax(logits):
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


def unusable_rows(total):
    """Rows whose probabilities cannot be drawn from: their sum (``total``) is NaN, as the
    softmax makes it of a row with a NaN, a +inf, or nothing but -inf."""
    return ~torch.isfinite(total) | (total <= 0)


def row_generator(seed: int, index: int, device) -> torch.Generator:
    """The generator of row ``index`` of a request seeded with ``seed``: each row draws its own
    stream, the same whichever rows it is batched with."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + index) % 2**63)


def choose(logits, opts: SamplingOptions, generators, raw=None) -> torch.Tensor:
    """One id per row of processed ``logits`` (R, V): the argmax, or, for sampling, a draw
    from their softmax with one uniform number from ``generators[r]`` (None: torch's global
    generator) per row. A row that cannot be drawn from takes the argmax of its ``raw``
    logits (default ``logits``)."""
    if not opts.sampling:
        return argmax(logits)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device if g is None else g.device)
                   for g in generators]).to(logits.device)
    x = (u * cdf[:, -1]).unsqueeze(-1)
    chosen = torch.searchsorted(cdf, x.to(cdf.dtype), right=True).clamp_(max=logits.shape[-1] - 1).view(-1)
    bad = unusable_rows(cdf[:, -1])
    if bad.any():  # NaN probabilities: such a row takes the argmax of its raw logits instead
        chosen[bad] = argmax((logits if raw is None else raw)[bad]).to(chosen.device)
    return chosen


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
