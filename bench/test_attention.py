"""Attention speed: fastlm's CPU kernel against torch's scaled_dot_product_attention (its own
CPU flash-attention kernel) and the reference backend, fp32, causal, on the same inputs.

    pytest bench/test_attention.py --benchmark-only --benchmark-json=attn.json
    python bench/tables.py attn.json          # ratios, GFLOP/s, fraction of the ceilings

Groups: "fwd B,H,T,D", "fwdbwd B,H,T,D", "decode B=..", and the machine's ceilings measured
in the same run: "ceiling matmul" (a large fp32 torch.mm) and "ceiling copy" (a large copy).
Before timing, fastlm's result and SDPA's are checked against the reference in float64
(relative error under 1e-4, forward, and the gradients of forward + backward), so that both
sides of a ratio compute the same attention.
FLOPs counted for causal attention: forward 2*B*H*T*T*D, forward + backward 7*B*H*T*T*D
(backward: five T x T x D products, half of them masked); decode reads K and V:
2*B*Hkv*L*D*4 bytes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from checks import assert_close
from fastlm import reference as R

SHAPES = [(1, 12, 1024, 64), (4, 12, 512, 64), (8, 12, 256, 64), (1, 16, 2048, 128)]
DECODE = [(1, 12, 2048, 64), (8, 12, 2048, 64), (8, 4, 192, 64)]  # the last: a batch-8 step of the small config


def _qkv(shape, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_(grad) for _ in range(3)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _ours(q, k, v):
    with fastlm.ops.use_backend("cpu"):
        return fastlm.ops.attention(q, k, v, causal=True)


def _ref(q, k, v):
    return R.attention(q, k, v, causal=True)


IMPLS = {"fastlm": _ours, "torch_sdpa": _sdpa, "reference": _ref}


def _name(shape):
    return ",".join(map(str, shape))


_REF = {}  # (kind, shape) -> the reference's float64 result, shared by the group's implementations


def _ref_fwd(shape, q, k, v):
    if ("fwd", shape) not in _REF:
        _REF["fwd", shape] = R.attention(q.double(), k.double(), v.double(), causal=True)
    return _REF["fwd", shape]


def _ref_fwdbwd(shape, q, k, v, do):
    """dq, dk, dv of the reference in float64."""
    if ("fwdbwd", shape) not in _REF:
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        out = R.attention(q64, k64, v64, causal=True)
        _REF["fwdbwd", shape] = torch.autograd.grad(out, (q64, k64, v64), do.double())
    return _REF["fwdbwd", shape]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_fwd(benchmark, shape, impl):
    benchmark.group = f"fwd {_name(shape)}"
    B, H, T, D = shape
    benchmark.extra_info.update(kind="fwd", shape=list(shape), impl=impl, flops=2 * B * H * T * T * D)
    inputs = [_qkv(shape, s) for s in range(2)]  # rotate between two inputs
    fn = IMPLS[impl]
    if impl != "reference":
        with torch.no_grad():
            assert_close(fn(*inputs[0]), _ref_fwd(shape, *inputs[0]), 1e-4, f"{impl}'s output")
    it = iter(range(10**9))

    def run():
        with torch.no_grad():
            return fn(*inputs[next(it) % 2])

    rounds = 2 if impl == "reference" else 7
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_fwdbwd(benchmark, shape, impl):
    benchmark.group = f"fwdbwd {_name(shape)}"
    B, H, T, D = shape
    benchmark.extra_info.update(kind="fwdbwd", shape=list(shape), impl=impl, flops=7 * B * H * T * T * D)
    q, k, v = _qkv(shape, 7, grad=True)
    do = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    fn = IMPLS[impl]
    if impl != "reference":
        grads = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        assert_close(grads, _ref_fwdbwd(shape, q, k, v, do), 1e-4, f"{impl}'s dq, dk, dv")

    def run():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)

    rounds = 2 if impl == "reference" else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastlm", "torch_sdpa", "reference", "read_floor"])
@pytest.mark.parametrize("shape", DECODE, ids=lambda s: f"B={s[0]},H={s[1]},L={s[2]},D={s[3]}")
def test_decode(benchmark, shape, impl):
    B, H, L, D = shape
    benchmark.group = f"decode B={B},H={H},L={L},D={D}"
    L_max = L + 256  # the cache has room past the valid prefix
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, 1, D, generator=g)
    kc = torch.randn(B, H, L_max, D, generator=g)
    vc = torch.randn(B, H, L_max, D, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32)
    benchmark.extra_info.update(kind="decode", shape=list(shape), impl=impl, bytes=2 * B * H * L * D * 4)
    if impl == "fastlm":
        def run():
            with fastlm.ops.use_backend("cpu"):
                return fastlm.ops.decode_attention(q, kc, vc, lens)
    elif impl == "torch_sdpa":
        def run():  # SDPA on the valid slice (every sequence has L valid positions here)
            return F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L])
    elif impl == "read_floor":
        def run():  # only reading the valid K and V once (torch.sum): the floor of any decode
            return kc[:, :, :L].sum(), vc[:, :, :L].sum()
    else:
        def run():
            return R.decode_attention(q, kc, vc, lens)
    if impl in ("fastlm", "torch_sdpa"):
        want = R.decode_attention(q.double(), kc.double(), vc.double(), lens)
        assert_close(run(), want, 1e-4, f"{impl}'s decode output")
    benchmark.pedantic(run, rounds=50, warmup_rounds=3)


def test_ceiling_matmul(benchmark):
    benchmark.group = "ceiling matmul"
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    benchmark.extra_info.update(kind="matmul", flops=2 * n ** 3)
    benchmark.pedantic(lambda: torch.mm(a, b, out=c), rounds=7, warmup_rounds=1)


def test_ceiling_copy(benchmark):
    benchmark.group = "ceiling copy"
    n = 64 * 2**20 // 4  # 64 MiB, larger than the caches
    a, b = torch.randn(n), torch.empty(n)
    benchmark.extra_info.update(kind="copy", bytes=n * 4)  # bytes read (as for decode's K and V)
    benchmark.pedantic(lambda: b.copy_(a), rounds=20, warmup_rounds=2)
