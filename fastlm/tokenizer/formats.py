"""Tokenizer files: reading Hugging Face ``tokenizer.json``, GPT-2 ``vocab.json`` + ``merges.txt``
and tiktoken rank files (``.tiktoken``, optionally gzipped), converting a tiktoken ``Encoding``,
and writing the Hugging Face and GPT-2 files. ``Tokenizer.load``, ``Tokenizer.from_tiktoken``
and ``Tokenizer.save`` call these with the tokenizer class (or tokenizer) to build (or write).

A file is read whole, up to ``MAX_FILE_BYTES`` after gzip decompression; ids and token
lengths are checked against ``MAX_VOCAB`` and ``MAX_TOKEN_BYTES`` before memory is sized by
them.
"""
from __future__ import annotations

import base64
import binascii
import json
import pathlib
import zlib

from .. import _gguf
from .._io import atomic_write_bytes
from ..hub import TOKENIZER_FILES, HubNotFoundError, resolve_pretrained
from ._common import ENDOFTEXT, MAX_FILE_BYTES, _check_id, _check_token_length
from .patterns import _PATTERN_ALIASES, PATTERNS, _pattern_name

# Special tokens of tiktoken's encodings, by name.
_TIKTOKEN_SPECIALS = {
    "r50k_base": {ENDOFTEXT: 50256},
    "p50k_base": {ENDOFTEXT: 50256},
    "cl100k_base": {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    "o200k_base": {ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
}

# tiktoken's rank files that Tokenizer.from_tiktoken(name) reads from tiktoken's cache (never
# downloading them): name -> (the URL tiktoken keys its cache by, the file's SHA-256).
_TIKTOKEN_RANK_FILES = {
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}

# The files Tokenizer.save writes into a folder (chat_template.jinja only for a tokenizer with a template).
SAVED_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja")


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


def tiktoken_cache_path(name: str) -> pathlib.Path | None:
    """Where tiktoken caches the rank file of encoding ``name`` (cl100k_base, o200k_base): the
    SHA-1 of its URL under ``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else
    ``<temp dir>/data-gym-cache``, as tiktoken's ``read_file_cached`` does; ``None`` when the
    cache is switched off (an empty directory name)."""
    import hashlib
    import os
    import tempfile

    url = _TIKTOKEN_RANK_FILES[name][0]
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return pathlib.Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def _from_tiktoken_cache(cls, name: str):
    """Encoding ``name`` built from the rank file in tiktoken's cache, checked against its
    SHA-256; ``FileNotFoundError`` when it is not there (nothing is downloaded)."""
    import hashlib

    path = tiktoken_cache_path(name)
    url, sha256 = _TIKTOKEN_RANK_FILES[name]
    if path is None or not path.is_file():
        where = "tiktoken's cache is switched off (TIKTOKEN_CACHE_DIR is empty)" if path is None else \
            f"it is not in tiktoken's cache ({path})"
        raise FileNotFoundError(
            f"{name}: the rank file is needed and {where}; fastlm does not download it. Run "
            f"tiktoken.get_encoding({name!r}) once where the network is reachable (TIKTOKEN_CACHE_DIR chooses "
            f"the cache), or pass the file itself: Tokenizer.load('{name}.tiktoken') (from {url})")
    data = _read_bytes(path)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: the cached {name} rank file does not have the expected SHA-256 {sha256} "
                         "(a damaged or different file); delete it and fetch it again")
    return _tiktoken_from_bytes(cls, data, str(path), name, None, None)


def from_tiktoken_encoding(cls, encoding):
    """``cls.from_tiktoken``: the same tokenizer as a tiktoken ``Encoding`` (or its name, e.g.
    ``"r50k_base"``), built as a ``cls``. ``cl100k_base`` and ``o200k_base`` by name are read
    from tiktoken's cache and never downloaded (``FileNotFoundError`` when absent)."""
    if isinstance(encoding, str) and encoding in _TIKTOKEN_RANK_FILES:
        return _from_tiktoken_cache(cls, encoding)
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


def load_files(cls, path, pattern: str | None = None, special_tokens: dict[str, int] | None = None,
               revision: str | None = None):
    """``cls.load``: a ``cls`` read from a directory or a file: Hugging Face ``tokenizer.json``,
    GPT-2 ``vocab.json`` + ``merges.txt``, a tiktoken rank file (``*.tiktoken[.gz]``), or a
    GGUF model file (its ``gpt2`` tokenizer). For a
    tiktoken file, the pattern and special tokens come from the encoding's name in the file
    name (r50k_base, p50k_base, cl100k_base, o200k_base) or from the arguments."""
    try:
        p = resolve_pretrained(path, revision, need=TOKENIZER_FILES)
    except HubNotFoundError as e:
        raise FileNotFoundError(f"no tokenizer at {path}: {e}") from None
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _with_chat_files(_load_hf(cls, p / "tokenizer.json", pattern, special_tokens), p)
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _with_chat_files(_load_gpt2(cls, p / "vocab.json", p / "merges.txt", pattern, special_tokens), p)
        tk = sorted(p.glob("*.tiktoken")) + sorted(p.glob("*.tiktoken.gz"))
        if len(tk) == 1:
            return _with_chat_files(_load_tiktoken(cls, tk[0], pattern, special_tokens), p)
        raise ValueError(f"{p} has no tokenizer.json, no vocab.json + merges.txt and no single *.tiktoken file")
    name = p.name
    if _gguf.is_gguf(p):
        return _load_gguf(cls, p, pattern, special_tokens)
    if name.endswith(".tiktoken") or name.endswith(".tiktoken.gz"):
        return _load_tiktoken(cls, p, pattern, special_tokens)
    if name == "vocab.json" and (p.parent / "merges.txt").is_file():
        return _load_gpt2(cls, p, p.parent / "merges.txt", pattern, special_tokens)
    if name.endswith(".json"):
        return _load_hf(cls, p, pattern, special_tokens)
    # Otherwise sniff: JSON or tiktoken lines.
    head = _read_bytes(p)[:1].strip()
    if head in (b"{",):
        return _load_hf(cls, p, pattern, special_tokens)
    return _load_tiktoken(cls, p, pattern, special_tokens)


def _with_chat_files(tok, directory: pathlib.Path):
    """``tok`` with the chat template and the named special tokens of ``directory`` (its
    ``tokenizer_config.json``, when there is one, names the special tokens)."""
    from .chat_template import read_chat_template

    source, names = read_chat_template(directory)
    tok.chat_template = source
    if (directory / "tokenizer_config.json").is_file():
        tok.special_tokens_map = names
    return tok


def _load_tiktoken(cls, p: pathlib.Path, pattern, special_tokens):
    return _tiktoken_from_bytes(cls, _read_bytes(p), str(p), p.name.split(".")[0], pattern, special_tokens)


def _tiktoken_from_bytes(cls, data: bytes, p: str, base: str, pattern, special_tokens):
    """A ``cls`` from the lines of a tiktoken rank file (``p`` names it in errors; ``base`` is
    the encoding's name, which chooses the pattern and special tokens when they are not given)."""
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
    if pattern is None:
        pattern = base if base in _PATTERN_ALIASES else "gpt2"
    if special_tokens is None:
        special_tokens = _TIKTOKEN_SPECIALS.get(base, {ENDOFTEXT: max(by_rank) + 1})
    token_bytes = [b""] * (max(by_rank) + 1)
    for r, t in by_rank.items():
        token_bytes[r] = t
    return cls(token_bytes, rank_by_id=True, special_tokens=special_tokens, pattern=pattern, name=base)


def _load_gpt2(cls, vocab_path: pathlib.Path, merges_path: pathlib.Path, pattern, special_tokens):
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
    return _from_vocab_merges(cls, vocab, merges, special_tokens, pattern or "gpt2", False, str(vocab_path))


def _load_gguf(cls, p: pathlib.Path, pattern, special_tokens):
    """The byte-level BPE tokenizer of a GGUF file (llama.cpp's ``gpt2`` tokenizer model): its
    tokens, merges, and control tokens as special tokens. Entries of type UNUSED (ids a model
    reserves without a token) are left out."""
    gguf = _gguf.gguf_module()
    rd = _gguf.reader(p)
    model = _gguf.scalar(rd, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{p}: tokenizer model {model!r}; fastlm reads byte-level BPE ('gpt2')")
    tokens = _gguf.strings(rd, "tokenizer.ggml.tokens")
    types = _gguf.ints(rd, "tokenizer.ggml.token_type", required=False) or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = _gguf.strings(rd, "tokenizer.ggml.merges", limit=4 * _gguf.MAX_VOCAB)
    if len(types) != len(tokens):
        raise ValueError(f"{p}: {len(tokens)} tokens but {len(types)} token types")
    vocab, special = {}, {}
    for i, (s, kind) in enumerate(zip(tokens, types)):
        if kind == int(gguf.TokenType.UNUSED):
            continue
        if kind == int(gguf.TokenType.CONTROL):
            special[s] = i
        if s in vocab:
            raise ValueError(f"{p}: token {s[:40]!r} appears twice")
        vocab[s] = i
    pairs = []
    for k, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{p}: merge {k} is {m[:80]!r}; expected 'A B'")
        pairs.append(parts)
    if special_tokens is not None:
        special = special_tokens
    return _from_vocab_merges(cls, vocab, pairs, special, pattern or "gpt2", False, str(p))


def _load_hf(cls, p: pathlib.Path, pattern, special_tokens):
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
    return _from_vocab_merges(cls, vocab, pairs, special_tokens, pattern, bool(model.get("ignore_merges")), str(p))


def _from_vocab_merges(cls, vocab: dict, merges: list, special_tokens: dict, pattern: str, ignore_merges: bool,
                       where: str):
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


def byte_level_vocab(tok):
    """The ordinary tokens of ``tok`` in GPT-2's byte-level alphabet, {id: string} (special
    tokens and ids without a token left out), and its merges as (string, string) pairs in rank
    order: what vocab.json / merges.txt and a GGUF vocabulary hold."""
    special_ids = set(tok.special_tokens.values())
    ordinary = {}
    for i in range(tok._n_ordinary):
        if i in special_ids:
            continue
        try:
            ordinary[i] = _to_unicode(tok._core.token_bytes(i))
        except ValueError:
            continue
    merges = [(_to_unicode(tok._core.token_bytes(a)), _to_unicode(tok._core.token_bytes(b)))
              for a, b, _ in tok._core.merges()]
    return ordinary, merges


def save_files(tok, directory) -> pathlib.Path:
    """``tok.save``: write ``tokenizer.json`` (Hugging Face), ``vocab.json`` + ``merges.txt`` (GPT-2) and
    ``tokenizer_config.json`` into ``directory``; Hugging Face tokenizers and transformers
    load them."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ordinary, merges = byte_level_vocab(tok)
    vocab = {t: i for i, t in ordinary.items()}
    for s, i in tok.special_tokens.items():
        vocab[s] = i
    if tok.pattern == "gpt2":
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            # Oniguruma (Hugging Face's regex engine) reads "{1,3}+" as "({1,3})+", not as
            # possessive; plain "{1,3}" means the same here.
            {"type": "Split", "pattern": {"Regex": PATTERNS[tok.pattern].replace("{1,3}+", "{1,3}")},
             "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    obj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in tok._special_list],
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": bool(tok.rank_by_id), "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    atomic_write_bytes(d / "tokenizer.json", json.dumps(obj, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(d / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(d / "merges.txt", ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
           "clean_up_tokenization_spaces": False}
    names = getattr(tok, "special_tokens_map", None)
    if names is None:
        names = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT} \
            if ENDOFTEXT in tok.special_tokens else {}
    cfg.update(names)
    template = getattr(tok, "chat_template", None)
    if template is not None:  # transformers' own layout: the template in a file of its own
        atomic_write_bytes(d / "chat_template.jinja", template.encode("utf-8"))
    atomic_write_bytes(d / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False).encode("utf-8"))
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
