"""Weight-only reduced precision for inference: the linear layers of a GPT with their weights in
bf16, fp16, int8 or int4, for the full forward, the prefill and the decode steps alike.

``quantize(model, weights, keep_head=False)`` replaces every ``nn.Linear`` of the model (the
attention and MLP projections, and the output layer unless ``keep_head``) by a ``QuantLinear``
that holds only the weight packed by ``fastlm.ops.pack_decode_weight_q`` (and the float bias),
and computes ``fastlm.ops.decode_linear_q`` on every call, over all rows at once: a prefill or
a full forward runs the same kernel as a decode step, so they agree. The formats:

=========== ================= ==========================================================
weights     packed format     what a weight is
=========== ================= ==========================================================
``bf16``    ``bf16``          bfloat16
``fp16``    ``f16``           float16
``int8``    ``q8_0``          int8 in blocks of 32 along the input, a float16 scale a block
``int4``    ``q4_0``          4 bits in blocks of 32, a float16 scale a block
=========== ================= ==========================================================

With int8 and int4 weights each layer's input is rounded to int8 in the same blocks (with a
float32 scale), as llama.cpp does, and the CPU multiplies 8-bit integers.

The token and position embeddings stay float32 (a step reads one row of them); the output
layer tied to the token embeddings gets a packed copy of its own. A quantized model is for
inference: its packed weights are buffers, not parameters, and get no gradients.

A checkpoint of a quantized model stores the packed blocks (``<layer>.weight_q``) and says its
format in config.json (``QUANT_KEY``); ``apply_layout`` rebuilds the same modules, empty, on
a model that a loader then fills.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.linear import _q_shape

__all__ = ["QuantLinear", "WEIGHT_FORMATS", "quantize", "apply_layout", "quantization_of", "QUANT_KEY",
           "read_quantization", "write_quantization", "convert_layout", "choose_weights"]

# the name a user gives -> the packed format of ops.decode_linear_q
WEIGHT_FORMATS = {"bf16": "bf16", "fp16": "f16", "int8": "q8_0", "int4": "q4_0"}
# config.json's key for a quantized checkpoint (Hugging Face keeps its quantizers' settings
# under this name too): {"quant_method": "fastlm", "weights": ..., "keep_head": ...}
QUANT_KEY = "quantization_config"
QUANT_METHOD = "fastlm"
# The byte layout of the packed int8 / int4 blocks a checkpoint holds: 1, each block's values as
# rows along K (checkpoints that state no layout); 2, in groups of 4 values along K per column
# (``reference.pack_decode_weight_q``). A layout-1 checkpoint is converted as it loads.
PACK_LAYOUT = 2


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W (out_features, in_features) held packed in ``format``
    (``weight_q``, a buffer); b a float parameter or None. x (..., in_features)."""

    def __init__(self, in_features: int, out_features: int, weights: str, bias: bool = True,
                 device=None, dtype=torch.float32):
        super().__init__()
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
        self.in_features, self.out_features, self.weights = in_features, out_features, weights
        self.format = WEIGHT_FORMATS[weights]
        qdtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(self.format, torch.uint8)
        self.register_buffer("weight_q", torch.zeros(_q_shape(self.format, out_features, in_features),
                                                     dtype=qdtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: str) -> "QuantLinear":
        """The layer ``linear`` with its weight packed in ``weights``' format."""
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, weights, bias=linear.bias is not None,
                device="meta", dtype=w.dtype)
        q.weight_q = ops.pack_decode_weight_q(w, q.format)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q

    def forward(self, x):
        y = ops.decode_linear_q(x.reshape(-1, self.in_features), self.weight_q, self.bias, self.out_features,
                                self.format)
        return y.view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() convert floating tensors; the packed weight keeps its format
        # (a bf16 or f16 panel is the format, not the model's compute dtype) and only moves.
        wq = self._buffers.pop("weight_q")
        try:
            out = super()._apply(fn, recurse)
        finally:
            moved = fn(wq)
            self._buffers["weight_q"] = moved if moved.dtype == wq.dtype else wq.to(moved.device)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weights}, "
                f"bias={self.bias is not None}")


def quantization_of(model) -> dict | None:
    """{"weights": ..., "keep_head": ...} of a quantized model, or None for a float one."""
    return getattr(model, "_quantization", None)


