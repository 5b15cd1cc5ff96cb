"""Where a GPU kernel (the ``cuda`` and ``triton`` backends) serves an op by default: the ops
measured ahead of PyTorch's own fused op on the same CUDA tensors (bench/test_gpu.py;
bench/RESULTS.md, "GPU kernels on an H200", has the figures and the command).

Elsewhere the automatic choice lets the reference backend serve, which on a GPU is PyTorch's
fused ops (``_torch_forms``); an explicit ``use_backend("cuda" | "triton")`` or
``FASTLM_BACKEND`` still runs the kernels.

triton: on an H200 every op measured behind torch's, but for the residual + norm forward at wide
rows, and training needs the backward too. cuda: built and loaded on the H200, not yet timed
there, so not preferred until a benchmark shows it ahead.
"""
from __future__ import annotations

GPU_WINS: dict[str, frozenset] = {
    "cuda": frozenset(),
    "triton": frozenset(),
}


def preferred(backend: str, op: str):
    """A predicate for the dispatcher: is ``backend``'s kernel of ``op`` measured ahead of torch?"""
    wins = GPU_WINS[backend]
    return lambda numel=None: op in wins
