"""LayerNorm / RMSNorm (optionally fused with a residual add): every backend against the
float64 reference, forward and all gradients, on hypothesis-drawn shapes and dtypes."""
import gc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlm
from fastlm import ops
from fastlm import reference as R

from conftest import CPU_LEVEL_BACKENDS, TRITON_ON_CPU, backend_name, on_backend, rel_error

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NATIVE = CPU_LEVEL_BACKENDS
TRITON = TRITON_ON_CPU


def _inputs(shape, dtype, bias, residual, noncontig, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    if noncontig:  # a strided view: every other row of a taller tensor
        x = rnd(*shape[:-2], 2 * shape[-2], C)[..., ::2, :]
    else:
        x = rnd(*shape)
    x = (x * 2 + 0.5).to(dtype)
    r = (rnd(*shape)).to(dtype) if residual else None
    w = (rnd(C) * 0.5 + 1).to(dtype)
    b = (rnd(C) * 0.1).to(dtype) if bias else None
    dy = rnd(*shape).to(dtype)
    dh = rnd(*shape).to(dtype) if residual else None
    return x, r, w, b, dy, dh


def _run(fn, kind, x, r, w, b, dy, dh, dtype=None):
    """Run `fn` (a backend op or the reference) with gradients; returns outputs and grads."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.detach().to(dtype))
    leaves = [t for t in (cast(x), cast(r), cast(w), cast(b))]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    xx, rr, ww, bb = leaves
    if kind == "ln":
        out = fn(xx, ww, bb, eps=1e-5, residual=rr)
    else:
        out = fn(xx, ww, eps=1e-6, residual=rr)
    outs = list(out) if rr is not None else [out]
    gys = [cast(dy)] + ([cast(dh)] if rr is not None else [])
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, live, gys)
    return [o.detach() for o in outs] + list(grads)


def _check(backend, kind, shape, dtype, bias, residual, noncontig, seed):
    bias = bias and kind == "ln"
    x, r, w, b, dy, dh = _inputs(shape, dtype, bias, residual, noncontig, seed)
    fn = ops.layer_norm if kind == "ln" else ops.rms_norm
    reff = R.layer_norm if kind == "ln" else R.rms_norm
    with on_backend(backend):
        assert ops.implementation("layer_norm" if kind == "ln" else "rms_norm", x) == backend_name(backend)
        got = _run(fn, kind, x, r, w, b, dy, dh)
    want = _run(reff, kind, x, r, w, b, dy, dh, dtype=torch.float64)
    # dx = rstd * (g - mean(g) - xhat * mean(g xhat)) cancels almost entirely for tiny C
    # (RMSNorm of one element: dx ~ eps / h^2 of its terms), so the gradient of x (and of
    # the residual) is judged relative to the size of those terms, ||rstd * dy * w||.
    hd = x.double() if r is None else (x.double() + r.double())
    hc = hd - (hd.mean(-1, keepdim=True) if kind == "ln" else 0)
    rstd = torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + (1e-5 if kind == "ln" else 1e-6))
    scale = (rstd * dy.double() * w.double()).norm().item()
    nout = 2 if r is not None else 1
    dx_idx = {nout, nout + 1} if r is not None else {nout}
    # A row that is nearly constant against its mean (LayerNorm of a few elements) is
    # ill-conditioned: a row mean held in the dtype is off by up to half an ulp of itself,
    # which moves every normalised value by u |mean| rstd, however the rest is computed.
    # The tolerance grows with that bound where it exceeds the dtype's own (never in float64).
    u = 0.0 if dtype == torch.float64 else torch.finfo(dtype).eps / 2
    cond = (hd.mean(-1, keepdim=True).abs() * rstd).max().item() if kind == "ln" else 0.0
    tol = max(TOL[dtype], 4 * u * cond)
    for i, (g, wnt) in enumerate(zip(got, want)):
        assert g.shape == wnt.shape and g.dtype == x.dtype, (i, g.shape, wnt.shape, g.dtype)
        assert not torch.isnan(g).any(), f"output {i} has NaN"
        if i in dx_idx:
            err = (g.double() - wnt).norm().item() / max(wnt.norm().item(), scale, 1e-300)
        else:
            err = rel_error(g, wnt)
        assert err <= tol, f"output {i}: rel err {err:.3g} (tolerance {tol:.3g})"


SHAPES = st.one_of(
    st.tuples(st.integers(1, 40), st.sampled_from([1, 2, 3, 7, 15, 16, 17, 31, 33, 100, 257, 771])),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.sampled_from([1, 5, 16, 48, 130])),
)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("kind", ["ln", "rms"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       bias=st.booleans(), residual=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_native_matches_reference(backend, kind, shape, dtype, bias, residual, noncontig, seed):
    _check(backend, kind, shape, dtype, bias and kind == "ln", residual, noncontig and len(shape) >= 2, seed)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("C", [768, 1024, 4096, 8192, 8193])
def test_native_wide_rows(backend, kind, C):
    _check(backend, kind, (9, C), torch.float32, True, True, False, C)


@pytest.mark.skipif(not TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("kind", ["ln", "rms"])
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(shape=st.tuples(st.integers(1, 5), st.sampled_from([1, 3, 16, 33])),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(), residual=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(kind, shape, dtype, bias, residual, seed):
    _check("triton", kind, shape, dtype, bias and kind == "ln", residual, False, seed)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_every_output_element_is_written(backend, kind):
    """Large outputs come from a pool that reuses freed blocks: fill those blocks with NaN,
    free them, and check that the next call overwrites every element."""
    shape = (1500, 1003)  # ~6 MB per float32 output: pooled
    x, r, w, b, dy, dh = _inputs(shape, torch.float32, True, True, False, 1)
    b = b if kind == "ln" else None
    args = (w, b) if kind == "ln" else (w,)
    fn = ops.layer_norm if kind == "ln" else ops.rms_norm
    with on_backend(backend):
        for _ in range(2):
            xx = x.clone().requires_grad_()
            out, h = fn(xx, *args, residual=r)
            (dx,) = torch.autograd.grad([out, h], [xx], [dy, dh])
            for t in (out, h, dx):
                t.fill_(float("nan"))
            del out, h, dx, xx
            gc.collect()
        xx = x.clone().requires_grad_()
        out, h = fn(xx, *args, residual=r)
        (dx,) = torch.autograd.grad([out, h], [xx], [dy, dh])
    ref = _run(R.layer_norm if kind == "ln" else R.rms_norm, kind, x, r, w, b, dy, dh, dtype=torch.float64)
    for got, want in zip((out, h, dx), (ref[0], ref[1], ref[2])):
        assert not torch.isnan(got).any()
        assert rel_error(got, want) < 1e-5


def test_output_tensors_are_ordinary():
    x = torch.randn(2048, 1024)
    out = ops.layer_norm(x, torch.ones(1024))
    out.resize_(4096, 1024)  # a pooled output is a normal resizable tensor
    out.fill_(1.0)
    assert out.shape == (4096, 1024) and out.sum().item() == 4096 * 1024


@pytest.mark.parametrize("backend", NATIVE[:1] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_backward_through_the_residual_sum_alone(backend, kind):
    """Only h = x + residual is used, so autograd hands the backward no gradient of the
    normalised output: every form treats it as zero (C++, CUDA and Triton share one glue)."""
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(4, 24, generator=g, requires_grad=True), torch.randn(4, 24, generator=g, requires_grad=True)
    w = (torch.rand(24, generator=g) + 0.5).requires_grad_()
    with on_backend(backend):
        if kind == "ln":
            _, h = ops.layer_norm(x, w, torch.zeros(24), residual=r)
        else:
            _, h = ops.rms_norm(x, w, residual=r)
    (3 * h).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0)) and torch.equal(r.grad, torch.full_like(r, 3.0))
    assert torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", NATIVE)
def test_opcheck(backend):
    x = torch.randn(3, 5, 37, requires_grad=True)
    r = torch.randn(3, 5, 37, requires_grad=True)
    w = torch.randn(37, requires_grad=True)
    b = torch.randn(37, requires_grad=True)
    for args in [(x, w, b, r, 1e-5), (x, w, None, None, 1e-5)]:
        torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd.default, args)
    for args in [(x, w, r, 1e-6), (x, w, None, 1e-6)]:
        torch.library.opcheck(torch.ops.fastlm.rms_norm_fwd.default, args)
    # the backward ops have no derivative of their own: check them on plain tensors
    x, r, w, b = (t.detach() for t in (x, r, w, b))
    out, h, mean, rstd = torch.ops.fastlm.layer_norm_fwd(x, w, b, r, 1e-5)
    g = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastlm.layer_norm_bwd.default, (g, g, h, w, b, mean, rstd))
    torch.library.opcheck(torch.ops.fastlm.layer_norm_bwd.default, (g, None, x, w, None, mean, rstd))
    out, h, rstd = torch.ops.fastlm.rms_norm_fwd(x, w, r, 1e-6)
    torch.library.opcheck(torch.ops.fastlm.rms_norm_bwd.default, (g, None, h, w, rstd))


@pytest.mark.parametrize("backend", NATIVE)
def test_torch_compile_fullgraph(backend):
    w = torch.randn(48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)

    def block(x, r):
        y, h = ops.layer_norm(x, w, b, residual=r)
        z, h2 = ops.rms_norm(y * 2, w, residual=h)
        return (z + h2).sum()

    x = torch.randn(4, 7, 48, requires_grad=True)
    r = torch.randn(4, 7, 48, requires_grad=True)
    with on_backend(backend):
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        got = compiled(x, r)
        gx, gr = torch.autograd.grad(got, (x, r))
        want = block(x, r)
        wx, wr = torch.autograd.grad(want, (x, r))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gx, wx, rtol=1e-5, atol=1e-5) and torch.allclose(gr, wr, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="floating-point"):
        ops.layer_norm(x.long(), torch.ones(8))
    with pytest.raises(TypeError, match="dtype"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(ValueError, match="bias"):
        ops.layer_norm(x, torch.ones(8), torch.ones(9))
    with pytest.raises(ValueError, match="on meta"):
        ops.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.layer_norm(torch.tensor(1.0), torch.ones(1))


def test_empty_rows():
    x = torch.randn(0, 16)
    out, h = ops.layer_norm(x, torch.ones(16), residual=torch.randn(0, 16))
    assert out.shape == (0, 16) and h.shape == (0, 16)
    assert ops.rms_norm(torch.randn(2, 0, 5), torch.ones(5)).shape == (2, 0, 5)
