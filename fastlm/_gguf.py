"""Reading GGUF files (llama.cpp's single-file format) through the ``gguf`` package, shared by
the model loader (``fastlm.models.gguf``) and the tokenizer loader (``Tokenizer.load``).

A GGUF file read from disk may be hostile: the reader memory-maps it (nothing is read whole),
and every field is checked for its kind and count before anything is sized by it.
"""
from __future__ import annotations

from pathlib import Path

from ._io import CheckpointError

MAX_VOCAB = 1 << 22  # entries of a token or merge list


def is_gguf(path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading and writing GGUF files needs the gguf package (pip install gguf)") from None
    return gguf


def reader(path):
    """The ``gguf.GGUFReader`` of ``path``; CheckpointError for anything that is not a readable GGUF file."""
    gguf = gguf_module()
    p = Path(path)
    if not is_gguf(p):
        raise CheckpointError(f"{p} is not a GGUF file")
    try:
        return gguf.GGUFReader(p, "r")
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable GGUF file ({type(e).__name__}: {e})") from None


def _field(rd, key, required=True):
    f = rd.fields.get(key)
    if f is None:
        if required:
            raise CheckpointError(f"GGUF file has no {key!r}")
        return None
    if not f.types:
        raise CheckpointError(f"GGUF field {key!r} has no type")
    return f


def scalar(rd, key, required=True):
    """A field holding one number or string."""
    f = _field(rd, key, required)
    if f is None:
        return None
    if len(f.data) != 1 or f.types[0].name == "ARRAY":
        raise CheckpointError(f"GGUF field {key!r} must hold one value")
    v = f.parts[f.data[0]]
    if f.types[0].name == "STRING":
        try:
            return v.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"GGUF field {key!r} is not UTF-8") from None
    return v[0].item()


def strings(rd, key, required=True, limit=MAX_VOCAB):
    """A field holding an array of strings, at most ``limit`` of them."""
    f = _field(rd, key, required)
    if f is None:
        return None
    if f.types[0].name != "ARRAY" or len(f.types) < 2 or f.types[1].name != "STRING":
        raise CheckpointError(f"GGUF field {key!r} must be an array of strings")
    if len(f.data) > limit:
        raise CheckpointError(f"GGUF field {key!r} holds {len(f.data)} entries, over the limit of {limit}")
    try:
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    except UnicodeDecodeError:
        raise CheckpointError(f"GGUF field {key!r} holds a string that is not UTF-8") from None


def ints(rd, key, required=True, limit=MAX_VOCAB):
    """A field holding an array of integers, at most ``limit`` of them."""
    f = _field(rd, key, required)
    if f is None:
        return None
    if f.types[0].name != "ARRAY" or len(f.types) < 2 or "INT" not in f.types[1].name:
        raise CheckpointError(f"GGUF field {key!r} must be an array of integers")
    if len(f.data) > limit:
        raise CheckpointError(f"GGUF field {key!r} holds {len(f.data)} entries, over the limit of {limit}")
    return [int(f.parts[i][0]) for i in f.data]
