"""Loading fastlm's compiled extensions (fastlm._C for the CPU, fastlm._C_cuda for CUDA).

Importing fastlm never fails because an extension is missing: the reference backend then
serves every op, and one warning says why.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_warned = False


def _load(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        return None, f"{type(e).__name__}: {e}"


cpu_ext, cpu_error = _load("fastlm._C")
cuda_ext, cuda_error = (None, "torch has no CUDA device")
if torch.cuda.is_available():
    cuda_ext, cuda_error = _load("fastlm._C_cuda")

if cpu_ext is None and not _warned:
    _warned = True
    warnings.warn(
        "fastlm's C++ extension (fastlm._C) could not be loaded, so every op runs on the "
        f"pure-PyTorch reference backend ({cpu_error}). Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """Facts about the CPU extension build: SIMD level, OpenMP, compiler."""
    return dict(cpu_ext.build_info()) if cpu_ext is not None else {}
