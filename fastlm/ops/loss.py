"""Cross-entropy: ``cross_entropy`` over given logits, and ``linear_cross_entropy``, the loss of
``h @ weight.T`` fused so that the (N, V) logits are never materialised at once; the public
ops, their checks, and the one autograd glue of the fused kernels.

The kernels (csrc/cpu/loss.cpp, csrc/cuda/loss.cu, kernels/loss.py) are the custom ops
``linear_cross_entropy_{fwd,bwd}`` in the namespaces ``fastlm`` and ``fastlm_triton`` (see
``_forms``). When the loss is reduced and a gradient is wanted, the forward computes the
gradients along with the loss (for a unit grad_output), so the backward only scales them.
For reduction="none" the backward op recomputes the chunks with each row's grad_output.
"""
from __future__ import annotations

import torch

from . import _autocast, _forms
from ._checks import FLOATS, check_float, check_same, is_tensor
from ._dispatch import resolve


# ----------------------------------------------------------------------------- the public ops
def _check_targets(targets, n_rows_shape, device):
    is_tensor("targets", targets)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64/int32 tensor of class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(n_rows_shape):
        raise ValueError(f"targets must have shape {tuple(n_rows_shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")


def _check_reduction(reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of logits (..., V) against class indices (...); in float32 under
    ``torch.autocast``, as ``F.cross_entropy``."""
    if isinstance(logits, torch.Tensor):
        (logits,) = _autocast.float32(logits.device, logits)
    check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("cross_entropy: logits must have shape (..., V)")
    _check_targets(targets, logits.shape[:-1], logits.device)
    _check_reduction(reduction)
    return resolve("cross_entropy", logits.device, logits.dtype)[1](logits, targets, ignore_index=ignore_index,
                                                                      reduction=reduction)


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None):
    """cross_entropy(h @ weight.T, targets) without materialising all the logits at once
    (where the backend fuses it). h (..., C), weight (V, C), targets (...). Under
    ``torch.autocast`` h and weight are cast to the autocast dtype (the product's, as
    ``F.linear``'s); the loss is float32 either way for low-precision inputs."""
    if isinstance(h, torch.Tensor):
        h, weight = _autocast.lower(h.device, h, weight)
    check_float("h", h)
    check_float("weight", weight)
    check_same("weight", weight, "h", h)
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must have shape (V, {h.shape[-1]}), got {tuple(weight.shape)}")
    _check_targets(targets, h.shape[:-1], h.device)
    _check_reduction(reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    name, fn = resolve("linear_cross_entropy", h.device, h.dtype)
    if name == "reference":
        return fn(h, weight, targets, ignore_index=ignore_index, reduction=reduction)
    return fn(h, weight, targets, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- the glue
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    """Output shapes of the C++/CUDA ops for fake tensors (torch.compile); the Triton ops get
    theirs from triton_op."""

    @torch.library.register_fake("fastlm::linear_cross_entropy_fwd")
    def _(h, weight, targets, ignore_index, reduction, chunk_size, compute_grad):
        acc = _acc(h.dtype)
        loss = h.new_empty((h.shape[0],), dtype=acc) if reduction == "none" else h.new_empty((), dtype=acc)
        grad = compute_grad and reduction != "none"
        gh = h.new_empty(h.shape) if grad else h.new_empty((0,))
        gw = weight.new_empty(weight.shape) if grad else weight.new_empty((0,))
        return loss, gh, gw

    @torch.library.register_fake("fastlm::linear_cross_entropy_bwd")
    def _(grad_loss, h, weight, targets, ignore_index, chunk_size):
        return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    h, weight, targets, ignore_index, reduction, chunk_size, compute_grad = inputs
    _, gh, gw = output
    ctx.reduction, ctx.ignore_index, ctx.chunk_size, ctx.compute_grad = reduction, ignore_index, chunk_size, compute_grad
    if reduction == "none":
        ctx.save_for_backward(h, weight, targets)
    else:
        ctx.save_for_backward(gh, gw)


def _backward(ns):
    bwd = _forms.op(ns, "linear_cross_entropy_bwd")

    def backward(ctx, g_loss, _g_gh, _g_gw):
        if ctx.reduction == "none":
            h, weight, targets = ctx.saved_tensors
            gh, gw = bwd(g_loss, h, weight, targets, ctx.ignore_index, ctx.chunk_size)
            return gh, gw, None, None, None, None, None
        if not ctx.compute_grad:
            raise RuntimeError("linear_cross_entropy: the forward ran without gradients (compute_grad=False), "
                               "so there is nothing to backpropagate")
        gh, gw = ctx.saved_tensors
        g = g_loss.to(gh.dtype)
        if type(gw) is torch.Tensor and not torch.compiler.is_compiling():
            # Eager: scaled in place, so the (V, C) weight gradient is not copied. A second
            # backward through the same graph fails autograd's saved-tensor version check.
            return gh.mul_(g), gw.mul_(g), None, None, None, None, None
        return gh * g, gw * g, None, None, None, None, None  # traced (torch.compile): no mutation

    return backward


def _linear_cross_entropy_form(ns):
    fwd = _forms.op(ns, "linear_cross_entropy_fwd")

    def linear_cross_entropy(h, weight, targets, ignore_index=-100, reduction="mean", chunk_size=None):
        lead = h.shape[:-1]
        compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        loss, _, _ = fwd(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), int(ignore_index), reduction,
                         int(chunk_size or 0), compute_grad)
        return loss.reshape(lead) if reduction == "none" else loss

    return linear_cross_entropy


def _register() -> None:
    _forms.install({"linear_cross_entropy": (_linear_cross_entropy_form, FLOATS)},
                   autograd={"linear_cross_entropy_fwd": (_backward, _setup)}, fakes=_register_fakes)
