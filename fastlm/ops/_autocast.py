"""The fused ops under ``torch.autocast``, as PyTorch's own counterparts behave on CUDA.

Autocast does not reach inside custom ops, so each public op casts its inputs itself before its
checks (which want one dtype), by the policy of the torch op it replaces:

- ``attention`` (like ``scaled_dot_product_attention``) and the product of
  ``linear_cross_entropy`` (like ``F.linear``) run in the autocast dtype: their float inputs
  are cast to it;
- ``layer_norm``, ``rms_norm`` (like ``F.layer_norm`` on CUDA) and ``cross_entropy`` run in
  float32: a bf16 output of a projection beside a float32 residual stream and float32 gains
  gives a float32 result, as in a PyTorch GPT under autocast.

float64 tensors are left alone (autocast casts only lower floats), and with autocast off
nothing changes. Casts are differentiable, so gradients reach the float32 parameters.
"""
from __future__ import annotations

import torch


def _cast(dtype, tensors):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _on(device: torch.device) -> bool:
    # meta and other device types autocast has no state for are never under it
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def lower(device: torch.device, *tensors):
    """``tensors`` in the autocast dtype of ``device`` when autocast is on there."""
    if not _on(device):
        return tensors
    return _cast(torch.get_autocast_dtype(device.type), tensors)


def float32(device: torch.device, *tensors):
    """``tensors`` in float32 when autocast is on for ``device``."""
    if not _on(device):
        return tensors
    return _cast(torch.float32, tensors)
