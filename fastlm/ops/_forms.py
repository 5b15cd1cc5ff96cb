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

Each formula serves two drivers. ``torch.library.register_autograd`` ties it to the op itself,
for torch.compile, ``torch.library.opcheck`` and anyone calling ``torch.ops`` directly; that
path bounces from the dispatcher into Python and back on every call, which on a small input
costs as much as the kernel itself (bench/RESULTS.md, "The fused ops' glue"). In eager mode the
public ops go through
``op()``'s callable instead: a plain ``torch.autograd.Function`` built from the same
``setup_context`` and backward, which runs the kernel below the autograd keys.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from . import _cpu_choice, _gpu_choice
from ._dispatch import _BACKENDS

NATIVE = "fastlm"  # the C++ and CUDA kernels
TRITON = "fastlm_triton"  # the Triton kernels
_NAMESPACE = {"cpu": NATIVE, "cuda": NATIVE, "triton": TRITON}
# (namespace, forward op) -> the eager autograd.Function of its formula (register_autograd)
_EAGER: dict[tuple[str, str], type] = {}
# dispatch straight to the kernel, past the autograd keys (what torch.library's own autograd
# wrapper does around its redispatch); private torch API, hence the fallback
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)
_any_requires_grad = getattr(torch._C, "_any_requires_grad",
                             lambda *a: any(isinstance(t, torch.Tensor) and t.requires_grad for t in a))
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


def _raw(namespace: str, name: str):
    return getattr(getattr(torch.ops, namespace), name)


def op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>``; for a forward op with an autograd formula, a callable
    that runs the same op: through torch.library while torch.compile traces, through the eager
    Function when a gradient is wanted, and straight to the kernel otherwise."""
    raw = _raw(namespace, name)
    fn = _EAGER.get((namespace, name))
    if fn is None:
        return raw
    apply = fn.apply

    def call(*args):
        if torch.compiler.is_compiling():
            return raw(*args)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            return apply(*args)
        with _below_autograd():
            return raw(*args)

    call.__name__ = call.__qualname__ = name
    return call


def _eager_function(namespace: str, name: str, backward: Callable, setup_context: Callable) -> type:
    """The autograd.Function of forward op ``name``: the kernel below autograd, then
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as registered."""
    raw = _raw(namespace, name)

    def forward(ctx, *args):
        with _below_autograd():
            out = raw(*args)
        setup_context(ctx, args, out)
        return out

    return type(f"{namespace}_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def register_autograd(name: str, make_backward: Callable, setup_context: Callable,
                      backends: Iterable[str] = ("cpu", "cuda", "triton")) -> None:
    """Tie forward op ``name`` to its backward in every loaded namespace: ``make_backward(ns)``
    returns the backward formula that calls namespace ``ns``'s backward op. The same formula
    drives the op's eager Function (``op()``)."""
    for ns in namespaces(backends):
        backward = make_backward(ns)
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup_context)
        _EAGER[(ns, name)] = _eager_function(ns, name, backward, setup_context)


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
