"""Data preparation: raw text in, memory-mapped token files out.

The path is ``read -> clean -> split -> tokenize -> write``:

1. **Read** documents from text files, folders (glob patterns, extensions), JSONL files
   (one JSON object a line, text under a named field), a Hugging Face dataset (name or
   ``save_to_disk`` folder, when ``datasets`` is installed), or the built-in corpus: the
   running interpreter's own standard library (``stdlib_corpus()``), which exists wherever
   Python runs.
2. **Clean** (``CleanConfig``; every step on by default and switchable): Unicode NFC,
   newlines normalised to ``\\n``, control characters removed, documents outside
   ``[min_chars, max_chars]`` dropped, exact duplicates dropped (SHA-256 of the cleaned
   text), and optionally personal data scrubbed (e-mail addresses, phone numbers, IP
   addresses, card-like numbers replaced by placeholders). ``CleanReport`` says how many
   documents and bytes each step removed.
3. **Split** train/val deterministically by the hash of each document's text
   (``val_fraction``). When a corpus has too few documents for a hash split to give both
   sides (a single text file such as tiny Shakespeare), the tail ``val_fraction`` of every
   document, cut at a line boundary, goes to val instead, as nanoGPT does.
4. **Tokenize** with the C++ tokenizer's batch encoder on all cores; an end-of-text token
   follows every document.
5. **Write** ``train.bin`` and ``val.bin`` (raw little-endian uint16 when the vocabulary
   fits, else uint32), the tokenizer, and ``meta.json`` (tokenizer, counts, source and
   cleaning summary). Every file is written atomically, and the same inputs give
   byte-identical files.

``TokenData`` reads a prepared folder back through ``numpy.memmap`` and draws batches.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import sys
import sysconfig
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes, atomic_write_json, iter_jsonl, read_json

META_NAME = "meta.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- documents
@dataclass
class Document:
    text: str
    source: str  # where it came from (a file path, "stdlib:<module path>", "hf:<name>[i]")


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("disable", not sys.stderr.isatty() and os.environ.get("FASTLM_PROGRESS") != "1")
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def stdlib_corpus(max_files: int | None = None) -> list[Document]:
    """The ``.py`` files of the running interpreter's standard library, in a fixed order
    (tests, ``site-packages`` and caches excluded): a corpus of real Python code that
    exists wherever Python runs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if max_files is not None:
        files = files[:max_files]
    docs = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(Document(text, f"stdlib:{p.relative_to(root).as_posix()}"))
    return docs


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or text_field not in obj:
            raise ValueError(f"{path} line {lineno}: no {text_field!r} field (choose the field with --text-field)")
        if not isinstance(obj[text_field], str):
            raise ValueError(f"{path} line {lineno}: field {text_field!r} is not a string")
        docs.append(Document(obj[text_field], f"{path}:{lineno}"))
    return docs


def _read_file(path: Path, text_field: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    with open(path, "rb") as f:
        raw = f.read()
    return [Document(raw.decode("utf-8", errors="replace"), str(path))]


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def load_hf_dataset(name_or_path: str, text_field: str = "text", split: str = "train") -> list[Document]:
    """Documents of a Hugging Face dataset: a hub name (``datasets.load_dataset``) or a
    ``save_to_disk`` folder (``datasets.load_from_disk``). Needs ``pip install datasets``."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the dataset {name_or_path!r} needs the datasets package: pip install datasets") from None
    p = Path(name_or_path)
    if p.exists():
        ds = datasets.load_from_disk(str(p))
    else:
        ds = datasets.load_dataset(name_or_path, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {name_or_path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name_or_path} has columns {ds.column_names}, not {text_field!r} (use --text-field)")
    return [Document(t, f"hf:{name_or_path}[{i}]") for i, t in enumerate(ds[text_field]) if isinstance(t, str)]


def read_documents(sources, text_field: str = "text", extensions=DEFAULT_EXTENSIONS,
                   hf_split: str = "train") -> tuple[list[Document], list[dict]]:
    """Read every source: ``"stdlib"`` (the built-in corpus), a file, a folder (searched
    recursively for ``extensions``), a glob pattern, a ``save_to_disk`` folder, or
    ``hf:NAME`` / a name that is no path (a Hugging Face dataset). Returns the documents
    and a per-source summary (documents and bytes)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    docs, summary = [], []
    exts = tuple(e if e.startswith(".") else "." + e for e in extensions)
    for src in sources:
        s = str(src)
        p = Path(s)
        if s == "stdlib":
            got = stdlib_corpus()
        elif s.startswith("hf:"):
            got = load_hf_dataset(s[3:], text_field, hf_split)
        elif _is_hf_saved(p):
            got = load_hf_dataset(s, text_field, hf_split)
        elif p.is_file():
            got = _read_file(p, text_field)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in exts)
            if not files:
                raise FileNotFoundError(f"no files with extensions {', '.join(exts)} under {p}")
            got = [d for f in files for d in _read_file(f, text_field)]
        elif glob.has_magic(s):
            files = sorted(Path(f) for f in glob.glob(s, recursive=True) if Path(f).is_file())
            if not files:
                raise FileNotFoundError(f"the pattern {s!r} matches no file")
            got = [d for f in files for d in _read_file(f, text_field)]
        else:
            raise FileNotFoundError(f"data source {s!r} is not a file, folder, pattern, 'stdlib' or 'hf:NAME'")
        docs.extend(got)
        summary.append({"source": s, "documents": len(got), "bytes": sum(len(d.text.encode()) for d in got)})
    return docs, summary


