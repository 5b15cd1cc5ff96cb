"""LayerNorm / RMSNorm over the last dimension, optionally fused with a residual add (Triton).

Forward: one program per row, the whole row in one block (BLOCK = next power of two >= C):
    h = x + residual (stored), mean and rstd in float32, out = (h - mean) * rstd * w + b.
    Saved for backward: h (x itself without a residual), mean and rstd per row.
Backward: each program owns a contiguous block of rows; per row it forms
    xhat = (h - mean) * rstd, g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g xhat)) (+ dh)
and accumulates dy * xhat and dy into its own row of a (programs, C) float32 buffer, which
torch then sums: no atomics. RMSNorm is the same with mean = 0 and no mean(g) term.
Each launcher is a torch.library.triton_op (fastlm_triton::{layer,rms}_norm_{fwd,bwd}, the schemas
of csrc/ops.cpp), so fake tensors and torch.compile see through it; the autograd formula is
fastlm/ops/norms.py's, shared with the C++ and CUDA kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._name import require_package_name

require_package_name(__name__)

MAX_C = 65536


@triton.jit
def _norm_fwd_kernel(X, R, W, B, Y, H, Mean, Rstd, C, eps, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     IS_RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        hs = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * C + cols, hs, mask=mask)
        x = hs.to(tl.float32)
    if IS_RMS:
        mean = 0.0
        d = x
    else:
        mean = tl.sum(x, axis=0) / C
        d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * C + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _norm_bwd_kernel(DY, DH, H, W, Mean, Rstd, DX, DWp, DBp, rows, C, rows_per_prog, HAS_DH: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog  # int64 row offsets
    end = tl.minimum(start + rows_per_prog, rows)
    for row in range(start, end):
        off = row * C + cols
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(mask, (h - tl.load(Mean + row)) * rstd, 0.0)
        g = dy * w
        mgx = tl.sum(g * xhat, axis=0) / C
        if IS_RMS:
            dx = rstd * (g - xhat * mgx)
        else:
            mg = tl.sum(g, axis=0) / C
            dx = rstd * ((g - mg) - xhat * mgx)
        if HAS_DH:
            dx += tl.load(DH + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DWp + pid * C + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DBp + pid * C + cols, db, mask=mask)


def _block(C: int) -> int:
    if C > MAX_C:
        raise ValueError(f"triton norms: C = {C} exceeds the largest supported row ({MAX_C}); use the cpu/cuda backend")
    return triton.next_power_of_2(max(C, 1))


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fwd(x, weight, bias, residual, eps, is_rms):
    C = x.shape[-1]
    BLOCK = _block(C)
    x = x.contiguous()
    rows = x.numel() // C if C else 0
    out = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    stats = x.shape[:-1]
    mean = x.new_empty(stats if not is_rms else (0,), dtype=torch.float32)
    rstd = x.new_empty(stats, dtype=torch.float32)
    if rows > 0:
        res = residual.contiguous() if residual is not None else x
        wrap_triton(_norm_fwd_kernel)[(rows,)](
            x, res, weight.contiguous(), bias.contiguous() if bias is not None else weight, out,
            h if residual is not None else out, mean if not is_rms else rstd, rstd, C, eps,
            HAS_RES=residual is not None, HAS_BIAS=bias is not None, IS_RMS=is_rms, BLOCK=BLOCK)
    return out, h, mean, rstd


def _bwd(grad_out, grad_h, h, weight, has_bias, mean, rstd, is_rms):
    C = h.shape[-1]
    BLOCK = _block(C)
    h = h.contiguous()
    dy = grad_out.contiguous().to(h.dtype)
    rows = h.numel() // C if C else 0
    progs = max(1, min(rows, 256))
    rows_per_prog = triton.cdiv(max(rows, 1), progs)
    dx = torch.empty_like(h)
    dwp = h.new_zeros((progs, C), dtype=torch.float32)
    dbp = h.new_zeros((progs, C), dtype=torch.float32) if has_bias else dwp
    if rows > 0:
        dh = grad_h.contiguous().to(h.dtype) if grad_h is not None else dy
        wrap_triton(_norm_bwd_kernel)[(progs,)](
            dy, dh, h, weight.contiguous(), mean if not is_rms else rstd, rstd, dx, dwp, dbp, rows, C,
            rows_per_prog, HAS_DH=grad_h is not None, HAS_BIAS=has_bias, IS_RMS=is_rms, BLOCK=BLOCK)
    dw = dwp.sum(0).to(weight.dtype)
    db = dbp.sum(0).to(weight.dtype) if has_bias else weight.new_empty((0,))
    return dx, dw, db


@triton_op("fastlm_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    return _fwd(x, weight, bias, residual, eps, False)


@triton_op("fastlm_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(grad_out: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(grad_out, grad_h, h, weight, bias is not None, mean, rstd, False)


@triton_op("fastlm_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, h, _, rstd = _fwd(x, weight, None, residual, eps, True)
    return out, h, rstd


@triton_op("fastlm_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(grad_out: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = _bwd(grad_out, grad_h, h, weight, False, rstd, rstd, True)
    return dx, dw
