"""Python side of the fused linear + cross-entropy op
(torch.ops.fastlm.linear_cross_entropy_{fwd,bwd}): fake kernels and autograd.

The forward computes the gradients along with the loss (for a unit grad_output) when the
loss is reduced and a gradient is wanted, so the backward only scales them: the (N, V)
logits are never kept. For reduction="none" the backward op recomputes the chunks with
each row's grad_output.
"""
from __future__ import annotations

import torch

_lib_ready = False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register() -> None:
    global _lib_ready
    if _lib_ready:
        return
    _lib_ready = True

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
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.compute_grad = compute_grad
        if reduction == "none":
            ctx.save_for_backward(h, weight, targets)
        else:
            ctx.save_for_backward(gh, gw)

    def _backward(ctx, g_loss, _g_gh, _g_gw):
        if ctx.reduction == "none":
            h, weight, targets = ctx.saved_tensors
            gh, gw = torch.ops.fastlm.linear_cross_entropy_bwd(g_loss, h, weight, targets, ctx.ignore_index,
                                                               ctx.chunk_size)
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

    torch.library.register_autograd("fastlm::linear_cross_entropy_fwd", _backward, setup_context=_setup)


def linear_cross_entropy(h, weight, targets, ignore_index=-100, reduction="mean", chunk_size=None):
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    t2 = targets.reshape(-1)
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, _, _ = torch.ops.fastlm.linear_cross_entropy_fwd(h2, weight, t2, int(ignore_index), reduction,
                                                           int(chunk_size or 0), compute_grad)
    return loss.reshape(lead) if reduction == "none" else loss
