"""Token files: the tokenizer trained or loaded, documents tokenized and written by
``prepare`` (steps 4-5 of ``fastlm.data``'s path), read back by ``TokenData``, and split into
folds by document for cross-validation."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json, read_json
from .._progress import progress_bar, progress_enabled
from .corpus import (DEFAULT_EXTENSIONS, CleanConfig, Document, clean_documents, read_documents,
                     split_documents)

META_NAME = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- tokenizer
def _tokenizer_class():
    try:
        from ..tokenizer import Tokenizer
    except ImportError as e:
        raise ImportError(f"fastlm's tokenizer is not available ({e}); rebuild the package") from None
    return Tokenizer


def load_tokenizer(path):
    return _tokenizer_class().load(str(path))


def inside(folder, name, what: str) -> Path:
    """``folder / name`` for a path ``name`` that the folder's own metadata names, with links
    resolved; ``ValueError`` unless it is a relative path that stays inside ``folder`` (no
    absolute path, no ``..`` out, no link out), so a folder's metadata cannot make fastlm read
    or copy files from elsewhere."""
    base = Path(folder).resolve()
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        raise ValueError(f"{what} must be a relative path inside {folder}, got {name!r}")
    p = (base / name).resolve()
    if p != base and base not in p.parents:
        raise ValueError(f"{what} {name!r} leads outside {folder}; refused")
    return p


def train_tokenizer(texts, vocab_size: int, max_bytes: int | None = 20_000_000):
    """A byte-level BPE tokenizer with ``<|endoftext|>`` trained on ``texts`` (at most the
    first ``max_bytes`` bytes of them). ``vocab_size=256`` means plain bytes, no merges."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    sample, total = [], 0
    for t in texts:
        if max_bytes is not None and total >= max_bytes:
            break
        sample.append(t)
        total += len(t.encode())
    return _tokenizer_class().train(sample, vocab_size, special_tokens=("<|endoftext|>",))


def _encode(tokenizer, texts, num_threads=None, progress=True, batch_bytes=4_000_000):
    """Concatenated token ids of texts, each followed by the end-of-text token."""
    eot = tokenizer.eot_token
    if eot is None:
        raise ValueError("the tokenizer has no end-of-text token; train it with special_tokens=('<|endoftext|>',)")
    parts, batch, size = [], [], 0
    total = sum(len(t) for t in texts)
    bar = progress_bar(total=total, desc="tokenizing", unit="char", unit_scale=True,
                       enabled=progress_enabled(progress))

    def flush():
        for ids in tokenizer.encode_batch(batch, num_threads=num_threads):
            parts.append(np.asarray(ids, dtype=np.int64))
            parts.append(np.asarray([eot], dtype=np.int64))
        bar.update(sum(len(t) for t in batch))

    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= batch_bytes:
            flush()
            batch, size = [], 0
    if batch:
        flush()
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def token_dtype(n_vocab: int):
    return np.uint16 if n_vocab <= 65536 else np.uint32


