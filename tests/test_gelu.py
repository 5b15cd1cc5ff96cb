"""GELU (tanh approximation): every backend against the float64 reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm import ops
from fastlm import reference as R

from conftest import CPU_LEVEL_BACKENDS, backend_name, on_backend, rel_error

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NATIVE = CPU_LEVEL_BACKENDS


@pytest.mark.parametrize("backend", NATIVE)
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.sampled_from([1, 15, 16, 17, 1000, 40000]), dtype=st.sampled_from(list(TOL)),
       scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_gelu_matches_reference(backend, n, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    dy = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    xx = x.clone().requires_grad_()
    with on_backend(backend):
        y = ops.gelu(xx)
        (dx,) = torch.autograd.grad(y, xx, dy)
    xd = x.double().requires_grad_()
    yd = R.gelu(xd)
    (dxd,) = torch.autograd.grad(yd, xd, dy.double())
    assert y.dtype == dtype and dx.dtype == dtype
    # Storing the exact result in the dtype already costs rel_error(ref.to(dtype), ref): large
    # for fp16 subnormals (|y| < 6e-5). The kernel may be at most twice that, or the tolerance.
    assert rel_error(y, yd) <= max(TOL[dtype], 2 * rel_error(yd.to(dtype), yd))
    assert rel_error(dx, dxd) <= max(4 * TOL[dtype], 2 * rel_error(dxd.to(dtype), dxd))


@pytest.mark.parametrize("backend", NATIVE)
def test_gelu_extremes_and_noncontiguous(backend):
    x = torch.tensor([0.0, -1e4, 1e4, -50.0, 50.0, 1e-30, float("inf"), float("-inf")])
    with on_backend(backend):
        y = ops.gelu(x)
        big = torch.randn(64, 33)[:, ::2]
        assert rel_error(ops.gelu(big), R.gelu(big.double())) < 1e-6
    assert y[0] == 0 and y[2] == 1e4 and y[4] == 50.0 and abs(y[1]) < 1e-30 and abs(y[3]) < 1e-30
    assert y[6] == float("inf") and not torch.isnan(y[:6]).any()


@pytest.mark.parametrize("backend", NATIVE)
def test_gelu_opcheck_and_compile(backend):
    x = torch.randn(5, 19, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.gelu_fwd.default, (x,))
    with on_backend(backend):
        f = torch.compile(lambda t: ops.gelu(t).sum(), fullgraph=True, backend="aot_eager")
        (g,) = torch.autograd.grad(f(x), x)
    xd = x.detach().double().requires_grad_()
    (gd,) = torch.autograd.grad(R.gelu(xd).sum(), xd)
    assert rel_error(g, gd) < 1e-5
