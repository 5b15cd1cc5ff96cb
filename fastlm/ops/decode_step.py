"""``gpt_decode_step``: one decode step of a GPT (embeddings, every block, the final norm, the
output layer) as a single call of the CPU kernels, for one new token per sequence.

It is not a new computation: it runs the kernels that ``decode_linear``, ``layer_norm`` /
``rms_norm``, ``gelu``, ``kv_cache_write`` and ``decode_attention`` run, in the order
``fastlm.models.decode.step`` calls them, on the same operands (csrc/cpu/decode_step.cpp).
What it saves is the per-op cost of Python and the dispatcher, dozens of calls a step that
on a small model weigh more than the kernels. So it serves only where each of those ops is
served by the CPU kernels anyway, and the Python step is its specification (the tests hold
the two equal).
"""
from __future__ import annotations

import torch

from . import _native

# The weights of one block, in the order the kernel takes them (csrc/ops.cpp).
PER_LAYER = 12


def available() -> bool:
    """Whether the CPU extension with the fused step is loaded."""
    return _native.cpu_ext is not None and hasattr(torch.ops.fastlm, "gpt_decode_step")


def gpt_decode_step(tokens, positions, attend_lens, wte, wpe, weights, kv, *, n_head: int, n_kv_head: int,
                    hidden: int, rms: bool, eps: float, weight_format: str = "f32", head_weight=None,
                    head_bias=None, head_format: str = "f32"):
    """Logits (B, vocab) of one token per sequence (``tokens`` (B,)) at ``positions`` (B,),
    attending over the first ``attend_lens[b]`` cache positions. ``weights``: per block its
    ln_1 weight and bias, attention input and output projections (weight, bias), ln_2 weight
    and bias, MLP input and output projections (weight, bias), the projections packed for
    ``decode_linear`` (``weight_format`` "f32") or ``decode_linear_q``; then the final norm's
    weight and bias (biases may be None). ``kv``: each block's key and value caches, contiguous
    (B, Hkv, L, D), all float32, all bfloat16 or all float16 (a narrower cache stores its new
    keys and values rounded to nearest even); the step writes its keys and values into them."""
    if not available():
        raise RuntimeError("gpt_decode_step needs fastlm's CPU extension (fastlm._C)")
    return torch.ops.fastlm.gpt_decode_step(tokens, positions, attend_lens, wte, wpe, list(weights), list(kv),
                                            int(n_head), int(n_kv_head), int(hidden), bool(rms), float(eps),
                                            weight_format, head_weight, head_bias, head_format)
