"""Benchmarks: fused residual + LayerNorm / RMSNorm on the CPU against torch.

Groups (per shape (rows, C), float32, 2 threads):
  res_ln_fwd:  fastlm.ops.layer_norm(x, w, b, residual=r)  vs  F.layer_norm(x + r, ...)
               and the copy ceiling: a preallocated copy moving the same bytes
               (x and r read, out and h written once: 16 * rows * C bytes).
  ln_fwdbwd:   LayerNorm forward + backward (dx, dw, db), no residual, vs F.layer_norm.
  rms_fwdbwd:  RMSNorm forward + backward vs torch.nn.functional.rms_norm.
Before timing, fastlm's result and torch's are checked against the reference in float64
(relative error under 1e-5: the forward's out and h, or dx, dw, db), so that both sides of a
ratio compute the same thing. Outputs are allocated by each call, as users allocate them; every benchmark records its
minor page faults per call (getrusage) in extra_info["faults_per_call"].

    pytest bench/test_norms.py --benchmark-only --benchmark-json=norms.json
    python bench/tables.py norms.json
"""
import resource

import pytest
import torch
import torch.nn.functional as F

from checks import assert_close
from fastlm import ops
from fastlm import reference as R

torch.set_num_threads(2)
SHAPES = [(8192, 768), (16384, 1024), (4096, 4096)]
ROUNDS = 15


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _run(benchmark, fn, nbytes=None):
    counter = {"calls": 0, "faults": 0}

    def timed():
        f0 = _faults()
        fn()
        counter["faults"] += _faults() - f0
        counter["calls"] += 1

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    benchmark.extra_info["faults_per_call"] = counter["faults"] / max(1, counter["calls"])
    if nbytes:
        benchmark.extra_info["bytes"] = nbytes


def _ref_grads(norm, dy, *inputs, **kw):
    """The gradients of the reference norm in float64 with respect to every input."""
    xs = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(norm(*xs, **kw), xs, dy.double())


def _data(rows, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g)
    r = torch.randn(rows, C, generator=g)
    w = torch.randn(C, generator=g) * 0.5 + 1
    b = torch.randn(C, generator=g) * 0.1
    dy = torch.randn(rows, C, generator=g)
    return x, r, w, b, dy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["fastlm", "torch_two_ops", "copy_ceiling"])
def test_res_ln_fwd(benchmark, shape, impl):
    rows, C = shape
    benchmark.group = f"res_ln_fwd {rows}x{C}"
    x, r, w, b, _ = _data(rows, C)
    nbytes = 4 * rows * C * 4
    want = R.layer_norm(x.double(), w.double(), b.double(), residual=r.double())  # (out, h)
    if impl == "fastlm":
        assert_close(ops.layer_norm(x, w, b, residual=r), want, 1e-5)
        _run(benchmark, lambda: ops.layer_norm(x, w, b, residual=r), nbytes)
    elif impl == "torch_two_ops":
        def two_ops():
            h = x + r
            return F.layer_norm(h, (C,), w, b), h
        assert_close(two_ops(), want, 1e-5, "torch's result")
        _run(benchmark, two_ops, nbytes)
    else:
        src = torch.randn(2, rows, C)
        dst = torch.empty_like(src)
        _run(benchmark, lambda: dst.copy_(src), nbytes)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["fastlm", "torch"])
def test_ln_fwdbwd(benchmark, shape, impl):
    rows, C = shape
    benchmark.group = f"ln_fwdbwd {rows}x{C}"
    x, _, w, b, dy = _data(rows, C)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    if impl == "fastlm":
        fn = lambda: torch.autograd.grad(ops.layer_norm(x, w, b), (x, w, b), dy)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(F.layer_norm(x, (C,), w, b), (x, w, b), dy)  # noqa: E731
    assert_close(fn(), _ref_grads(R.layer_norm, dy, x, w, b), 1e-5, f"{impl}'s dx, dw, db")
    _run(benchmark, fn)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["fastlm", "torch"])
def test_rms_fwdbwd(benchmark, shape, impl):
    rows, C = shape
    benchmark.group = f"rms_fwdbwd {rows}x{C}"
    x, _, w, _, dy = _data(rows, C)
    x, w = (t.requires_grad_() for t in (x, w))
    if impl == "fastlm":
        fn = lambda: torch.autograd.grad(ops.rms_norm(x, w, eps=1e-6), (x, w), dy)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(F.rms_norm(x, (C,), w, eps=1e-6), (x, w), dy)  # noqa: E731
    assert_close(fn(), _ref_grads(R.rms_norm, dy, x, w, eps=1e-6), 1e-5, f"{impl}'s dx, dw")
    _run(benchmark, fn)
