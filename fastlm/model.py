"""Former home of the GPT model, kept so that ``fastlm.model`` imports keep working: the
model now lives in ``fastlm.models`` (config.py, layers.py, gpt.py)."""
from .models import build_model
from .models.config import GPTConfig, ids_in_vocab
from .models.gpt import GPT
from .models.layers import MLP, Block, CausalSelfAttention, Norm, apply_rope, next_token_targets, rope_tables

__all__ = ["GPT", "GPTConfig", "build_model", "ids_in_vocab", "Norm", "CausalSelfAttention", "MLP", "Block",
           "apply_rope", "rope_tables", "next_token_targets"]
