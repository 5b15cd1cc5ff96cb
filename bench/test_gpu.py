"""GPU speed: fastlm's CUDA and Triton kernels against PyTorch's own ops on the same CUDA
tensors (bf16 unless said): attention forward and forward + backward against
scaled_dot_product_attention (its FlashAttention / cuDNN kernels), decode attention over a
cache, residual + LayerNorm and RMSNorm against `x + r; F.layer_norm` / `F.rms_norm`, the fused
output layer + loss against `F.linear; F.cross_entropy` (with the peak extra memory), and a
GPT-2 124M training step with fastlm's kernels against the same model on the reference backend
(torch's ops).

    pytest bench/test_gpu.py --benchmark-only --benchmark-json=gpu.json
    python bench/tables.py gpu.json

Skipped without a CUDA device. Every implementation is checked against a float32 torch
computation of the same thing before it is timed. A timed round launches the op REPS times
and waits for the device once, so a round's time is REPS calls of device time (launch
overhead included where the op is too short to hide it); the ratios are competitor / fastlm
medians of those rounds.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from checks import assert_close
from fastlm import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DEV = "cuda"
REPS = 10
GPU = [b for b in ("cuda", "triton") if b in ops.backends()]


def _time(benchmark, fn, rounds=15):
    fn()
    torch.cuda.synchronize()

    def run():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    benchmark.extra_info["calls_per_round"] = REPS
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2)


def _name(shape):
    return ",".join(map(str, shape))


# ----------------------------------------------------------------------------- attention
ATTN = [(8, 12, 1024, 64), (4, 16, 2048, 128), (1, 32, 4096, 128), (16, 12, 512, 64)]


def _qkv(shape, grad=False):
    g = torch.Generator(device=DEV).manual_seed(0)
    return [torch.randn(*shape, generator=g, device=DEV, dtype=torch.bfloat16).requires_grad_(grad) for _ in range(3)]


def _attn_impl(impl):
    if impl == "torch_sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def f(q, k, v):
        with ops.use_backend(impl):
            return ops.attention(q, k, v, causal=True)
    return f


def _attn_ref(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)


@pytest.mark.parametrize("impl", GPU + ["torch_sdpa"])
@pytest.mark.parametrize("shape", ATTN, ids=_name)
def test_attention_fwd(benchmark, shape, impl):
    B, H, T, D = shape
    benchmark.group = f"attn fwd bf16 {_name(shape)}"
    benchmark.extra_info.update(impl=impl, flops=2 * B * H * T * T * D)
    q, k, v = _qkv(shape)
    fn = _attn_impl(impl)
    with torch.no_grad():
        assert_close(fn(q, k, v), _attn_ref(q, k, v), 2e-2, impl)
        _time(benchmark, lambda: fn(q, k, v))


@pytest.mark.parametrize("impl", GPU + ["torch_sdpa"])
@pytest.mark.parametrize("shape", ATTN, ids=_name)
def test_attention_fwdbwd(benchmark, shape, impl):
    B, H, T, D = shape
    benchmark.group = f"attn fwd+bwd bf16 {_name(shape)}"
    benchmark.extra_info.update(impl=impl, flops=7 * B * H * T * T * D)
    q, k, v = _qkv(shape, grad=True)
    do = torch.randn_like(q)
    fn = _attn_impl(impl)
    got = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(_attn_ref(q32, k32, v32), (q32, k32, v32), do.float())
    assert_close(got, want, 2e-2, impl)
    _time(benchmark, lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))


DECODE = [(8, 12, 4096, 64), (32, 32, 2048, 128)]  # B, H, L, D; one new query a sequence


@pytest.mark.parametrize("impl", GPU + ["torch_sdpa"])
@pytest.mark.parametrize("shape", DECODE, ids=_name)
def test_decode_attention(benchmark, shape, impl):
    B, H, L, D = shape
    benchmark.group = f"decode bf16 {_name(shape)}"
    benchmark.extra_info.update(impl=impl, bytes=2 * B * H * L * D * 2)
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, H, 1, D, generator=g, device=DEV, dtype=torch.bfloat16)
    kc, vc = (torch.randn(B, H, L, D, generator=g, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.full((B,), L, device=DEV, dtype=torch.int32)
    if impl == "torch_sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, kc, vc)  # noqa: E731  (every position valid)
    else:
        def fn():
            with ops.use_backend(impl):
                return ops.decode_attention(q, kc, vc, lens)
    with torch.no_grad():
        assert_close(fn(), F.scaled_dot_product_attention(q.float(), kc.float(), vc.float()), 2e-2, impl)
        _time(benchmark, fn)


# ----------------------------------------------------------------------------- norms
NORMS = [(16384, 768), (8192, 4096), (4096, 8192)]


def _norm_inputs(shape, grad):
    g = torch.Generator(device=DEV).manual_seed(0)
    x, r = (torch.randn(*shape, generator=g, device=DEV, dtype=torch.bfloat16).requires_grad_(grad) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g, device=DEV)).bfloat16().requires_grad_(grad)
    b = (0.1 * torch.randn(shape[-1], generator=g, device=DEV)).bfloat16().requires_grad_(grad)
    return x, r, w, b


def _norm_impl(kind, impl):
    if impl == "torch":
        if kind == "ln":
            def f(x, r, w, b):
                h = x + r
                return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h
        else:
            def f(x, r, w, b):
                h = x + r
                return F.rms_norm(h, (h.shape[-1],), w, 1e-6), h
        return f

    def f(x, r, w, b):
        with ops.use_backend(impl):
            if kind == "ln":
                return ops.layer_norm(x, w, b, eps=1e-5, residual=r)
            return ops.rms_norm(x, w, eps=1e-6, residual=r)
    return f


def _norm_ref(kind, x, r, w, b):
    h = x.float() + r.float()
    y = F.layer_norm(h, (h.shape[-1],), w.float(), b.float(), 1e-5) if kind == "ln" else \
        F.rms_norm(h, (h.shape[-1],), w.float(), 1e-6)
    return y, h


@pytest.mark.parametrize("impl", GPU + ["torch"])
@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("shape", NORMS, ids=_name)
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_residual_norm(benchmark, shape, kind, impl, grad):
    benchmark.group = f"residual+{kind} {'fwd+bwd' if grad else 'fwd'} bf16 {_name(shape)}"
    n = shape[0] * shape[1]
    # bytes a fused pass must move: x, r in; y, h out (forward); and as much again backward
    benchmark.extra_info.update(impl=impl, bytes=(4 * n * 2) * (3 if grad else 1))
    x, r, w, b = _norm_inputs(shape, grad)
    fn = _norm_impl(kind, impl)
    if not grad:
        with torch.no_grad():
            assert_close(fn(x, r, w, b), _norm_ref(kind, x, r, w, b), 2e-2, impl)
            _time(benchmark, lambda: fn(x, r, w, b))
        return
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    leaves = (x, r, w, b) if kind == "ln" else (x, r, w)
    got = torch.autograd.grad(fn(x, r, w, b), leaves, (dy, dh))
    l32 = [t.detach().float().requires_grad_() for t in (x, r, w, b)]
    want = torch.autograd.grad(_norm_ref(kind, *l32), l32[: len(leaves)], (dy.float(), dh.float()))
    assert_close(got, want, 3e-2, impl)
    _time(benchmark, lambda: torch.autograd.grad(fn(x, r, w, b), leaves, (dy, dh)))


# ----------------------------------------------------------------------------- loss
LOSS = [(8192, 768, 50257), (16384, 2048, 32000)]  # N rows, C features, V vocabulary


@pytest.mark.parametrize("impl", GPU + ["torch"])
@pytest.mark.parametrize("shape", LOSS, ids=_name)
def test_linear_cross_entropy(benchmark, shape, impl):
    N, C, V = shape
    benchmark.group = f"linear+CE fwd+bwd bf16 {_name(shape)}"
    benchmark.extra_info.update(impl=impl, flops=6 * N * C * V)
    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn(N, C, generator=g, device=DEV, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, C, generator=g, device=DEV) / math.sqrt(C)).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device=DEV)
    if impl == "torch":
        def fn():
            return torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), t), (h, w))
    else:
        def fn():
            with ops.use_backend(impl):
                loss = ops.linear_cross_entropy(h, w, t)
            return torch.autograd.grad(loss, (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = torch.autograd.grad(F.cross_entropy(F.linear(h32, w32), t), (h32, w32))
    got = fn()
    assert_close(got, want, 2e-2, impl)
    del got
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    _time(benchmark, fn, rounds=10)


# ----------------------------------------------------------------------------- a training step
class _TorchGPT(torch.nn.Module):
    """GPT-2 in plain PyTorch, as nanoGPT's model.py writes it (SDPA with is_causal,
    nn.LayerNorm, tanh GELU, tied output layer, F.cross_entropy over the full logits): the
    competitor of fastlm's GPT in the training step."""

    def __init__(self, V=50257, T=1024, L=12, H=12, C=768):
        super().__init__()
        nn = torch.nn
        self.H = H
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(C), c_attn=nn.Linear(C, 3 * C), attn_proj=nn.Linear(C, C),
            ln_2=nn.LayerNorm(C), c_fc=nn.Linear(C, 4 * C), mlp_proj=nn.Linear(4 * C, C))) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def loss(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.H, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["attn_proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x)), approximate="tanh"))
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


@pytest.mark.parametrize("impl", GPU + ["torch"])
def test_gpt2_train_step(benchmark, impl):
    """GPT-2 124M, batch 8 x 1024, bf16 autocast, forward + backward + fused AdamW: fastlm's GPT
    on its GPU kernels (attention, residual + LayerNorm, fused output layer + loss) against the
    same model written in plain PyTorch (nanoGPT's), same initialisation scheme."""
    from fastlm import GPT, GPTConfig

    benchmark.group = "GPT-2 124M train step, 8x1024, bf16 autocast"
    B, T = 8, 1024
    torch.manual_seed(0)
    model = (_TorchGPT() if impl == "torch" else GPT(GPTConfig())).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, 50257, (B, T + 1), device=DEV)
    benchmark.extra_info.update(impl=impl, tokens=B * T)

    def step():
        with ops.use_backend("auto" if impl == "torch" else impl), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    loss = step()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(50257)) < 1.0
    torch.cuda.synchronize()

    def run():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=8, iterations=1, warmup_rounds=2)
