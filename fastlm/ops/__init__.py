"""fastlm.ops: the public functional ops, and the one place where an implementation is chosen.

Every op has one spec (``fastlm.reference``) and several interchangeable backends:

=========== ============================================ ================================
backend     what it is                                   serves
=========== ============================================ ================================
reference   plain PyTorch: the spec; as the automatic    every op, every device/dtype
            fallback torch's fused ops (_torch_forms)
cpu         C++ kernels in ``fastlm._C`` (OpenMP, SIMD)   CPU tensors
cuda        CUDA kernels in ``fastlm._C_cuda``            CUDA tensors
triton      Triton kernels in ``fastlm.kernels``          CUDA tensors (CPU tensors under
                                                          ``TRITON_INTERPRET=1``)
=========== ============================================ ================================

Choose with ``FASTLM_BACKEND=reference|cpu|cuda|triton`` or ``with fastlm.ops.use_backend(name):``;
by default each op takes the backend measured fastest for its input (``_cpu_choice``,
``_gpu_choice``). ``implementation(op, x)``
tells which backend would serve a call; ``backends_status()`` says which backends can run here
and why the others cannot.

One module an op (or a pair of ops that share kernels): ``attention`` (attention,
decode_attention), ``kv_cache``, ``norms`` (layer_norm, rms_norm), ``gelu``, ``linear``
(decode_linear, pack_decode_weight, decode_linear_q, pack_decode_weight_q), ``loss``
(cross_entropy, linear_cross_entropy). Each
holds the public function with its checks and the one autograd glue its C++, CUDA and Triton
kernels share (``_forms``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import reference as _ref
from . import _native, _torch_forms
from . import attention as _attention_ops
from . import gelu as _gelu_ops
from . import kv_cache as _kv_cache_ops
from . import linear as _linear_ops
from . import loss as _loss_ops
from . import norms as _norms_ops
from ._checks import FLOATS
from ._dispatch import (Backend, BackendStatus, add_backend, backends, backends_status, get_backend, requested_backend,
                        resolve, use_backend)
from ._native import cpu_isa, cpu_isas, use_cpu_isa
from .attention import attention, decode_attention
from .gelu import gelu
from .kv_cache import kv_cache_write
from .linear import decode_linear, decode_linear_q, pack_decode_weight, pack_decode_weight_q
from .loss import cross_entropy, linear_cross_entropy
from .norms import layer_norm, rms_norm

__all__ = [
    "attention",
    "decode_attention",
    "kv_cache_write",
    "layer_norm",
    "rms_norm",
    "gelu",
    "decode_linear",
    "pack_decode_weight",
    "decode_linear_q",
    "pack_decode_weight_q",
    "cross_entropy",
    "linear_cross_entropy",
    "backends",
    "backends_status",
    "BackendStatus",
    "use_backend",
    "get_backend",
    "implementation",
    "requested_backend",
    "build_info",
    "cpu_isa",
    "cpu_isas",
    "use_cpu_isa",
]

_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")


# ----------------------------------------------------------------------------- backends
def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, (), "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ("cpu",), ""
    if torch.cuda.is_available():
        return True, ("cuda",), ""
    return False, (), "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"


_reference = add_backend(Backend("reference", _ALL_DEVICES))
for _name in ("attention", "decode_attention", "kv_cache_write", "layer_norm", "rms_norm", "gelu", "decode_linear",
              "decode_linear_q", "cross_entropy", "linear_cross_entropy"):
    # the spec; on accelerators, torch's fused op of the same function where it has one
    _reference.register(_name, _torch_forms.FORMS.get(_name, getattr(_ref, _name)), FLOATS)
# chosen automatically, it serves through torch's fused ops on CPUs as well
_reference.auto.update(_torch_forms.AUTO)

add_backend(Backend("cpu", ("cpu",), available=_native.cpu_ext is not None,
                    why_unavailable=f"fastlm._C could not be loaded ({_native.cpu_error})"))
add_backend(Backend("cuda", ("cuda",), available=_native.cuda_ext is not None,
                    why_unavailable=f"fastlm._C_cuda could not be loaded ({_native.cuda_error})"))
_ok, _devs, _why = _triton_status()
add_backend(Backend("triton", _devs, available=_ok, why_unavailable=_why))
if _ok:
    from .. import kernels as _kernels  # noqa: F401  (defines torch.ops.fastlm_triton.*)

# Each op's module registers its kernels' fake shapes, its autograd glue and its forms.
for _module in (_attention_ops, _kv_cache_ops, _norms_ops, _gelu_ops, _linear_ops, _loss_ops):
    _module._register()


def implementation(op: str, x: torch.Tensor) -> str:
    """Name of the backend that would serve ``op`` for input ``x`` under the current choice (a
    norm's choice counts its residual too: here, as called without one)."""
    return resolve(op, x.device, x.dtype, x.numel())[0]


def build_info() -> dict:
    return _native.build_info()
