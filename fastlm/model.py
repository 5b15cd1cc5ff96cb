"""The GPT model: GPT-2's architecture, with options for the modern variant.

GPT-2 (the defaults): learned positions, pre-LayerNorm blocks, tanh-GELU MLP of width
4 * n_embd, biases everywhere, tied input/output embeddings, GPT-2 initialisation.
Modern options: ``norm="rmsnorm"``, ``pos="rope"``, ``mlp="swiglu"``, ``bias=False``,
``n_kv_head < n_head`` (grouped-query attention).

Every hot op goes through ``fastlm.ops``. Each normalisation is fused with the residual
add that precedes it: a block receives the residual stream ``h`` and the last branch output
``delta``, and ``norm(delta, residual=h)`` returns both ``norm(h + delta)`` and ``h + delta``
in one pass. The parameter names are Hugging Face GPT-2's (``transformer.h.0.attn.c_attn``
...), stored as ``nn.Linear`` (GPT-2's Conv1D weights are transposed on load and save; see
``fastlm.checkpoint``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


def ids_in_vocab(what: str, v, vocab_size: int, stacklevel: int = 2):
    """``v`` (an id, a list of ids or None) without the ids outside [0, vocab_size), with a
    warning naming ``what`` when any is dropped. A special-token id the model cannot produce
    (transformers' GPT2Config defaults to 50256 whatever its vocab_size) is dropped where a
    checkpoint's settings are read, as transformers warns and generates, instead of failing
    every generation later."""
    ids = v if isinstance(v, (list, tuple)) else [v] if v is not None else []
    fits = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size]
    if len(fits) == len(ids):
        return v
    warnings.warn(f"{what}={v!r} lies outside the vocabulary of {vocab_size} ids and is dropped"
                  f"{f' (kept {fits})' if fits else ''}", UserWarning, stacklevel=stacklevel + 1)
    return (fits if len(fits) > 1 else fits[0]) if fits else None


@dataclass
class GPTConfig:
    arch: str = "gpt"  # "gpt" (transformer) | "lstm" | "gru" (recurrent baselines, fastlm.recurrent)
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context (GPT-2's n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # key/value heads; None means n_head (plain multi-head)
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd (gelu) or ~8/3 * n_embd (swiglu)
    dropout: float = 0.0  # embedding and residual dropout (attention probabilities are not dropped)
    bias: bool = True
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    pos: str = "learned"  # "learned" | "rope"
    mlp: str = "gelu"  # "gelu" (tanh approximation) | "swiglu"
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # free-form metadata kept in config.json

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        checks = [
            (self.arch in ("gpt", "lstm", "gru"), f"arch must be 'gpt', 'lstm' or 'gru', got {self.arch!r}"),
            (self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}"),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.n_layer >= 0, f"n_layer must be >= 0, got {self.n_layer}"),
            (self.n_head >= 1 and self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be a positive multiple of n_head ({self.n_head})"),
            (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.pos in ("learned", "rope"), f"pos must be 'learned' or 'rope', got {self.pos!r}"),
            (self.mlp in ("gelu", "swiglu"), f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.pos != "rope" or (self.n_embd // self.n_head) % 2 == 0, "rotary positions need an even head size"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")
        for name in ("bos_token_id", "eos_token_id"):
            setattr(self, name, ids_in_vocab(f"GPTConfig: {name}", getattr(self, name), self.vocab_size, stacklevel=3))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.n_inner is not None:
            return self.n_inner
        if self.mlp == "swiglu":  # same parameter count as a 4x GELU MLP, rounded up to 64
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def is_gpt2(self) -> bool:
        """True when transformers' GPT2LMHeadModel can hold this configuration exactly."""
        return (self.arch == "gpt" and self.norm == "layernorm" and self.pos == "learned" and self.mlp == "gelu" and self.bias
                and self.n_kv_head == self.n_head and self.tie_word_embeddings)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- pieces
class Norm(nn.Module):
    """LayerNorm or RMSNorm through fastlm.ops; ``norm(x, residual)`` fuses the residual add."""

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
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, D) by position angles cos/sin (T, D/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x, rope=None):
        """(B, T, C_qkv) -> q (B, H, T, D), k and v (B, Hkv, T, D); rotary positions applied."""
        B, T, _ = x.shape
        D = self.head_dim
        q, k, v = x.split([self.n_head * D, self.n_kv_head * D, self.n_kv_head * D], dim=-1)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, D).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def merge_heads(self, y):
        B, H, T, D = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x, rope=None):
        q, k, v = self.split_heads(self.c_attn(x), rope)
        return self.merge_heads(ops.attention(q, k, v, causal=True))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.c_gate = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            hidden = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            hidden = ops.gelu(self.c_fc(x))
        return self.dropout(self.c_proj(hidden))


