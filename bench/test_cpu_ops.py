"""Every CPU kernel against PyTorch's own op on the same inputs, at the SIMD level this process
runs (FASTLM_CPU_ISA), fp32: the figures behind fastlm.ops._cpu_choice and issue targets.

Run at every level the machine has, with torch held to the same level, by
    python bench/cpu_levels.py                  # writes bench/results/cpu_ops_<level>_<date>_<tag>.json
or for the level in use alone:
    pytest bench/test_cpu_ops.py --benchmark-only --benchmark-json=out.json

Each case first checks fastlm's result against the reference (relative error in float64
terms), then alternates fastlm's call and torch's over the rounds (the machines are shared
and noisy: a per-round ratio cancels most of a slow spell) and records in extra_info the
median times, the median of the per-round ratios torch / fastlm, and each side's minor page
faults per call. The pytest-benchmark statistics are those of one round (both calls).
"""
import os
import resource
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from checks import assert_close
from fastlm import ops
from fastlm import reference as R

torch.set_num_threads(int(os.environ.get("FASTLM_BENCH_THREADS", "2")))
pytestmark = pytest.mark.skipif("cpu" not in ops.backends(), reason="fastlm._C is not built")


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_close = assert_close  # relative error in float64 against the reference or torch's op


def _pair(benchmark, ours, theirs, rounds, floor=None, **info):
    """Alternate ours() and theirs() for `rounds` rounds after a warm-up; extra_info gets the
    medians and the median per-round ratio (theirs / ours: above 1 means fastlm is faster).
    ``floor``: a call that only moves the bytes the op must move (plain torch copies of the
    same streams), timed third in every round; extra_info then also gets its median and the
    median per-round theirs / floor, the ratio a kernel as fast as that copying would reach."""
    for _ in range(2):
        ours()
        theirs()
        if floor is not None:
            floor()
    t_ours, t_theirs, t_floor, ratios, ceiling = [], [], [], [], []
    faults = {"ours": 0, "theirs": 0}

    def one_round():
        f0 = _faults()
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        f1 = _faults()
        theirs()
        t2 = time.perf_counter()
        faults["ours"] += f1 - f0
        faults["theirs"] += _faults() - f1
        t_ours.append(t1 - t0)
        t_theirs.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        if floor is not None:
            t3 = time.perf_counter()
            floor()
            t_floor.append(time.perf_counter() - t3)
            ceiling.append((t2 - t1) / t_floor[-1])

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(
        info, cpu_isa=ops.cpu_isa(), torch_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(), fastlm_ms=statistics.median(t_ours) * 1e3,
        torch_ms=statistics.median(t_theirs) * 1e3, ratio=statistics.median(ratios),
        fastlm_faults_per_call=faults["ours"] / rounds, torch_faults_per_call=faults["theirs"] / rounds)
    if floor is not None:
        benchmark.extra_info.update(floor_ms=statistics.median(t_floor) * 1e3,
                                    ceiling_ratio=statistics.median(ceiling))


def _cpu():
    return ops.use_backend("cpu")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- attention
ATTN = [(1, 12, 1024, 64), (4, 12, 512, 64), (8, 12, 256, 64)]


@pytest.mark.parametrize("shape", ATTN, ids=lambda s: ",".join(map(str, s)))
def test_attention_fwd(benchmark, shape):
    benchmark.group = f"attention fwd {shape}"
    q, k, v = (_randn(*shape, seed=s) for s in range(3))
    with _cpu(), torch.no_grad():
        _close(ops.attention(q, k, v, causal=True), R.attention(q.double(), k.double(), v.double()), 1e-4)

    def ours():
        with _cpu(), torch.no_grad():
            ops.attention(q, k, v, causal=True)

    def theirs():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    _pair(benchmark, ours, theirs, rounds=7, op="attention", kind="fwd", shape=list(shape),
          competitor="torch SDPA")


