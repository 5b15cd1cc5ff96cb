"""fastlm: build, train, run and serve GPT-style language models fast."""
from ._version import __version__
from . import ops, reference

__all__ = ["__version__", "ops", "reference"]
