"""Reading documents (files, folders, patterns, JSONL, Hugging Face datasets, the standard
library), cleaning them (``CleanConfig``, ``CleanReport``) and splitting them into train and
val: steps 1-3 of ``fastlm.data``'s path."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import sysconfig
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .._io import iter_jsonl
from .._progress import progress_bar, progress_enabled

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".jsonl")


# ----------------------------------------------------------------------------- documents
@dataclass
class Document:
    text: str
    source: str  # where it came from (a file path, "stdlib:<module path>", "hf:<name>[i]")


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
    for d in progress_bar(docs, desc="cleaning", unit="doc", enabled=progress_enabled(progress)):
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
