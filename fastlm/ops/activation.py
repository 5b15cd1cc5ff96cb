"""Python side of the GELU op (torch.ops.fastlm.gelu_{fwd,bwd}) and of the decode step's linear
layer (torch.ops.fastlm.decode_linear): fake kernels and autograd."""
from __future__ import annotations

import torch

_lib_ready = False


def _register() -> None:
    global _lib_ready
    if _lib_ready:
        return
    _lib_ready = True

    @torch.library.register_fake("fastlm::gelu_fwd")
    def _(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::gelu_bwd")
    def _(grad_out, x):
        return x.new_empty(x.shape)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.fastlm.gelu_bwd(g, x)

    torch.library.register_autograd("fastlm::gelu_fwd", _backward, setup_context=_setup)

    @torch.library.register_fake("fastlm::decode_linear")
    def _(x, weight_t, bias):
        return x.new_empty((x.shape[0], weight_t.shape[1]))

    def _setup_linear(ctx, inputs, output):
        x, weight_t, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight_t)

    def _backward_linear(ctx, g):
        x, weight_t = ctx.saved_tensors
        return g @ weight_t.t(), x.t() @ g, g.sum(0) if ctx.has_bias else None

    torch.library.register_autograd("fastlm::decode_linear", _backward_linear, setup_context=_setup_linear)


def gelu(x):
    return torch.ops.fastlm.gelu_fwd(x)


def decode_linear(x, weight_t, bias=None):
    return torch.ops.fastlm.decode_linear(x, weight_t, bias)
