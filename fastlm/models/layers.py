"""The pieces of the GPT: norm, rotary positions, attention, MLP, block.

Every hot op goes through ``fastlm.ops``. Each normalisation is fused with the residual
add that precedes it: a block receives the residual stream ``h`` and the last branch output
``delta``, and ``norm(delta, residual=h)`` returns both ``norm(h + delta)`` and ``h + delta``
in one pass.

Each module's forward is written once and serves both the full forward (training, scoring)
and the incremental forward over a KV cache (``fastlm.models.decode``). Two things are
parameters of it:

- ``attend(q, k, v)``: what attention does with the step's queries, keys and values. By
  default causal attention over the sequence itself; the incremental forward passes one that
  writes the keys and values into the cache and attends over the cache.
- ``run``: how submodules, linear layers, norms, GELU and dropout are applied. ``EAGER``
  calls the modules (hooks included) and ``fastlm.ops`` (which choose an implementation on
  every call); the incremental forward passes one with the implementations chosen once, the
  projection weights kept in the layout its product reads fastest, and no per-call module
  machinery (a decode step is a few microseconds of work per op).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .config import GPTConfig

__all__ = ["Eager", "EAGER", "Norm", "rope_tables", "apply_rope", "CausalSelfAttention", "MLP", "Block",
           "next_token_targets"]


class Eager:
    """Applies a forward's submodules, linear layers, norms, GELU and dropout through the modules themselves."""

    def call(self, module: nn.Module, *args):
        return module(*args)

    def linear(self, module: nn.Linear, x):
        return module(x)

    def norm(self, module, x, residual=None):
        return module(x, residual)

    def gelu(self, x):
        return ops.gelu(x)

    def dropout(self, module: nn.Dropout, x):
        return module(x)


EAGER = Eager()


class Norm(nn.Module):
    """LayerNorm or RMSNorm through fastlm.ops; ``norm(x, residual)`` fuses the residual add
    and returns (norm(x + residual), x + residual)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.layer_norm_epsilon
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        use_bias = cfg.norm == "layernorm" and cfg.bias
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if use_bias else None

    def forward(self, x, residual=None):
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


def rope_tables(head_dim: int, length: int, theta: float, device=None, dtype=torch.float32):
    """cos and sin tables (length, head_dim // 2) for rotary positions."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(length, device=device, dtype=torch.float64), inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, D) by position angles cos/sin, shaped
    (T, D/2) or anything that broadcasts against (B, H, T, D/2): each pair as a complex number
    times cos + i sin, one complex product (forward and backward) instead of four real products
    of strided halves, a stack and their gradients. 16-bit x is rotated in float32."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    try:
        xc = torch.view_as_complex(pairs)
    except RuntimeError:  # a layout view_as_complex cannot view (odd strides or offset)
        xc = torch.view_as_complex(pairs.contiguous())
    rot = torch.complex(cos.to(xf.dtype), sin.to(xf.dtype))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


def causal_attention(q, k, v):
    return ops.attention(q, k, v, causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qk_norm, self.eps = cfg.qk_norm, cfg.layer_norm_epsilon
        qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x, rope=None):
        """(B, T, C_qkv) -> q (B, H, T, D), k and v (B, Hkv, T, D); with qk_norm q and k
        RMS-normalised over each head's D features (no gain), then rotary positions applied."""
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        # split along the heads before moving them ahead of time: the backward then joins the
        # three gradients, each in (B, T, heads, D) order, with one concatenation straight into
        # the projection's layout (slices would fill zero tensors of the whole width, and a
        # split after the transpose would concatenate in (B, heads, T, D) order and copy back)
        heads = x.view(B, T, H + 2 * Hkv, self.head_dim).split([H, Hkv, Hkv], dim=2)
        q, k, v = (t.transpose(1, 2) for t in heads)
        if self.qk_norm:  # bounds the attention logits whatever the weights' scale (modded-nanogpt)
            # fastlm's fused RMSNorm with a unit gain: one op each way where F.rms_norm records
            # five forward and more backward
            one = self._unit_gain(q)
            q, k = ops.rms_norm(q, one, self.eps), ops.rms_norm(k, one, self.eps)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _unit_gain(self, x):
        """A gain of ones (head_dim,) in x's dtype and device (no gradient), kept between calls."""
        g = getattr(self, "_ones", None)
        if g is None or g.dtype != x.dtype or g.device != x.device:
            g = self._ones = torch.ones(self.head_dim, dtype=x.dtype, device=x.device)
        return g

    def forward(self, x, rope=None, attend=None, run: Eager = EAGER):
        """x (B, T, C) -> (B, T, C). ``attend(q, k, v)`` returns (B, H, T, D): causal attention
        over the T tokens by default (see the module's doc)."""
        B, T, _ = x.shape
        q, k, v = self.split_heads(run.linear(self.c_attn, x), rope)
        y = (attend or causal_attention)(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return run.dropout(self.resid_dropout, run.linear(self.c_proj, y))


class _ReluSquare(torch.autograd.Function):
    """relu(x)^2 with the backward 2 relu(x) g: two products each way, where relu().square()
    records four operations and its backward five."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return (g * r).mul_(2.0)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.c_gate = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, run: Eager = EAGER):
        if self.kind == "swiglu":
            hidden = F.silu(run.linear(self.c_gate, x)) * run.linear(self.c_fc, x)
        elif self.kind == "relu2":
            hidden = _ReluSquare.apply(run.linear(self.c_fc, x))
        else:
            hidden = run.gelu(run.linear(self.c_fc, x))
        return run.dropout(self.dropout, run.linear(self.c_proj, hidden))


class Block(nn.Module):
    """Pre-norm transformer block over the residual stream, residual adds fused into norms."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, delta, rope=None, attend=None, run: Eager = EAGER):
        """Takes the residual stream h and the pending branch output delta (None at the first
        block); returns the new (h, delta). The stream after the block is h + delta."""
        if delta is None:
            y = run.norm(self.ln_1, h)
        else:
            y, h = run.norm(self.ln_1, delta, h)
        y, h = run.norm(self.ln_2, run.call(self.attn, y, rope, attend, run), h)
        return h, run.call(self.mlp, y, run)


def next_token_targets(idx, targets, labels, ignore_index: int = -100):
    """The targets a loss scores position t of ``idx`` on: ``targets`` as given (already
    shifted), or ``labels`` (aligned with ``idx``) shifted left by one, the last position
    given ``ignore_index``; None when neither is given."""
    if labels is None:
        return targets
    if targets is not None:
        raise ValueError("give labels (aligned with idx, shifted inside) or targets (already shifted), not both")
    if not isinstance(labels, torch.Tensor) or labels.shape != getattr(idx, "shape", None):
        raise ValueError(f"labels must be a tensor shaped like idx {tuple(getattr(idx, 'shape', ()))}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)
