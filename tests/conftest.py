"""Shared test setup: Triton runs on the CPU interpreter when no GPU is present, float64
oracles, and helpers that compare a kernel with the reference."""
import contextlib
import os
import pathlib
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels then run on the CPU interpreter (set before fastlm.kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A Triton cache of this test session's own, not shared with other processes on the machine.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fastlm-triton-cache-"))

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it never passes."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


# ----------------------------------------------------------------------------- CPU SIMD levels
# The CPU kernel tests run at every SIMD level this machine executes: "cpu" at the level in
# use (the best one), "cpu@<level>" at each lower one (forced with ops.use_cpu_isa).
def _cpu_level_backends():
    from fastlm import ops

    if "cpu" not in ops.backends():
        return []
    return ["cpu"] + [f"cpu@{level}" for level in ops.cpu_isas() if level != ops.cpu_isa()]


CPU_LEVEL_BACKENDS = _cpu_level_backends()


def _triton_on_cpu() -> bool:
    """Whether the Triton kernels run on CPU tensors here (the interpreter). With a CUDA device
    they run compiled on CUDA tensors only, and tests/test_gpu.py checks them there."""
    from fastlm import ops

    return "triton" in ops.backends() and "cpu" in ops.get_backend("triton").devices


TRITON_ON_CPU = _triton_on_cpu()


def backend_name(name: str) -> str:
    """The backend of a test parameter ("cpu@baseline" -> "cpu")."""
    return name.partition("@")[0]


@contextlib.contextmanager
def on_backend(name: str):
    """Run the block on backend ``name``, at the SIMD level it names ("cpu@avx2"), if any."""
    from fastlm import ops

    base, _, level = name.partition("@")
    with ops.use_backend(base), (ops.use_cpu_isa(level) if level else contextlib.nullcontext()):
        yield
