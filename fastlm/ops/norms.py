"""LayerNorm and RMSNorm over the last dimension, optionally fused with a residual add: the
public ops, their checks, and the one autograd glue of their kernels.

The kernels (csrc/cpu/norms.cpp, csrc/cuda/norms.cu, kernels/norms.py) are the custom ops
``{layer,rms}_norm_{fwd,bwd}`` in the namespaces ``fastlm`` and ``fastlm_triton`` (see
``_forms``). The forward returns (out, h, [mean,] rstd): h = x + residual when a residual is
given (an empty tensor otherwise), and the per-row statistics the backward reuses. The
backward takes grad_out, the gradient of h (None without one) and the saved h (x itself
without a residual), and returns dx (= dresidual), dw[, db].
"""
from __future__ import annotations

import torch

from . import _autocast, _forms
from ._checks import FLOATS, check_float, check_same
from ._dispatch import resolve


# ----------------------------------------------------------------------------- the public ops
def _check_norm(x, weight, bias, residual):
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("norm: x must have at least one dimension (..., C)")
    check_float("weight", weight)
    check_same("weight", weight, "x", x)
    C = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"norm: weight must have shape ({C},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check_same("bias", bias, "x", x)
        if bias.shape != weight.shape:
            raise ValueError(f"norm: bias must have shape ({C},), got {tuple(bias.shape)}")
    if residual is not None:
        check_float("residual", residual)
        check_same("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"norm: residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")


def _read(x, residual) -> int:
    """The elements a norm reads, x and the residual: the size its automatic choice goes by."""
    return x.numel() * (1 if residual is None else 2)


def layer_norm(x, weight, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim of ``x`` (..., C). With ``residual``: returns (out, x + residual).
    Under ``torch.autocast`` it runs in float32, as ``F.layer_norm`` does on CUDA."""
    if isinstance(x, torch.Tensor):
        x, weight, bias, residual = _autocast.float32(x.device, x, weight, bias, residual)
    _check_norm(x, weight, bias, residual)
    return resolve("layer_norm", x.device, x.dtype, _read(x, residual))[1](x, weight, bias, eps, residual)


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim of ``x`` (..., C). With ``residual``: returns (out, x + residual).
    Under ``torch.autocast`` it runs in float32."""
    if isinstance(x, torch.Tensor):
        x, weight, residual = _autocast.float32(x.device, x, weight, residual)
    _check_norm(x, weight, None, residual)
    return resolve("rms_norm", x.device, x.dtype, _read(x, residual))[1](x, weight, eps, residual)


# ----------------------------------------------------------------------------- the glue
def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    """Output shapes of the C++/CUDA ops for fake tensors (torch.compile); the Triton ops get
    theirs from triton_op."""

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


def _grads_in(ctx, g_out, g_h, h):
    """The output gradients as the backward ops take them: a missing grad_out (only h was
    used) as zeros, and grad_h only where the forward had a residual and h got a gradient."""
    g_out = torch.zeros_like(h) if g_out is None else g_out
    return g_out, (g_h if ctx.has_residual and g_h is not None else None)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, bias, mean, rstd)


def _ln_backward(ns):
    bwd = _forms.op(ns, "layer_norm_bwd")

    def backward(ctx, g_out, g_h, _g_mean, _g_rstd):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = bwd(*_grads_in(ctx, g_out, g_h, h), h, weight, bias, mean, rstd)
        return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None

    return backward


def _rms_setup(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _rms_backward(ns):
    bwd = _forms.op(ns, "rms_norm_bwd")

    def backward(ctx, g_out, g_h, _g_rstd):
        h, weight, rstd = ctx.saved_tensors
        dx, dw = bwd(*_grads_in(ctx, g_out, g_h, h), h, weight, rstd)
        return dx, dw, (dx if ctx.has_residual else None), None

    return backward


def _layer_norm_form(ns):
    fwd = _forms.op(ns, "layer_norm_fwd")

    def layer_norm(x, weight, bias=None, eps=1e-5, residual=None):
        out, h, _, _ = fwd(x, weight, bias, residual, eps)
        return out if residual is None else (out, h)

    return layer_norm


def _rms_norm_form(ns):
    fwd = _forms.op(ns, "rms_norm_fwd")

    def rms_norm(x, weight, eps=1e-6, residual=None):
        out, h, _ = fwd(x, weight, residual, eps)
        return out if residual is None else (out, h)

    return rms_norm


def _register() -> None:
    _forms.install({"layer_norm": (_layer_norm_form, FLOATS), "rms_norm": (_rms_norm_form, FLOATS)},
                   autograd={"layer_norm_fwd": (_ln_backward, _ln_setup), "rms_norm_fwd": (_rms_backward, _rms_setup)},
                   fakes=_register_fakes)
