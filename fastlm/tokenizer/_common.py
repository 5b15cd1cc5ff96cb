"""What every part of ``fastlm.tokenizer`` shares: the C++ core (``fastlm._tokenizer``), the
end-of-text token, and the limits on what a tokenizer may hold and read, with their checks."""
from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"

# What a tokenizer may hold and read (the C++ core enforces the first two as well: core.h).
# Memory is sized by the largest id, deriving a tiktoken vocabulary's merges takes time that
# grows with each token's length, and a file is read whole into memory.
MAX_VOCAB = 1 << 21  # every id, ordinary or special, is below this
MAX_TOKEN_BYTES = 1024  # bytes of one token (a special token's text included)
MAX_FILE_BYTES = 64 << 20  # bytes of a tokenizer file, after gzip decompression


def _core():
    from fastlm import _tokenizer  # noqa: PLC0415  (import the extension lazily)

    return _tokenizer


def _check_id(i, where: str) -> None:
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError(f"{where} has a bad id {i!r}")
    if i >= MAX_VOCAB:
        raise ValueError(f"{where} has the id {i}, past the limit: ids are below {MAX_VOCAB} "
                         "(fastlm.tokenizer.MAX_VOCAB)")


def _check_token_length(token: bytes, where: str) -> None:
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"{where}: a token of {len(token)} bytes is past the limit of {MAX_TOKEN_BYTES} "
                         "(fastlm.tokenizer.MAX_TOKEN_BYTES)")
