"""The GPU kernels (the `cuda` backend, csrc/cuda, and the compiled `triton` backend, kernels/)
on CUDA tensors against the float64 reference, forward and backward: attention (GQA, causal
and not, Tq != Tk, odd head sizes, non-contiguous views), decode attention over a ragged cache
(NaN past the valid lengths), LayerNorm / RMSNorm with and without the residual, and the fused
linear + cross-entropy; then a GPT's training step and cached generation on the GPU.

The rest of the suite runs the Triton kernels on CPU tensors under the interpreter; this file
runs them compiled, and it is skipped where torch sees no CUDA device (bench/gpu_run.sh builds
fastlm on a GPU machine and runs it with the GPU benches).
"""
import math

import pytest
import torch

from fastlm import ops
from fastlm import reference as R
from fastlm.generation.generate import generate

from conftest import rel_error

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in ops.backends()]
DEV = "cuda"
# Relative error against float64 on the same (dtype-rounded) inputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _serves(backend, op, dtype):
    impl = ops.get_backend(backend).ops.get(op)
    return impl is not None and impl.serves("cuda", dtype)


def _cases(op, dtypes):
    """(backend, dtype) pairs where ``backend`` runs ``op`` itself; "reference" is torch's fused
    ops on CUDA tensors (fastlm/ops/_torch_forms.py), the automatic choice's fallback there."""
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}") for b in GPU_BACKENDS + ["reference"]
            for d in dtypes if _serves(b, op, d)]


def test_automatic_choice_on_cuda_follows_the_gpu_table():
    """A GPU kernel serves by default only for the ops _gpu_choice lists (measured ahead of
    torch); the others go to the reference backend (torch's fused ops); float64 never reaches
    the GPU kernels, which compute in float32 / bf16 / fp16."""
    from fastlm.ops import _gpu_choice

    x = torch.randn(4, 8, device=DEV)
    for op in ("attention", "layer_norm", "rms_norm", "linear_cross_entropy"):
        want = next((b for b in GPU_BACKENDS if op in _gpu_choice.GPU_WINS[b]), "reference")
        assert ops.implementation(op, x) == want
        for b in GPU_BACKENDS:
            assert not ops.get_backend(b).ops[op].serves("cuda", torch.float64)


def test_gpu_backends_are_usable():
    """On a machine with a CUDA device both GPU backends load (a build or load error shows here,
    not as a silent fall-back to the reference)."""
    status = ops.backends_status()
    assert status["cuda"].available, status["cuda"].why_unavailable
    assert status["triton"].available, status["triton"].why_unavailable


# ----------------------------------------------------------------------------- attention
ATTN_SHAPES = [  # B, H, Hkv, Tq, Tk, D, causal
    (1, 1, 1, 1, 1, 1, True),
    (2, 3, 3, 17, 17, 24, True),
    (1, 4, 2, 65, 65, 64, True),
    (2, 2, 1, 31, 100, 32, True),   # fewer queries than keys (a chunked prefill)
    (1, 2, 2, 100, 31, 64, True),   # more queries than keys: the first rows see no key
    (2, 4, 4, 128, 128, 128, False),
    (1, 2, 1, 200, 200, 256, True),
    (1, 12, 12, 257, 257, 64, True),
    (1, 2, 2, 1, 513, 80, True),
    (1, 3, 1, 70, 70, 96, False),
]


