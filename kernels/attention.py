"""Flash attention in Triton: forward, backward and ragged-cache decode.

Forward, one program per (query block of BLOCK_M rows, batch x head[, cache slice]):
  S = Q K^T scale log2(e) over key blocks of BLOCK_N; online softmax (running max m and sum l,
  accumulator rescaled by 2^(m_old - m_new)); out = acc / l; lse = (m + log2 l) ln 2, +inf for
  a query that sees no key. Key blocks past the causal limit are never visited. Causal masking
  is bottom-right aligned (query i sees keys j <= i + Tk - Tq); with per-sequence lengths
  (decode) Tk is each sequence's valid cache length.
Backward (FlashAttention 2), delta = rowsum(dO o O), P = 2^(S - lse log2 e),
  dS = P (dP - delta), dP = dO V^T:
  one program per key block for dK = scale dS^T Q and dV = P^T dO (per query head; the
  query heads that share a key/value head are summed afterwards), one per query block for
  dQ = scale dS K. No atomics.
Decode splits the cache into NSPLIT slices, one program each; the slices' partial outputs
are combined by their logsumexps.
float32 runs with IEEE products (no TF32); bf16/fp16 feed the tensor cores, accumulate fp32.
Each launcher is a torch.library.triton_op (fastlm_triton::attention_{fwd,bwd},
fastlm_triton::decode_attention, the schemas of csrc/ops.cpp), so fake tensors and
torch.compile see through it; the autograd formula is fastlm/ops/attention.py's, shared with
the C++ and CUDA kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._name import require_package_name

require_package_name(__name__)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LENS,
                sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                sob, soh, sot, sos, H, G, Tq, Tk, chunk, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // G
    if HAS_LENS:
        Tk = tl.load(LENS + b).to(tl.int32)
    off = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    lo = split * chunk
    hi = tl.minimum(hi, lo + chunk)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        kmask = kn < Tk
        kt = tl.load(kbase + kn[None, :] * skt + offs_d[:, None] * skd, mask=kmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        valid = kmask[None, :]
        if CAUSAL:
            valid = valid & (kn[None, :] <= offs_m[:, None] + off)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + kn[:, None] * svt + offs_d[None, :] * svd, mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    rmask = offs_m < Tq
    obase = O + split * sos + b * sob + h * soh
    tl.store(obase + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + (split * (tl.num_programs(1)) + bh) * Tq + offs_m, lse, mask=rmask)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, rmask, kmask, off, qk_scale,
                       CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """The backward's recomputation for one (query block, key block) tile: P = 2^(S - lse)
    (0 where masked) and dS = P (dP - delta), with S = Q K^T scaled and dP = dO V^T."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    valid = rmask[:, None] & kmask[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                     H, G, Tq, Tk, qk_scale, scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    off = Tk - Tq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kmask = offs_n < Tk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                mask=kmask[:, None] & dmask[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - off) // BLOCK_M * BLOCK_M
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rmask = offs_m < Tq
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        lse2 = tl.load(LSE + bh * Tq + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=rmask, other=0.0)
        p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, rmask, kmask, off, qk_scale,
                                   CAUSAL, PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    base = bh * Tk * D
    omask = kmask[:, None] & dmask[None, :]
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], dk * scale, mask=omask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv, mask=omask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   H, G, Tq, Tk, qk_scale, scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    off = Tk - Tq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rmask = offs_m < Tq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                 mask=rmask[:, None] & dmask[None, :], other=0.0)
    lse2 = tl.load(LSE + bh * Tq + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + off)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = offs_n < Tk
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, rmask, kmask, off, qk_scale,
                                   CAUSAL, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(DQ + bh * Tq * D + offs_m[:, None] * D + offs_d[None, :], dq * scale,
             mask=rmask[:, None] & dmask[None, :])


def _blocks(D, device):
    bd = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":  # the interpreter: small blocks keep it quick
        return 16, 16, bd
    return (64, 64, bd) if bd <= 128 else (32, 32, bd)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else None


def _s(t):
    return tuple(t.stride())


def _forward(q, k, v, causal, scale, lens=None, nsplit=1):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    BM, BN, BD = _blocks(D, q.device)
    chunk = triton.cdiv(triton.cdiv(Tk, nsplit), BN) * BN
    o = torch.empty((nsplit, B, H, Tq, D), device=q.device, dtype=q.dtype if nsplit == 1 else torch.float32)
    lse = torch.empty((nsplit, B, H, Tq), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(Tq, BM), B * H, nsplit)
    wrap_triton(_fwd_kernel)[grid](
        q, k, v, o, lse, lens if lens is not None else lse,
        *_s(q), *_s(k), *_s(v), o.stride(1), o.stride(2), o.stride(3), o.stride(0),
        H, H // Hkv, Tq, Tk, chunk, scale * LOG2E,
        D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, CAUSAL=causal, HAS_LENS=lens is not None, PREC=_prec(q.dtype))
    return o, lse


@triton_op("fastlm_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _forward(q, k, v, causal, scale)
    return o[0], lse[0]


@triton_op("fastlm_triton::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    BM, BN, BD = _blocks(D, q.device)
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq = torch.empty((B, H, Tq, D), device=q.device, dtype=torch.float32)
    dk = torch.empty((B, H, Tk, D), device=q.device, dtype=torch.float32)
    dv = torch.empty((B, H, Tk, D), device=q.device, dtype=torch.float32)
    args = (*_s(q), *_s(k), *_s(v), *_s(grad_out), H, G, Tq, Tk, scale * LOG2E, scale)
    meta = dict(D=D, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, CAUSAL=causal, PREC=_prec(q.dtype))
    wrap_triton(_bwd_dkdv_kernel)[(triton.cdiv(Tk, BN), B * H)](q, k, v, grad_out, lse, delta, dk, dv, *args, **meta)
    wrap_triton(_bwd_dq_kernel)[(triton.cdiv(Tq, BM), B * H)](q, k, v, grad_out, lse, delta, dq, *args, **meta)
    if G > 1:
        dk = dk.view(B, Hkv, G, Tk, D).sum(2)
        dv = dv.view(B, Hkv, G, Tk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@triton_op("fastlm_triton::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    B, H, Tq, D = q.shape
    L = k_cache.shape[2]
    nsplit = max(1, min(16, L // 256))
    o, lse = _forward(q, k_cache, v_cache, True, scale, lens=cache_lens.to(torch.int32).contiguous(), nsplit=nsplit)
    if nsplit == 1:
        return o[0]
    lse = torch.where(torch.isinf(lse) & (lse > 0), torch.full_like(lse, float("-inf")), lse)
    m = lse.amax(0, keepdim=True)
    w = torch.exp(lse - torch.where(torch.isinf(m), torch.zeros_like(m), m))  # empty slices weigh 0
    total = w.sum(0)
    out = (w.unsqueeze(-1) * torch.nan_to_num(o)).sum(0) / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out.to(q.dtype)
