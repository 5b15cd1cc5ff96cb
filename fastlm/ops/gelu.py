"""GELU with the tanh approximation (GPT-2's ``gelu_new``): the public op, its check, and the
autograd glue of its kernel.

The kernel is the custom op pair ``fastlm::gelu_{fwd,bwd}`` (csrc/cpu/gelu.cpp; the CPU only).
The backward recomputes the derivative from the saved input.
"""
from __future__ import annotations

import torch

from . import _forms
from ._checks import FLOATS, check_float
from ._dispatch import resolve


def gelu(x):
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    check_float("x", x)
    return resolve("gelu", x.device, x.dtype)[1](x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ns):
    bwd = _forms.op(ns, "gelu_bwd")

    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return bwd(g, x)

    return backward


def _gelu_form(ns):
    return _forms.op(ns, "gelu_fwd")


def _register_fakes() -> None:
    """Output shapes of the C++ ops for fake tensors (torch.compile)."""

    @torch.library.register_fake("fastlm::gelu_fwd")
    def _(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("fastlm::gelu_bwd")
    def _(grad_out, x):
        return x.new_empty(x.shape)


def _register() -> None:
    _forms.install({"gelu": (_gelu_form, FLOATS)}, autograd={"gelu_fwd": (_backward, _setup)}, fakes=_register_fakes,
                   backends=("cpu",))
