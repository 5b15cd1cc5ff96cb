"""fastlm.ops.decode_linear and pack_decode_weight: the CPU kernel against torch at the sizes
that take its threaded path, its input checks, opcheck and torch.compile. (Random shapes of
every backend against the reference are in test_backends.py.)"""
import math

import pytest
import torch

import fastlm.ops as ops
from fastlm import reference
from fastlm.ops import _dispatch

from conftest import rel_error


@pytest.mark.skipif("decode_linear" not in _dispatch._BACKENDS["cpu"].ops if "cpu" in ops.backends() else True,
                    reason="the CPU backend is not built")
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16, 33, 269])
@pytest.mark.parametrize("K,N", [(256, 768), (1024, 256), (768, 2311)])
def test_decode_linear_threaded_sizes(M, K, N):
    # weights large enough for the threaded path, N not a multiple of the panel width; M up to
    # 8 rows takes one pass over each panel, more take several (a prefill: hundreds)
    g = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    want = torch.addmm(b, x, w.t())
    w_p = ops.pack_decode_weight(w.float())
    W = reference.DECODE_PANEL
    assert w_p.shape == ((N + W - 1) // W, K, W)
    with ops.use_backend("cpu"):
        got = ops.decode_linear(x.float(), w_p, b.float(), N)
        got_nb = ops.decode_linear(x.float(), w_p, None, N)
    assert got.shape == (M, N)
    assert rel_error(got.double(), want) < 2e-6
    assert rel_error(got_nb.double(), x @ w.t()) < 2e-6
    with pytest.raises(ValueError, match="same K"):
        ops.decode_linear(x.float()[:, :-1], w_p, None, N)
    with pytest.raises(ValueError, match="does not match"):
        ops.decode_linear(x.float(), w_p, None, N + W)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.decode_linear(x.float(), w_p, b.float()[:-1], N)


@pytest.mark.skipif("decode_linear" not in _dispatch._BACKENDS["cpu"].ops if "cpu" in ops.backends() else True,
                    reason="the CPU backend is not built")
def test_decode_linear_opcheck_and_compile():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g, requires_grad=True)
    w_p = ops.pack_decode_weight(torch.randn(70, 40, generator=g)).requires_grad_()
    b = torch.randn(70, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.decode_linear.default, (x, w_p, b, 70))
    torch.library.opcheck(torch.ops.fastlm.decode_linear.default, (x.detach(), w_p.detach(), None, 70))
    with ops.use_backend("cpu"):
        want = ops.decode_linear(x.detach(), w_p.detach(), b.detach(), 70)
        f = torch.compile(lambda x, w, b: ops.decode_linear(x, w, b, 70), fullgraph=True)
        got = f(x.detach(), w_p.detach(), b.detach())
    assert torch.allclose(got, want)
