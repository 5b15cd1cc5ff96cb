"""fastlm's models: the config, the GPT and its pieces, the recurrent baselines, the task
heads, checkpoints in the Hugging Face layout, and the incremental forward over a KV cache.

config.py -> layers.py -> quant.py (reduced-precision weights) -> checkpoint.py -> gpt.py,
recurrent.py, decode.py, heads.py; this
file builds a model from a config (``build_model``) or a checkpoint (``load_model``).
"""
from __future__ import annotations

import torch.nn as nn

from .checkpoint import CheckpointError, load_gpt
from .config import GPTConfig, ids_in_vocab
from .gpt import GPT
from .layers import Block, CausalSelfAttention, MLP, Norm, apply_rope, next_token_targets, rope_tables
from .recurrent import RecurrentLM

__all__ = ["GPTConfig", "GPT", "RecurrentLM", "build_model", "load_model", "CheckpointError", "ids_in_vocab",
           "Norm", "CausalSelfAttention", "MLP", "Block", "apply_rope", "rope_tables", "next_token_targets"]


def build_model(config: GPTConfig) -> nn.Module:
    """The model a config describes: a GPT, or a recurrent baseline for arch "lstm"/"gru"."""
    if config.arch == "gpt":
        return GPT(config)
    return RecurrentLM(config)


def load_model(path, dtype=None, device=None, revision=None, weights=None, **overrides):
    """The model a checkpoint directory (or Hugging Face repo id) holds, whatever its
    architecture (GPT, LSTM, GRU); ``weights`` as in ``GPT.from_pretrained``."""
    return load_gpt(build_model, path, dtype=dtype, device=device, revision=revision, weights=weights, **overrides)
