"""Shared test setup: Triton runs on the CPU interpreter when no GPU is present, float64
oracles, and helpers that compare a kernel with the reference."""
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
