"""``decode_linear``: ``x @ weight.T + bias`` over a weight packed once into column panels, for
the few rows of a decode step (or the many of a prefill); ``decode_linear_q``: the same product
with the weight in a reduced-precision format (bf16, f16, int8 q8_0, 4-bit q4_0); the public
ops, their checks, the packing, and the autograd glue of their kernels.

The kernels are the custom ops ``fastlm::decode_linear`` and ``fastlm::decode_linear_q``
(csrc/cpu/linear.cpp; the CPU only). ``decode_linear``'s backward is written in torch over the
packed layout: the gradient of the packed weight has the packed shape, and the padding columns
of the last panel get none. ``decode_linear_q``'s weight is a constant (quantized weights are
for inference): its backward gives x and the bias their gradients only.
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

    @torch.library.register_fake("fastlm::decode_linear_q")
    def _(x, weight_q, bias, n, format):
        return x.new_empty((x.shape[0], n))


def _register() -> None:
    _forms.install({"decode_linear": (_decode_linear_form, (torch.float32,)),
                    "decode_linear_q": (_decode_linear_q_form, (torch.float32,))},
                   autograd={"decode_linear": (_backward, _setup), "decode_linear_q": (_backward_q, _setup_q)},
                   fakes=_register_fakes, backends=("cpu",))


# ----------------------------------------------------------------------------- reduced-precision weights
WEIGHT_FORMATS = _ref.WEIGHT_FORMATS  # ("bf16", "f16", "q8_0", "q4_0")
_Q_DTYPE = {"bf16": torch.bfloat16, "f16": torch.float16, "q8_0": torch.uint8, "q4_0": torch.uint8}


def _check_format(op, format):
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"{op}: format must be one of {', '.join(WEIGHT_FORMATS)}, got {format!r}")


def pack_decode_weight_q(weight, format: str):
    """Pack a linear layer's weight (N, K) once for ``decode_linear_q`` in ``format``:
    "bf16" / "f16": ``pack_decode_weight``'s panels in that dtype, (ceil(N / 48), K, 48);
    "q8_0" / "q4_0": uint8 (ceil(N / 48), ceil(K / 32), bytes per block): each block of 32
    weights along K of 48 columns as int8 values (q8_0) or 4-bit values (q4_0), 4 consecutive
    values of a column in adjacent bytes, then the 48 columns' float16 scales (llama.cpp's formats; ``fastlm.reference.pack_decode_weight_q``
    states the layout)."""
    _check_format("pack_decode_weight_q", format)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"pack_decode_weight_q: weight must be (N, K), got shape {tuple(weight.shape)}")
    return _ref.pack_decode_weight_q(weight.detach(), format)


def _q_shape(format, n, k):
    """The shape of ``pack_decode_weight_q``'s output for a (n, k) weight."""
    W, B = _ref.DECODE_PANEL, _ref.QUANT_BLOCK
    P = -(-n // W)
    if format in ("bf16", "f16"):
        return (P, k, W)
    values = B * W if format == "q8_0" else B // 2 * W
    return (P, -(-k // B), values + 2 * W)


def decode_linear_q(x, weight_q, bias=None, n: int | None = None, format: str = "q8_0"):
    """``x @ weight.T + bias`` with the weight (N, K) packed by ``pack_decode_weight_q`` in
    ``format`` ("bf16", "f16", "q8_0", "q4_0"): x (M, K), bias (N,) or None, n = N (default:
    every packed column). The product with the dequantized weight
    (``reference.unpack_decode_weight_q``); for q8_0 and q4_0, of x rounded to q8_0 blocks
    (``reference.quantize_activations_q8_0``, as llama.cpp rounds a layer's input). The CPU kernel
    (x float32) multiplies 8-bit integers for q8_0 and q4_0 (up to 8 rows in one pass over the
    weight; more rows convert each panel to float32 once) and converts bf16 / f16 weights in
    registers as it reads them; other dtypes and devices get the reference, which dequantizes the
    whole weight on every call."""
    _check_format("decode_linear_q", format)
    check_float("x", x)
    if not isinstance(weight_q, torch.Tensor):
        raise TypeError(f"weight_q must be a torch.Tensor, got {type(weight_q).__name__}")
    check_same("weight_q", weight_q, "x", x, dtype=False)
    if x.dim() != 2 or weight_q.dim() != 3:
        raise ValueError(f"decode_linear_q: x must be (M, K) and weight_q 3-dimensional, got {tuple(x.shape)} "
                         f"and {tuple(weight_q.shape)}")
    if weight_q.dtype != _Q_DTYPE[format]:
        raise TypeError(f"decode_linear_q: a {format} weight is {_Q_DTYPE[format]}, got {weight_q.dtype}")
    W = _ref.DECODE_PANEL
    P = weight_q.shape[0]
    n = P * W if n is None else int(n)
    if n < 0 or tuple(weight_q.shape) != _q_shape(format, n, x.shape[1]):
        raise ValueError(f"decode_linear_q: a {format} weight for n = {n} outputs and K = {x.shape[1]} inputs has "
                         f"shape {_q_shape(format, max(n, 0), x.shape[1])}, got {tuple(weight_q.shape)}")
    if bias is not None:
        check_float("bias", bias)
        check_same("bias", bias, "x", x)
        if bias.shape != (n,):
            raise ValueError(f"decode_linear_q: bias must have shape ({n},), got {tuple(bias.shape)}")
    return resolve("decode_linear_q", x.device, x.dtype)[1](x, weight_q, bias, n, format)


def _setup_q(ctx, inputs, output):
    x, weight_q, bias, n, format = inputs
    ctx.has_bias, ctx.n, ctx.format, ctx.k = bias is not None, n, format, x.shape[1]
    ctx.save_for_backward(weight_q)


def _backward_q(ns):
    def backward(ctx, g):
        (weight_q,) = ctx.saved_tensors
        w = _ref.unpack_decode_weight_q(weight_q, ctx.format, ctx.n, ctx.k).to(g.dtype)
        return g @ w, None, g.sum(0) if ctx.has_bias else None, None, None

    return backward


def _decode_linear_q_form(ns):
    fwd = _forms.op(ns, "decode_linear_q")

    def decode_linear_q(x, weight_q, bias=None, n=None, format="q8_0"):
        return fwd(x, weight_q, bias, weight_q.shape[0] * _ref.DECODE_PANEL if n is None else n, format)

    return decode_linear_q
