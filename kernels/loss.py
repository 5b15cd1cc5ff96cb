"""Fused linear + cross-entropy (Triton), chunked like Liger-Kernel's fused linear CE.

For each chunk of rows: Z = h[chunk] @ W^T (torch.mm, into one reused buffer), then one
Triton program per row turns Z's row, in place, into scale * (softmax(z) - onehot(t)) and
writes the row's loss (online max / sum-of-exp over blocks of the vocabulary, then a second
sweep for the gradient); then dh[chunk] = Z @ W and dW += Z^T @ h[chunk] (torch.mm/addmm).
A row whose target is ignore_index gets loss 0 and a zero gradient row. The forward
computes the gradients for a unit grad_output when the loss is reduced; the backward
scales them. For reduction "none" the backward reruns the chunks with per-row scales.
Computation in float32 (bf16/fp16 inputs converted).
Each launcher is a torch.library.triton_op (fastlm_triton::linear_cross_entropy_{fwd,bwd}, the
schemas of csrc/ops.cpp), so fake tensors and torch.compile see through it; the autograd
formula is fastlm/ops/loss.py's, shared with the C++ and CUDA kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._name import require_package_name

require_package_name(__name__)


@triton.jit
def _ce_rows_kernel(Z, T, Loss, RowScale, V, stride, ignore_index, scale, GRAD: tl.constexpr,
                    HAS_ROW_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zr = Z + row * stride
    t = tl.load(T + row)
    keep = t != ignore_index
    t_safe = tl.where(keep, t, 0)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -1e30, tl.float32)  # finite, so m - m_new is never inf - inf
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, V, BLOCK):
        z = tl.load(zr + off + cols, mask=off + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)  # masked lanes: exp(-inf) = 0
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - mx), axis=0)
    lse = mx + tl.log(total)
    zt = tl.load(zr + t_safe)
    tl.store(Loss + row, tl.where(keep, lse - zt, 0.0))
    if GRAD:
        if HAS_ROW_SCALE:
            sc = tl.load(RowScale + row)
        else:
            sc = scale
        sc = tl.where(keep, sc, 0.0)
        for off in range(0, V, BLOCK):
            mask = off + cols < V
            z = tl.load(zr + off + cols, mask=mask, other=0.0)
            p = tl.exp(z - lse) * sc
            p = tl.where(off + cols == t_safe, p - sc, p)
            tl.store(zr + off + cols, p, mask=mask)


def _run_chunks(h, w, t, ignore_index, chunk, grad, scale, row_scale):
    N, V = h.shape[0], w.shape[0]
    loss_rows = h.new_empty((N,), dtype=torch.float32)
    dh = torch.empty_like(h) if grad else None
    dw = torch.zeros_like(w) if grad else None
    buf = h.new_empty((min(chunk, max(N, 1)), V))
    BLOCK = min(4096, triton.next_power_of_2(V))
    for r0 in range(0, N, chunk):
        R = min(chunk, N - r0)
        z = buf[:R]
        hc = h[r0:r0 + R]
        torch.mm(hc, w.t(), out=z)
        wrap_triton(_ce_rows_kernel)[(R,)](
            z, t[r0:r0 + R], loss_rows[r0:r0 + R], row_scale[r0:r0 + R] if row_scale is not None else loss_rows,
            V, z.stride(0), ignore_index, scale, GRAD=grad, HAS_ROW_SCALE=row_scale is not None, BLOCK=BLOCK)
        if grad:
            torch.mm(z, w, out=dh[r0:r0 + R])
            dw.addmm_(z.t(), hc)
    return loss_rows, dh, dw


def _prepare(h, weight, targets, chunk_size):
    h32 = h.float().contiguous()
    w32 = weight.float().contiguous()
    t = targets.long().contiguous()
    N, V = h32.shape[0], w32.shape[0]
    if chunk_size <= 0:
        chunk_size = max(1, (64 << 20) // (4 * max(V, 1)))
    return h32, w32, t, max(1, min(chunk_size, max(N, 1)))


@triton_op("fastlm_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             reduction: str, chunk_size: int,
                             compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h32, w32, t, chunk = _prepare(h, weight, targets, chunk_size)
    grad = compute_grad and reduction != "none"
    n_valid = (t != ignore_index).sum()
    # the scale is a Python float for the kernel: "mean" needs the count (one host sync)
    scale = 1.0 / max(int(n_valid), 1) if reduction == "mean" else 1.0
    loss_rows, dh, dw = _run_chunks(h32, w32, t, ignore_index, chunk, grad, scale, None)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / n_valid
    gh = dh.to(h.dtype) if grad else h.new_empty((0,))
    gw = dw.to(weight.dtype) if grad else weight.new_empty((0,))
    return loss, gh, gw


@triton_op("fastlm_triton::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_loss: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    h32, w32, t, chunk = _prepare(h, weight, targets, chunk_size)
    rs = grad_loss.reshape(-1).float().contiguous()
    _, dh, dw = _run_chunks(h32, w32, t, ignore_index, chunk, True, 1.0, rs)
    return dh.to(h.dtype), dw.to(weight.dtype)