@pytest.mark.parametrize("shape", ATTN, ids=lambda s: ",".join(map(str, s)))
def test_attention_fwdbwd(benchmark, shape):
    benchmark.group = f"attention fwd+bwd {shape}"
    q, k, v = (_randn(*shape, seed=s).requires_grad_() for s in range(3))
    do = _randn(*shape, seed=3)

    def ours():
        with _cpu():
            out = ops.attention(q, k, v, causal=True)
        return torch.autograd.grad(out, (q, k, v), do)

    def theirs():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), do)

    _close(ours(), theirs(), 1e-4)  # dq, dk, dv
    _pair(benchmark, ours, theirs, rounds=5, op="attention", kind="fwd+bwd", shape=list(shape),
          competitor="torch SDPA")


# nanoGPT's CPU recipe (batch 12, 4 heads of 32, block 64), q, k, v split from one projection
# as the model has them (rows 3 C apart): many small heads, one tile each
TRAIN = [(12, 4, 64, 32)]


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", TRAIN, ids=lambda s: ",".join(map(str, s)))
def test_attention_train_shape(benchmark, shape, kind):
    B, H, T, D = shape
    benchmark.group = f"attention {kind} {shape}, split from one projection"
    qkv = _randn(B, T, 3 * H * D).requires_grad_(kind == "fwd+bwd")
    do = _randn(B, H, T, D, seed=3)

    def split():
        return [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]

    def run(fn):
        if kind == "fwd":
            with torch.no_grad():
                return fn(*split())
        return torch.autograd.grad(fn(*split()), qkv, do)

    def ours():
        with _cpu():
            return run(lambda q, k, v: ops.attention(q, k, v, causal=True))

    def theirs():
        return run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    _close(ours(), theirs(), 1e-4)
    _pair(benchmark, ours, theirs, rounds=41, op="attention", kind=kind, shape=list(shape), competitor="torch SDPA")


DECODE = [(1, 12, 1024, 64), (8, 12, 1024, 64), (1, 12, 2048, 64), (8, 12, 2048, 64)]


@pytest.mark.parametrize("shape", DECODE, ids=lambda s: f"B={s[0]},H={s[1]},L={s[2]},D={s[3]}")
def test_decode_attention(benchmark, shape):
    B, H, L, D = shape
    benchmark.group = f"decode attention {shape}"
    q = _randn(B, H, 1, D)
    kc, vc = _randn(B, H, L + 256, D, seed=1), _randn(B, H, L + 256, D, seed=2)
    lens = torch.full((B,), L, dtype=torch.int32)

    def ours():
        with _cpu():
            return ops.decode_attention(q, kc, vc, lens)

    def theirs():  # SDPA on the valid slice (every sequence has L valid positions here)
        return F.scaled_dot_product_attention(q, kc[:, :, :L], vc[:, :, :L])

    _close(ours(), theirs(), 1e-4)
    _pair(benchmark, ours, theirs, rounds=41, op="decode_attention", kind="decode", shape=list(shape),
          competitor="torch SDPA on the valid slice")


# ----------------------------------------------------------------------------- norms and GELU
NORM = [(8192, 768), (16384, 1024)]


@pytest.mark.parametrize("shape", NORM, ids=lambda s: f"{s[0]}x{s[1]}")
def test_residual_layer_norm_fwd(benchmark, shape):
    rows, C = shape
    benchmark.group = f"residual + layer_norm fwd {shape}"
    x, r, w, b = _randn(rows, C), _randn(rows, C, seed=1), _randn(C, seed=2) * 0.5 + 1, _randn(C, seed=3) * 0.1

    def ours():
        with _cpu():
            return ops.layer_norm(x, w, b, residual=r)

    def theirs():
        h = x + r
        return F.layer_norm(h, (C,), w, b), h

    def floor():  # the four streams: read x and r, write h and the output
        return x.clone(), r.clone()

    _close(ours(), theirs(), 1e-5)  # out and h = x + r
    _pair(benchmark, ours, theirs, rounds=15, floor=floor, op="layer_norm", kind="residual fwd",
          shape=list(shape), competitor="x + r; F.layer_norm")


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", NORM, ids=lambda s: f"{s[0]}x{s[1]}")
def test_norm_fwdbwd(benchmark, shape, kind):
    rows, C = shape
    benchmark.group = f"{kind} fwd+bwd {shape}"
    x = _randn(rows, C).requires_grad_()
    w = (_randn(C, seed=2) * 0.5 + 1).requires_grad_()
    b = (_randn(C, seed=3) * 0.1).requires_grad_()
    dy = _randn(rows, C, seed=4)
    if kind == "layer_norm":
        def ours():
            with _cpu():
                y = ops.layer_norm(x, w, b)
            return torch.autograd.grad(y, (x, w, b), dy)

        def theirs():
            return torch.autograd.grad(F.layer_norm(x, (C,), w, b), (x, w, b), dy)
    else:
        def ours():
            with _cpu():
                y = ops.rms_norm(x, w)
            return torch.autograd.grad(y, (x, w), dy)

        def theirs():
            return torch.autograd.grad(F.rms_norm(x, (C,), w, eps=1e-6), (x, w), dy)

    xd = x.detach()

    def floor():  # the five streams: read x, write y; read x and dy, write dx
        return xd.clone(), xd + dy

    _close(ours(), theirs(), 1e-5)  # dx, dw (and db)
    _pair(benchmark, ours, theirs, rounds=15, floor=floor, op=kind, kind="fwd+bwd", shape=list(shape),
          competitor=f"F.{kind}")


