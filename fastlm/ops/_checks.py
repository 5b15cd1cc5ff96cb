"""Input checks shared by the public ops: each raises a TypeError or ValueError that names the
argument and says what was expected, before any backend sees the tensors."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name, t):
    is_tensor(name, t)
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {t.dtype}")


def check_same(name, t, ref_name, ref, dtype=True):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


def check_index(op, name, t, shape, device, device_name):
    """An int32/int64 tensor of ``shape`` on ``device`` (cache lengths, write positions)."""
    is_tensor(name, t)
    if t.dtype not in (torch.int32, torch.int64) or t.shape != shape:
        raise ValueError(f"{op}: {name} must be an int32/int64 tensor of shape {tuple(shape)}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but {device_name} is on {device}")
