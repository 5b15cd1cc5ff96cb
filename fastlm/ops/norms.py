"""Python side of the fused normalization ops (torch.ops.fastlm.{layer,rms}_norm_{fwd,bwd}).

The kernels (csrc/cpu/norms.cpp, csrc/cuda/norms.cu) register per device; here we register,
once for all devices, the fake (meta) kernels that give output shapes under
torch.compile, and the autograd formulas that tie each forward op to its backward op.
"""
from __future__ import annotations

import torch

_lib_ready = False


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register() -> None:
    global _lib_ready
    if _lib_ready:
        return
    _lib_ready = True

    @torch.library.register_fake("fastlm::layer_norm_fwd")
    def _(x, weight, bias, residual, eps):
        stats = x.shape[:-1]
        h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
        return (x.new_empty(x.shape), h, x.new_empty(stats, dtype=_stat_dtype(x)),
                x.new_empty(stats, dtype=_stat_dtype(x)))

    @torch.library.register_fake("fastlm::layer_norm_bwd")
    def _(grad_out, grad_h, h, weight, bias, mean, rstd):
        db = weight.new_empty(weight.shape) if bias is not None else weight.new_empty((0,))
        return h.new_empty(h.shape), weight.new_empty(weight.shape), db

    @torch.library.register_fake("fastlm::rms_norm_fwd")
    def _(x, weight, residual, eps):
        h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
        return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))

    @torch.library.register_fake("fastlm::rms_norm_bwd")
    def _(grad_out, grad_h, h, weight, rstd):
        return h.new_empty(h.shape), weight.new_empty(weight.shape)

    def _ln_setup(ctx, inputs, output):
        x, weight, bias, residual, eps = inputs
        _, h, mean, rstd = output
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)

    def _ln_backward(ctx, g_out, g_h, _g_mean, _g_rstd):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        g_out = torch.zeros_like(h) if g_out is None else g_out
        g_h = g_h if (ctx.has_residual and g_h is not None) else None
        dx, dw, db = torch.ops.fastlm.layer_norm_bwd(g_out, g_h, h, weight, bias, mean, rstd)
        return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None

    torch.library.register_autograd("fastlm::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)

    def _rms_setup(ctx, inputs, output):
        x, weight, residual, eps = inputs
        _, h, rstd = output
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)

    def _rms_backward(ctx, g_out, g_h, _g_rstd):
        h, weight, rstd = ctx.saved_tensors
        g_out = torch.zeros_like(h) if g_out is None else g_out
        g_h = g_h if (ctx.has_residual and g_h is not None) else None
        dx, dw = torch.ops.fastlm.rms_norm_bwd(g_out, g_h, h, weight, rstd)
        return dx, dw, (dx if ctx.has_residual else None), None

    torch.library.register_autograd("fastlm::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
    out, h, _, _ = torch.ops.fastlm.layer_norm_fwd(x, weight, bias, residual, eps)
    return out if residual is None else (out, h)


def rms_norm(x, weight, eps=1e-6, residual=None):
    out, h, _ = torch.ops.fastlm.rms_norm_fwd(x, weight, residual, eps)
    return out if residual is None else (out, h)
