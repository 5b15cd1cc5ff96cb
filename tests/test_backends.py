"""Every op of every compiled backend against the reference in float64.

The (backend, op) pairs come from the registry itself, so a kernel registered later is
checked here as soon as it exists. Inputs are fresh random tensors over shapes drawn with
hypothesis: size 1, odd sizes, non-contiguous views. Forward and backward. The Triton
forms are checked in each op's own test file, at the small shapes the CPU interpreter
can run in reasonable time (on a GPU they join this test).
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastlm.ops as ops
from fastlm import reference
from fastlm.ops import _dispatch

from conftest import rel_error

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ATTN_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _pairs():
    out = []
    for name in ops.backends():
        if name == "reference" or (name == "triton" and not torch.cuda.is_available()):
            continue
        for op in _dispatch._BACKENDS[name].ops:
            out.append((name, op))
    return out


PAIRS = _pairs()


def _rand(shape, dtype, noncontig, gen):
    """Random tensor; a non-contiguous view (every other column of a wider buffer) on request."""
    if noncontig and len(shape) >= 1:
        wide = list(shape)
        wide[-1] = 2 * shape[-1]
        return torch.randn(wide, generator=gen, dtype=torch.float64)[..., ::2].to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _inputs(op, data, dtype, gen):
    """(args, kwargs, indices of differentiable args) for one random call of ``op``."""
    nc = data.draw(st.booleans(), label="noncontiguous")
    if op in ("layer_norm", "rms_norm"):
        lead = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=2), label="lead")
        C = data.draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64, 100, 257]), label="C")
        x = _rand(lead + [C], dtype, nc, gen)
        w = _rand([C], dtype, False, gen)
        res = _rand(lead + [C], dtype, nc, gen) if data.draw(st.booleans(), label="residual") else None
        eps = 1e-5
        if op == "layer_norm":
            b = _rand([C], dtype, False, gen) if data.draw(st.booleans(), label="bias") else None
            args = [x, w, b, eps, res]
        else:
            args = [x, w, eps, res]
        return args, {}, [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if op == "gelu":
        shape = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="shape")
        return [_rand(shape, dtype, nc, gen) * 3], {}, [0]
    if op == "attention":
        B = data.draw(st.integers(1, 2), label="B")
        hkv = data.draw(st.integers(1, 2), label="Hkv")
        H = hkv * data.draw(st.integers(1, 3), label="group")
        D = data.draw(st.sampled_from([1, 8, 16, 40, 64]), label="D")
        Tk = data.draw(st.integers(1, 70), label="Tk")
        Tq = data.draw(st.integers(1, Tk), label="Tq")
        causal = data.draw(st.booleans(), label="causal")
        q = _rand([B, H, Tq, D], dtype, nc, gen)
        k = _rand([B, hkv, Tk, D], dtype, nc, gen)
        v = _rand([B, hkv, Tk, D], dtype, nc, gen)
        return [q, k, v], {"causal": causal}, [0, 1, 2]
    if op == "decode_attention":
        B = data.draw(st.integers(1, 3), label="B")
        hkv = data.draw(st.integers(1, 2), label="Hkv")
        H = hkv * data.draw(st.integers(1, 3), label="group")
        D = data.draw(st.sampled_from([8, 16, 64]), label="D")
        L = data.draw(st.integers(1, 80), label="L")
        Tq = data.draw(st.integers(1, min(4, L)), label="Tq")
        lens = torch.randint(Tq, L + 1, (B,), generator=gen)
        q = _rand([B, H, Tq, D], dtype, nc, gen)
        kc = _rand([B, hkv, L, D], dtype, nc, gen)
        vc = _rand([B, hkv, L, D], dtype, nc, gen)
        return [q, kc, vc, lens], {}, []
    if op == "decode_linear":
        M = data.draw(st.integers(1, 20), label="M")
        K = data.draw(st.sampled_from([1, 3, 16, 64, 100, 257]), label="K")
        N = data.draw(st.sampled_from([1, 5, 16, 47, 48, 49, 64, 65, 130]), label="N")
        x = _rand([M, K], dtype, nc, gen)
        w_p = ops.pack_decode_weight(_rand([N, K], dtype, data.draw(st.booleans(), label="noncontiguous w"), gen))
        b = _rand([N], dtype, False, gen) if data.draw(st.booleans(), label="bias") else None
        return [x, w_p, b, N], {}, [0, 1] + ([2] if b is not None else [])
    if op == "decode_linear_q":
        # the integer formats: their packed weight is bytes, which the float64 oracle takes as
        # they are (bf16/f16 weights are checked in test_linear_quant.py)
        M = data.draw(st.integers(1, 20), label="M")
        K = data.draw(st.sampled_from([1, 3, 16, 33, 64, 100, 257]), label="K")
        N = data.draw(st.sampled_from([1, 5, 16, 47, 48, 49, 64, 65, 130]), label="N")
        fmt = data.draw(st.sampled_from(["q8_0", "q4_0"]), label="format")
        x = _rand([M, K], dtype, nc, gen)
        w_q = ops.pack_decode_weight_q(_rand([N, K], torch.float32, False, gen), fmt)
        b = _rand([N], dtype, False, gen) if data.draw(st.booleans(), label="bias") else None
        return [x, w_q, b, N, fmt], {}, [0] + ([2] if b is not None else [])
    if op in ("cross_entropy", "linear_cross_entropy"):
        N = data.draw(st.integers(1, 40), label="N")
        V = data.draw(st.integers(1, 300), label="V")
        t = torch.randint(0, V, (N,), generator=gen)
        t[torch.rand(N, generator=gen) < 0.2] = -100
        t[0] = 0 if V > 0 else t[0]  # at least one row counts
        if op == "cross_entropy":
            return [_rand([N, V], dtype, nc, gen) * 2, t], {}, [0]
        C = data.draw(st.integers(1, 70), label="C")
        return [_rand([N, C], dtype, nc, gen), _rand([V, C], dtype, False, gen) / math.sqrt(C), t], {}, [0, 1]
    if op == "kv_cache_write":  # in place: the caches it writes are its outputs (IN_PLACE)
        B = data.draw(st.integers(1, 5), label="B")
        Hkv = data.draw(st.integers(1, 4), label="Hkv")
        L = data.draw(st.integers(1, 40), label="L")
        D = data.draw(st.sampled_from([1, 8, 16, 40, 64]), label="D")
        pos = torch.randint(0, L, (B,), generator=gen)
        return [_rand([B, Hkv, L, D], dtype, False, gen), _rand([B, Hkv, L, D], dtype, False, gen),
                _rand([B, Hkv, D], dtype, nc, gen), _rand([B, Hkv, D], dtype, nc, gen), pos], {}, []
    raise AssertionError(f"no input generator for op {op!r}: add one")


# Ops that write into some of their arguments and return nothing: those arguments are compared.
IN_PLACE = {"kv_cache_write": (0, 1)}


def _outputs(o):
    return list(o) if isinstance(o, (tuple, list)) else [o]


@pytest.mark.skipif(not PAIRS, reason="no compiled backend is usable")
@pytest.mark.parametrize("backend,op", PAIRS)
@settings(max_examples=12, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_op_matches_reference(backend, op, data, seed):
    impl = _dispatch._BACKENDS[backend].ops[op]
    dev = "cpu" if "cpu" in impl.devices else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA backend without a GPU")
    dtypes = [d for d in (torch.float64, torch.float32, torch.bfloat16) if d in impl.dtypes]
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    gen = torch.Generator().manual_seed(seed)
    args, kwargs, grad_idx = _inputs(op, data, dtype, gen)
    args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    # The oracle: the same inputs, in float64, through the reference.
    # (an op that writes in place gets copies, so that it cannot write into the oracle's inputs;
    # the others get the arguments themselves, non-contiguous views kept as they are)
    own = (lambda t: t.clone()) if op in IN_PLACE else (lambda t: t)
    ref_args = [own(a.detach().double()).requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for i, a in enumerate(args)]
    test_args = [own(a.detach()).requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for i, a in enumerate(args)]
    ref_out = _outputs(getattr(reference, op)(*ref_args, **kwargs))
    if op in IN_PLACE:
        ref_out = [ref_args[i] for i in IN_PLACE[op]]
    # In bf16/fp16 the spec itself rounds (e.g. h = x + residual is stored in bf16), so a
    # kernel is held to the larger of the dtype's tolerance and twice the error of the
    # reference computed in that same dtype (FlashAttention's criterion).
    low = dtype in (torch.bfloat16, torch.float16)
    lp_args = [a.detach().clone().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) and a.is_floating_point()
               else a for i, a in enumerate(args)]
    lp_out = _outputs(getattr(reference, op)(*lp_args, **kwargs)) if low else None
    if low and op in IN_PLACE:
        lp_out = [lp_args[i] for i in IN_PLACE[op]]
    with ops.use_backend(backend):
        assert ops.implementation(op, test_args[0]) == backend
        out = _outputs(getattr(ops, op)(*test_args, **kwargs))
    if op in IN_PLACE:
        assert out == [None]
        out = [test_args[i] for i in IN_PLACE[op]]
    tol = (ATTN_TOL if "attention" in op else TOL)[dtype]
    assert len(out) == len(ref_out)
    # Losses of bf16/fp16 inputs are float32 (as the reference computes them).
    out_dtype = torch.float32 if (low and "cross_entropy" in op) else dtype
    for j, (o, r) in enumerate(zip(out, ref_out)):
        assert o.shape == r.shape and o.dtype == out_dtype
        allowed = max(tol, 2 * rel_error(lp_out[j], r)) if low else tol
        assert rel_error(o, r) <= allowed, f"{backend}.{op} forward rel err {rel_error(o, r):.3g} > {allowed:.3g}"
    if not grad_idx:
        return
    # Backward: the same random cotangent for each output, in both computations.
    cot = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(r.device) for r in ref_out]
    torch.autograd.backward([r for r in ref_out], cot)
    torch.autograd.backward([o for o in out], [c.to(o.dtype).to(o.device) for c, o in zip(cot, out)])
    if low:
        torch.autograd.backward(lp_out, [c.to(o.dtype) for c, o in zip(cot, lp_out)])
    for i in grad_idx:
        g, gr = test_args[i].grad, ref_args[i].grad
        assert g is not None, f"{backend}.{op}: no gradient for argument {i}"
        allowed = max(4 * tol, 2 * rel_error(lp_args[i].grad, gr)) if low else 4 * tol
        # A gradient that cancels to almost nothing has no meaningful relative error: a norm
        # over C = 1 has dx = 0, over C = 2 dx = rstd w (g0 - g1)/2 (1 - a^2) with
        # a^2 = d^2 / (d^2 + eps), which float32 forms from terms ~1e5 times larger (0.2%
        # off at eps / d^2 = 1e-5). Measure such a gradient against a tenth of the cotangent's
        # size: a wrong formula still misses by the size of the terms.
        floor = 0.1 * max(c.norm().item() for c in cot)
        err = (g.double() - gr).norm().item() / max(gr.norm().item(), floor)
        assert err <= allowed, f"{backend}.{op} grad[{i}] rel err {err:.3g} > {allowed:.3g}"
