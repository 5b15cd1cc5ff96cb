"""Where a GPU kernel (the ``cuda`` and ``triton`` backends) serves an op by default: the ops
measured ahead of PyTorch's own fused op on the same CUDA tensors (bench/test_gpu.py;
bench/RESULTS.md, "GPU kernels on an H200", has the figures and the command).

Elsewhere the automatic choice lets the reference backend serve, which on a GPU is PyTorch's
fused ops (``_torch_forms``); an explicit ``use_backend("cuda" | "triton")`` or
``FASTLM_BACKEND`` still runs the kernels.

triton: on an H200 every op measured behind torch (attention forward 0.33-0.64x SDPA, forward
+ backward 0.16-0.57x, decode 0.10-0.56x, residual + norm forward + backward 0.28-0.41x, the
fused output layer + loss 0.10-0.40x; only the residual + norm forward at 4096-8192 columns was
ahead, 1.06-1.21x, and training needs the backward too). cuda: correct on the H200 where it was
tested, not yet timed there, so it is not preferred until a benchmark shows it ahead.
"""
from __future__ import annotations

GPU_WINS: dict[str, frozenset] = {
    "cuda": frozenset(),
    "triton": frozenset(),
}


def preferred(backend: str, op: str):
    """A predicate for the dispatcher: is ``backend``'s kernel of ``op`` measured ahead of torch?"""
    wins = GPU_WINS[backend]
    return lambda: op in wins