# ----------------------------------------------------------------------------- prepare
def prepare(sources, out_dir, tokenizer=None, vocab_size: int | None = None, val_fraction: float = 0.05,
            clean: CleanConfig | None = None, text_field: str = "text", extensions=DEFAULT_EXTENSIONS,
            num_threads: int | None = None, tokenizer_max_bytes: int | None = 20_000_000,
            progress: bool = True, verbose: bool = True, documents: list[Document] | None = None) -> dict:
    """Read, clean, split, tokenize and write ``sources`` into ``out_dir``; returns meta.

    ``tokenizer`` is a ``fastlm.Tokenizer``, a folder holding one, or None to train one of
    ``vocab_size`` on the training split. ``documents`` may be given instead of sources."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if documents is None:
        docs, source_summary = read_documents(sources, text_field=text_field, extensions=extensions)
    else:
        docs = list(documents)
        source_summary = [{"source": "documents", "documents": len(docs), "bytes": sum(len(d.text.encode()) for d in docs)}]
    docs, report = clean_documents(docs, clean, progress=progress)
    if verbose:
        print(report, file=sys.stderr)
    if not docs:
        raise ValueError("no documents left after cleaning; check the sources and the length limits")
    train_texts, val_texts, method = split_documents(docs, val_fraction)

    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("give a tokenizer (--tokenizer DIR) or a vocabulary size to train one (--vocab-size N)")
        if verbose:
            print(f"training a byte-level BPE tokenizer with {vocab_size} tokens ...", file=sys.stderr)
        tokenizer = train_tokenizer(train_texts, vocab_size, max_bytes=tokenizer_max_bytes)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    tokenizer.save(str(out / TOKENIZER_DIR))

    dtype = token_dtype(tokenizer.n_vocab)
    counts = {}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        ids = _encode(tokenizer, texts, num_threads=num_threads, progress=progress)
        atomic_write_bytes(out / f"{split}.bin", ids.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes())
        counts[split] = {"documents": len(texts), "tokens": int(ids.size), "bytes": sum(len(t.encode()) for t in texts)}
    meta = {
        "format": "fastlm-tokens",
        "version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(tokenizer.n_vocab),
        "eot_token": int(tokenizer.eot_token),
        "tokenizer": TOKENIZER_DIR,
        "split": {"method": method, "val_fraction": val_fraction},
        "counts": counts,
        "sources": source_summary,
        "cleaning": {"config": (clean or CleanConfig()).to_dict(), "report": report.to_dict()},
    }
    atomic_write_json(out / META_NAME, meta)
    if verbose:
        print(f"wrote {out}: train {counts['train']['tokens']:,} tokens, val {counts['val']['tokens']:,} tokens, "
              f"vocabulary {tokenizer.n_vocab}", file=sys.stderr)
    return meta


def is_prepared(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_NAME).is_file() and (p / "train.bin").is_file()


# ----------------------------------------------------------------------------- reading back
class TokenData:
    """A prepared folder, memory-mapped: ``batch(split, batch_size, block_size, rng)`` draws
    random windows (x, y) with y shifted by one token, as int64 tensors."""

    def __init__(self, path):
        self.path = Path(path)
        if not is_prepared(self.path):
            raise FileNotFoundError(f"{self.path} is not a prepared data folder (no {META_NAME} and train.bin); "
                                    f"run `fastlm prepare --data ... --out {self.path}`")
        self.meta = read_json(self.path / META_NAME)
        if not isinstance(self.meta, dict) or self.meta.get("format") != "fastlm-tokens":
            raise ValueError(f"{self.path / META_NAME} is not a fastlm token folder")
        if self.meta.get("dtype") not in ("uint16", "uint32"):
            raise ValueError(f"{self.path / META_NAME}: dtype must be uint16 or uint32, got {self.meta.get('dtype')!r}")
        # The tokenizer's folder, as meta.json names it; it must lie inside this folder.
        self.tokenizer_dir = inside(self.path, self.meta.get("tokenizer", TOKENIZER_DIR),
                                    f"{self.path / META_NAME}: the tokenizer path")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size = int(self.meta["vocab_size"])
        self.eot_token = self.meta.get("eot_token")
        self.splits = {}
        for split in ("train", "val"):
            f = self.path / f"{split}.bin"
            if f.is_file() and f.stat().st_size > 0:
                if f.stat().st_size % self.dtype.itemsize:
                    raise ValueError(f"{f} has a size that is not a multiple of {self.dtype.itemsize} bytes")
                self.splits[split] = np.memmap(f, dtype=self.dtype, mode="r")
            else:
                self.splits[split] = np.zeros(0, dtype=self.dtype)

    def __len__(self):
        return len(self.splits["train"])

    def num_tokens(self, split="train") -> int:
        return len(self.splits[split])

    @property
    def bytes_per_token(self) -> float:
        c = self.meta.get("counts", {}).get("val") or {}
        if c.get("tokens"):
            return c["bytes"] / c["tokens"]
        c = self.meta["counts"]["train"]
        return c["bytes"] / max(c["tokens"], 1)

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def has_batches(self, split: str, block_size: int) -> bool:
        """Whether ``split`` is long enough for windows of ``block_size + 1`` tokens."""
        return len(self.splits[split]) > block_size + 1

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        import torch

        data = self.splits[split]
        n = len(data) - block_size - 1
        if n < 1:
            raise ValueError(f"the {split} split has {len(data)} tokens, too few for windows of {block_size + 1}; "
                             f"use more data or a smaller --block-size")
        starts = rng.integers(0, n, size=batch_size)
        rows = data[starts[:, None] + np.arange(block_size + 1)]
        t = torch.from_numpy(rows.astype(np.int64))
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


# ----------------------------------------------------------------------------- folds
def token_documents(data: TokenData) -> list[np.ndarray]:
    """The documents of a prepared folder, train then val: runs of tokens, each ending with
    the end-of-text token that ``prepare`` writes after every document."""
    docs = []
    for split in ("train", "val"):
        ids = np.asarray(data.splits[split])
        ends = np.flatnonzero(ids == data.eot_token) + 1
        starts = np.concatenate([[0], ends[:-1]]) if len(ends) else np.zeros(0, dtype=np.int64)
        docs += [ids[s:e] for s, e in zip(starts, ends)]
        tail = ends[-1] if len(ends) else 0
        if tail < len(ids):  # a last document with no end-of-text token
            docs.append(ids[tail:])
    return docs


def assign_folds(docs: list[np.ndarray], k: int) -> list[int]:
    """The fold (0..k-1) of each document: documents ordered by the SHA-256 of their tokens and
    dealt round-robin, so the folds are deterministic, disjoint, cover every document and
    differ in size by one document at most."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(docs) < k:
        raise ValueError(f"{k} folds need at least {k} documents; the data has {len(docs)}")
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(np.ascontiguousarray(docs[i]).tobytes()).digest(), i))
    fold = [0] * len(docs)
    for rank, i in enumerate(order):
        fold[i] = rank % k
    return fold


def write_folds(path, k: int, out_dir) -> list[Path]:
    """Write k prepared folders ``out_dir/fold-I`` from the prepared folder ``path``: fold I's
    documents (``assign_folds``) are its val split, all the others its train split; the
    tokenizer is the same. Returns the folders."""

    data = TokenData(path)
    tok = data.tokenizer()
    docs = token_documents(data)
    fold = assign_folds(docs, k)
    nbytes = [len(tok.decode_bytes([int(t) for t in d if t != data.eot_token])) for d in docs]
    little = data.dtype.newbyteorder("<")
    outs = []
    for f in range(k):
        out = Path(out_dir) / f"fold-{f}"
        tok.save(str(out / TOKENIZER_DIR))
        counts = {}
        for split, pick in (("train", lambda i: fold[i] != f), ("val", lambda i: fold[i] == f)):
            chosen = [i for i in range(len(docs)) if pick(i)]
            ids = np.concatenate([docs[i] for i in chosen]) if chosen else np.zeros(0, dtype=np.int64)
            atomic_write_bytes(out / f"{split}.bin", ids.astype(little).tobytes())
            counts[split] = {"documents": len(chosen), "tokens": int(ids.size), "bytes": sum(nbytes[i] for i in chosen)}
        meta = {**data.meta, "tokenizer": TOKENIZER_DIR, "counts": counts,
                "split": {"method": "fold", "fold": f, "folds": k, "source": str(data.path)}}
        atomic_write_json(out / META_NAME, meta)
        outs.append(out)
    return outs
