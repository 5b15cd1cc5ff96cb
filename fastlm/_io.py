"""Files: atomic writes, bounded JSON and JSONL readers, safetensors files.

A leaf of the package (it imports nothing of fastlm): every module that writes a file goes
through it. A write goes to a temporary file in the target directory, is flushed to disk,
then renamed over the target, so a crash never leaves a half-written file under the final
name. A metadata file is read up to ``MAX_JSON_BYTES``, so a crafted file cannot make a
reader hold gigabytes, and nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

# A metadata file (config.json, an index, trainer_state.json) is read up to this many bytes.
MAX_JSON_BYTES = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint or metadata file that cannot be read, or does not fit the model."""


# ----------------------------------------------------------------------------- writing
def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once: a temporary file beside it, synced, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    """``obj`` as indented JSON with sorted keys, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically. The tensors must not share storage."""
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={k: str(v) for k, v in (metadata or {}).items()}))


# ----------------------------------------------------------------------------- reading
def read_json(path):
    """A JSON metadata file, at most ``MAX_JSON_BYTES`` long; ``CheckpointError`` when it is
    longer, not JSON, or nested deeper than the parser goes."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is longer than a metadata file may be ({MAX_JSON_BYTES} bytes)")
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid metadata: JSON nested too deep") from None


def iter_jsonl(path) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines file; ``ValueError``
    naming the file and line where a line is not JSON."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None


def load_tensors(path) -> dict:
    """All tensors of one safetensors file, with a clear error when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