def _attn_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed, layout):
    g = _gen(seed)

    def rnd(b, h, t):
        if layout == "bthd":  # the model's layout: (B, T, H, D) storage viewed as (B, H, T, D)
            return torch.randn(b, t, h, D, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(b, h, t, D, generator=g, dtype=torch.float64).to(dtype)

    return rnd(B, H, Tq), rnd(B, Hkv, Tk), rnd(B, Hkv, Tk), rnd(B, H, Tq)


@pytest.mark.parametrize("backend,dtype", _cases("attention", [torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("c" if s[6] else "n"))
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_attention_matches_reference(backend, dtype, shape, layout):
    B, H, Hkv, Tq, Tk, D, causal = shape
    q, k, v, do = _attn_inputs(B, H, Hkv, Tq, Tk, D, dtype, seed=hash(shape) % 2**31, layout=layout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = R.attention(q64, k64, v64, causal=causal)
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    qc, kc, vc = (t.to(DEV).requires_grad_() for t in (q, k, v))
    with ops.use_backend(backend):
        assert ops.implementation("attention", qc) == backend
        out = ops.attention(qc, kc, vc, causal=causal)
    grads = torch.autograd.grad(out, (qc, kc, vc), do.to(DEV))
    assert out.dtype == dtype and out.shape == ref.shape and out.device.type == "cuda"
    tol = TOL[dtype]
    assert rel_error(out.cpu(), ref) < tol, ("out", rel_error(out.cpu(), ref))
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_g):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_error(a.cpu(), b) < tol, (name, rel_error(a.cpu(), b))


DECODE_SHAPES = [  # B, H, Hkv, Tq, L, D
    (1, 1, 1, 1, 1, 16),
    (3, 4, 2, 1, 300, 64),
    (2, 2, 2, 3, 1100, 64),  # several cache slices, combined by their logsumexps
    (4, 8, 8, 1, 2048, 128),
    (5, 6, 3, 2, 777, 48),
]


@pytest.mark.parametrize("backend,dtype", _cases("decode_attention", [torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_attention_matches_reference(backend, dtype, shape):
    B, H, Hkv, Tq, L, D = shape
    g = _gen(B * 1000 + L)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64).to(dtype)
    kc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    vc = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    lens = torch.randint(Tq, L + 1, (B,), generator=g)
    lens[0] = L  # one sequence fills the cache
    for b in range(B):  # past the valid length: NaN, which must have no effect
        kc[b, :, lens[b]:] = float("nan")
        vc[b, :, lens[b]:] = float("nan")
    ref = R.decode_attention(q.double(), kc.double(), vc.double(), lens)
    with ops.use_backend(backend):
        out = ops.decode_attention(q.to(DEV), kc.to(DEV), vc.to(DEV), lens.to(DEV))
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_error(out.cpu(), ref) < TOL[dtype], rel_error(out.cpu(), ref)


# ----------------------------------------------------------------------------- norms
NORM_SHAPES = [(1, 1), (7, 3), (33, 768), (5, 3, 1024), (64, 4097), (300, 8192), (2, 20000)]


@pytest.mark.parametrize("backend,dtype", _cases("layer_norm", [torch.float32, torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual,bias,noncontig", [(False, False, False), (True, True, False), (True, False, True),
                                                     (False, True, True)])
def test_norms_match_reference(backend, dtype, kind, shape, residual, bias, noncontig):
    bias = bias and kind == "ln"
    g = _gen(sum(shape) * 7 + residual + 2 * bias)
    C = shape[-1]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x = rnd(*shape[:-1], 2 * C)[..., ::2] if noncontig else rnd(*shape)  # a strided view
    x = (x * 2 + 0.5).to(dtype)
    r = rnd(*shape).to(dtype) if residual else None
    w = (rnd(C) * 0.5 + 1).to(dtype)
    b = (rnd(C) * 0.1).to(dtype) if bias else None
    dy = rnd(*shape).to(dtype)
    dh = rnd(*shape).to(dtype) if residual else None

    def run(fn, tensors, device):
        leaves = [None if t is None else t.to(device).detach().requires_grad_() for t in tensors]
        xx, rr, ww, bb = leaves
        out = fn(xx, ww, bb, eps=1e-5, residual=rr) if kind == "ln" else fn(xx, ww, eps=1e-6, residual=rr)
        outs = list(out) if rr is not None else [out]
        gys = [dy.to(device).to(outs[0].dtype)] + ([dh.to(device).to(outs[0].dtype)] if rr is not None else [])
        grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], gys)
        return [o.detach().cpu() for o in outs] + [t.cpu() for t in grads]

    with ops.use_backend(backend):
        op_name = "layer_norm" if kind == "ln" else "rms_norm"
        assert ops.implementation(op_name, x.to(DEV)) == backend
        got = run(ops.layer_norm if kind == "ln" else ops.rms_norm, (x, r, w, b), DEV)
    want = run(R.layer_norm if kind == "ln" else R.rms_norm, [None if t is None else t.double() for t in (x, r, w, b)],
               "cpu")
    # The gradient of x (and of the residual) cancels almost entirely for tiny C: judged against
    # the size of its terms, ||rstd * dy * w|| (as tests/test_norms.py does).
    hd = x.double() if r is None else x.double() + r.double()
    hc = hd - (hd.mean(-1, keepdim=True) if kind == "ln" else 0)
    rstd = torch.rsqrt(hc.pow(2).mean(-1, keepdim=True) + (1e-5 if kind == "ln" else 1e-6))
    scale = (rstd * dy.double() * w.double()).norm().item()
    nout = 2 if residual else 1
    dx_idx = {nout, nout + 1} if residual else {nout}
    u = torch.finfo(dtype).eps / 2
    cond = (hd.mean(-1, keepdim=True).abs() * rstd).max().item() if kind == "ln" else 0.0
    tol = max(TOL[dtype], 4 * u * cond)
    for i, (a, wnt) in enumerate(zip(got, want)):
        assert a.shape == wnt.shape and a.dtype == dtype, (i, a.shape, wnt.shape, a.dtype)
        if i in dx_idx:
            err = (a.double() - wnt).norm().item() / max(wnt.norm().item(), scale, 1e-300)
        else:
            err = rel_error(a, wnt)
        assert err <= tol, f"output {i}: rel err {err:.3g} (tolerance {tol:.3g})"


# ----------------------------------------------------------------------------- loss
LOSS_CASES = [  # N, C, V, reduction, ignore_frac, chunk
    (1, 1, 1, "mean", 0.0, None),
    (37, 16, 17, "sum", 0.3, 5),
    (300, 64, 1001, "none", 0.0, None),
    (128, 768, 50257, "mean", 0.1, None),
    (40, 33, 100, "mean", 1.0, None),  # every row ignored: NaN, as torch
]


@pytest.mark.parametrize("backend,dtype", _cases("linear_cross_entropy", [torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-{c[3]}-{c[4]}-{c[5]}")
def test_linear_cross_entropy_matches_reference(backend, dtype, case):
    N, C, V, reduction, ignore_frac, chunk = case
    g = _gen(N * 31 + V)
    h = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, C, generator=g, dtype=torch.float64) / C**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    hc, wc = h.to(DEV).requires_grad_(), w.to(DEV).requires_grad_()
    with ops.use_backend(backend):
        assert ops.implementation("linear_cross_entropy", hc) == backend
        loss = ops.linear_cross_entropy(hc, wc, t.to(DEV), reduction=reduction, chunk_size=chunk)
    gl = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    gh, gw = torch.autograd.grad(loss, (hc, wc), gl.to(DEV).to(loss.dtype))
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = R.linear_cross_entropy(hd, wd, t, reduction=reduction).reshape(loss.shape)
    if torch.isnan(ref).all():
        assert torch.isnan(loss.cpu()).all()
        return
    ghd, gwd = torch.autograd.grad(ref, (hd, wd), gl)
    assert gh.dtype == dtype and gw.dtype == dtype
    # Gradients are judged against the size of their terms where they cancel (C = 1):
    # |dz| |W| and |dz|^T |h|, dz the loss's float64 gradient in the logits (tests/test_loss.py).
    zd = (hd.detach() @ wd.detach().T).requires_grad_()
    (dz,) = torch.autograd.grad(R.cross_entropy(zd, t, reduction=reduction), zd, gl.reshape(loss.shape))
    terms = {"grad h": (dz.abs() @ wd.detach().abs()).norm().item(),
             "grad weight": (dz.abs().T @ hd.detach().abs()).norm().item()}
    for name, got, want in (("loss", loss, ref), ("grad h", gh, ghd), ("grad weight", gw, gwd)):
        err = rel_error(got.cpu(), want)
        if name in terms and err >= TOL[dtype]:
            err = (got.cpu().double() - want).norm().item() / max(terms[name], want.norm().item(), 1e-30)
        assert err < TOL[dtype], f"{name}: rel err {err:.3g}"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="runs on"):
            ops.attention(q.cpu(), q.cpu(), q.cpu())
        with pytest.raises((ValueError, RuntimeError), match="device|same|cuda|CUDA"):
            ops.attention(q, q.cpu(), q)
        with pytest.raises((ValueError, RuntimeError), match="256|head"):
            big = torch.randn(1, 1, 4, 300, device=DEV)
            ops.attention(big, big, big)
    torch.cuda.synchronize()  # nothing left broken on the device
    assert torch.isfinite(ops.attention(q, q, q)).all()


# ----------------------------------------------------------------------------- a model
def _tiny_gpt():
    from fastlm import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=64)
    return GPT(cfg)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gpt_training_step_matches_reference(backend, autocast):
    """Loss and gradients of a GPT on the GPU kernels against the reference backend (torch's
    ops), in float32 and under the bf16 autocast the Trainer uses on GPUs."""
    model = _tiny_gpt().to(DEV)
    idx = torch.randint(0, 97, (3, 40), device=DEV)
    tgt = torch.randint(0, 97, (3, 40), device=DEV)

    def loss_and_grads(name):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(name), torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(idx, tgt)  # the fused output layer + loss
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(backend)
    ref_loss, ref_grads = loss_and_grads("reference")
    assert math.isfinite(loss.item()) and loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < (1e-3 if autocast else 1e-4) * abs(ref_loss.item())
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert rel_error(a, b) < (3e-2 if autocast else 1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cached_generation_matches_full_forward(backend):
    """Greedy tokens from the KV-cache path equal those from re-running the whole sequence."""
    model = _tiny_gpt().to(DEV).eval()
    prompt = torch.randint(0, 97, (2, 7), device=DEV)
    with ops.use_backend(backend), torch.no_grad():
        out = generate(model, prompt, max_new_tokens=12)
        seq = prompt
        for _ in range(12):
            logits = model(seq)[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, : seq.shape[1]].cpu(), seq.cpu())
