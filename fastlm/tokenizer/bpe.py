"""``Tokenizer``: fastlm's byte-level BPE tokenizer with tiktoken's encoding semantics -- its
Python API over the C++ core (``fastlm._tokenizer``): encoding, decoding, training. Its files
are read and written by ``fastlm.tokenizer.formats``."""
from __future__ import annotations

import os
import pathlib
from typing import AbstractSet, Collection, Iterable, Literal

from . import formats
from ._common import ENDOFTEXT, MAX_VOCAB, _check_id, _core
from .patterns import _PATTERN_CODE, _pattern_name

_BATCH_BYTES = 64 << 20  # training texts are counted in batches of about this many bytes


def _fix_surrogates(text: str) -> str:
    # tiktoken's fix-up: lone surrogates become U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A byte-level BPE tokenizer with tiktoken's encoding semantics.

    Build one with :meth:`train`, :meth:`load` or :meth:`from_tiktoken`, or directly from
    ``token_bytes`` (``token_bytes[id]`` is the byte string of token ``id``; all 256 single
    bytes must be tokens), ``merges`` (ordered ``(a, b)`` id pairs) or ``rank_by_id=True``
    (tiktoken's rule: merges are implied by the vocabulary, lower id first), special tokens
    ``{text: id}`` and a pattern name (``"gpt2"``, also called r50k/p50k, ``"cl100k"`` or ``"o200k"``).
    """

    def __init__(self, token_bytes: list[bytes], merges: Iterable[tuple[int, int]] | None = None, *,
                 special_tokens: dict[str, int] | None = None, pattern: str = "gpt2", rank_by_id: bool = False,
                 name: str | None = None):
        self.pattern = _pattern_name(pattern)
        self.name = name
        self.train_stats: dict | None = None  # set by train(): words, merges, corpus_tokens
        merges = [] if merges is None else [(int(a), int(b)) for a, b in merges]
        if not merges and not rank_by_id and any(len(t) > 1 for t in token_bytes):
            raise ValueError("give merges, or rank_by_id=True for a tiktoken-style vocabulary")
        specials = dict(special_tokens or {})
        for text, i in specials.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"special token {text!r} must be a non-empty string")
            _check_id(i, f"special token {text!r}")
        if len(set(specials.values())) != len(specials):
            raise ValueError("two special tokens share an id")
        self._special_list = sorted(specials.items(), key=lambda kv: kv[1])
        self._special_index = {t: k for k, (t, _) in enumerate(self._special_list)}
        self.special_tokens: dict[str, int] = dict(self._special_list)
        self.special_tokens_set: frozenset[str] = frozenset(specials)
        self.rank_by_id = rank_by_id
        self._n_ordinary = len(token_bytes)
        self._core = _core().Core([bytes(t) for t in token_bytes], merges, rank_by_id, self._special_list,
                                  _PATTERN_CODE[self.pattern])
        # The chat template (Jinja2 text, or None: the plain template) and the named special
        # tokens it sees ({"bos_token": text, ...}); a directory's tokenizer_config.json and
        # chat_template.jinja set them when loading, ``save`` writes them back.
        self.chat_template: str | None = None
        self.special_tokens_map: dict[str, str] = (
            {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT} if ENDOFTEXT in specials else {})

    # ------------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        """Number of ids (one more than the largest id, special tokens included)."""
        return self._core.n_vocab

    @property
    def eot_token(self) -> int | None:
        """The id of ``<|endoftext|>`` (None when the vocabulary has none)."""
        return self.special_tokens.get(ENDOFTEXT)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, pattern={self.pattern!r}, "
                f"special_tokens={len(self.special_tokens)})")

    # ------------------------------------------------------------------ encoding
    def _special_args(self, allowed_special, disallowed_special) -> tuple[list[int], list[int]]:
        if allowed_special == "all":
            allowed = self.special_tokens_set
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self.special_tokens_set
            if unknown:
                raise ValueError(f"allowed_special names tokens that are not special tokens: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed = self.special_tokens_set - allowed
        else:
            disallowed = frozenset(disallowed_special)
            unknown = disallowed - self.special_tokens_set
            if unknown:
                raise ValueError(f"disallowed_special names tokens that are not special tokens: {sorted(unknown)}")
        idx = self._special_index
        return sorted(idx[t] for t in allowed), sorted(idx[t] for t in disallowed)

    @staticmethod
    def _check_text(text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")

    def encode(self, text: str, *, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of ``text``, as tiktoken's ``Encoding.encode``: special-token text raises
        ``ValueError`` unless allowed (then it becomes the special token) or not disallowed
        (then it is encoded as ordinary text)."""
        self._check_text(text)
        allowed, disallowed = self._special_args(allowed_special, disallowed_special)
        try:
            return self._core.encode(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode(_fix_surrogates(text), allowed, disallowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token text encoded as ordinary text."""
        self._check_text(text)
        try:
            return self._core.encode(text, [], [])
        except UnicodeEncodeError:
            return self._core.encode(_fix_surrogates(text), [], [])

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (invalid UTF-8 included); no special tokens."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return self._core.encode(bytes(data), [], [])

    def encode_to_numpy(self, text: str, *, allowed_special=frozenset(),
                        disallowed_special="all"):
        """Like :meth:`encode`, as a numpy ``uint32`` array (no Python int per token)."""
        import numpy as np

        self._check_text(text)
        allowed, disallowed = self._special_args(allowed_special, disallowed_special)
        try:
            buf = self._core.encode_to_bytes(text, allowed, disallowed)
        except UnicodeEncodeError:
            buf = self._core.encode_to_bytes(_fix_surrogates(text), allowed, disallowed)
        return np.frombuffer(buf, dtype="<u4")

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None, *,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        """:meth:`encode` of each text, in parallel threads (all cores by default), GIL released."""
        texts = list(texts)
        for t in texts:
            self._check_text(t)
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        allowed, disallowed = self._special_args(allowed_special, disallowed_special)
        try:
            return self._core.encode_batch(texts, allowed, disallowed, num_threads or 0)
        except UnicodeEncodeError:
            return self._core.encode_batch([_fix_surrogates(t) for t in texts], allowed, disallowed,
                                           num_threads or 0)

    def encode_ordinary_batch(self, texts: Iterable[str], num_threads: int | None = None) -> list[list[int]]:
        return self.encode_batch(texts, num_threads=num_threads, disallowed_special=())

    def clear_cache(self) -> None:
        """Forget the pre-token -> ids cache (bounded; kept between calls to speed up encoding)."""
        self._core.clear_cache()

    def pretokenize(self, text: str) -> list[str]:
        """The pre-tokens of ``text`` (the splits the pattern's regex makes)."""
        self._check_text(text)
        return [p.decode("utf-8", "surrogateescape") for p in self._core.pretokenize(text)]

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids) -> bytes:
        """The bytes of the tokens (a list, tuple or integer array of ids)."""
        return self._core.decode_bytes(ids)

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of the tokens; a partial UTF-8 sequence becomes U+FFFD (``errors="replace"``)."""
        return self._core.decode(ids, errors)

    def decode_batch(self, batch, errors: str = "replace") -> list[str]:
        return [self.decode(ids, errors) for ids in batch]

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (special tokens give their text's UTF-8)."""
        return self._core.token_bytes(int(id))

    def decode_single_token_bytes(self, id: int) -> bytes:
        return self.token_bytes(id)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False, *,
                            chat_template: str | None = None, tools=None, documents=None,
                            continue_final_message: bool | str = False, **kwargs):
        """Chat messages (``[{"role": ..., "content": ...}, ...]``, or a list of such
        conversations) to prompt text as transformers' ``apply_chat_template`` renders it, with
        ``chat_template``, else this tokenizer's ``chat_template`` (from its directory's
        ``chat_template.jinja`` or ``tokenizer_config.json``), else the plain template
        (``"User: ...\n\nAssistant:"``). ``tokenize=True``: the prompt's ids, the template's own
        special tokens as special tokens and the messages' text always as ordinary text.
        ``tools``, ``documents`` and other keyword arguments reach the template; a template's
        ``raise_exception`` is a ``fastlm.tokenizer.chat_template.ChatTemplateError``. Unlike
        transformers, ``add_generation_prompt`` defaults to True (a prompt for a reply)."""
        from .chat_template import apply_chat_template

        return apply_chat_template(self, conversation, add_generation_prompt, tokenize, chat_template=chat_template,
                                   tools=tools, documents=documents, continue_final_message=continue_final_message,
                                   **kwargs)

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts, vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,), pattern: str = "gpt2", *,
              num_threads: int | None = None) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of ``vocab_size`` ids (the 256 bytes and the
        special tokens included, as Hugging Face's ``BpeTrainer`` counts) from ``texts``: an
        iterable of strings, bytes, paths (``pathlib.Path``: a file read whole) or open files.
        Special-token text in the corpus is cut out before counting. ``vocab_size <= 256 +
        len(special_tokens)`` gives the plain bytes. Counting runs on ``num_threads`` threads
        (all cores by default); the result does not depend on the thread count. Ties between
        pairs of equal count go to the pair of smaller ids."""
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size {vocab_size} is past the limit of {MAX_VOCAB} ids (fastlm.tokenizer.MAX_VOCAB)")
        specials = list(dict.fromkeys(special_tokens))
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special token {s!r} must be a non-empty string")
        pat = _pattern_name(pattern)
        if isinstance(texts, (str, bytes, os.PathLike)):
            texts = [texts]
        trainer = _core().Trainer(_PATTERN_CODE[pat], specials)
        batch, size = [], 0
        for t in texts:
            if isinstance(t, os.PathLike):
                t = pathlib.Path(t).read_bytes()
            elif hasattr(t, "read"):
                t = t.read()
            if not isinstance(t, (str, bytes)):
                raise TypeError(f"training texts must be str, bytes, paths or files; got {type(t).__name__}")
            batch.append(t)
            size += len(t)
            if size >= _BATCH_BYTES:
                trainer.add(batch, num_threads or 0)
                batch, size = [], 0
        if batch:
            trainer.add(batch, num_threads or 0)
        n_tokens = max(256, vocab_size - len(specials))
        merges = trainer.train(n_tokens)
        token_bytes = [bytes([b]) for b in range(256)]
        for a, b, new in merges:
            if new == len(token_bytes):
                token_bytes.append(token_bytes[a] + token_bytes[b])
        special_map = {s: len(token_bytes) + k for k, s in enumerate(specials)}
        tok = cls(token_bytes, [(a, b) for a, b, _ in merges], special_tokens=special_map, pattern=pat)
        tok.train_stats = {"words": trainer.n_words, "merges": len(merges), "corpus_tokens": trainer.final_tokens}
        return tok

    # ------------------------------------------------------------------ files (in fastlm.tokenizer.formats)
    @classmethod
    def from_tiktoken(cls, encoding) -> "Tokenizer":
        """The same tokenizer as a tiktoken ``Encoding`` (or its name, e.g. ``"r50k_base"``; ``"cl100k_base"``
        and ``"o200k_base"`` are read from tiktoken's cache, never downloaded)."""
        return formats.from_tiktoken_encoding(cls, encoding)

    @classmethod
    def load(cls, path, *, pattern: str | None = None, special_tokens: dict[str, int] | None = None,
             revision: str | None = None) -> "Tokenizer":
        """Read a tokenizer from a directory, a file, or a Hugging Face repo id (``"gpt2"``, found
        in the local cache or downloaded; see ``fastlm.hub``): Hugging Face ``tokenizer.json``, GPT-2
        ``vocab.json`` + ``merges.txt``, or a tiktoken rank file (``*.tiktoken[.gz]``). For a
        tiktoken file, the pattern and special tokens come from the encoding's name in the file
        name (r50k_base, p50k_base, cl100k_base, o200k_base) or from the arguments. From a
        directory, the chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s) and
        the named special tokens of ``tokenizer_config.json`` come along."""
        return formats.load_files(cls, path, pattern, special_tokens, revision)

    def save(self, directory) -> pathlib.Path:
        """Write ``tokenizer.json`` (Hugging Face), ``vocab.json`` + ``merges.txt`` (GPT-2) and
        ``tokenizer_config.json`` (the named special tokens), and ``chat_template.jinja`` when
        the tokenizer has a chat template, into ``directory``; Hugging Face tokenizers and
        transformers load them."""
        return formats.save_files(self, directory)
