"""fastlm.ops.attention and decode_attention: every backend against the float64 reference.

Outputs are allocated by the kernels, so the tests run with deterministic algorithms on:
torch then fills every fresh (uninitialised) float tensor with NaN, and an element a
kernel forgets to write fails the comparison.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlm
from fastlm import reference as R
from fastlm.ops import _cpu_choice
from conftest import CPU_LEVEL_BACKENDS, TRITON_ON_CPU, backend_name, on_backend, rel_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

def _serves(backend):
    if backend not in fastlm.ops.backends():
        return False
    return "attention" in fastlm.ops.get_backend(backend).ops


KERNEL_BACKENDS = (CPU_LEVEL_BACKENDS if _serves("cpu") else []) + (["triton"] if _serves("triton") and TRITON_ON_CPU else [])
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _nan_fill():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    return q, k, v, do


def _ref_with_grads(q, k, v, do, causal, scale=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = R.attention(q, k, v, causal=causal, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), grads


def _run(backend, q, k, v, do, causal, scale=None, dtype=torch.float32):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    with on_backend(backend):
        assert fastlm.ops.implementation("attention", q) == backend_name(backend)
        out = fastlm.ops.attention(q, k, v, causal=causal, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return out.detach(), grads


def _check(backend, B, H, Hkv, Tq, Tk, D, causal, seed, dtype=torch.float32, scale=None):
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed)
    ref, ref_g = _ref_with_grads(q, k, v, do, causal, scale)
    out, g = _run(backend, q, k, v, do, causal, scale, dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    assert rel_error(out, ref) < tol, ("out", rel_error(out, ref))
    for name, a, b in zip(("dq", "dk", "dv"), g, ref_g):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_error(a, b) < tol, (name, rel_error(a, b))


# ----------------------------------------------------------------------------- CPU kernel
LENGTHS = [1, 2, 7, 13, 31, 63, 64, 65, 97, 128, 131, 200]


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 3]),
       Tq=st.sampled_from(LENGTHS), dT=st.sampled_from([0, 0, 1, 17, 70]),
       D=st.sampled_from([16, 40, 64, 80, 128, 256]), causal=st.booleans(), seed=st.integers(0, 2**31))
def test_cpu_matches_reference(B, Hkv, G, Tq, dT, D, causal, seed):
    _check("cpu", B, Hkv * G, Hkv, Tq, Tq + dT, D, causal, seed)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 300), (257, 257), (129, 61), (70, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_edge_lengths(Tq, Tk, causal):
    # Tq > Tk under causal masking: the first Tq - Tk queries see no key and output zeros.
    _check("cpu", 1, 2, 1, Tq, Tk, 64, causal, seed=Tq * 1000 + Tk, scale=0.3)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_cpu_no_visible_key_outputs_zeros():
    q, k, v, do = _inputs(1, 2, 2, 9, 4, 16, torch.float32, seed=3)
    out, g = _run("cpu", q, k, v, do, causal=True)
    assert torch.all(out[:, :, :5] == 0)
    assert all(torch.isfinite(t).all() for t in g)
    assert torch.all(g[0][:, :, :5] == 0)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 2, 77, 77, 64), (1, 2, 2, 130, 200, 128), (1, 3, 1, 33, 33, 80)])
def test_cpu_low_precision_within_2x_of_torch(dtype, shape):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, do = _inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=sum(shape))
    ref, ref_g = _ref_with_grads(q, k, v, do, True)
    out, g = _run("cpu", q, k, v, do, True, dtype=dtype)
    # torch's own attention in the same dtype on the same (rounded) inputs
    qt, kt, vt = (t.to(dtype).repeat_interleave(H // Hkv, 1) if t is not q else t.to(dtype) for t in (q, k, v))
    qt, kt, vt = (t.detach().requires_grad_() for t in (qt, kt, vt))
    tout = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    tg = torch.autograd.grad(tout, (qt, kt, vt), do.to(dtype))
    def fold(t):  # sum the expanded k/v gradients back onto the Hkv heads
        return t.view(B, Hkv, H // Hkv, Tk, D).sum(2)
    tg = (tg[0], fold(tg[1]), fold(tg[2]))
    assert rel_error(out, ref) <= max(2 * rel_error(tout, ref), 1e-3) and rel_error(out, ref) < TOL[dtype]
    for a, b, c in zip(g, ref_g, tg):
        assert rel_error(a, b) <= max(2 * rel_error(c, b), 1e-3) and rel_error(a, b) < 2 * TOL[dtype]


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_cpu_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    B, T, H, D = 2, 45, 4, 64
    # (B, T, H, D) storage viewed as (B, H, T, D), as a model's fused projection gives it
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = torch.randn(B, H, T, D, generator=g, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    ref, ref_g = _ref_with_grads(q, k, v, do, True)
    out, grads = _run("cpu", q, k, v, do, True)
    assert rel_error(out, ref) < 1e-4
    for a, b in zip(grads, ref_g):
        assert rel_error(a, b) < 1e-4


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 45, 4, 4, 64), (1, 1, 1, 1, 8), (3, 70, 6, 2, 24), (2, 9, 1, 1, 5)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_reads_and_writes_heads_in_place(B, T, H, Hkv, D, causal):
    """float32 heads split from one (B, T, (H + 2 Hkv) D) projection are read where they lie;
    the output and the gradients come back in the same (B, T, H, D) order, so merging the heads
    is a view and the projection's gradient needs no reordering; values match the reference."""
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    proj = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g)
    q, k, v = proj.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2).requires_grad_() for t in (q.detach(), k.detach(), v.detach()))
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # the merged output's gradient, seen per head
    with on_backend("cpu"):
        out = fastlm.ops.attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_g = _ref_with_grads(q.double(), k.double(), v.double(), do.double(), causal)
    assert rel_error(out, ref) < 1e-5
    for got, want in zip(grads, ref_g):
        assert rel_error(got, want) < 1e-4
    if T > 1 and H > 1:
        assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory
        assert grads[0].transpose(1, 2).is_contiguous()
    # a gradient of any other layout (here broadcast from one row, and one with strided rows)
    for other in (torch.ones(1, 1, 1, D).expand(B, H, T, D), torch.randn(B, H, T, 2 * D, generator=g)[..., ::2]):
        with on_backend("cpu"):
            out = fastlm.ops.attention(q, k, v, causal=causal)
        got = torch.autograd.grad(out, (q, k, v), other)
        want = _ref_with_grads(q.double(), k.double(), v.double(), other.double(), causal)[1]
        for a, b in zip(got, want):
            assert rel_error(a, b) < 1e-4


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_cpu_is_the_default_on_cpu_where_it_wins():
    q = torch.randn(1, 1, 4, 16)
    wins = fastlm.ops.cpu_isa() in _cpu_choice.NATIVE_WINS["attention"]
    assert fastlm.ops.implementation("attention", q) == ("cpu" if wins else "reference")
    assert fastlm.ops.implementation("attention", q.double()) == "reference"