# From small to large: where the fused norms start to pay for their Python autograd glue (the
# op's forward and backward through torch.autograd.Function) against torch's C++ autograd.
# The models call the residual form; both forms forward and backward, as training runs them.
NORM_SIZES = [(768, 128), (1024, 256), (2048, 256), (4096, 256), (4096, 512), (8192, 768)]


@pytest.mark.parametrize("form", ["plain", "residual"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape", NORM_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_norm_sizes(benchmark, shape, kind, form):
    rows, C = shape
    benchmark.group = f"{kind} {form} fwd+bwd by size {shape}"
    x = _randn(rows, C).requires_grad_()
    r = _randn(rows, C, seed=1).requires_grad_()
    w = (_randn(C, seed=2) * 0.5 + 1).requires_grad_()
    dy, dh = _randn(rows, C, seed=4), _randn(rows, C, seed=5)
    leaves = (x, r, w) if form == "residual" else (x, w)

    def grads(out, h=None):
        if h is None:
            return torch.autograd.grad(out, leaves, dy)
        return torch.autograd.grad((out, h), leaves, (dy, dh))

    def ours():
        with _cpu():
            if kind == "layer_norm":
                y = ops.layer_norm(x, w, None, residual=r if form == "residual" else None)
            else:
                y = ops.rms_norm(x, w, residual=r if form == "residual" else None)
        return grads(*y) if form == "residual" else grads(y)

    def theirs():
        h = x + r if form == "residual" else x
        y = F.layer_norm(h, (C,), w, None) if kind == "layer_norm" else F.rms_norm(h, (C,), w, eps=1e-6)
        return grads(y, h) if form == "residual" else grads(y)

    _close(ours(), theirs(), 1e-5)
    _pair(benchmark, ours, theirs, rounds=41 if rows * C < 2**21 else 15, op=kind, kind=f"{form} fwd+bwd",
          shape=list(shape), competitor=f"{'x + r; ' if form == 'residual' else ''}F.{kind}")


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_gelu(benchmark, kind):
    shape = (8192, 768)
    benchmark.group = f"gelu {kind} {shape}"
    x = _randn(*shape).mul_(3).requires_grad_()
    dy = _randn(*shape, seed=1)

    def ours():
        with _cpu():
            y = ops.gelu(x)
        return torch.autograd.grad(y, x, dy) if kind == "fwd+bwd" else y

    def theirs():
        y = F.gelu(x, approximate="tanh")
        return torch.autograd.grad(y, x, dy) if kind == "fwd+bwd" else y

    first = (lambda r: r) if kind == "fwd" else (lambda r: r[0])
    _close(first(ours()).detach(), first(theirs()).detach(), 1e-5)
    _pair(benchmark, ours, theirs, rounds=15, op="gelu", kind=kind, shape=list(shape),
          competitor="F.gelu(approximate='tanh')")


# ----------------------------------------------------------------------------- generation's products
LINEAR = [(1, 768, 2304), (8, 768, 2304), (1, 768, 3072), (8, 768, 3072), (1, 3072, 768), (8, 3072, 768),
          (1, 768, 50257), (8, 768, 50257)]


@pytest.mark.parametrize("mkn", LINEAR, ids=lambda s: f"M={s[0]},K={s[1]},N={s[2]}")
def test_decode_linear(benchmark, mkn):
    M, K, N = mkn
    benchmark.group = f"decode_linear {mkn}"
    w, b, x = _randn(N, K), _randn(N, seed=1), _randn(M, K, seed=2)
    wp = ops.pack_decode_weight(w)

    def ours():
        with _cpu():
            return ops.decode_linear(x, wp, b, N)

    def theirs():
        return F.linear(x, w, b)

    _close(ours(), theirs(), 1e-5)
    _pair(benchmark, ours, theirs, rounds=41, op="decode_linear", kind=f"M={M}", shape=[M, K, N],
          competitor="F.linear")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "bf16"])
