"""The GPT model: GPT-2's architecture, with options for the modern variant.

token ids -> token embeddings (+ learned positions) -> n_layer blocks (norm, attention, norm,
MLP, each with a residual add) -> final norm -> output layer (tied to the token embeddings
unless ``tie_word_embeddings=False``) -> logits (soft-capped with ``logit_softcap``). The pieces are in ``fastlm.models.layers``; the options in ``GPTConfig``. The
parameter names are Hugging Face GPT-2's (``transformer.h.0.attn.c_attn`` ...), stored as
``nn.Linear`` (GPT-2's Conv1D weights are transposed on load and save; see
``fastlm.models.checkpoint``). Generation runs the same blocks over a KV cache
(``fastlm.models.decode``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from .. import ops
from .checkpoint import load_gpt, save_gpt
from .config import GPTConfig
from .layers import EAGER, Block, Eager, Norm, next_token_targets, rope_tables
from .quant import QuantLinear, quantization_of, quantize

__all__ = ["GPT"]


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
        if cfg.zero_init_proj:
            # modded-nanogpt: each block starts as the identity on the residual stream, and an
            # output layer of its own starts at uniform predictions.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not cfg.tie_word_embeddings):
                    nn.init.zeros_(p)
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

    def rope_at(self, positions):
        """The rotary tables (cos, sin) at ``positions`` (a tensor of any shape: the tables get
        its shape plus (D/2,)), or None for learned positions."""
        if self.config.pos != "rope":
            return None
        return self.rope_cos[positions], self.rope_sin[positions]

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

    # -- forward, in the order it runs
    def embed(self, idx, positions, run: Eager = EAGER):
        """Token embeddings of ``idx`` plus, for learned positions, those of ``positions``
        (a tensor shaped like ``idx``)."""
        x = run.call(self.transformer.wte, idx)
        if self.config.pos == "learned":
            x = x + run.call(self.transformer.wpe, positions)
        return x

    def blocks(self, x, rope=None, attend=None, run: Eager = EAGER):
        """The residual stream x (B, T, C) through every block; returns (h, delta), the stream
        being h + delta. ``attend(i, q, k, v)``: layer i's attention (default: causal over x)."""
        h, delta = x, None
        for i, block in enumerate(self.transformer.h):
            h, delta = run.call(block, h, delta, rope, None if attend is None else partial(attend, i), run)
        return h, delta

    def final_norm(self, h, delta, run: Eager = EAGER):
        """The final norm of the stream h + delta (delta None without blocks)."""
        if delta is None:
            return run.norm(self.transformer.ln_f, h)
        return run.norm(self.transformer.ln_f, delta, h)[0]

    def logits(self, y, run: Eager = EAGER):
        """The output layer over final hidden states y (..., n_embd): logits (..., vocab),
        ``cap * tanh(logits / cap)`` when ``logit_softcap`` is set."""
        logits = run.linear(self.lm_head, y)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, idx):
        """Final normalised hidden states (B, T, n_embd) for token ids idx (B, T)."""
        self._check_idx(idx)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.embed(idx, positions))
        return self.final_norm(*self.blocks(x, self.rope_at(positions)))

    def forward(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        """Logits (B, T, vocab); with a loss: (logits, mean cross-entropy).

        ``labels`` (B, T) are aligned with ``idx``, as in transformers' causal LMs: position t
        is scored on ``labels[:, t + 1]``, so ``labels=idx`` trains next-token prediction.
        ``targets`` (B, T) are already shifted: position t is scored on ``targets[:, t]``.
        Positions whose label is ``ignore_index`` do not count."""
        targets = next_token_targets(idx, targets, labels, ignore_index)
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits
        loss = ops.cross_entropy(logits, targets, ignore_index=ignore_index)
        return logits, loss

    def loss(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        """Mean cross-entropy of next-token targets (``targets``, already shifted, or
        ``labels`` aligned with ``idx``, as in ``forward``) without materialising every logit:
        the output layer and the loss are fused (``fastlm.ops.linear_cross_entropy``). With
        ``logit_softcap`` the fused kernels do not apply the cap, so the capped logits are made
        and scored (``ops.cross_entropy``)."""
        targets = next_token_targets(idx, targets, labels, ignore_index)
        if targets is None:
            raise TypeError("loss() needs targets (already shifted) or labels (aligned with idx)")
        y = self.hidden_states(idx)
        if self.config.logit_softcap is not None or isinstance(self.lm_head, QuantLinear):
            # soft-capped logits, or a packed output layer: the logits, then the loss
            return ops.cross_entropy(self.logits(y), targets, ignore_index=ignore_index)
        return ops.linear_cross_entropy(y, self.lm_head.weight, targets, ignore_index=ignore_index)

    # -- reduced-precision weights (see fastlm.models.quant)
    def quantize(self, weights: str, keep_head: bool = False) -> "GPT":
        """Put the weights of every linear layer in ``weights`` ("int8", "int4", "bf16", "fp16"),
        in place, and return the model. The attention and MLP projections and the output layer
        then hold only their packed weights, and the forward, the prefill and every decode step
        multiply by them through ``fastlm.ops.decode_linear_q``; ``keep_head=True`` keeps the
        output layer (tied to the token embeddings) in float. int8 and int4 are llama.cpp's q8_0
        and q4_0 (blocks of 32 weights along the input, a float16 scale each). Weight-only:
        activations, the embeddings and the KV cache stay float32. For inference;
        ``save_pretrained`` writes the packed weights and ``from_pretrained`` loads them back
        quantized. A quantized model cannot be quantized again."""
        return quantize(self, weights, keep_head=keep_head)

    @property
    def quantization(self) -> dict | None:
        """{"weights": ..., "keep_head": ...} after ``quantize``, else None."""
        return quantization_of(self)

    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        """Continue token ids with a KV cache; Hugging Face's parameters (do_sample, temperature,
        top_k, top_p, repetition_penalty, eos_token_id, ...). See ``fastlm.generation.generate``.

        The generation loop sits above the models (it imports them for the decode forward and
        the cache), so this method reaches it with the one import of the models package that
        points upward, made when it is called."""
        from ..generation.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # -- checkpoints (Hugging Face directory layout; see fastlm.models.checkpoint)
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, revision: str | None = None,
                        weights: str | None = None, **overrides) -> "GPT":
        """The checkpoint at ``path``: a directory, a GGUF file, or a Hugging Face repo id
        (``"gpt2"``) found in the local cache or downloaded (see ``fastlm.hub``); ``revision`` a
        branch, tag or commit. A quantized checkpoint loads quantized; ``weights`` ("fp32",
        "int8", "int4", "bf16", "fp16") quantizes a float checkpoint on load (a quantized one
        must already hold that format)."""
        return load_gpt(cls, path, dtype=dtype, device=device, revision=revision, weights=weights, **overrides)

    def save_pretrained(self, path, max_shard_size: int | None = None, state_dict: dict | None = None) -> None:
        save_gpt(self, path, max_shard_size=max_shard_size, state_dict=state_dict)

    def save_gguf(self, path, dtype: str = "f32", tokenizer=None):
        """Write the model and its ``tokenizer`` as a GGUF file llama.cpp runs, the matrices in
        ``dtype`` ("f32", "f16", "q8_0" or "q4_0"); see ``fastlm.models.gguf``. ``from_pretrained``
        reads GGUF files back."""
        from .gguf import save_gguf

        return save_gguf(self, path, dtype, tokenizer)
