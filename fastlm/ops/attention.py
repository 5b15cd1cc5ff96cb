"""Python side of the fused attention ops (torch.ops.fastlm.attention_{fwd,bwd},
torch.ops.fastlm.decode_attention) and of the KV-cache write (torch.ops.fastlm.kv_cache_write).

The kernels (csrc/cpu/attention.cpp, csrc/cuda/attention.cu) register per device; here we
register, once for all devices, the fake (meta) kernels that give output shapes under
torch.compile, and the autograd formula that ties the forward op to the backward op.
"""
from __future__ import annotations

import math

import torch

_lib_ready = False


def _register() -> None:
    global _lib_ready
    if _lib_ready:
        return
    _lib_ready = True

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

    @torch.library.register_fake("fastlm::kv_cache_write")
    def _(k_cache, v_cache, k, v, positions):
        return None

    def _setup(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, out, lse)

    def _backward(ctx, g_out, _g_lse):
        q, k, v, out, lse = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out
        dq, dk, dv = torch.ops.fastlm.attention_bwd(g_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    torch.library.register_autograd("fastlm::attention_fwd", _backward, setup_context=_setup)


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


def attention(q, k, v, causal: bool = True, scale: float | None = None):
    out, _ = torch.ops.fastlm.attention_fwd(q, k, v, bool(causal), _scale(q, scale))
    return out


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
    return torch.ops.fastlm.decode_attention(q, k_cache, v_cache, cache_lens, _scale(q, scale))


def kv_cache_write(k_cache, v_cache, k, v, positions):
    torch.ops.fastlm.kv_cache_write(k_cache, v_cache, k, v, positions)