class Block(nn.Module):
    """Pre-norm transformer block over the residual stream, residual adds fused into norms."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, h, delta, rope=None):
        """Takes the residual stream h and the pending branch output delta (None at the first
        block); returns the new (h, delta). The stream after the block is h + delta."""
        if delta is None:
            y = self.ln_1(h)
        else:
            y, h = self.ln_1(delta, residual=h)
        y, h = self.ln_2(self.attn(y, rope), residual=h)
        return h, self.mlp(y)


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


# ----------------------------------------------------------------------------- the model
def build_model(config: GPTConfig) -> nn.Module:
    """The model a config describes: a GPT, or a recurrent baseline for arch "lstm"/"gru"."""
    if config.arch == "gpt":
        return GPT(config)
    from .recurrent import RecurrentLM

    return RecurrentLM(config)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.arch != "gpt":
            raise ValueError(f"GPT needs arch='gpt', got {config.arch!r}; use fastlm.build_model(config)")
        self.config = cfg = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=Norm(cfg),
        ))
        if cfg.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.initializer_range / math.sqrt(2 * max(cfg.n_layer, 1)))
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # -- helpers
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights counted once); optionally without position
        embeddings (and token embeddings when they are not tied to the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def _rope(self, T: int, offset: int = 0):
        if self.config.pos != "rope":
            return None
        return self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]

    def _check_idx(self, idx):
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError("idx must be an integer tensor of token ids with shape (B, T)")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T < 1:
            raise ValueError("idx must hold at least one token per sequence")
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds the model's context of {self.config.block_size}")

    # -- forward
    def hidden_states(self, idx):
        """Final normalised hidden states (B, T, n_embd) for token ids idx (B, T). (Generation
        runs its own lean forward over a KV cache: ``fastlm.generate``.)"""
        self._check_idx(idx)
        T = idx.shape[1]
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        rope = self._rope(T)
        h, delta = self.transformer.drop(x), None
        for block in self.transformer.h:
            h, delta = block(h, delta, rope)
        if delta is None:
            return self.transformer.ln_f(h)
        return self.transformer.ln_f(delta, residual=h)[0]

    def forward(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        """Logits (B, T, vocab); with a loss: (logits, mean cross-entropy).

        ``labels`` (B, T) are aligned with ``idx``, as in transformers' causal LMs: position t
        is scored on ``labels[:, t + 1]``, so ``labels=idx`` trains next-token prediction.
        ``targets`` (B, T) are already shifted: position t is scored on ``targets[:, t]``.
        Positions whose label is ``ignore_index`` do not count."""
        targets = next_token_targets(idx, targets, labels, ignore_index)
        y = self.hidden_states(idx)
        logits = self.lm_head(y)
        if targets is None:
            return logits
        loss = ops.cross_entropy(logits, targets, ignore_index=ignore_index)
        return logits, loss

    def loss(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        """Mean cross-entropy of next-token targets (``targets``, already shifted, or
        ``labels`` aligned with ``idx``, as in ``forward``) without materialising every logit:
        the output layer and the loss are fused (``fastlm.ops.linear_cross_entropy``)."""
        targets = next_token_targets(idx, targets, labels, ignore_index)
        if targets is None:
            raise TypeError("loss() needs targets (already shifted) or labels (aligned with idx)")
        y = self.hidden_states(idx)
        return ops.linear_cross_entropy(y, self.lm_head.weight, targets, ignore_index=ignore_index)

    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        """Continue token ids with a KV cache; Hugging Face's parameters (do_sample, temperature,
        top_k, top_p, repetition_penalty, eos_token_id, ...). See ``fastlm.generate.generate``."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # -- checkpoints (Hugging Face directory layout; see fastlm.checkpoint)
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, **overrides) -> "GPT":
        from .checkpoint import load_gpt

        return load_gpt(cls, path, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path, max_shard_size: int | None = None, state_dict: dict | None = None) -> None:
        from .checkpoint import save_gpt

        save_gpt(self, path, max_shard_size=max_shard_size, state_dict=state_dict)
