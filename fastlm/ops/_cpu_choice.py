"""Where a CPU kernel serves an op by default: the SIMD levels at which it is measured ahead
of PyTorch's own op on the same inputs, with torch held to the same level
(bench/RESULTS.md, "CPU kernels at each SIMD level", has the figures and their commands).

At a level not listed, the automatic choice lets the reference (PyTorch) serve the op; an
explicit ``use_backend("cpu")`` or ``FASTLM_BACKEND=cpu`` still runs the kernel.
"""
from __future__ import annotations

from . import _native

ALL = frozenset({"baseline", "avx2", "avx512", "neon"})

# op -> the levels where fastlm's kernel wins
NATIVE_WINS: dict[str, frozenset] = {
    "attention": frozenset({"avx2", "avx512", "neon"}),
    "decode_attention": frozenset({"avx2", "avx512", "neon"}),
    "layer_norm": frozenset({"avx2", "avx512", "neon"}),
    "rms_norm": frozenset({"avx2", "avx512", "neon"}),
    "gelu": frozenset({"avx2", "avx512", "neon"}),
    "decode_linear": frozenset({"avx2", "avx512", "neon"}),
    "linear_cross_entropy": frozenset({"avx2", "avx512", "neon"}),
    "kv_cache_write": ALL,  # plain row copies: no SIMD level matters
}


def preferred(op: str):
    """A predicate for the dispatcher: does the CPU kernel of ``op`` win at the current level?"""
    wins = NATIVE_WINS[op]
    return lambda: _native.cpu_isa() in wins
