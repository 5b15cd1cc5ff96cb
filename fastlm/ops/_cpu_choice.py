"""Where a CPU kernel serves an op by default: the SIMD levels (and, where it matters, the input
sizes) at which it is measured ahead of PyTorch's own op on the same inputs, with torch held to
the same level (bench/RESULTS.md, "CPU kernels at each SIMD level", has the figures and their
commands).

At a level not listed, the automatic choice lets PyTorch's own op serve (the reference backend
through torch's fused op of the same function, ``_torch_forms.AUTO``); an explicit
``use_backend("cpu")`` or ``FASTLM_BACKEND=cpu`` still runs the kernel.
"""
from __future__ import annotations

from . import _native

ALL = frozenset({"baseline", "avx2", "avx512", "avx512_vnni", "neon"})
X86 = frozenset({"baseline", "avx2", "avx512", "avx512_vnni"})

# op -> the levels where fastlm's kernel wins. avx2 and baseline: measured on an AMD Zen 3
# (bench/cpu_levels.py). avx512_vnni, and avx2 with torch held to AVX2: measured on an AMD Zen 4,
# ahead on every op (LayerNorm's plain fwd+bwd by 1.31-1.64x since its two-pass backward; at
# parity before). avx512 compiles the same kernels (avx512_vnni differs only in the quantized
# products). neon: correct (checked under qemu) but not yet measured on ARM hardware, so torch
# serves there until a benchmark shows otherwise.
NATIVE_WINS: dict[str, frozenset] = {
    # at the baseline level the forward wins and the backward loses to torch SDPA (bench/RESULTS.md,
    # section "CPU kernels at each SIMD level"): one op, one choice, and training needs both
    "attention": frozenset({"avx2", "avx512", "avx512_vnni"}),
    "decode_attention": X86,
    "layer_norm": X86,
    "rms_norm": X86,
    "gelu": X86,
    "decode_linear": X86,
    # not measured against torch: the reference unpacks the whole weight to float32 on every
    # call and then multiplies, more bytes moved than the kernel reads, so the kernel serves
    # wherever the extension loads (NEON checked for correctness under qemu only)
    "decode_linear_q": ALL,
    "linear_cross_entropy": X86,
    "kv_cache_write": ALL,  # plain row copies: no SIMD level matters
}


# op -> {level: the fewest input elements at which the kernel wins (for the norms the elements
# they read: x, and the residual when given)}; smaller inputs go to torch's own op. Measured for
# LayerNorm forward and backward through the public op (whose
# Python autograd glue costs a few tens of microseconds that torch's C++ autograd does not)
# against F.layer_norm, plain and with the residual add (`python bench/cpu_levels.py --levels
# avx2 avx512_vnni baseline -k norm_sizes`; bench/RESULTS.md, "The fused ops' glue, their
# sizes, and the ceiling at `avx2`"): at `avx2` the plain form loses up to 0.5 M elements
# (0.74-0.91x) and is level at 1 M (0.98x), the residual form (two inputs of that size) is
# level at 0.25 M each (1.03x) and wins from 0.5 M (1.09x); at `avx512_vnni` the plain form
# wins from 0.5 M (1.04x), the residual form from 0.25 M each (1.07x): both forms cross at
# about the same number of elements read. At the baseline level the kernel wins at every size
# (1.27x at 768 x 128). RMSNorm wins at every size and level (torch's CPU RMSNorm is composed
# of plain ops).
MIN_NUMEL: dict[str, dict[str, int]] = {
    "layer_norm": {"avx2": 1 << 20, "avx512": 1 << 19, "avx512_vnni": 1 << 19},
}


def preferred(op: str):
    """A predicate for the dispatcher: does the CPU kernel of ``op`` win at the current level,
    for an input of ``numel`` elements? numel None (a caller choosing once for calls of every
    size, such as the decode step's, which runs no autograd glue) asks about the level alone.
    (The tables are read at each call, so a change to them takes effect.)"""

    def wins(numel: int | None = None) -> bool:
        level = _native.cpu_isa()
        if level not in NATIVE_WINS[op]:
            return False
        return numel is None or numel >= MIN_NUMEL.get(op, {}).get(level, 0)

    return wins
