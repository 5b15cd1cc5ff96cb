"""fastlm.ops: the public functional ops, and the one place where an implementation is chosen.

Every op has one spec (``fastlm.reference``) and several interchangeable backends:

=========== ============================================ ================================
backend     what it is                                   serves
=========== ============================================ ================================
reference   plain PyTorch (the spec and the fallback)     every op, every device/dtype
cpu         C++ kernels in ``fastlm._C`` (OpenMP, SIMD)   CPU tensors
cuda        CUDA kernels in ``fastlm._C_cuda``            CUDA tensors
triton      Triton kernels in ``fastlm.kernels``          CUDA tensors (CPU tensors under
                                                          ``TRITON_INTERPRET=1``)
=========== ============================================ ================================

Choose with ``FASTLM_BACKEND=reference|cpu|cuda|triton`` or ``with fastlm.ops.use_backend(name):``;
by default each op takes the fastest backend that serves its input. ``implementation(op, x)``
tells which backend would serve a call.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import reference as _ref
from . import _cpu_choice, _dispatch, _native
from ._dispatch import Backend, add_backend, backends, get_backend, requested_backend, resolve, use_backend
from ._native import cpu_isa, cpu_isas, use_cpu_isa

__all__ = [
    "attention",
    "decode_attention",
    "kv_cache_write",
    "layer_norm",
    "rms_norm",
    "gelu",
    "decode_linear",
    "pack_decode_weight",
    "cross_entropy",
    "linear_cross_entropy",
    "backends",
    "backends_status",
    "use_backend",
    "get_backend",
    "implementation",
    "requested_backend",
    "build_info",
    "cpu_isa",
    "cpu_isas",
    "use_cpu_isa",
]

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ALL_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")

# ----------------------------------------------------------------------------- backends
_reference = add_backend(Backend("reference", _ALL_DEVICES))
for _name in ("attention", "decode_attention", "kv_cache_write", "layer_norm", "rms_norm", "gelu", "decode_linear",
              "cross_entropy", "linear_cross_entropy"):
    _reference.register(_name, getattr(_ref, _name), FLOATS)

_cpu = add_backend(Backend("cpu", ("cpu",), available=_native.cpu_ext is not None,
                           why_unavailable=f"fastlm._C could not be loaded ({_native.cpu_error})"))
_cuda = add_backend(Backend("cuda", ("cuda",), available=_native.cuda_ext is not None,
                            why_unavailable=f"fastlm._C_cuda could not be loaded ({_native.cuda_error})"))

if _native.cpu_ext is not None or _native.cuda_ext is not None:
    from . import activation as _activation
    from . import attention as _attention
    from . import loss as _loss
    from . import norms as _norms

    _norms._register()
    _activation._register()
    _loss._register()
    _attention._register()
    _ATTN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    _GLUE = {  # op: (its glue, shared by the C++ and CUDA kernels; the dtypes they take)
        "layer_norm": (_norms.layer_norm, FLOATS),
        "rms_norm": (_norms.rms_norm, FLOATS),
        "linear_cross_entropy": (_loss.linear_cross_entropy, FLOATS),
        "attention": (_attention.attention, _ATTN_DTYPES),
        "decode_attention": (_attention.decode_attention, _ATTN_DTYPES),
        "gelu": (_activation.gelu, FLOATS),
        "kv_cache_write": (_attention.kv_cache_write, FLOATS),
        "decode_linear": (_activation.decode_linear, (torch.float32,)),
    }
    if _cpu.available:
        for _name, (_fn, _dtypes) in _GLUE.items():
            _cpu.register(_name, _fn, _dtypes, preferred=_cpu_choice.preferred(_name))
    if _cuda.available:
        for _name in ("layer_norm", "rms_norm", "linear_cross_entropy", "attention", "decode_attention"):
            _cuda.register(_name, *_GLUE[_name])  # gelu, kv_cache_write, decode_linear: CPU only


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, (), "triton is not installed (pip install triton)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ("cpu",), ""
    if torch.cuda.is_available():
        return True, ("cuda",), ""
    return False, (), "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"


_ok, _devs, _why = _triton_status()
_triton = add_backend(Backend("triton", _devs, available=_ok, why_unavailable=_why))
if _ok:
    from .. import kernels as _kernels  # fastlm.kernels: installed from the top-level kernels/

    for _name, (_fn, _dtypes) in getattr(_kernels, "OPS", {}).items():
        _triton.register(_name, _fn, _dtypes)


def backends_status() -> dict:
    """{backend name: None where it is usable, else why it is not} for every backend."""
    return {name: None if b.available else b.why_unavailable or "unavailable"
            for name, b in _dispatch._BACKENDS.items()}


def implementation(op: str, x: torch.Tensor) -> str:
    """Name of the backend that would serve ``op`` for input ``x`` under the current choice."""
    return resolve(op, x.device, x.dtype)[0]


def build_info() -> dict:
    return _native.build_info()


# ----------------------------------------------------------------------------- checks
def _is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(name, t):
    _is_tensor(name, t)
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {t.dtype}")


def _check_same(name, t, ref_name, ref, dtype=True):
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


# ----------------------------------------------------------------------------- attention
def _check_attention(q, k, v, kv_name="k"):
    for n, t in (("q", q), (kv_name, k), (kv_name.replace("k", "v", 1), v)):
        _check_float(n, t)
        if t.dim() != 4:
            raise ValueError(f"attention: {n} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
    vn = kv_name.replace("k", "v", 1)
    _check_same(kv_name, k, "q", q)
    _check_same(vn, v, "q", q)
    B, H, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: {kv_name} {tuple(k.shape)} and {vn} {tuple(v.shape)} must have one shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and {kv_name} {tuple(k.shape)} must agree on batch size and head size"
        )
    hkv = k.shape[1]
    if hkv < 1 or H % hkv != 0:
        raise ValueError(f"attention: the number of query heads ({H}) must be a multiple of the key/value heads ({hkv})")
    if D < 1 or D > 256:
        raise ValueError(f"attention: head size must be between 1 and 256, got {D}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"attention: sequence lengths must be at least 1 (q {tuple(q.shape)}, {kv_name} {tuple(k.shape)})")


def attention(q, k, v, causal: bool = True, scale: float | None = None):
    """Scaled dot-product attention on (B, H, Tq, D) queries and (B, Hkv, Tk, D) keys/values.

    ``H % Hkv == 0`` (grouped-query attention); causal masking is bottom-right aligned when
    Tq < Tk. Returns (B, H, Tq, D). See ``fastlm.reference.attention`` for the exact spec.
    """
    _check_attention(q, k, v)
    return resolve("attention", q.device, q.dtype)[1](q, k, v, causal=causal, scale=scale)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
    """Attention of the newest Tq tokens (q: (B, H, Tq, D)) over a ragged KV cache
    ((B, Hkv, L_max, D), valid lengths ``cache_lens`` (B,)). See the reference for the spec."""
    _check_attention(q, k_cache, v_cache, kv_name="k_cache")
    _is_tensor("cache_lens", cache_lens)
    if cache_lens.dtype not in (torch.int32, torch.int64) or cache_lens.shape != (q.shape[0],):
        raise ValueError(f"decode_attention: cache_lens must be an int32/int64 tensor of shape ({q.shape[0]},), "
                         f"got {cache_lens.dtype} {tuple(cache_lens.shape)}")
    if cache_lens.device != q.device:
        raise ValueError(f"decode_attention: cache_lens is on {cache_lens.device} but q is on {q.device}")
    return resolve("decode_attention", q.device, q.dtype)[1](q, k_cache, v_cache, cache_lens, scale=scale)


def kv_cache_write(k_cache, v_cache, k, v, positions) -> None:
    """Write a decode step's new keys and values (k, v: (B, Hkv, D)) into the caches
    ((B, Hkv, L, D)) in place, at position ``positions[b]`` of each sequence b."""
    for name, cache, x in (("k", k_cache, k), ("v", v_cache, v)):
        _check_float(f"{name}_cache", cache)
        _check_float(name, x)
        _check_same(name, x, f"{name}_cache", cache)
        if cache.dim() != 4 or x.dim() != 3 or x.shape != (cache.shape[0], cache.shape[1], cache.shape[3]):
            raise ValueError(f"kv_cache_write: {name}_cache must be (B, Hkv, L, D) and {name} (B, Hkv, D), "
                             f"got {tuple(cache.shape)} and {tuple(x.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"kv_cache_write: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _is_tensor("positions", positions)
    B, L = k_cache.shape[0], k_cache.shape[2]
    if positions.dtype not in (torch.int32, torch.int64) or positions.shape != (B,):
        raise ValueError(f"kv_cache_write: positions must be an int32/int64 tensor of shape ({B},), "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if positions.device != k_cache.device:
        raise ValueError(f"kv_cache_write: positions is on {positions.device} but the cache is on {k_cache.device}")
    if B and (int(positions.min()) < 0 or int(positions.max()) >= L):
        raise ValueError(f"kv_cache_write: positions must lie in [0, L = {L}), got {positions.tolist()}")
    resolve("kv_cache_write", k_cache.device, k_cache.dtype)[1](k_cache, v_cache, k, v, positions)


# ----------------------------------------------------------------------------- norms
def _check_norm(x, weight, bias, residual):
    _check_float("x", x)
    if x.dim() < 1:
        raise ValueError("norm: x must have at least one dimension (..., C)")
    _check_float("weight", weight)
    _check_same("weight", weight, "x", x)
    C = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"norm: weight must have shape ({C},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        _check_same("bias", bias, "x", x)
        if bias.shape != weight.shape:
            raise ValueError(f"norm: bias must have shape ({C},), got {tuple(bias.shape)}")
    if residual is not None:
        _check_float("residual", residual)
        _check_same("residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"norm: residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")


def layer_norm(x, weight, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dim of ``x`` (..., C). With ``residual``: returns (out, x + residual)."""
    _check_norm(x, weight, bias, residual)
    return resolve("layer_norm", x.device, x.dtype)[1](x, weight, bias, eps, residual)


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dim of ``x`` (..., C). With ``residual``: returns (out, x + residual)."""
    _check_norm(x, weight, None, residual)
    return resolve("rms_norm", x.device, x.dtype)[1](x, weight, eps, residual)


# ----------------------------------------------------------------------------- activation, loss
def gelu(x):
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    _check_float("x", x)
    return resolve("gelu", x.device, x.dtype)[1](x)


def pack_decode_weight(weight):
    """Pack a linear layer's weight (N, K) (``nn.Linear.weight``) once for ``decode_linear``:
    panels of W = ``reference.DECODE_PANEL`` (48) columns, each K x W contiguous, shape
    (ceil(N / W), K, W)."""
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"pack_decode_weight: weight must be (N, K), got shape {tuple(weight.shape)}")
    return _ref.pack_decode_weight(weight.detach())


def decode_linear(x, weight_p, bias=None, n: int | None = None):
    """``x @ weight.T + bias`` for the rows of a decode step (few) or a prefill (many): x (M, K),
    the weight (N, K) packed by ``pack_decode_weight`` (shape (ceil(N / W), K, W), W = 48), bias
    (N,) or None, n = N (default: every packed column). The CPU kernel reads the packed weight
    once for all rows, in address order, in passes of as many rows as the SIMD level's registers
    hold (8 on AVX-512, 2 on AVX2 and NEON) over each panel."""
    _check_float("x", x)
    _check_float("weight_p", weight_p)
    _check_same("weight_p", weight_p, "x", x)
    W = _ref.DECODE_PANEL
    if x.dim() != 2 or weight_p.dim() != 3 or weight_p.shape[2] != W or x.shape[1] != weight_p.shape[1]:
        raise ValueError(f"decode_linear: x must be (M, K) and weight_p (ceil(N / {W}), K, {W}) with the same K, "
                         f"got {tuple(x.shape)} and {tuple(weight_p.shape)}")
    P = weight_p.shape[0]
    n = P * W if n is None else int(n)
    if not (P - 1) * W < n <= P * W and not (n == 0 and P == 0):
        raise ValueError(f"decode_linear: n = {n} does not match the {P} panels of weight_p")
    if bias is not None:
        _check_float("bias", bias)
        _check_same("bias", bias, "x", x)
        if bias.shape != (n,):
            raise ValueError(f"decode_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    return resolve("decode_linear", x.device, x.dtype)[1](x, weight_p, bias, n)


def _check_targets(targets, n_rows_shape, device):
    _is_tensor("targets", targets)
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64/int32 tensor of class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(n_rows_shape):
        raise ValueError(f"targets must have shape {tuple(n_rows_shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the inputs are on {device}")


def _check_reduction(reduction):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of logits (..., V) against class indices (...)."""
    _check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError("cross_entropy: logits must have shape (..., V)")
    _check_targets(targets, logits.shape[:-1], logits.device)
    _check_reduction(reduction)
    return resolve("cross_entropy", logits.device, logits.dtype)[1](logits, targets, ignore_index=ignore_index,
                                                                      reduction=reduction)


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None):
    """cross_entropy(h @ weight.T, targets) without materialising all the logits at once
    (where the backend fuses it). h (..., C), weight (V, C), targets (...)."""
    _check_float("h", h)
    _check_float("weight", weight)
    _check_same("weight", weight, "h", h)
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must have shape (V, {h.shape[-1]}), got {tuple(weight.shape)}")
    _check_targets(targets, h.shape[:-1], h.device)
    _check_reduction(reduction)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    name, fn = resolve("linear_cross_entropy", h.device, h.dtype)
    if name == "reference":
        return fn(h, weight, targets, ignore_index=ignore_index, reduction=reduction)
    return fn(h, weight, targets, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)
