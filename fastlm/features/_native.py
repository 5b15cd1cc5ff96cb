"""The C++ side of ``fastlm.features``: loading the extension ``fastlm._features``, the Unicode
tables it counts with, and the number of threads it counts on.

The tables for ``\\w`` and ``str.lower()`` are taken from the running interpreter the first
time they are needed, so the result is exact on any Python version. The context-dependent
capital sigma (U+03A3) is lowered by Python itself (see ``_CAPITAL_SIGMA``).
"""
from __future__ import annotations

import numbers
import os
import re
import threading

import numpy as np

_CAPITAL_SIGMA = "\u03a3"

_NATIVE = None
_NATIVE_LOCK = threading.Lock()


def _unicode_tables():
    """Python's \\w set (as a little-endian bitmap) and str.lower()'s mapping, from this interpreter."""
    s = np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    word = np.zeros(0x110000, dtype=bool)
    for m in re.finditer(r"\w+", s):
        word[m.start():m.end()] = True
    lower_from, lower_to = [], []
    step = 4096
    for start in range(0, 0x110000, step):
        chunk = s[start:start + step]
        low = chunk.lower()
        if low == chunk:
            continue
        if len(low) == len(chunk):
            a = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            b = np.frombuffer(low.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            for i in np.flatnonzero(a != b):
                lower_from.append(start + int(i))
                lower_to.append([int(b[i])])
        else:  # a one-to-many mapping in this chunk (U+0130 -> "i\u0307")
            for i, ch in enumerate(chunk):
                low_ch = ch.lower()
                if low_ch != ch:
                    lower_from.append(start + i)
                    lower_to.append([ord(c) for c in low_ch])
    return np.packbits(word, bitorder="little").tobytes(), lower_from, lower_to


def _extension():
    """The extension module itself, without the Unicode tables (Word2Vec needs none)."""
    try:
        from .. import _features
    except ImportError as e:  # pragma: no cover - only in a broken install
        raise ImportError(
            "fastlm.features needs the C++ extension fastlm._features, which is not built; "
            "reinstall fastlm from source (pip install -e .)"
        ) from e
    return _features


def _native():
    global _NATIVE
    if _NATIVE is None:
        with _NATIVE_LOCK:  # the tables are set once, before any counting starts
            if _NATIVE is None:
                _features = _extension()
                if not _features.tables_ready():
                    _features.set_unicode_tables(*_unicode_tables())
                _NATIVE = _features
    return _NATIVE


def _n_threads(n_jobs) -> int:
    if n_jobs is None or n_jobs == -1:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or n_jobs < 1:
        raise ValueError(f"n_jobs must be None, -1 or an int >= 1, got {n_jobs!r}")
    return int(n_jobs)

