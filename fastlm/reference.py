"""The spec of every fastlm op, in plain PyTorch.

Each function here is the definition that every kernel (C++, CUDA, Triton) must compute:
the test oracle (run in float64), and the fallback when no kernel serves an input and torch
has no fused op of the same function (fastlm/ops/_torch_forms.py).
Written for clarity, not speed. Low-precision inputs (bf16/fp16) are computed in float32
and cast back, as the kernels do. Imports only torch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "decode_attention",
    "layer_norm",
    "rms_norm",
    "gelu",
    "cross_entropy",
    "linear_cross_entropy",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 are stored, float32 is computed; float32 and float64 compute as themselves."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Grouped-query attention: each of the Hkv key/value heads serves H // Hkv query heads."""
    hkv = k.shape[1]
    return k if hkv == num_heads else k.repeat_interleave(num_heads // hkv, dim=1)


def attention(q, k, v, causal: bool = True, scale: float | None = None):
    """softmax(q k^T * scale + mask) v over (B, H, Tq, D) queries and (B, Hkv, Tk, D) keys/values.

    Causal masking is aligned bottom-right: query i (0-based) sees keys j <= i + Tk - Tq, so
    the last query sees every key (FlashAttention 2's convention). A query that sees no key
    (possible only when Tq > Tk) outputs zeros.
    """
    out_dtype = q.dtype
    cd = _compute_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(Tq, device=q.device).unsqueeze(1)
        j = torch.arange(Tk, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i + (Tk - Tq), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    return torch.matmul(probs, v).to(out_dtype)


def decode_attention(q, k_cache, v_cache, cache_lens, scale: float | None = None):
    """Attention of a few new queries per sequence over a ragged KV cache.

    q: (B, H, Tq, D), the newest Tq tokens of each sequence, whose keys/values are already
    written at the end of each sequence's valid cache prefix. k_cache, v_cache:
    (B, Hkv, L_max, D). cache_lens: int tensor (B,), valid length of each sequence's cache
    (>= Tq). Query i of sequence b sees cache positions j < cache_lens[b] - Tq + 1 + i:
    causal attention, bottom-right aligned, over the valid prefix only. Whatever the cache
    holds past cache_lens[b] (uninitialised memory, NaN) has no effect.
    """
    out_dtype = q.dtype
    cd = _compute_dtype(q.dtype)
    B, H, Tq, D = q.shape
    L = k_cache.shape[2]
    # Lengths past the cache are an error (the kernels check them too). Not on a GPU, where
    # the check would wait for the device every decode step, nor while torch.compile traces.
    if q.device.type == "cpu" and B and not torch.compiler.is_compiling():
        lo, hi = int(cache_lens.min()), int(cache_lens.max())
        if lo < 0 or hi > L:
            raise ValueError(f"decode_attention: cache_lens must lie in [0, L_max = {L}], got {cache_lens.tolist()}")
        # Only the valid prefix is read (and converted, for a bf16 / fp16 cache).
        k_cache, v_cache, L = k_cache[:, :, :hi], v_cache[:, :, :hi], hi
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # The cache may be stored narrower than q (a float32 model with a bf16 / fp16 cache): its
    # values are read as stored, in q's compute dtype.
    qc = q.to(cd)
    k = _expand_kv(k_cache.to(cd), H)
    v = _expand_kv(v_cache.to(cd), H)
    scores = torch.matmul(qc, k.transpose(-1, -2)) * scale  # (B, H, Tq, L)
    lens = cache_lens.to(device=q.device, dtype=torch.long).view(B, 1, 1, 1)
    i = torch.arange(Tq, device=q.device).view(1, 1, Tq, 1)
    j = torch.arange(L, device=q.device).view(1, 1, 1, L)
    scores = scores.masked_fill(j >= lens - Tq + 1 + i, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    v = v.masked_fill((j >= lens).transpose(-1, -2), 0.0)  # 0 * NaN would still be NaN
    return torch.matmul(probs, v).to(out_dtype)


def kv_cache_write(k_cache, v_cache, k, v, positions) -> None:
    """Write a decode step's new keys and values into the cache, in place: for each sequence b,
    ``k_cache[b, :, positions[b]] = k[b]`` and ``v_cache[b, :, positions[b]] = v[b]``.
    Caches (B, Hkv, L, D); k, v (B, Hkv, D); positions int (B,), each in [0, L). float32 k, v
    into a bf16 / fp16 cache are rounded as ``.to(cache dtype)`` rounds (to nearest even)."""
    b = torch.arange(k.shape[0], device=k.device)
    pos = positions.to(device=k.device, dtype=torch.long)
    k_cache.transpose(1, 2).index_put_((b, pos), k.to(k_cache.dtype))
    v_cache.transpose(1, 2).index_put_((b, pos), v.to(v_cache.dtype))


def layer_norm(x, weight, bias=None, eps: float = 1e-5, residual=None):
    """LayerNorm over the last dimension: (h - mean) / sqrt(var + eps) * weight + bias.

    With residual given, h = x + residual is formed first and (out, h) is returned;
    otherwise h = x and only out is returned. Variance is the biased (population) one.
    """
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    h = x if residual is None else (x.to(cd) + residual.to(cd)).to(dtype)
    hc = h.to(cd)
    mean = hc.mean(dim=-1, keepdim=True)
    var = (hc - mean).pow(2).mean(dim=-1, keepdim=True)
    out = (hc - mean) * torch.rsqrt(var + eps) * weight.to(cd)
    if bias is not None:
        out = out + bias.to(cd)
    out = out.to(dtype)
    return out if residual is None else (out, h)


def rms_norm(x, weight, eps: float = 1e-6, residual=None):
    """RMSNorm over the last dimension: h / sqrt(mean(h^2) + eps) * weight.

    With residual given, h = x + residual is formed first and (out, h) is returned.
    """
    dtype = x.dtype
    cd = _compute_dtype(dtype)
    h = x if residual is None else (x.to(cd) + residual.to(cd)).to(dtype)
    hc = h.to(cd)
    out = hc * torch.rsqrt(hc.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(cd)
    out = out.to(dtype)
    return out if residual is None else (out, h)


def gelu(x):
    """GELU, tanh approximation (GPT-2's "gelu_new"):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    cd = _compute_dtype(x.dtype)
    xc = x.to(cd)
    inner = math.sqrt(2.0 / math.pi) * (xc + 0.044715 * xc.pow(3))
    return (0.5 * xc * (1.0 + torch.tanh(inner))).to(x.dtype)


# Column panel width of ``decode_linear``'s packed weight: 48 columns are three AVX-512
# vectors (six AVX2, twelve NEON), so eight rows (a batch of 8 decode steps) fit one AVX-512
# pass of the CPU micro-kernel (8 x 3 accumulators), which then reads each weight byte once,
# from memory; narrower levels take the panel in passes of fewer rows (csrc/cpu/kernels/linear.h).
DECODE_PANEL = 48


def pack_decode_weight(weight):
    """A linear layer's weight (N, K) packed for ``decode_linear``: DECODE_PANEL-column panels,
    weight_p[p, k, c] = weight[DECODE_PANEL p + c, k], zero past N; shape
    (ceil(N / DECODE_PANEL), K, DECODE_PANEL)."""
    N, K = weight.shape
    W = DECODE_PANEL
    P = -(-N // W)
    w = torch.zeros(P * W, K, dtype=weight.dtype, device=weight.device)
    w[:N] = weight
    return w.view(P, W, K).transpose(1, 2).contiguous()


def decode_linear(x, weight_p, bias=None, n: int | None = None):
    """The linear layer of a decode step: ``x @ weight.T + bias`` for x (M, K), few rows (one
    per sequence), the weight (N, K) given packed by ``pack_decode_weight`` (n = N, by default
    every packed column)."""
    P, K, W = weight_p.shape
    n = P * W if n is None else n
    w_t = weight_p.transpose(0, 1).reshape(K, P * W)[:, :n]
    return torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)


QUANT_BLOCK = 32
WEIGHT_FORMATS = ("bf16", "f16", "q8_0", "q4_0")


def quantize_q8_0(weight):
    """Weight-only int8 quantization of a (N, K) weight in blocks of QUANT_BLOCK along K (as
    llama.cpp's q8_0): per output column n and block j, scale = max|w| / 127 rounded to float16,
    q = round(w / scale) in [-127, 127] (0 where the scale is 0). Returns (q int8 (N, K),
    scales float16 (N, ceil(K / QUANT_BLOCK))); the weight is q * scale."""
    N, K = weight.shape
    nb = -(-K // QUANT_BLOCK)
    w = torch.zeros(N, nb * QUANT_BLOCK, dtype=torch.float32, device=weight.device)
    w[:, :K] = weight.float()
    w = w.view(N, nb, QUANT_BLOCK)
    scales = (w.abs().amax(dim=-1) / 127).to(torch.float16)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(w))
    return q.clamp_(-127, 127).to(torch.int8).view(N, nb * QUANT_BLOCK)[:, :K].contiguous(), scales


def quantize_q4_0(weight):
    """Weight-only 4-bit quantization of a (N, K) weight in blocks of QUANT_BLOCK along K (as
    llama.cpp's q4_0): per output column and block, m = the value of largest magnitude (its
    sign kept), d = m / -8, u = min(15, floor(w / d + 8.5)) in [0, 15] (0 where d is 0, so
    the weight is -8 d = 0); the scale is d rounded to float16 and the weight (u - 8) * scale.
    Returns (u uint8 (N, K), scales float16 (N, ceil(K / QUANT_BLOCK)))."""
    N, K = weight.shape
    nb = -(-K // QUANT_BLOCK)
    w = torch.zeros(N, nb * QUANT_BLOCK, dtype=torch.float32, device=weight.device)
    w[:, :K] = weight.float()
    w = w.view(N, nb, QUANT_BLOCK)
    m = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
    d = m / -8
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    u = torch.floor(w * inv + 8.5).clamp_(0, 15)
    u = torch.where(d != 0, u, torch.zeros_like(u))
    return u.to(torch.uint8).view(N, nb * QUANT_BLOCK)[:, :K].contiguous(), d.squeeze(-1).to(torch.float16)


def pack_decode_weight_q(weight, format: str):
    """A linear layer's weight (N, K) for ``decode_linear_q`` in a reduced-precision format:
    "bf16" / "f16": ``pack_decode_weight`` of the weight in that dtype, (P, K, 48);
    "q8_0": uint8 (P, ceil(K / 32), 32 * 48 + 2 * 48), P = ceil(N / 48): block j of panel p holds
    its values in 8 groups of 4 rows along K, byte [g][c][t] = Q[48 p + c, 32 j + 4 g + t] (int8,
    zero past N and K), then the 48 float16 scales of those columns' block j (zero past N), with
    Q and the scales from ``quantize_q8_0``;
    "q4_0": uint8 (P, ceil(K / 32), 16 * 48 + 2 * 48): block j of panel p holds 4 groups,
    byte [g][c][t] = U[48 p + c, 32 j + 4 g + t] + 16 U[48 p + c, 32 j + 16 + 4 g + t] (U from
    ``quantize_q4_0``; 8, a zero weight, past N and K), then the 48 float16 scales.
    (Four consecutive values of a column in adjacent bytes: one 32-bit lane of the CPU
    kernel's integer dot products.)"""
    if format in ("bf16", "f16"):
        return pack_decode_weight(weight.to(torch.bfloat16 if format == "bf16" else torch.float16))
    if format not in ("q8_0", "q4_0"):
        raise ValueError(f"weight format must be one of {WEIGHT_FORMATS}, got {format!r}")
    N, K = weight.shape
    W, B = DECODE_PANEL, QUANT_BLOCK
    P, nb = -(-N // W), -(-K // B)
    if format == "q8_0":
        q, scales = quantize_q8_0(weight)
        qp = torch.zeros(P * W, nb * B, dtype=torch.int8, device=weight.device)
        qp[:N, :K] = q
        # (P, W, nb, g, t) -> (P, nb, g, W, t)
        values = qp.view(P, W, nb, B // 4, 4).permute(0, 2, 3, 1, 4).reshape(P, nb, B * W).view(torch.uint8)
    else:
        u, scales = quantize_q4_0(weight)
        up = torch.full((P * W, nb * B), 8, dtype=torch.uint8, device=weight.device)
        up[:N, :K] = u
        up = up.view(P, W, nb, B)
        bytes_ = up[..., : B // 2] | (up[..., B // 2:] << 4)  # (P, W, nb, 16)
        values = bytes_.view(P, W, nb, B // 8, 4).permute(0, 2, 3, 1, 4).reshape(P, nb, B // 2 * W)
    sp = torch.zeros(P * W, nb, dtype=torch.float16, device=weight.device)
    sp[:N] = scales
    s_blocks = sp.view(P, W, nb).permute(0, 2, 1).contiguous().view(torch.uint8).view(P, nb, 2 * W)
    return torch.cat([values.contiguous(), s_blocks], dim=-1).contiguous()


def unpack_decode_weight_q(weight_q, format: str, n: int, k: int):
    """The float32 (n, k) weight that a ``pack_decode_weight_q`` tensor stands for."""
    W, B = DECODE_PANEL, QUANT_BLOCK
    if format in ("bf16", "f16"):
        P = weight_q.shape[0]
        return weight_q.float().transpose(1, 2).reshape(P * W, -1)[:n, :k]
    P, nb, _ = weight_q.shape
    nv = B * W if format == "q8_0" else B // 2 * W
    if format == "q8_0":
        # (P, nb, g, W, t) -> (P, nb, W, 32)
        q = weight_q[..., :nv].contiguous().view(torch.int8).view(P, nb, B // 4, W, 4).permute(0, 1, 3, 2, 4)
        q = q.reshape(P, nb, W, B).float()
    else:
        b = weight_q[..., :nv].view(P, nb, B // 8, W, 4).permute(0, 1, 3, 2, 4).reshape(P, nb, W, B // 2)
        q = torch.cat([b & 15, b >> 4], dim=-1).float() - 8
    s = weight_q[..., nv:].contiguous().view(torch.float16).view(P, nb, W, 1).float()
    return (q * s).permute(0, 2, 1, 3).reshape(P * W, nb * B)[:n, :k]


def relayout_decode_weight_q_v1(weight_q, format: str):
    """A q8_0 / q4_0 tensor packed in the first layout of ``pack_decode_weight_q`` (block j's
    values as 32 (q8_0) or 16 (q4_0) rows of 48 columns, byte [k][c]) in the current one
    (byte [g][c][t] of row k = 4 g + t): the same bytes, permuted. bf16 / f16 are unchanged."""
    if format in ("bf16", "f16"):
        return weight_q
    W = DECODE_PANEL
    P, nb, _ = weight_q.shape
    rows = QUANT_BLOCK if format == "q8_0" else QUANT_BLOCK // 2
    values = weight_q[..., : rows * W].reshape(P, nb, rows // 4, 4, W).transpose(3, 4).reshape(P, nb, rows * W)
    return torch.cat([values, weight_q[..., rows * W:]], dim=-1).contiguous()


def quantize_activations_q8_0(x):
    """The activations of a q8_0 / q4_0 product rounded to q8_0, as llama.cpp rounds them: per row
    of x (..., K), blocks of QUANT_BLOCK along K, d = max|x| / 127, q = round(x * (127 / max|x|))
    (half to even) computed in float32, the value q d (0 where the block is all 0; NaN for a
    block holding a NaN or an infinity). Returns float32 values of x's shape."""
    K = x.shape[-1]
    nb = -(-K // QUANT_BLOCK)
    xf = torch.zeros(*x.shape[:-1], nb * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    xf[..., :K] = x.float()
    xb = xf.view(*x.shape[:-1], nb, QUANT_BLOCK)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(torch.isnan(xb).any(dim=-1, keepdim=True), torch.full_like(amax, float("nan")), amax)
    finite = torch.isfinite(amax)
    inv = torch.where(finite & (amax > 0), 127.0 / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    q = torch.where(finite, torch.round(xb * inv), torch.zeros_like(xb))
    d = torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    return (q * d).view(*x.shape[:-1], nb * QUANT_BLOCK)[..., :K]


def decode_linear_q(x, weight_q, bias=None, n: int | None = None, format: str = "q8_0"):
    """``x @ weight.T + bias`` with the weight given by ``pack_decode_weight_q`` in ``format``:
    the product with the dequantized weight, in x's dtype; for q8_0 and q4_0, of the activations
    rounded to q8_0 (``quantize_activations_q8_0``), as llama.cpp computes them. The rounding
    passes x's gradient straight through (the gradient is that of the product with x)."""
    if n is None:
        n = weight_q.shape[0] * DECODE_PANEL
    w = unpack_decode_weight_q(weight_q, format, n, x.shape[-1]).to(x.dtype)
    if format in ("q8_0", "q4_0"):
        x = x + (quantize_activations_q8_0(x).to(x.dtype) - x).detach()
    return x @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy of (N, V) logits (or (..., V)) against integer targets (N,) (or (...)).

    Rows whose target equals ignore_index contribute nothing; "mean" divides by the number
    of rows that count (NaN when none does, as torch does); "none" returns the per-row losses
    in the shape of targets. The loss of bf16/fp16 logits is float32.
    """
    cd = _compute_dtype(logits.dtype)
    shape = targets.shape
    logits = logits.reshape(-1, logits.shape[-1]).to(cd)
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    safe_t = torch.where(keep, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    loss = torch.where(keep, lse - picked, torch.zeros_like(lse))
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / keep.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_cross_entropy(h, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    """cross_entropy(h @ weight.T, targets): h (..., C), weight (V, C), targets (...)."""
    logits = F.linear(h.to(_compute_dtype(h.dtype)), weight.to(_compute_dtype(weight.dtype)))
    return cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