# ----------------------------------------------------------------------------- decode
def _decode_case(B, H, Hkv, Tq, L, D, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    kc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("B,H,Hkv,Tq,L,D,lens", [
    (1, 2, 2, 1, 1, 16, [1]),
    (3, 4, 2, 1, 300, 64, [300, 1, 129]),
    (2, 6, 2, 3, 700, 80, [700, 5]),
    (2, 2, 1, 4, 64, 128, [2, 64]),      # a sequence shorter than Tq: its first queries see nothing
    (4, 12, 12, 1, 2100, 64, [2048, 17, 1999, 600]),
])
def test_decode_matches_reference(backend, B, H, Hkv, Tq, L, D, lens):
    if backend == "triton" and L > 700:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    q, kc, vc, cl = _decode_case(B, H, Hkv, Tq, L, D, lens, torch.float32, seed=L + Tq)
    ref = R.decode_attention(q, kc, vc, cl)
    with on_backend(backend):
        out = fastlm.ops.decode_attention(q.float(), kc.float(), vc.float(), cl)
    assert rel_error(out, ref) < 1e-4
    # and against full attention over each sequence's valid prefix
    for b in range(B):
        n = int(cl[b])
        if n >= Tq:
            full = R.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], causal=True)
            assert rel_error(out[b:b + 1], full) < 1e-4


