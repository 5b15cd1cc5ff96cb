"""The checks on what ``fastlm.features`` is given: documents, options, and tokenizers used as
analyzers."""
from __future__ import annotations

import numbers

import numpy as np


def _as_documents(raw_documents) -> list:
    if isinstance(raw_documents, (str, bytes)):
        raise ValueError("Iterable over raw text documents expected, string object received.")
    try:
        docs = list(raw_documents)
    except TypeError:
        raise TypeError(
            f"raw_documents must be an iterable of str, got {type(raw_documents).__name__}"
        ) from None
    if all(type(d) is str for d in docs):
        return docs
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            out.append(str(d))
        elif isinstance(d, (bytes, bytearray)):
            out.append(bytes(d).decode("utf-8"))  # scikit-learn's default encoding, strict
        else:
            raise TypeError(f"document {i} is a {type(d).__name__}, expected str (or UTF-8 bytes)")
    return out


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_df(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int >= 0 (documents) or a float in [0.0, 1.0] (proportion), got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 when it is an int, got {value}")
    elif not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0.0, 1.0] when it is a float, got {value}")


def _is_tokenizer(obj) -> bool:
    return any(callable(getattr(obj, name, None)) for name in ("encode_batch", "encode_ordinary_batch", "encode"))


def _encode_all(tokenizer, docs):
    for name in ("encode_ordinary_batch", "encode_batch"):
        fn = getattr(tokenizer, name, None)
        if callable(fn):
            return list(fn(docs))
    return [tokenizer.encode(d) for d in docs]
