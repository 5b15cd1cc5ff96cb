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
    # for fp16 subnormals (|y| < 6e-5). The kernel may be at most twice that, or the tolerance,
    # or what float32 arithmetic allows where the function is ill-conditioned (conditioning()).
    cond = 4 * 2.0**-24 * conditioning(xd.detach()) if dtype != torch.float64 else 0.0
    assert rel_error(y, yd) <= max(TOL[dtype], 2 * rel_error(yd.to(dtype), yd), cond)
    assert rel_error(dx, dxd) <= max(4 * TOL[dtype], 2 * rel_error(dxd.to(dtype), dxd), 4 * cond)


def conditioning(x: torch.Tensor) -> float:
    """The norm-wise relative condition number of GELU at float64 x: ||kappa y|| / ||y|| with
    kappa = |x y' / y| elementwise. A relative change e in the inputs (or in the internal
    argument u = sqrt(2/pi)(x + 0.044715 x^3), which the kernels form in float32) moves the
    output by about kappa e: for x = -6.2, kappa is about 60 (y = x sigmoid(2u) ~ x e^(2u)),
    so float32 arithmetic alone leaves a few 1e-6 there. (torch's own float32 GELU returns -0.)"""
    x = x.double().requires_grad_()
    y = R.gelu(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    y, dy, x = y.detach(), dy.detach(), x.detach()
    kappa = torch.where(y != 0, (x * dy / y).abs(), torch.zeros_like(y))
    norm = y.norm()
    return float((kappa * y).norm() / norm) if norm > 0 else 0.0


def test_gelu_tolerance_follows_the_conditioning():
    """conditioning() is about 1 where GELU is tame and grows in the far negative tail."""
    assert 0.5 < conditioning(torch.tensor([0.5])) < 2
    assert 40 < conditioning(torch.tensor([-6.2088828])) < 80


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
