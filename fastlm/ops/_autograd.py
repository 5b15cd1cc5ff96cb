"""Autograd formulas shared by every form of an op (C++/CUDA custom ops and Triton ops).

Each factory takes the backward op of one implementation and returns the
``(setup_context, backward)`` pair to register on its forward op, so the formula of a
gradient is written once, whichever kernel computes it.
"""
from __future__ import annotations

import torch


def attention(attention_bwd):
    """For ``attention_fwd(q, k, v, causal, scale) -> (out, lse)``."""

    def setup(ctx, inputs, output):
        q, k, v, causal, scale = inputs
        out, lse = output
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q, k, v, out, lse)

    def backward(ctx, g_out, _g_lse):
        q, k, v, out, lse = ctx.saved_tensors
        g_out = torch.zeros_like(out) if g_out is None else g_out.contiguous()
        dq, dk, dv = attention_bwd(g_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    return setup, backward


def layer_norm(layer_norm_bwd):
    """For ``layer_norm_fwd(x, weight, bias, residual, eps) -> (out, h, mean, rstd)``; with a
    residual, h = x + residual is an output too and its gradient adds to dx (= d residual)."""

    def setup(ctx, inputs, output):
        x, weight, bias, residual, eps = inputs
        _, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)

    def backward(ctx, g_out, g_h, _g_mean, _g_rstd):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        g_out = torch.zeros_like(h) if g_out is None else g_out
        g_h = g_h if (ctx.has_residual and g_h is not None) else None
        dx, dw, db = layer_norm_bwd(g_out, g_h, h, weight, bias, mean, rstd)
        return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None

    return setup, backward


def rms_norm(rms_norm_bwd):
    """For ``rms_norm_fwd(x, weight, residual, eps) -> (out, h, rstd)``."""

    def setup(ctx, inputs, output):
        x, weight, residual, eps = inputs
        _, h, rstd = output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)

    def backward(ctx, g_out, g_h, _g_rstd):
        h, weight, rstd = ctx.saved_tensors
        g_out = torch.zeros_like(h) if g_out is None else g_out
        g_h = g_h if (ctx.has_residual and g_h is not None) else None
        dx, dw = rms_norm_bwd(g_out, g_h, h, weight, rstd)
        return dx, dw, (dx if ctx.has_residual else None), None

    return setup, backward