def _targets(model, keep_head: bool):
    """(parent module, attribute name, linear) for every nn.Linear that quantization replaces."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and not (keep_head and child is model.lm_head):
                out.append((parent, name, child))
    return out


def _check_request(model, weights, keep_head):
    if getattr(model.config, "arch", "gpt") != "gpt":
        raise ValueError(f"quantized weights are for the GPT, not arch {model.config.arch!r}")
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if not isinstance(keep_head, bool):
        raise TypeError(f"keep_head must be a bool, got {type(keep_head).__name__}")
    have = quantization_of(model)
    if have is not None:
        raise ValueError(f"the model is already quantized ({have['weights']}); load its float checkpoint to "
                         f"quantize it to {weights}")


@torch.no_grad()
def quantize(model, weights: str, keep_head: bool = False):
    """Replace the linear layers of ``model`` (in place) by ``QuantLinear`` layers holding their
    weights packed in ``weights`` ("int8", "int4", "bf16", "fp16"); the output layer too unless
    ``keep_head``. Returns the model."""
    _check_request(model, weights, keep_head)
    for parent, name, linear in _targets(model, keep_head):
        setattr(parent, name, QuantLinear.from_linear(linear, weights))
    model._quantization = {"weights": weights, "keep_head": keep_head}
    return model


def apply_layout(model, quantization: dict):
    """Give ``model`` (in place) the modules of a quantized model in the format ``quantization``
    names, their packed weights zero (a loader fills them from a checkpoint): the model can then
    take a quantized checkpoint's tensors, names and shapes checked."""
    weights, keep_head = quantization["weights"], quantization["keep_head"]
    _check_request(model, weights, keep_head)
    for parent, name, linear in _targets(model, keep_head):
        w = linear.weight
        setattr(parent, name, QuantLinear(linear.in_features, linear.out_features, weights,
                                          bias=linear.bias is not None, device=w.device, dtype=w.dtype))
    model._quantization = {"weights": weights, "keep_head": keep_head}
    return model


def read_quantization(hf: dict) -> dict | None:
    """The quantization a config.json states (``QUANT_KEY``), checked; None when it states none."""
    from .._io import CheckpointError

    q = hf.get(QUANT_KEY)
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"config.json's {QUANT_KEY} is not fastlm's (quant_method {QUANT_METHOD!r}): "
                              f"{str(q)[:200]}")
    weights, keep_head = q.get("weights"), q.get("keep_head", False)
    if weights not in WEIGHT_FORMATS or not isinstance(keep_head, bool):
        raise CheckpointError(f"config.json's {QUANT_KEY} needs weights in {', '.join(WEIGHT_FORMATS)} and a bool "
                              f"keep_head, got {str(q)[:200]}")
    layout = q.get("layout", 1)
    if layout not in (1, PACK_LAYOUT) or isinstance(layout, bool):
        raise CheckpointError(f"config.json's {QUANT_KEY} states packed layout {str(layout)[:40]}; this fastlm "
                              f"reads layouts 1 and {PACK_LAYOUT}")
    return {"weights": weights, "keep_head": keep_head, "layout": layout}


def convert_layout(quantization: dict, state_dict: dict) -> dict:
    """``state_dict`` (a quantized checkpoint's tensors) with its packed weights in the current
    layout, converted from the one ``quantization`` states (the same bytes, permuted)."""
    from .. import reference

    fmt = WEIGHT_FORMATS[quantization["weights"]]
    if quantization.get("layout", PACK_LAYOUT) == PACK_LAYOUT or fmt not in ("q8_0", "q4_0"):
        return state_dict
    return {k: reference.relayout_decode_weight_q_v1(v, fmt) if k.endswith(".weight_q") and v.dim() == 3 else v
            for k, v in state_dict.items()}


def write_quantization(model) -> dict:
    """config.json's entry for ``model``'s quantization ({} for a float model)."""
    q = quantization_of(model)
    return {} if q is None else {QUANT_KEY: {"quant_method": QUANT_METHOD, **q, "layout": PACK_LAYOUT}}


def choose_weights(model, weights: str | None, keep_head: bool = False):
    """``model`` (just loaded) in the weight format a caller asks for: None or the format it
    already has, as it is; "fp32" for a float model, as it is; a format of ``WEIGHT_FORMATS``
    for a float model, quantized to it. A quantized model is not converted to another format
    (its float weights are gone): asking for one is an error."""
    if weights is None:
        return model
    if weights != "fp32" and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be fp32 or one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    have = quantization_of(model)
    if have is None:
        return model if weights == "fp32" else quantize(model, weights, keep_head=keep_head)
    if weights != have["weights"]:
        raise ValueError(f"the checkpoint holds {have['weights']} weights; it cannot be loaded as {weights} "
                         "(quantize its float checkpoint instead)")
    return model
