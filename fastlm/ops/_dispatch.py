"""Which implementation serves an op: backends, the user's choice, and the automatic pick.

A backend is a name and a table {op name: Impl}. An Impl says which devices and dtypes it
serves. The choice, per call:

1. the backend the user asked for (``use_backend(name)`` innermost first, then the
   ``FASTLM_BACKEND`` environment variable), if any; it must be usable (built and loadable)
   and must serve the input's device, or a clear error is raised. An op the chosen backend
   does not implement, or a dtype it does not take, is served by the reference;
2. otherwise the first backend in the device's preference order that implements the op for
   that dtype and is preferred for it (CPU: cpu, reference; CUDA: cuda, triton, reference).
   A CPU kernel is preferred only at the SIMD levels where it is measured ahead of PyTorch's
   own op (``fastlm.ops._cpu_choice``), a GPU kernel only for the ops measured ahead there
   (``fastlm.ops._gpu_choice``); elsewhere the reference (torch) serves;
3. the reference serves everything else: PyTorch's own fused op of the same function where
   torch has one and it expresses the case (``fastlm.ops._torch_forms``; on CPUs too, so that a
   kernel not chosen at the CPU's level leaves the op to torch's, not to the spec's plain
   ops), the spec otherwise. The reference asked for by name is the spec on CPUs.

The state is a plain module-level stack so that ``torch.compile`` traces through it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

_AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: frozenset
    dtypes: frozenset
    # for the automatic choice: preferred(numel), numel the input's size where the op's
    # caller gives it (None: size unknown); None: always preferred
    preferred: Callable[[int | None], bool] | None = None

    def serves(self, device_type: str, dtype: torch.dtype) -> bool:
        return device_type in self.devices and dtype in self.dtypes


@dataclass
class Backend:
    name: str
    devices: tuple  # device types this backend can run on at all
    ops: dict = field(default_factory=dict)
    # {op: function} that serve in its place when the automatic choice falls to this backend
    auto: dict = field(default_factory=dict)
    available: bool = True
    why_unavailable: str = ""

    def register(self, op: str, fn: Callable, dtypes: Iterable[torch.dtype], devices: Iterable[str] | None = None,
                 preferred: Callable[[int | None], bool] | None = None):
        self.ops[op] = Impl(fn, frozenset(devices or self.devices), frozenset(dtypes), preferred)


_BACKENDS: dict[str, Backend] = {}
_STACK: list[str] = []


def add_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown fastlm backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    b = _BACKENDS.get(name)
    if b is None or not b.available:
        why = b.why_unavailable if b is not None else "it was not built"
        raise RuntimeError(
            f"fastlm backend {name!r} is not available: {why}. Usable backends: {', '.join(backends())}"
        )
    return b


def backends() -> list[str]:
    """Names of the usable backends, in a fixed order."""
    return [n for n in BACKEND_NAMES if n in _BACKENDS and _BACKENDS[n].available]


class BackendStatus(NamedTuple):
    available: bool
    why_unavailable: str  # "" when available


def backends_status() -> dict[str, BackendStatus]:
    """Every known backend, in a fixed order: whether it can run here, and why not if it cannot
    (not built, its extension failed to load, no device)."""
    out = {}
    for name in BACKEND_NAMES:
        b = _BACKENDS.get(name)
        if b is None:
            out[name] = BackendStatus(False, "it was not built")
        else:
            out[name] = BackendStatus(b.available, "" if b.available else b.why_unavailable)
    return out


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend ``name`` (``None`` or "auto": automatic choice)."""
    if name is not None and name != "auto":
        get_backend(name)  # validates the name and that it is usable
    _STACK.append(None if name == "auto" else name)
    try:
        yield
    finally:
        _STACK.pop()


def requested_backend() -> str | None:
    """The backend the user asked for: innermost ``use_backend`` first, then FASTLM_BACKEND."""
    if _STACK:
        return _STACK[-1]
    env = os.environ.get("FASTLM_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    return env


def resolve(op: str, device: torch.device, dtype: torch.dtype, numel: int | None = None) -> tuple[str, Callable]:
    """(backend name, function) that serves ``op`` for an input on ``device`` of ``dtype`` (of
    ``numel`` elements, for the ops whose automatic choice depends on the size)."""
    dev = device.type
    want = requested_backend()
    if want is not None:
        b = get_backend(want)
        if dev not in b.devices:
            raise ValueError(
                f"fastlm backend {want!r} runs on {'/'.join(b.devices)} tensors, but the input of "
                f"{op} is on {device}; move the tensors or choose another backend"
            )
        impl = b.ops.get(op)
        if impl is not None and impl.serves(dev, dtype):
            return want, impl.fn
        ref = _BACKENDS["reference"]
        return "reference", ref.ops[op].fn
    for name in _AUTO_ORDER.get(dev, ("reference",)):
        b = _BACKENDS.get(name)
        if b is None or not b.available:
            continue
        impl = b.ops.get(op)
        if impl is not None and impl.serves(dev, dtype) and (impl.preferred is None or impl.preferred(numel)):
            return name, b.auto.get(op, impl.fn)
    ref = _BACKENDS["reference"]
    return "reference", ref.auto.get(op, ref.ops[op].fn)
