"""Recurrent language-model baselines: LSTM and GRU with the GPT's interface.

Same embeddings (tied with the output layer), final norm, loss, checkpoints and training as
``fastlm.GPT``, so architectures can be compared on the same data: ``GPTConfig(arch="lstm")``
or ``GPTConfig(arch="gru")`` with ``n_layer`` recurrent layers of width ``n_embd``
(``n_head`` and the attention options are unused). ``block_size`` bounds training windows
only: a recurrent model reads any length. Built through ``fastlm.build_model(config)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from .checkpoint import load_gpt, save_gpt
from .config import GPTConfig
from .layers import Norm, next_token_targets


class RecurrentLM(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.arch not in ("lstm", "gru"):
            raise ValueError(f"RecurrentLM needs arch 'lstm' or 'gru', got {config.arch!r}")
        self.config = cfg = config
        rnn_cls = nn.LSTM if cfg.arch == "lstm" else nn.GRU
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            rnn=rnn_cls(cfg.n_embd, cfg.n_embd, num_layers=max(cfg.n_layer, 1), batch_first=True,
                        dropout=cfg.dropout if cfg.n_layer > 1 else 0.0, bias=cfg.bias),
            ln_f=Norm(cfg),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=cfg.initializer_range)
        if not cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.initializer_range)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def hidden_states(self, idx, state=None, return_state: bool = False):
        """Final normalised hidden states (B, T, n_embd); with ``return_state`` also the
        recurrent state after the last token, to continue from (generation)."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 2:
            raise ValueError("idx must be an integer tensor of token ids with shape (B, T)")
        if idx.shape[1] < 1:
            raise ValueError("idx must hold at least one token per sequence")
        x = self.transformer.drop(self.transformer.wte(idx))
        y, state = self.transformer.rnn(x, state)
        y = self.transformer.ln_f(self.transformer.drop(y))
        return (y, state) if return_state else y

    def forward(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        """As ``GPT.forward``: ``targets`` already shifted, or ``labels`` aligned with ``idx``."""
        targets = next_token_targets(idx, targets, labels, ignore_index)
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits
        return logits, ops.cross_entropy(logits, targets, ignore_index=ignore_index)

    def loss(self, idx, targets=None, ignore_index: int = -100, *, labels=None):
        targets = next_token_targets(idx, targets, labels, ignore_index)
        if targets is None:
            raise TypeError("loss() needs targets (already shifted) or labels (aligned with idx)")
        return ops.linear_cross_entropy(self.hidden_states(idx), self.lm_head.weight, targets,
                                        ignore_index=ignore_index)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, revision=None, **overrides):
        return load_gpt(cls, path, dtype=dtype, device=device, revision=revision, **overrides)

    def save_pretrained(self, path, max_shard_size: int | None = None, state_dict: dict | None = None) -> None:
        save_gpt(self, path, max_shard_size=max_shard_size, state_dict=state_dict)