@pytest.mark.skipif(not _serves("cpu"), reason="the C++ extension is not built")
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.sampled_from([1, 1, 2]), Tq=st.sampled_from([1, 1, 2]),
       D=st.sampled_from([16, 32, 40, 48, 64, 80, 96, 112, 128, 256]), L=st.integers(1, 700),
       data=st.data())
def test_decode_cpu_on_drawn_shapes(B, Hkv, G, Tq, D, L, data):
    """The CPU decode kernel's paths (one query row per head with D = 16, 32, ..., 128; grouped
    or several query rows; other head sizes; cache splits) on drawn lengths, zero included."""
    lens = data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B), label="lens")
    q, kc, vc, cl = _decode_case(B, G * Hkv, Hkv, Tq, L, D, lens, torch.float32, seed=data.draw(st.integers(0, 2**31)))
    ref = R.decode_attention(q, kc, vc, cl)
    with fastlm.ops.use_backend("cpu"):
        out = fastlm.ops.decode_attention(q.float(), kc.float(), vc.float(), cl)
    assert out.shape == ref.shape and not torch.isnan(out).any()
    assert rel_error(out, ref) < 1e-4


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_decode_ignores_what_lies_past_the_lengths(backend):
    """The cache past cache_lens may be uninitialised memory: NaN and inf there change nothing."""
    q, kc, vc, cl = _decode_case(3, 4, 2, 2, 40, 16, [40, 7, 2], torch.float32, seed=11)
    ref = R.decode_attention(q, kc, vc, cl)
    kd, vd = kc.float().clone(), vc.float().clone()
    for b, n in enumerate(cl.tolist()):
        kd[b, :, n:] = float("nan")
        vd[b, :, n:] = float("inf") if b % 2 else float("nan")
    with on_backend(backend):
        out = fastlm.ops.decode_attention(q.float(), kd, vd, cl)
    assert torch.isfinite(out).all() and rel_error(out, ref) < 1e-4


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_decode_bf16_and_int64_lens():
    q, kc, vc, cl = _decode_case(2, 4, 1, 1, 500, 64, [500, 33], torch.bfloat16, seed=5)
    ref = R.decode_attention(q.bfloat16().double(), kc.bfloat16().double(), vc.bfloat16().double(), cl)
    out = fastlm.ops.decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), cl.long())
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) < 1e-2


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_decode_rejects_lengths_out_of_range():
    q, kc, vc, _ = _decode_case(2, 2, 2, 1, 8, 16, [1, 1], torch.float32, seed=1)
    with pytest.raises(ValueError, match="cache_lens"):
        fastlm.ops.decode_attention(q.float(), kc.float(), vc.float(), torch.tensor([9, 1]))
    with pytest.raises(ValueError, match="cache_lens"):
        fastlm.ops.decode_attention(q.float(), kc.float(), vc.float(), torch.tensor([3, -1]))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,err,msg", [
    (lambda: (torch.randn(2, 4, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16)), ValueError, "4 dimensions"),
    (lambda: (torch.randn(1, 6, 4, 16), torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16)), ValueError, "multiple"),
    (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), ValueError, "head size"),
    (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 5, 16)), ValueError, "one shape"),
    (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16).double(), torch.randn(1, 2, 4, 16)), TypeError,
     "dtype"),
    (lambda: (torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16, device="meta"), torch.randn(1, 2, 4, 16)),
     ValueError, "device|on meta"),
    (lambda: (torch.randn(1, 2, 4, 300), torch.randn(1, 2, 4, 300), torch.randn(1, 2, 4, 300)), ValueError,
     "head size"),
    (lambda: (torch.randint(0, 3, (1, 2, 4, 16)),) * 3, TypeError, "floating"),
])
def test_bad_inputs_raise(make, err, msg):
    q, k, v = make()
    with pytest.raises(err, match=msg):
        fastlm.ops.attention(q, k, v)


