"""``GPTConfig``: every size and option of a fastlm model, checked when it is made.

GPT-2 (the defaults): learned positions, pre-LayerNorm blocks, tanh-GELU MLP of width
4 * n_embd, biases everywhere, tied input/output embeddings. Modern options:
``norm="rmsnorm"``, ``pos="rope"``, ``mlp="swiglu"``, ``bias=False``, ``n_kv_head < n_head``
(grouped-query attention); ``arch="lstm"``/``"gru"`` for the recurrent baselines. The
modded-nanogpt speedrun's switches: ``qk_norm`` (queries and keys RMS-normalised per head),
``mlp="relu2"`` (ReLU squared), ``tie_word_embeddings=False`` (an output layer of its own),
``zero_init_proj`` (output projections, and an untied output layer, start at zero),
``logit_softcap`` (logits = cap * tanh(logits / cap)).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

__all__ = ["GPTConfig", "ids_in_vocab"]


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
    arch: str = "gpt"  # "gpt" (transformer) | "lstm" | "gru" (recurrent baselines, fastlm.models.recurrent)
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
    mlp: str = "gelu"  # "gelu" (tanh approximation) | "swiglu" | "relu2" (ReLU squared)
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (no gain) before rotary and attention
    zero_init_proj: bool = False  # attention's and the MLP's c_proj, and an untied lm_head, initialised to zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap), in the loss too; None: off
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
            (self.mlp in ("gelu", "swiglu", "relu2"), f"mlp must be 'gelu', 'swiglu' or 'relu2', got {self.mlp!r}"),
            (isinstance(self.qk_norm, bool), f"qk_norm must be True or False, got {self.qk_norm!r}"),
            (isinstance(self.zero_init_proj, bool), f"zero_init_proj must be True or False, got {self.zero_init_proj!r}"),
            (self.logit_softcap is None or (isinstance(self.logit_softcap, (int, float))
                                            and not isinstance(self.logit_softcap, bool)
                                            and 0 < self.logit_softcap < math.inf),
             f"logit_softcap must be None or a positive finite number, got {self.logit_softcap!r}"),
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
                and self.n_kv_head == self.n_head and self.tie_word_embeddings and not self.qk_norm
                and self.logit_softcap is None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GPTConfig: unknown keys {sorted(unknown)}")
        return cls(**d)
