"""Working with any tokenizer: loading fastlm's from a path (``load_tokenizer``), choosing the one
to use (``resolve_tokenizer``), and reading one token's bytes from any tiktoken-like tokenizer
(``token_bytes_fn``)."""
from __future__ import annotations

import os

from .bpe import Tokenizer


def token_bytes_fn(tokenizer):
    """A function id -> bytes of one token, for any tiktoken-like tokenizer (fastlm's
    ``token_bytes``, tiktoken's ``decode_single_token_bytes``, or ``decode_bytes``)."""
    for name in ("token_bytes", "decode_single_token_bytes"):
        fn = getattr(tokenizer, name, None)
        if callable(fn):
            return fn
    fn = getattr(tokenizer, "decode_bytes", None)
    if callable(fn):
        return lambda i: fn([i])
    raise TypeError("the tokenizer must provide token_bytes(id), decode_single_token_bytes(id) or decode_bytes(ids)")

# ----------------------------------------------------------------------------- loading any tokenizer
def load_tokenizer(path) -> Tokenizer:
    """``Tokenizer.load(path)``, with a clear error where it cannot serve."""
    try:
        return Tokenizer.load(path)
    except ImportError as e:  # the C++ core could not be loaded
        raise ValueError(f"no tokenizer given and fastlm's Tokenizer is not available ({e}); "
                         "pass tokenizer= (any object with encode and decode_bytes, e.g. a tiktoken Encoding)") from None
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}; pass tokenizer=...") from None


def resolve_tokenizer(tokenizer, path, who: str):
    """The tokenizer to use: ``tokenizer`` (an object, or a directory/file to load), else the
    one saved beside the model at ``path``; ``who`` names the caller in the error."""
    if tokenizer is None:
        if path is None:
            raise ValueError(f"{who}: pass tokenizer= when the model is an object, not a checkpoint directory")
        return load_tokenizer(path)
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer
