"""Generation's linear layer with reduced-precision weights (torch.ops.fastlm.decode_linear_q):
the quantizer and the packed layouts against their definitions in fastlm.reference, and the
CPU kernel at every SIMD level against the float64 product with the dequantized weight."""
import pytest
import torch

from fastlm import ops
from fastlm import reference as R

from conftest import CPU_LEVEL_BACKENDS, on_backend, rel_error

pytestmark = pytest.mark.skipif("cpu" not in ops.backends(), reason="fastlm._C not built")
FORMATS = ["q8_0", "q4_0", "bf16", "f16"]


def _weight(N, K, seed, scale=0.05):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("N,K", [(1, 1), (5, 31), (48, 32), (97, 100), (7, 65)])
def test_quantize_q8_0_follows_its_definition(N, K):
    w = _weight(N, K, N * 100 + K)
    w[0, : min(K, 32)] = 0  # an all-zero block: scale 0, values 0
    q, s = R.quantize_q8_0(w)
    assert q.dtype == torch.int8 and q.shape == (N, K)
    assert s.dtype == torch.float16 and s.shape == (N, -(-K // 32))
    assert int(q.abs().max()) <= 127
    assert float(s[0, 0]) == 0 and int(q[0, : min(K, 32)].abs().max()) == 0
    blocks = torch.nn.functional.pad(w, (0, s.shape[1] * 32 - K)).view(N, -1, 32)
    assert torch.equal(s, (blocks.abs().amax(-1) / 127).to(torch.float16))
    deq = (q.float().view(N, -1) * s.float().repeat_interleave(32, dim=1)[:, :K])
    # each value within half a step of its block's scale
    step = s.float().repeat_interleave(32, dim=1)[:, :K]
    assert bool(((deq - w).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("N,K", [(1, 1), (5, 31), (48, 32), (97, 100), (7, 65)])
def test_quantize_q4_0_follows_its_definition(N, K):
    w = _weight(N, K, N * 100 + K + 1)
    w[0, : min(K, 32)] = 0  # an all-zero block: scale 0, every weight 0
    u, s = R.quantize_q4_0(w)
    assert u.dtype == torch.uint8 and u.shape == (N, K) and int(u.max()) <= 15
    assert s.dtype == torch.float16 and s.shape == (N, -(-K // 32))
    assert float(s[0, 0]) == 0
    blocks = torch.nn.functional.pad(w, (0, s.shape[1] * 32 - K)).view(N, -1, 32)
    m = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(s, (m / -8).to(torch.float16))
    # each value lies within half a step (plus the scale's float16 rounding) of its
    # dequantized value, except at u = 15, where the range [-8, 7] clips values up to 8 steps
    # on the side opposite the largest one: within a step there
    step = s.float().abs().repeat_interleave(32, dim=1)[:, :K]
    deq = (u.float() - 8) * s.float().repeat_interleave(32, dim=1)[:, :K]
    bound = torch.where(u == 15, step * 1.01, step * 0.51) + 1e-3 * w.abs() + 1e-7
    assert bool(((deq - w).abs() <= bound).all())
    # and the value of largest magnitude of each block is exactly -8 scales: u = 0
    up = torch.nn.functional.pad(u, (0, s.shape[1] * 32 - K), value=8).view(N, -1, 32)
    at_max = torch.gather(up, -1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((at_max[s != 0] == 0).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("N,K", [(1, 1), (50, 33), (48, 64), (97, 100), (200, 7)])
def test_pack_and_unpack(fmt, N, K):
    w = _weight(N, K, 3 * N + K)
    wq = R.pack_decode_weight_q(w, fmt)
    P = -(-N // 48)
    if fmt == "q8_0":
        assert wq.dtype == torch.uint8 and wq.shape == (P, -(-K // 32), 32 * 48 + 96)
        q, s = R.quantize_q8_0(w)
        want = q.float() * s.float().repeat_interleave(32, dim=1)[:, :K]
    elif fmt == "q4_0":
        assert wq.dtype == torch.uint8 and wq.shape == (P, -(-K // 32), 16 * 48 + 96)
        u, s = R.quantize_q4_0(w)
        want = (u.float() - 8) * s.float().repeat_interleave(32, dim=1)[:, :K]
    else:
        assert wq.dtype == (torch.bfloat16 if fmt == "bf16" else torch.float16) and wq.shape == (P, K, 48)
        want = w.to(wq.dtype).float()
    assert torch.equal(R.unpack_decode_weight_q(wq, fmt, N, K), want)


@pytest.mark.parametrize("backend", CPU_LEVEL_BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 768, 2304), (2, 100, 50), (3, 31, 97), (8, 256, 769),
                                   (9, 64, 48), (13, 200, 97), (40, 130, 200)])
def test_kernel_matches_the_dequantized_product(backend, fmt, M, K, N):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N)
    w, x, b = _weight(N, K, M + K + N), torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    wq = R.pack_decode_weight_q(w, fmt)
    for bias in (None, b):
        with on_backend(backend):
            got = torch.ops.fastlm.decode_linear_q(x, wq, bias, N, fmt)
        want = R.decode_linear_q(x.double(), wq, None if bias is None else bias.double(), N, fmt)
        assert got.dtype == torch.float32 and got.shape == (M, N)
        assert rel_error(got, want) < 1e-5
    # and the dequantized product is close to the float32 one: the format's own error
    full = x.double() @ w.double().t()
    assert rel_error(R.decode_linear_q(x.double(), wq, None, N, fmt), full) < {"q8_0": 1e-2, "q4_0": 0.15,
                                                                             "bf16": 5e-3, "f16": 1e-3}[fmt]


@pytest.mark.parametrize("backend", CPU_LEVEL_BACKENDS)
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("M", [1, 8, 13])
def test_non_finite_activations(backend, fmt, M):
    """A row with a NaN or an infinity in some block gives NaN outputs (as the float product
    would), whatever the block's place (first, middle, the short last one); the other rows of
    the batch are untouched (the prefill path, M > 8, as well as the passes)."""
    K, N = 100, 97  # blocks of 32, 32, 32 and 4
    g = torch.Generator().manual_seed(M)
    wq = R.pack_decode_weight_q(_weight(N, K, 5), fmt)
    x = torch.randn(M, K, generator=g)
    bad = {0: (3, float("nan")), M // 2: (98, float("inf")), M - 1: (40, float("-inf"))}
    for row, (k, v) in bad.items():
        x[row, k] = v
    with on_backend(backend):
        got = torch.ops.fastlm.decode_linear_q(x, wq, None, N, fmt)
    for row in range(M):
        if row in bad:
            assert bool(torch.isnan(got[row]).all()), f"row {row}: {got[row, :4]}"
        else:
            want = R.decode_linear_q(x[row:row + 1].double(), wq, None, N, fmt)
            assert rel_error(got[row:row + 1], want) < 1e-5


def test_non_contiguous_input_and_empty():
    w = _weight(60, 40, 1)
    wq = R.pack_decode_weight_q(w, "q8_0")
    x = torch.randn(40, 5).t()  # (5, 40), not contiguous
    want = R.decode_linear_q(x.double(), wq, None, 60, "q8_0")
    assert rel_error(torch.ops.fastlm.decode_linear_q(x, wq, None, 60, "q8_0"), want) < 1e-5
    assert torch.ops.fastlm.decode_linear_q(torch.zeros(0, 40), wq, None, 60, "q8_0").shape == (0, 60)


def test_bad_input_is_refused():
    w = _weight(60, 40, 2)
    wq, wb = R.pack_decode_weight_q(w, "q8_0"), R.pack_decode_weight_q(w, "bf16")
    x = torch.randn(2, 40)
    with pytest.raises(RuntimeError, match="format must be"):
        torch.ops.fastlm.decode_linear_q(x, wq, None, 60, "q4_9")
    with pytest.raises(RuntimeError, match="q8_0 weight"):
        torch.ops.fastlm.decode_linear_q(x, wq, None, 200, "q8_0")  # n does not match the panels
    with pytest.raises(RuntimeError, match="q8_0 weight"):
        torch.ops.fastlm.decode_linear_q(torch.randn(2, 70), wq, None, 60, "q8_0")  # K does not match
    with pytest.raises(RuntimeError, match="q4_0 weight"):
        torch.ops.fastlm.decode_linear_q(x, wq, None, 60, "q4_0")  # q8_0 blocks given as q4_0
    with pytest.raises(RuntimeError, match="bf16 weight"):
        torch.ops.fastlm.decode_linear_q(x, wq, None, 60, "bf16")  # bytes given as bf16
    with pytest.raises(RuntimeError, match="f16 weight"):
        torch.ops.fastlm.decode_linear_q(x, wb, None, 60, "f16")
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.fastlm.decode_linear_q(x.double(), wq, None, 60, "q8_0")
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fastlm.decode_linear_q(x, wq, torch.randn(59), 60, "q8_0")
    with pytest.raises(ValueError, match="weight format"):
        R.pack_decode_weight_q(w, "int3")


# ----------------------------------------------------------------------------- the public op: fastlm.ops.decode_linear_q
@pytest.mark.parametrize("fmt", FORMATS)
def test_public_op_dispatches_and_matches_the_reference(fmt):
    g = torch.Generator().manual_seed(11)
    w, x, b = _weight(70, 40, 4), torch.randn(3, 40, generator=g), torch.randn(70, generator=g)
    wq = ops.pack_decode_weight_q(w, fmt)
    assert torch.equal(wq, R.pack_decode_weight_q(w, fmt))
    assert ops.implementation("decode_linear_q", x) == "cpu"
    want = R.decode_linear_q(x.double(), wq, b.double(), 70, fmt)
    assert rel_error(ops.decode_linear_q(x, wq, b, 70, fmt), want) < 1e-5
    # n left out: every packed column, the padding ones (zero weights) giving 0
    every = ops.decode_linear_q(x, wq, None, format=fmt)
    assert every.shape == (3, 96) and torch.equal(every[:, 70:], torch.zeros(3, 26))
    assert rel_error(every[:, :70], R.decode_linear_q(x.double(), wq, None, 70, fmt)) < 1e-5
    with ops.use_backend("reference"):
        assert ops.implementation("decode_linear_q", x) == "reference"
        assert rel_error(ops.decode_linear_q(x, wq, b, 70, fmt), want) < 1e-6
    # float64 input: the reference serves it, in float64
    got = ops.decode_linear_q(x.double(), wq, b.double(), 70, fmt)
    assert got.dtype == torch.float64 and rel_error(got, want) < 1e-12


def test_public_op_refuses_bad_input_with_python_errors():
    w = _weight(60, 40, 2)
    wq, wb = ops.pack_decode_weight_q(w, "q8_0"), ops.pack_decode_weight_q(w, "bf16")
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="format must be one of"):
        ops.decode_linear_q(x, wq, None, 60, "int8")
    with pytest.raises(ValueError, match="format must be one of"):
        ops.pack_decode_weight_q(w, "q5_1")
    with pytest.raises(ValueError, match=r"weight must be \(N, K\)"):
        ops.pack_decode_weight_q(w[0], "q8_0")
    with pytest.raises(TypeError, match="floating-point"):
        ops.pack_decode_weight_q(w.to(torch.int32), "q8_0")
    with pytest.raises(ValueError, match="has shape"):
        ops.decode_linear_q(x, wq, None, 200, "q8_0")  # n does not match the panels
    with pytest.raises(ValueError, match="has shape"):
        ops.decode_linear_q(torch.randn(2, 70), wq, None, 60, "q8_0")  # K does not match
    with pytest.raises(ValueError, match="has shape"):
        ops.decode_linear_q(x, wq, None, 60, "q4_0")  # q8_0 blocks given as q4_0
    with pytest.raises(TypeError, match="a bf16 weight is torch.bfloat16"):
        ops.decode_linear_q(x, wq, None, 60, "bf16")
    with pytest.raises(TypeError, match="a f16 weight is torch.float16"):
        ops.decode_linear_q(x, wb, None, 60, "f16")
    with pytest.raises(TypeError, match="floating-point"):
        ops.decode_linear_q(x.long(), wq, None, 60, "q8_0")
    with pytest.raises(TypeError, match="weight_q must be a torch.Tensor"):
        ops.decode_linear_q(x, wq.numpy(), None, 60, "q8_0")
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        ops.decode_linear_q(x[0], wq, None, 60, "q8_0")
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.decode_linear_q(x, wq, torch.randn(59), 60, "q8_0")
    with pytest.raises(TypeError, match="bias has dtype"):
        ops.decode_linear_q(x, wq, torch.randn(60, dtype=torch.float64), 60, "q8_0")
    with pytest.raises(ValueError, match="meta"):
        ops.decode_linear_q(x, wq.to("meta"), None, 60, "q8_0")


def test_opcheck_autograd_and_compile():
    g = torch.Generator().manual_seed(5)
    w = _weight(70, 40, 6)
    for fmt in ("q8_0", "bf16"):
        wq = ops.pack_decode_weight_q(w, fmt)
        x = torch.randn(3, 40, generator=g, requires_grad=True)
        b = torch.randn(70, generator=g, requires_grad=True)
        torch.library.opcheck(torch.ops.fastlm.decode_linear_q.default, (x, wq, b, 70, fmt))
        torch.library.opcheck(torch.ops.fastlm.decode_linear_q.default, (x.detach(), wq, None, 70, fmt))
        # gradients of x and the bias: those of the product with the dequantized weight
        wd = R.unpack_decode_weight_q(wq, fmt, 70, 40)
        cot = torch.randn(3, 70, generator=g)
        ops.decode_linear_q(x, wq, b, 70, fmt).backward(cot)
        assert rel_error(x.grad, cot.double() @ wd.double()) < 1e-5
        assert rel_error(b.grad, cot.sum(0)) < 1e-6
        if fmt == "q8_0":  # one compile: the fake shape does not depend on the format
            f = torch.compile(lambda x, b: ops.decode_linear_q(x, wq, b, 70, fmt), fullgraph=True)
            assert torch.allclose(f(x.detach(), b.detach()), ops.decode_linear_q(x.detach(), wq, b.detach(), 70, fmt))
