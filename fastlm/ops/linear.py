"""``decode_linear``: ``x @ weight.T + bias`` over a weight packed once into column panels, for
the few rows of a decode step (or the many of a prefill); the public op, its checks, the
packing, and the autograd glue of its kernel.

The kernel is the custom op ``fastlm::decode_linear`` (csrc/cpu/linear.cpp; the CPU only). Its
backward is written in torch over the packed layout: the gradient of the packed weight has
the packed shape, and the padding columns of the last panel get none.
"""
from __future__ import annotations

import torch

from .. import reference as _ref
from . import _forms
from ._checks import check_float, check_same
from ._dispatch import resolve


def pack_decode_weight(weight):
    """Pack a linear layer's weight (N, K) (``nn.Linear.weight``) once for ``decode_linear``:
    panels of W = ``reference.DECODE_PANEL`` (48) columns, each K x W contiguous, shape
    (ceil(N / W), K, W)."""
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"pack_decode_weight: weight must be (N, K), got shape {tuple(weight.shape)}")
    return _ref.pack_decode_weight(weight.detach())


def decode_linear(x, weight_p, bias=None, n: int | None = None):
    """``x @ weight.T + bias`` for the rows of a decode step (few) or a prefill (many): x (M, K),
    the weight (N, K) packed by ``pack_decode_weight`` (shape (ceil(N / W), K, W), W = 48), bias
    (N,) or None, n = N (default: every packed column). The CPU kernel reads the packed weight
    once for all rows, in address order, in passes of as many rows as the SIMD level's registers
    hold (8 on AVX-512, 2 on AVX2 and NEON) over each panel."""
    check_float("x", x)
    check_float("weight_p", weight_p)
    check_same("weight_p", weight_p, "x", x)
    W = _ref.DECODE_PANEL
    if x.dim() != 2 or weight_p.dim() != 3 or weight_p.shape[2] != W or x.shape[1] != weight_p.shape[1]:
        raise ValueError(f"decode_linear: x must be (M, K) and weight_p (ceil(N / {W}), K, {W}) with the same K, "
                         f"got {tuple(x.shape)} and {tuple(weight_p.shape)}")
    P = weight_p.shape[0]
    n = P * W if n is None else int(n)
    if not (P - 1) * W < n <= P * W and not (n == 0 and P == 0):
        raise ValueError(f"decode_linear: n = {n} does not match the {P} panels of weight_p")
    if bias is not None:
        check_float("bias", bias)
        check_same("bias", bias, "x", x)
        if bias.shape != (n,):
            raise ValueError(f"decode_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    return resolve("decode_linear", x.device, x.dtype)[1](x, weight_p, bias, n)


def _setup(ctx, inputs, output):
    x, weight_p, bias, n = inputs
    ctx.has_bias, ctx.n = bias is not None, n
    ctx.save_for_backward(x, weight_p)


def _backward(ns):
    def backward(ctx, g):
        x, weight_p = ctx.saved_tensors
        P, K, W = weight_p.shape
        g_pad = torch.nn.functional.pad(g, (0, P * W - ctx.n))  # (M, P*W)
        w_t = weight_p.transpose(0, 1).reshape(K, P * W)
        grad_wp = (x.t() @ g_pad).view(K, P, W).transpose(0, 1)
        return g_pad @ w_t.t(), grad_wp, g.sum(0) if ctx.has_bias else None, None

    return backward


def _decode_linear_form(ns):
    fwd = _forms.op(ns, "decode_linear")

    def decode_linear(x, weight_p, bias=None, n=None):
        return fwd(x, weight_p, bias, weight_p.shape[0] * weight_p.shape[2] if n is None else n)

    return decode_linear


def _register_fakes() -> None:
    """Output shape of the C++ op for fake tensors (torch.compile)."""

    @torch.library.register_fake("fastlm::decode_linear")
    def _(x, weight_p, bias, n):
        return x.new_empty((x.shape[0], n))


def _register() -> None:
    _forms.install({"decode_linear": (_decode_linear_form, (torch.float32,))},
                   autograd={"decode_linear": (_backward, _setup)}, fakes=_register_fakes, backends=("cpu",))
