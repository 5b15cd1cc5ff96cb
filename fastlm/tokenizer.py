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
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import pathlib
import zlib
from typing import AbstractSet, Collection, Iterable, Literal

from ._io import atomic_write_bytes

__all__ = ["Tokenizer", "PATTERNS", "bytes_to_unicode", "MAX_VOCAB", "MAX_TOKEN_BYTES", "MAX_FILE_BYTES",
           "load_tokenizer", "resolve_tokenizer", "token_bytes_fn"]

# The regexes the scanners implement (kept for saving Hugging Face files and for reference).
PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
_PATTERN_ALIASES = {"gpt2": "gpt2", "r50k": "gpt2", "r50k_base": "gpt2", "p50k": "gpt2", "p50k_base": "gpt2",
                    "p50k_edit": "gpt2", "cl100k": "cl100k", "cl100k_base": "cl100k"}
_PATTERN_CODE = {"gpt2": 0, "cl100k": 1}

ENDOFTEXT = "<|endoftext|>"
# Special tokens of tiktoken's encodings, by name.
_TIKTOKEN_SPECIALS = {
    "r50k_base": {ENDOFTEXT: 50256},
    "p50k_base": {ENDOFTEXT: 50256},
    "cl100k_base": {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
}

_BATCH_BYTES = 64 << 20  # training texts are counted in batches of about this many bytes

# What a tokenizer may hold and read (the C++ core enforces the first two as well: core.h).
# Memory is sized by the largest id, deriving a tiktoken vocabulary's merges takes time that
# grows with each token's length, and a file is read whole into memory.
MAX_VOCAB = 1 << 21  # every id, ordinary or special, is below this
MAX_TOKEN_BYTES = 1024  # bytes of one token (a special token's text included)
MAX_FILE_BYTES = 64 << 20  # bytes of a tokenizer file, after gzip decompression

# The files Tokenizer.save writes into a folder.
SAVED_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def _core():
    from fastlm import _tokenizer  # noqa: PLC0415  (import the extension lazily)

    return _tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the alphabet of vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_B2U = bytes_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def _to_unicode(b: bytes) -> str:
    return "".join(_B2U[x] for x in b)


def _from_unicode(s: str, where: str) -> bytes:
    try:
        return bytes(_U2B[ch] for ch in s)
    except KeyError as e:
        raise ValueError(f"{where}: token {s!r} has the character {e.args[0]!r}, which is not in the "
                         "byte-level alphabet (not a byte-level BPE vocabulary?)") from None


def _pattern_name(pattern: str) -> str:
    if pattern in _PATTERN_ALIASES:
        return _PATTERN_ALIASES[pattern]
    for name, pat in PATTERNS.items():
        if pattern in (pat, pat.replace("{1,3}+", "{1,3}")):
            return name
    # cl100k's older spelling (before tiktoken 0.8 it ended in \s+ and had no \s++$).
    if pattern.startswith(r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+"):
        raise ValueError("this is an older spelling of cl100k's pattern; fastlm implements the current one "
                         "(pattern='cl100k')")
    raise ValueError(f"unknown pre-tokenization pattern {pattern!r}; supported: "
                     f"{sorted(_PATTERN_ALIASES)} (the regexes in fastlm.tokenizer.PATTERNS)")


def _fix_surrogates(text: str) -> str:
    # tiktoken's fix-up: lone surrogates become U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A byte-level BPE tokenizer with tiktoken's encoding semantics.

    Build one with :meth:`train`, :meth:`load` or :meth:`from_tiktoken`, or directly from
    ``token_bytes`` (``token_bytes[id]`` is the byte string of token ``id``; all 256 single
    bytes must be tokens), ``merges`` (ordered ``(a, b)`` id pairs) or ``rank_by_id=True``
    (tiktoken's rule: merges are implied by the vocabulary, lower id first), special tokens
    ``{text: id}`` and a pattern name (``"gpt2"``, also called r50k/p50k, or ``"cl100k"``).
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

    # ------------------------------------------------------------------ files
    @classmethod
    def from_tiktoken(cls, encoding) -> "Tokenizer":
        """The same tokenizer as a tiktoken ``Encoding`` (or its name, e.g. ``"r50k_base"``)."""
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover
            raise ImportError("Tokenizer.from_tiktoken needs the tiktoken package") from e
        if isinstance(encoding, str):
            encoding = tiktoken.get_encoding(encoding)
        ranks = encoding._mergeable_ranks
        for b, r in ranks.items():
            _check_id(r, f"token {b[:40]!r}")
            _check_token_length(b, f"rank {r}")
        token_bytes = [b""] * (max(ranks.values()) + 1)
        for b, r in ranks.items():
            token_bytes[r] = b
        return cls(token_bytes, rank_by_id=True, special_tokens=dict(encoding._special_tokens),
                   pattern=_pattern_name(encoding._pat_str), name=encoding.name)

    @classmethod
    def load(cls, path, *, pattern: str | None = None, special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """Read a tokenizer from a directory or a file: Hugging Face ``tokenizer.json``, GPT-2
        ``vocab.json`` + ``merges.txt``, or a tiktoken rank file (``*.tiktoken[.gz]``). For a
        tiktoken file, the pattern and special tokens come from the encoding's name in the file
        name (r50k_base, p50k_base, cl100k_base) or from the arguments."""
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no tokenizer at {p}")
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                return cls._load_hf(p / "tokenizer.json", pattern, special_tokens)
            if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return cls._load_gpt2(p / "vocab.json", p / "merges.txt", pattern, special_tokens)
            tk = sorted(p.glob("*.tiktoken")) + sorted(p.glob("*.tiktoken.gz"))
            if len(tk) == 1:
                return cls._load_tiktoken(tk[0], pattern, special_tokens)
            raise ValueError(f"{p} has no tokenizer.json, no vocab.json + merges.txt and no single *.tiktoken file")
        name = p.name
        if name.endswith(".tiktoken") or name.endswith(".tiktoken.gz"):
            return cls._load_tiktoken(p, pattern, special_tokens)
        if name == "vocab.json" and (p.parent / "merges.txt").is_file():
            return cls._load_gpt2(p, p.parent / "merges.txt", pattern, special_tokens)
        if name.endswith(".json"):
            return cls._load_hf(p, pattern, special_tokens)
        # Otherwise sniff: JSON or tiktoken lines.
        head = _read_bytes(p)[:1].strip()
        if head in (b"{",):
            return cls._load_hf(p, pattern, special_tokens)
        return cls._load_tiktoken(p, pattern, special_tokens)

    @classmethod
    def _load_tiktoken(cls, p: pathlib.Path, pattern, special_tokens) -> "Tokenizer":
        data = _read_bytes(p)
        by_rank: dict[int, bytes] = {}
        seen: dict[bytes, int] = {}
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{p}:{lineno}: expected 'BASE64 RANK', got {line[:80]!r}")
            try:
                tok = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{p}:{lineno}: bad base64 {parts[0][:80]!r}") from None
            try:
                rank = int(parts[1])
            except ValueError:
                raise ValueError(f"{p}:{lineno}: bad rank {parts[1][:40]!r}") from None
            _check_id(rank, f"{p}:{lineno}: rank")
            _check_token_length(tok, f"{p}:{lineno}")
            if rank in by_rank:
                raise ValueError(f"{p}:{lineno}: duplicate rank {rank}")
            if not tok:
                raise ValueError(f"{p}:{lineno}: empty token")
            if tok in seen:
                raise ValueError(f"{p}:{lineno}: token {tok!r} repeats rank {seen[tok]}")
            by_rank[rank] = tok
            seen[tok] = rank
        if not by_rank:
            raise ValueError(f"{p}: no tokens")
        base = p.name.split(".")[0]
        if pattern is None:
            pattern = base if base in _PATTERN_ALIASES else "gpt2"
        if special_tokens is None:
            special_tokens = _TIKTOKEN_SPECIALS.get(base, {ENDOFTEXT: max(by_rank) + 1})
        token_bytes = [b""] * (max(by_rank) + 1)
        for r, t in by_rank.items():
            token_bytes[r] = t
        return cls(token_bytes, rank_by_id=True, special_tokens=special_tokens, pattern=pattern, name=base)

    @classmethod
    def _load_gpt2(cls, vocab_path: pathlib.Path, merges_path: pathlib.Path, pattern, special_tokens) -> "Tokenizer":
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_path}: expected a JSON object {{token: id}}")
        lines = _read_bytes(merges_path).decode("utf-8").splitlines()
        merges = []
        for lineno, line in enumerate(lines, 1):
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{lineno}: expected 'A B', got {line[:80]!r}")
            merges.append(parts)
        if special_tokens is None:
            special_tokens = {ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {}
        return cls._from_vocab_merges(vocab, merges, special_tokens, pattern or "gpt2", False, str(vocab_path))

    @classmethod
    def _load_hf(cls, p: pathlib.Path, pattern, special_tokens) -> "Tokenizer":
        obj = _read_json(p)
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            raise ValueError(f"{p}: not a BPE tokenizer.json (model.type is "
                             f"{model.get('type') if isinstance(model, dict) else None!r})")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ValueError(f"{p}: model.vocab must be an object and model.merges a list")
        pairs = []
        for k, m in enumerate(merges):
            if isinstance(m, str):
                parts = m.split(" ")
            elif isinstance(m, list):
                parts = m
            else:
                parts = None
            if not parts or len(parts) != 2 or not all(isinstance(x, str) for x in parts):
                raise ValueError(f"{p}: merge {k} is {m!r}; expected 'A B' or ['A', 'B']")
            pairs.append(parts)
        if pattern is None:
            pattern = _hf_pattern(obj.get("pre_tokenizer"), p)
        if special_tokens is None:
            special_tokens = {}
            for t in obj.get("added_tokens") or []:
                if isinstance(t, dict) and "content" in t and "id" in t:
                    special_tokens[t["content"]] = t["id"]
        return cls._from_vocab_merges(vocab, pairs, special_tokens, pattern, bool(model.get("ignore_merges")), str(p))

    @classmethod
    def _from_vocab_merges(cls, vocab: dict, merges: list, special_tokens: dict, pattern: str, ignore_merges: bool,
                           where: str) -> "Tokenizer":
        special_ids = set(special_tokens.values())
        for s, i in vocab.items():
            _check_id(i, f"{where}: token {s[:40]!r}")
        size = max(vocab.values(), default=-1) + 1
        token_bytes = [b""] * size
        for s, i in vocab.items():
            if i in special_ids or s in special_tokens:
                continue
            if token_bytes[i]:
                raise ValueError(f"{where}: id {i} is given to two tokens")
            token_bytes[i] = _from_unicode(s, where)
            _check_token_length(token_bytes[i], f"{where}: token id {i}")
        ids = {s: i for s, i in vocab.items()}
        pairs = []
        for k, (a, b) in enumerate(merges):
            if a not in ids or b not in ids:
                raise ValueError(f"{where}: merge {k} ({a!r} {b!r}) names a token that is not in the vocabulary")
            if a + b not in ids:
                raise ValueError(f"{where}: merge {k} ({a!r} {b!r}) makes {a + b!r}, which is not in the vocabulary")
            pairs.append((ids[a], ids[b]))
        if ignore_merges:
            # Hugging Face's ignore_merges (a whole pre-token that is a token stays whole) is
            # tiktoken's rule; the files fastlm writes for tiktoken vocabularies use it.
            return cls(token_bytes, pairs, special_tokens=special_tokens, pattern=pattern, rank_by_id=True,
                       name=pathlib.Path(where).parent.name)
        return cls(token_bytes, pairs, special_tokens=special_tokens, pattern=pattern,
                   name=pathlib.Path(where).parent.name)

    def save(self, directory) -> pathlib.Path:
        """Write ``tokenizer.json`` (Hugging Face), ``vocab.json`` + ``merges.txt`` (GPT-2) and
        ``tokenizer_config.json`` into ``directory``; Hugging Face tokenizers and transformers
        load them."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        special_ids = set(self.special_tokens.values())
        vocab = {}
        for i in range(self._n_ordinary):
            if i in special_ids:
                continue
            try:
                b = self._core.token_bytes(i)
            except ValueError:
                continue
            vocab[_to_unicode(b)] = i
        for s, i in self.special_tokens.items():
            vocab[s] = i
        merges = [(_to_unicode(self._core.token_bytes(a)), _to_unicode(self._core.token_bytes(b)))
                  for a, b, _ in self._core.merges()]
        if self.pattern == "gpt2":
            pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                # Oniguruma (Hugging Face's regex engine) reads "{1,3}+" as "({1,3})+", not as
                # possessive; plain "{1,3}" means the same here.
                {"type": "Split", "pattern": {"Regex": PATTERNS[self.pattern].replace("{1,3}+", "{1,3}")},
                 "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        obj = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in self._special_list],
            "normalizer": None,
            "pre_tokenizer": pre,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                               "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": bool(self.rank_by_id), "vocab": vocab, "merges": [list(m) for m in merges]},
        }
        atomic_write_bytes(d / "tokenizer.json", json.dumps(obj, ensure_ascii=False).encode("utf-8"))
        atomic_write_bytes(d / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        atomic_write_bytes(d / "merges.txt", ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
               "clean_up_tokenization_spaces": False}
        if ENDOFTEXT in self.special_tokens:
            cfg.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
        atomic_write_bytes(d / "tokenizer_config.json", json.dumps(cfg, indent=2).encode("utf-8"))
        return d


def _hf_pattern(pre, where) -> str:
    if pre is None:
        raise ValueError(f"{where}: no pre_tokenizer; pass pattern=")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise ValueError(f"{where}: ByteLevel with add_prefix_space=true is not supported")
        if pre.get("use_regex", True):
            return "gpt2"
        raise ValueError(f"{where}: ByteLevel without a regex is not supported")
    if kind == "Sequence":
        subs = pre.get("pretokenizers") or []
        for s in subs:
            if s.get("type") == "Split":
                pat = (s.get("pattern") or {}).get("Regex")
                if pat is None:
                    break
                return _pattern_name(pat)
            if s.get("type") == "ByteLevel" and s.get("use_regex", True):
                return _hf_pattern(s, where)
    raise ValueError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:200]}; pass pattern=")


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


def _too_big(p: pathlib.Path) -> ValueError:
    return ValueError(f"{p}: a tokenizer file is read up to {MAX_FILE_BYTES} bytes (after gzip decompression) "
                      "and this one is longer (fastlm.tokenizer.MAX_FILE_BYTES)")


def _read_bytes(p: pathlib.Path) -> bytes:
    """The bytes of a tokenizer file, gunzipped when they start with gzip's magic, at most
    ``MAX_FILE_BYTES`` of them (``ValueError`` past it, before reading or inflating more)."""
    with open(p, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(p)
    if data[:2] != b"\x1f\x8b":
        return data
    # Inflate member by member (a gzip file may hold several), never producing more than one
    # byte past the limit.
    out = bytearray()
    rest = data
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(rest, MAX_FILE_BYTES + 1 - len(out))
            if len(out) > MAX_FILE_BYTES:
                raise _too_big(p)
            if not d.eof:
                raise ValueError(f"{p}: bad gzip data (truncated)")
            rest = d.unused_data
            if not rest.strip(b"\0"):  # zero padding after the last member, as gzip allows
                break
    except zlib.error as e:
        raise ValueError(f"{p}: bad gzip data ({e})") from None
    return bytes(out)


def _read_json(p: pathlib.Path):
    try:
        return json.loads(_read_bytes(p).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{p}: not a tokenizer file (JSON nested too deep)") from None


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
