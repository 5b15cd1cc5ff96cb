"""Loading fastlm's compiled extensions (fastlm._C for the CPU, fastlm._C_cuda for CUDA), and
the SIMD level of the CPU kernels.

Importing fastlm never fails because an extension is missing: the reference backend then
serves every op, and one warning says why. The CPU kernels are built for every SIMD level of
the architecture (x86-64: baseline, avx2, avx512, avx512_vnni; aarch64: baseline, neon) and
run at the best one the CPU supports; ``FASTLM_CPU_ISA=<level>`` (or ``use_cpu_isa``) picks
a lower one, and naming a level the CPU lacks is an error.
"""
from __future__ import annotations

import contextlib
import importlib
import os
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
    """Facts about the CPU extension build: SIMD level in use, OpenMP, compiler."""
    return dict(cpu_ext.build_info()) if cpu_ext is not None else {}


def cpu_isa_levels() -> list[tuple[str, bool]]:
    """[(level, whether this CPU runs it)] for every SIMD level built, lowest first."""
    return list(cpu_ext.cpu_isa_levels()) if cpu_ext is not None else []


def cpu_isas() -> list[str]:
    """The SIMD levels the CPU kernels can run at on this machine, lowest first."""
    return [name for name, ok in cpu_isa_levels() if ok]


# The level in use, mirrored here (a plain module global, so that torch.compile traces the
# dispatcher's choice without calling into the extension).
_current: str | None = cpu_ext.cpu_isa() if cpu_ext is not None else None


def cpu_isa() -> str | None:
    """The SIMD level the CPU kernels run at (None without the extension)."""
    return _current


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels at SIMD level ``name`` from now on (one of ``cpu_isas()``)."""
    if cpu_ext is None:
        raise RuntimeError(f"fastlm's CPU kernels are not available ({cpu_error})")
    levels = dict(cpu_isa_levels())
    if name not in levels:
        raise ValueError(f"unknown CPU SIMD level {name!r}; this build has {', '.join(levels)}")
    if not levels[name] or not cpu_ext.set_cpu_isa(name):
        raise RuntimeError(f"this CPU cannot run the {name!r} kernels; it supports {', '.join(cpu_isas())}")
    global _current
    _current = name


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Run the CPU kernels inside the block at SIMD level ``name``, then restore the level."""
    before = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(before)


_env_isa = os.environ.get("FASTLM_CPU_ISA", "").strip().lower()
if cpu_ext is not None and _env_isa not in ("", "auto"):
    try:
        set_cpu_isa(_env_isa)
    except (ValueError, RuntimeError) as e:
        raise RuntimeError(f"FASTLM_CPU_ISA={_env_isa}: {e}") from None
