"""Attention: ``attention`` (causal or full, grouped-query) and ``decode_attention`` (the newest
tokens over a ragged KV cache): the public ops, their checks, and the one autograd glue of
their kernels.

The kernels (csrc/cpu/attention.cpp, csrc/cuda/attention.cu, kernels/attention.py) are the
custom ops ``attention_fwd`` -> (out, lse), ``attention_bwd`` and ``decode_attention`` in the
namespaces ``fastlm`` and ``fastlm_triton`` (see ``_forms``). The forward saves q, k, v, out
and the per-row logsumexp; the backward recomputes the probabilities from them.
"""
from __future__ import annotations

import math

import torch

from . import _autocast, _forms
from ._checks import check_float, check_index, check_same
from ._dispatch import resolve

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused kernels take


# ----------------------------------------------------------------------------- the public ops
def _check_attention(q, k, v, kv_name="k", kv_dtypes=None):
    """kv_dtypes: the dtypes k and v may have besides q's (a KV cache stored narrower than q);
    None: q's only."""
    vn = kv_name.replace("k", "v", 1)
    for n, t in (("q", q), (kv_name, k), (vn, v)):
        check_float(n, t)
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
    if kv_dtypes is None or k.dtype == q.dtype:
        check_same(kv_name, k, "q", q)
    elif k.dtype not in kv_dtypes:
        raise TypeError(f"attention: {kv_name} has dtype {k.dtype}; it must be q's ({q.dtype}) or one of "
                        f"{', '.join(str(d) for d in kv_dtypes)}")
    else:
        check_same(kv_name, k, "q", q, dtype=False)
    check_same(vn, v, kv_name, k)
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: {kv_name} {tuple(k.shape)} and {vn} {tuple(v.shape)} must have one shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and {kv_name} {tuple(k.shape)} must agree on batch size and head size"
        )
    hkv = k.shape[1]
    if hkv < 1 or H % hkv != 0:
        raise ValueError(f"attention: the number of query heads ({H}) must be a multiple of the key/value heads ({hkv})")
    if D < 1 or D > 256:
        raise ValueError(f"attention: head size must be between 1 and 256, got {D}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"attention: sequence lengths must be at least 1 (q {tuple(q.shape)}, {kv_name} {tuple(k.shape)})")


def attention(q, k, v, causal: bool = True, scale: float | None = None):
    """Scaled dot-product attention on (B, H, Tq, D) queries and (B, Hkv, Tk, D) keys/values.

    ``H % Hkv == 0`` (grouped-query attention); causal masking is bottom-right aligned when
    Tq < Tk. Returns (B, H, Tq, D). See ``fastlm.reference.attention`` for the exact spec.
    Under ``torch.autocast`` q, k, v are cast to the autocast dtype, as SDPA's are.
    """
    if isinstance(q, torch.Tensor):
        q, k, v = _autocast.lower(q.device, q, k, v)
    _check_attention(q, k, v)
    return resolve("attention", q.device, q.dtype)[1](q, k, v, causal=causal, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
    """Attention of the newest Tq tokens (q: (B, H, Tq, D)) over a ragged KV cache
    ((B, Hkv, L_max, D), valid lengths ``cache_lens`` (B,)). See the reference for the spec.

    The cache may be stored as bfloat16 / float16 under float32 queries (``kv_dtype`` in
    generation): the CPU kernel reads it as stored; other backends run the reference there."""
    _check_attention(q, k_cache, v_cache, kv_name="k_cache", kv_dtypes=_DTYPES)
    check_index("decode_attention", "cache_lens", cache_lens, (q.shape[0],), q.device, "q")
    name, fn = resolve("decode_attention", q.device, q.dtype)
    if k_cache.dtype != q.dtype and name != "cpu":
        fn = _reference_decode()
    return fn(q, k_cache, v_cache, cache_lens, scale=scale)


def _reference_decode():
    from .. import reference

    return reference.decode_attention


# ----------------------------------------------------------------------------- the glue
def _register_fakes() -> None:
    """Output shapes of the C++/CUDA ops for fake tensors (torch.compile); the Triton ops get
    theirs from triton_op."""

    @torch.library.register_fake("fastlm::attention_fwd")
    def _(q, k, v, causal, scale):
        B, H, Tq, _ = q.shape
        return _empty_rows_like(q, q), q.new_empty((B, H, Tq), dtype=torch.float32)

    @torch.library.register_fake("fastlm::attention_bwd")
    def _(grad_out, q, k, v, out, lse, causal, scale):
        return _empty_rows_like(q, q), _empty_rows_like(k, k), _empty_rows_like(v, v)

    @torch.library.register_fake("fastlm::decode_attention")
    def _(q, k_cache, v_cache, cache_lens, scale):
        return q.new_empty(q.shape)


def _setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ns):
    bwd = _forms.op(ns, "attention_bwd")

    def backward(ctx, g_out, _g_lse):
        q, k, v, out, lse = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out  # only lse was used
        dq, dk, dv = bwd(g_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    return backward


def _empty_rows_like(like, t):
    """An empty (B, H, T, D) tensor shaped like t, in the row order the CPU kernel gives its
    outputs: (B, T, H, D) memory when `like`'s heads lie in that order on the CPU (heads split
    from one projection), so that merging the heads back is a view; contiguous otherwise."""
    B, H, T, D = t.shape
    if like.device.type == "cpu" and H > 1 and T > 1 and like.stride(2) > like.stride(1):
        return t.new_empty((B, T, H, D)).permute(0, 2, 1, 3)
    return t.new_empty(t.shape)


def _scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _attention_form(ns):
    fwd = _forms.op(ns, "attention_fwd")

    def attention(q, k, v, causal: bool = True, scale: float | None = None):
        out, _ = fwd(q, k, v, bool(causal), _scale(q, scale))
        return out

    return attention


def _decode_attention_form(ns):
    fwd = _forms.op(ns, "decode_attention")

    def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
        return fwd(q, k_cache, v_cache, cache_lens, _scale(q, scale))

    return decode_attention


def _register() -> None:
    _forms.install({"attention": (_attention_form, _DTYPES), "decode_attention": (_decode_attention_form, _DTYPES)},
                   autograd={"attention_fwd": (_backward, _setup)}, fakes=_register_fakes)
