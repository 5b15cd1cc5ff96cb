"""fastlm: build, train, run and serve GPT-style language models fast."""
from ._version import __version__
from . import ops, reference
from .model import GPT, GPTConfig, build_model
from .checkpoint import load_model
from .tokenizer import Tokenizer
from .train import Trainer, TrainConfig

__all__ = ["__version__", "ops", "reference", "GPT", "GPTConfig", "build_model", "load_model", "Tokenizer",
           "Trainer", "TrainConfig"]
