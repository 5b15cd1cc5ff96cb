"""Python side of the GELU op (torch.ops.fastlm.gelu_{fwd,bwd}): fake kernel and autograd."""
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


def gelu(x):
    return torch.ops.fastlm.gelu_fwd(x)