# ----------------------------------------------------------------------------- cleaning
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_PII = [
    ("<EMAIL>", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    ("<CARD>", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("<IP>", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("<PHONE>", re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b")),
]


@dataclass
class CleanConfig:
    nfc: bool = True  # Unicode NFC normalisation
    newlines: bool = True  # \r\n and \r become \n
    control_chars: bool = True  # C0/C1 control characters other than \n and \t removed
    min_chars: int = 1  # shorter documents dropped (0: keep empty ones too)
    max_chars: int | None = 50_000_000  # longer documents dropped (None: no limit)
    dedup: bool = True  # exact duplicates (same cleaned text) dropped
    scrub_pii: bool = False  # e-mail, phone, IP and card-like numbers replaced by placeholders

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class CleanReport:
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    steps: dict = field(default_factory=dict)  # step -> {"documents": removed, "bytes": removed}

    def _add(self, step, docs=0, nbytes=0):
        s = self.steps.setdefault(step, {"documents": 0, "bytes": 0})
        s["documents"] += docs
        s["bytes"] += nbytes

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        lines = [f"cleaning: {self.documents_in} documents ({self.bytes_in:,} bytes) in, "
                 f"{self.documents_out} documents ({self.bytes_out:,} bytes) out"]
        for step, s in self.steps.items():
            lines.append(f"  {step:<14} removed {s['documents']:>6} documents, {s['bytes']:>12,} bytes")
        return "\n".join(lines)


def clean_text(text: str, config: CleanConfig, report: CleanReport | None = None) -> str:
    """Apply the per-document text steps of ``config`` to one text."""
    def step(name, fn, t):
        out = fn(t)
        if report is not None and out != t:
            report._add(name, 0, len(t.encode()) - len(out.encode()))
        return out

    if config.nfc:
        text = step("nfc", lambda t: unicodedata.normalize("NFC", t), text)
    if config.newlines:
        text = step("newlines", lambda t: t.replace("\r\n", "\n").replace("\r", "\n"), text)
    if config.control_chars:
        text = step("control_chars", lambda t: _CONTROL.sub("", t), text)
    if config.scrub_pii:
        for placeholder, rx in _PII:
            text = step("scrub_pii", lambda t, rx=rx, ph=placeholder: rx.sub(ph, t), text)
    return text


def clean_documents(docs: list[Document], config: CleanConfig | None = None, progress: bool = True):
    """Cleaned documents (order kept) and a ``CleanReport``."""
    config = config or CleanConfig()
    report = CleanReport(documents_in=len(docs), bytes_in=sum(len(d.text.encode()) for d in docs))
    for name in ("nfc", "newlines", "control_chars", "scrub_pii", "length", "dedup"):
        if name == "length" or getattr(config, name, False):
            report.steps[name] = {"documents": 0, "bytes": 0}
    out, seen = [], set()
    for d in _progress(docs, desc="cleaning", unit="doc", disable=None if progress else True):
        text = clean_text(d.text, config, report)
        n = len(text)
        if n < config.min_chars or (config.max_chars is not None and n > config.max_chars):
            report._add("length", 1, len(text.encode()))
            continue
        if config.dedup:
            h = hashlib.sha256(text.encode()).digest()
            if h in seen:
                report._add("dedup", 1, len(text.encode()))
                continue
            seen.add(h)
        out.append(Document(text, d.source))
    report.documents_out = len(out)
    report.bytes_out = sum(len(d.text.encode()) for d in out)
    return out, report


# ----------------------------------------------------------------------------- split
def _hash_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2.0 ** 64


def split_documents(docs: list[Document], val_fraction: float = 0.05):
    """(train texts, val texts, method). Deterministic: by document hash, or, when that
    leaves either side empty, the tail ``val_fraction`` of each document (cut at a line)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    texts = [d.text for d in docs]
    if val_fraction == 0.0:
        return texts, [], "none"
    is_val = [_hash_fraction(t) < val_fraction for t in texts]
    if 0 < sum(is_val) < len(texts):
        return ([t for t, v in zip(texts, is_val) if not v], [t for t, v in zip(texts, is_val) if v], "hash")
    train, val = [], []
    for t in texts:
        cut = int(len(t) * (1.0 - val_fraction))
        nl = t.find("\n", cut)
        cut = nl + 1 if 0 <= nl < len(t) - 1 else cut
        if t[:cut]:
            train.append(t[:cut])
        if t[cut:]:
            val.append(t[cut:])
    return train, val, "tail"


# ----------------------------------------------------------------------------- tokenizer
def _tokenizer_class():
    try:
        from .tokenizer import Tokenizer
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
    bar = _progress(total=total, desc="tokenizing", unit="char", unit_scale=True, disable=None if progress else True)

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
