"""The reference backend on accelerators: PyTorch's own fused ops in place of the spec.

``fastlm.reference`` is the spec and the test oracle, written to be read: attention as two
matrix products around a softmax, LayerNorm as means and a square root. On a CPU it is also
the fallback. On a GPU the same arithmetic through those plain ops materialises the (T x T)
scores and launches a kernel per step, where PyTorch has fused kernels for the same functions
(``scaled_dot_product_attention``, ``F.layer_norm``, ``F.rms_norm``, ``F.gelu``,
``F.cross_entropy``): those are what fastlm's GPU kernels are measured against, and what serves
when none of them is chosen (``_gpu_choice``). Each form below computes the spec's function;
cases torch's op does not express (causal attention with fewer keys than queries or a
different alignment, float64) go to the spec itself.

The automatic choice serves the same forms on CPUs too (``AUTO``): where no fastlm kernel is
preferred for an op at the CPU's SIMD level (``_cpu_choice``), PyTorch's own op serves it, not
the spec's plain ops (attention through ``scaled_dot_product_attention`` rather than the (T x T)
scores). Asked for by name (``use_backend("reference")``), the reference stays the spec on CPUs.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import reference as R


def _spec_only(t: torch.Tensor, cpu_spec: bool = True) -> bool:
    """float64 keeps the spec (the oracle's precision), and CPU tensors too unless ``cpu_spec``
    is off (the automatic choice's forms, ``AUTO``)."""
    return t.dtype == torch.float64 or (cpu_spec and t.device.type == "cpu")


def attention(q, k, v, causal: bool = True, scale: float | None = None, *, cpu_spec: bool = True):
    Tq, Tk = q.shape[2], k.shape[2]
    if _spec_only(q, cpu_spec) or (causal and Tq != Tk):
        # SDPA's is_causal aligns the mask top-left; the spec's is bottom-right (they agree
        # when Tq == Tk)
        return R.attention(q, k, v, causal=causal, scale=scale)
    return torch_attention(q, k, v, causal, scale)


def torch_attention(q, k, v, causal: bool, scale: float | None):
    """SDPA on (B, H, T, D) q and (B, Hkv, T, D) k, v (GQA by enable_gqa)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def layer_norm(x, weight, bias=None, eps: float = 1e-5, residual=None, *, cpu_spec: bool = True):
    if _spec_only(x, cpu_spec):
        return R.layer_norm(x, weight, bias, eps, residual=residual)
    h = x if residual is None else x + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


def rms_norm(x, weight, eps: float = 1e-6, residual=None, *, cpu_spec: bool = True):
    if _spec_only(x, cpu_spec):
        return R.rms_norm(x, weight, eps, residual=residual)
    h = x if residual is None else x + residual
    out = F.rms_norm(h, (h.shape[-1],), weight, eps)
    return out if residual is None else (out, h)


def gelu(x, *, cpu_spec: bool = True):
    if _spec_only(x, cpu_spec):
        return R.gelu(x)
    return F.gelu(x, approximate="tanh")


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean", *, cpu_spec: bool = True):
    if _spec_only(logits, cpu_spec):
        return R.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    # the loss of bf16 / fp16 logits is float32, as the spec's
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean", *,
                         cpu_spec: bool = True):
    if _spec_only(h, cpu_spec):
        return R.linear_cross_entropy(h, weight, targets, ignore_index=ignore_index, reduction=reduction)
    return cross_entropy(F.linear(h, weight), targets, ignore_index=ignore_index, reduction=reduction,
                         cpu_spec=cpu_spec)


FORMS = {"attention": attention, "layer_norm": layer_norm, "rms_norm": rms_norm, "gelu": gelu,
         "cross_entropy": cross_entropy, "linear_cross_entropy": linear_cross_entropy}
# the automatic choice's fallback: torch's fused op on every device where it expresses the case
AUTO = {name: functools.partial(fn, cpu_spec=False) for name, fn in FORMS.items()}
