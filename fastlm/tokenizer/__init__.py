"""Byte-level BPE tokenizer: train, encode, decode; the same ids as tiktoken.

The work is done in C++ (``csrc/tokenizer``, module ``fastlm._tokenizer``): hand-written
pre-tokenizer scanners for GPT-2's (r50k/p50k) and cl100k's patterns, BPE merging with a
pair-rank hash table and a pre-token cache, multi-threaded batch encoding and training.

    tok = Tokenizer.load("r50k_base.tiktoken")          # or a tokenizer.json, or vocab.json + merges.txt
    ids = tok.encode("hello world")
    text = tok.decode(ids)
    tok = Tokenizer.train(["some text", pathlib.Path("corpus.txt")], vocab_size=32768)
    tok.save("my-tokenizer")                            # tokenizer.json + vocab.json + merges.txt

Formats read by :meth:`Tokenizer.load`: Hugging Face ``tokenizer.json`` (ByteLevel BPE,
merges spelled ``"a b"`` or ``["a", "b"]``), GPT-2 ``vocab.json`` + ``merges.txt``, and
tiktoken rank files (``.tiktoken``, optionally gzipped).

Limits: a single pre-token longer than 1 MiB (e.g. a megabyte of letters without a space) is
merged in 1 MiB pieces, which bounds memory and time; tiktoken merges it whole (quadratic
time), so ids can differ for such inputs only. A tokenizer holds ids below ``MAX_VOCAB``
(2,097,152) and tokens of at most ``MAX_TOKEN_BYTES`` (1024) bytes, and a tokenizer file is
read only up to ``MAX_FILE_BYTES`` (64 MiB, after gzip decompression): past any of them
loading or building raises ``ValueError`` before the memory is allocated (training leaves out
merges that would make a longer token). Character classes follow Python's Unicode
database, completed with tiktoken's classes for code points that are newer
(``scripts/gen_unicode_tables.py``).

Submodules: ``bpe`` (``Tokenizer``), ``formats`` (the files above), ``chat_template`` (chat
templates rendered as transformers renders them; ``Tokenizer.apply_chat_template``), ``patterns``
(the pre-tokenizer patterns), ``load`` (``load_tokenizer``, ``resolve_tokenizer``,
``token_bytes_fn``) and ``_common`` (the core, the limits and their checks).
"""
from ._common import ENDOFTEXT, MAX_FILE_BYTES, MAX_TOKEN_BYTES, MAX_VOCAB  # noqa: F401 (ENDOFTEXT)
from .bpe import Tokenizer
from .formats import SAVED_FILES, bytes_to_unicode  # noqa: F401 (SAVED_FILES)
from .load import load_tokenizer, resolve_tokenizer, token_bytes_fn
from .patterns import PATTERNS

__all__ = ["Tokenizer", "PATTERNS", "bytes_to_unicode", "MAX_VOCAB", "MAX_TOKEN_BYTES", "MAX_FILE_BYTES",
           "load_tokenizer", "resolve_tokenizer", "token_bytes_fn"]

# The class keeps the module path it has always had (``fastlm.tokenizer.Tokenizer``).
Tokenizer.__module__ = __name__
