"""The compiled forms of the fused ops, as each op's module in fastlm.ops registers them.

A fused op is one set of custom ops with one schema in two namespaces:

- ``torch.ops.fastlm.<name>``: the C++ kernels (fastlm._C, ``TORCH_LIBRARY_IMPL(fastlm, CPU)``)
  and the CUDA kernels (fastlm._C_cuda, ``TORCH_LIBRARY_IMPL(fastlm, CUDA)``); the schemas are
  in csrc/ops.cpp;
- ``torch.ops.fastlm_triton.<name>``: the Triton kernels (fastlm.kernels, each op defined with
  ``torch.library.triton_op``), named as in csrc/ops.cpp.

An op's module (fastlm/ops/<op>.py) writes its autograd formula and its Python wrapper once,
as functions of a namespace, and applies them here to every namespace that is loaded, so the
C++, CUDA and Triton forms share one glue and cannot drift apart.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import _cpu_choice, _gpu_choice
from ._dispatch import _BACKENDS

NATIVE = "fastlm"  # the C++ and CUDA kernels
TRITON = "fastlm_triton"  # the Triton kernels
_NAMESPACE = {"cpu": NATIVE, "cuda": NATIVE, "triton": TRITON}
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _available(backend: str) -> bool:
    b = _BACKENDS.get(backend)
    return b is not None and b.available


def namespaces(backends: Iterable[str] = ("cpu", "cuda", "triton")) -> list[str]:
    """The op namespaces loaded for ``backends``, each once (cpu and cuda share ``fastlm``)."""
    out = []
    for name in backends:
        ns = _NAMESPACE[name]
        if _available(name) and ns not in out:
            out.append(ns)
    return out


def op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>``."""
    return getattr(getattr(torch.ops, namespace), name)


def register_autograd(name: str, make_backward: Callable, setup_context: Callable,
                      backends: Iterable[str] = ("cpu", "cuda", "triton")) -> None:
    """Tie forward op ``name`` to its backward in every loaded namespace: ``make_backward(ns)``
    returns the backward formula that calls namespace ``ns``'s backward op."""
    for ns in namespaces(backends):
        torch.library.register_autograd(f"{ns}::{name}", make_backward(ns), setup_context=setup_context)


def register_forms(op_name: str, make_form: Callable, dtypes, backends: Iterable[str] = ("cpu", "cuda", "triton")):
    """Give the dispatcher the form of public op ``op_name`` on each usable backend of
    ``backends``: ``make_form(ns)`` returns the function of the public op's signature that runs
    namespace ``ns``'s kernels. C++ takes ``dtypes``; CUDA and Triton take float32/bf16/fp16 (of
    those in ``dtypes``). A form is preferred only where it wins (``_cpu_choice``, ``_gpu_choice``)."""
    for backend in backends:
        if not _available(backend):
            continue
        ns = _NAMESPACE[backend]
        # the GPU kernels compute in float32 / bf16 / fp16; float64 goes to the reference
        takes = tuple(d for d in dtypes if backend == "cpu" or d in GPU_DTYPES)
        preferred = _cpu_choice.preferred(op_name) if backend == "cpu" else _gpu_choice.preferred(backend, op_name)
        _BACKENDS[backend].register(op_name, make_form(ns), takes, preferred=preferred)


def install(forms: dict, autograd: dict | None = None, fakes: Callable | None = None,
            backends: Iterable[str] = ("cpu", "cuda", "triton")) -> None:
    """Everything an op module registers, once at import of fastlm.ops, on ``backends``:
    ``fakes()`` (the fake shapes of its C++/CUDA ops; the Triton ops get theirs from
    triton_op) when the ``fastlm`` ops are loaded, ``autograd`` {forward op: (make_backward,
    setup_context)} and ``forms`` {public op: (make_form, dtypes)}."""
    backends = tuple(backends)
    if fakes is not None and NATIVE in namespaces(backends):
        fakes()
    for name, (make_backward, setup_context) in (autograd or {}).items():
        register_autograd(name, make_backward, setup_context, backends)
    for name, (make_form, dtypes) in forms.items():
        register_forms(name, make_form, dtypes, backends)