def test_decode_bad_inputs_raise():
    q = torch.randn(2, 2, 1, 16)
    kc = torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match="cache_lens"):
        fastlm.ops.decode_attention(q, kc, kc, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cache_lens"):
        fastlm.ops.decode_attention(q, kc, kc, torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------- custom-op machinery
@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_opcheck():
    torch.use_deterministic_algorithms(False)  # opcheck compares against fresh tensors itself
    g = torch.Generator().manual_seed(0)
    for causal, (H, Hkv, Tq, Tk) in [(True, (4, 2, 37, 70)), (False, (2, 2, 65, 65))]:
        q = torch.randn(2, H, Tq, 40, generator=g, requires_grad=True)
        k = torch.randn(2, Hkv, Tk, 40, generator=g, requires_grad=True)
        v = torch.randn(2, Hkv, Tk, 40, generator=g, requires_grad=True)
        torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, causal, 0.2))
        out, lse = torch.ops.fastlm.attention_fwd(q.detach(), k.detach(), v.detach(), causal, 0.2)
        do = torch.randn_like(out)
        torch.library.opcheck(torch.ops.fastlm.attention_bwd.default,
                              (do, q.detach(), k.detach(), v.detach(), out, lse, causal, 0.2))
    # heads split from one projection: outputs come back in its (B, T, H, D) order, fake too
    proj = torch.randn(2, 33, 3 * 4 * 16, generator=g)
    q, k, v = (t.view(2, 33, 4, 16).transpose(1, 2) for t in proj.split(64, dim=-1))
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, True, 0.25))
    out, lse = torch.ops.fastlm.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    torch.library.opcheck(torch.ops.fastlm.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, 0.25))
    kc = torch.randn(3, 2, 90, 64, generator=g)
    q = torch.randn(3, 4, 2, 64, generator=g)
    torch.library.opcheck(torch.ops.fastlm.decode_attention.default,
                          (q, kc, kc.clone(), torch.tensor([90, 2, 50], dtype=torch.int32), 0.125))


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_torch_compile_fullgraph():
    torch.use_deterministic_algorithms(False)
    torch._dynamo.reset()

    def f(q, k, v, kc, cl):
        a = fastlm.ops.attention(q, k, v, causal=True)
        d = fastlm.ops.decode_attention(q[:, :, -1:], kc, kc, cl)
        return a.sum() + d.sum()

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 64, generator=g, requires_grad=True) for _ in range(3))
    kc = torch.randn(1, 2, 40, 64, generator=g)
    cl = torch.tensor([33])
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(q, k, v, kc, cl)
    y.backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y2 = f(q2, k2, v2, kc, cl)
    y2.backward()
    torch.testing.assert_close(y, y2)
    for a, b in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- long sequences
_LONG = r"""
import resource, torch, fastlm
torch.manual_seed(0)
B, H, T, D = 1, 4, 8192, 64
q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = fastlm.ops.attention(q, k, v, causal=True)
out.backward(torch.randn_like(out))
assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="fastlm._C not built")
def test_long_sequence_allocates_no_score_matrix():
    # One float32 8192 x 8192 score matrix per head would be 1 GiB for the 4 heads; the peak
    # growth of the process's resident memory during forward + backward must stay far below.
    env = dict(os.environ, FASTLM_BACKEND="cpu")
    r = subprocess.run([sys.executable, "-c", _LONG], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 256 * 2**20, f"peak memory grew by {grew / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton backend not usable")
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal", [
    (1, 2, 1, 5, 5, 16, True),
    (1, 2, 2, 19, 33, 32, True),
    (1, 2, 2, 33, 20, 16, True),
    (2, 1, 1, 17, 17, 40, False),
])
def test_triton_matches_reference(B, H, Hkv, Tq, Tk, D, causal):
    _check("triton", B, H, Hkv, Tq, Tk, D, causal, seed=Tq * 7 + D)
