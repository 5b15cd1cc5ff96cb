"""fastlm: build, train, run and serve GPT-style language models fast."""
from ._version import __version__
from . import ops, reference
from .models import GPT, GPTConfig, build_model, load_model
from .tokenizer import Tokenizer
from .train import Trainer, TrainConfig
from .generation import stream
from .pipelines import pipeline

__all__ = ["__version__", "ops", "reference", "GPT", "GPTConfig", "build_model", "load_model", "Tokenizer",
           "Trainer", "TrainConfig", "stream", "pipeline"]
