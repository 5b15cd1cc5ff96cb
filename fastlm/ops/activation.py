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
    def _(x, weight_p, bias, n):
        return x.new_empty((x.shape[0], n))

    def _setup_linear(ctx, inputs, output):
        x, weight_p, bias, n = inputs
        ctx.has_bias, ctx.n = bias is not None, n
        ctx.save_for_backward(x, weight_p)

    def _backward_linear(ctx, g):
        x, weight_p = ctx.saved_tensors
        P, K, W = weight_p.shape
        g_pad = torch.nn.functional.pad(g, (0, P * W - ctx.n))  # (M, P*W)
        w_t = weight_p.transpose(0, 1).reshape(K, P * W)
        grad_wp = (x.t() @ g_pad).view(K, P, W).transpose(0, 1)
        return g_pad @ w_t.t(), grad_wp, g.sum(0) if ctx.has_bias else None, None

    torch.library.register_autograd("fastlm::decode_linear", _backward_linear, setup_context=_setup_linear)


def gelu(x):
    return torch.ops.fastlm.gelu_fwd(x)


def decode_linear(x, weight_p, bias=None, n=None):
    return torch.ops.fastlm.decode_linear(x, weight_p, bias, weight_p.shape[0] * weight_p.shape[2] if n is None else n)