@pytest.mark.parametrize("mkn", [(1, 768, 3072), (8, 768, 3072), (1, 768, 50257), (8, 768, 50257)],
                         ids=lambda s: f"M={s[0]},K={s[1]},N={s[2]}")
def test_decode_linear_q(benchmark, mkn, fmt):
    """The product with the weight in a reduced-precision format against float32 F.linear (what
    runs without it); the result is checked against the product with the dequantized weight."""
    from fastlm import reference as R

    M, K, N = mkn
    benchmark.group = f"decode_linear_q {fmt} {mkn}"
    w, b, x = _randn(N, K) * 0.05, _randn(N, seed=1), _randn(M, K, seed=2)
    wq = R.pack_decode_weight_q(w, fmt)

    def ours():
        return torch.ops.fastlm.decode_linear_q(x, wq, b, N, fmt)

    def theirs():
        return F.linear(x, w, b)

    _close(ours(), R.decode_linear_q(x.double(), wq, b.double(), N, fmt), 1e-5)
    _pair(benchmark, ours, theirs, rounds=41, op="decode_linear_q", kind=f"{fmt} M={M}", shape=[M, K, N],
          competitor="F.linear (float32 weight)")


# ----------------------------------------------------------------------------- the fused output layer + loss
LOSS = [(768, 256, 8192), (2048, 768, 50257)]


@pytest.mark.parametrize("ncv", LOSS, ids=lambda s: f"N={s[0]},C={s[1]},V={s[2]}")
def test_linear_cross_entropy(benchmark, ncv):
    N, C, V = ncv
    benchmark.group = f"linear_cross_entropy fwd+bwd {ncv}"
    h = (_randn(N, C) * 0.5).requires_grad_()
    w = (_randn(V, C, seed=1) * 0.05).requires_grad_()
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))

    def ours():
        with _cpu():
            loss = ops.linear_cross_entropy(h, w, t)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def theirs():
        loss = F.cross_entropy(h @ w.t(), t)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    got, want = ours(), theirs()
    for g, r in zip(got, want):
        _close(g.detach(), r.detach(), 1e-4)
    _pair(benchmark, ours, theirs, rounds=5, op="linear_cross_entropy", kind="fwd+bwd", shape=[N, C, V],
          competitor="F.cross_entropy(h @ W.T)")


# ----------------------------------------------------------------------------- the machine's ceilings
def test_ceilings(benchmark):
    """An fp32 matmul's GFLOP/s and a 64 MiB copy's GB/s at this torch level, same run."""
    benchmark.group = "ceilings"
    n = 2048
    a, bm, c = _randn(n, n), _randn(n, n, seed=1), torch.empty(n, n)
    src, dst = _randn(16 * 2**20), torch.empty(16 * 2**20)
    mm, cp = [], []

    def one_round():
        t0 = time.perf_counter()
        torch.mm(a, bm, out=c)
        t1 = time.perf_counter()
        dst.copy_(src)
        cp.append(time.perf_counter() - t1)
        mm.append(t1 - t0)

    one_round()
    benchmark.pedantic(one_round, rounds=7, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(op="ceilings", cpu_isa=ops.cpu_isa(),
                                torch_capability=torch.backends.cpu.get_cpu_capability(),
                                matmul_gflops=2 * n**3 / statistics.median(mm) / 1e9,
                                copy_gbs=2 * src.numel() * 4 / statistics.median(cp) / 1e9)
