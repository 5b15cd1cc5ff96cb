"""fastlm: build, train, run and serve GPT-style language models fast."""
from ._version import __version__
from . import ops, reference
from .tokenizer import Tokenizer

__all__ = ["__version__", "ops", "reference", "Tokenizer"]
