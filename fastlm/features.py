"""Classic text features, fast and exact: token counts, TF-IDF, and a TF-IDF search index.

``CountVectorizer`` and ``TfidfVectorizer`` follow scikit-learn's interface (``fit``,
``transform``, ``fit_transform``, ``get_feature_names_out``, ``vocabulary_``, ``idf_``) and
options, and return ``scipy.sparse`` CSR matrices equal to scikit-learn's for the same
tokenization. The counting runs in C++ (``fastlm._features``) on several threads with the
GIL released; what is left in Python is numpy work on whole arrays.

The default analyzer is scikit-learn's ``analyzer="word"``: ``str.lower()`` (when
``lowercase``), then the tokens of the pattern ``(?u)\\b\\w\\w+\\b`` -- maximal runs of at
least two word characters (``str.isalnum()`` or ``_``) -- then n-grams joined by one space.
The tables for ``\\w`` and ``str.lower()`` are taken from the running interpreter the first
time they are needed, so the result is exact on any Python version. The context-dependent
capital sigma (U+03A3) is lowered by Python itself. Columns are the terms in sorted order.

``analyzer`` may also be a tokenizer (an object with ``encode_batch`` or ``encode``, and
``token_bytes``, ``decode_single_token_bytes`` or ``decode_bytes`` for names, such as
``fastlm.Tokenizer`` or a tiktoken ``Encoding``): terms are then n-grams of token ids,
columns ordered by id sequence, ``vocabulary_`` keys are tuples of ids and feature names
are the n-grams' decoded text. A plain callable (str -> list of str) is used as
scikit-learn uses it: its output terms are counted as they are (no lowercasing, no n-grams).
"""
from __future__ import annotations

import io
import json
import numbers
import os
import re
import threading
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._io import atomic_write_bytes, atomic_write_json, read_json
from .tokenizer import token_bytes_fn

__all__ = ["CountVectorizer", "TfidfVectorizer", "TfidfIndex", "NotFittedError"]

_CAPITAL_SIGMA = "\u03a3"


class NotFittedError(ValueError, AttributeError):
    """The vectorizer is used before ``fit`` (same bases as scikit-learn's NotFittedError)."""


# ----------------------------------------------------------------------------- native part
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


def _native():
    global _NATIVE
    if _NATIVE is None:
        with _NATIVE_LOCK:  # the tables are set once, before any counting starts
            if _NATIVE is None:
                try:
                    from . import _features
                except ImportError as e:  # pragma: no cover - only in a broken install
                    raise ImportError(
                        "fastlm.features needs the C++ extension fastlm._features, which is not built; "
                        "reinstall fastlm from source (pip install -e .)"
                    ) from e
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


# ----------------------------------------------------------------------------- input checks
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


# ----------------------------------------------------------------------------- vectorizers
class CountVectorizer:
    """Token counts as a CSR matrix, like ``sklearn.feature_extraction.text.CountVectorizer``.

    Options (scikit-learn's meaning): ``lowercase``, ``ngram_range``, ``analyzer``
    (``"word"``, a tokenizer, or a callable), ``max_df``/``min_df`` (int: documents, float:
    proportion), ``max_features``, ``vocabulary`` (a fixed vocabulary: a mapping term ->
    column or an iterable of terms; with a tokenizer analyzer a term is a tuple of ids),
    ``binary``, ``dtype``; and ``n_jobs``, the threads that count (None or -1: every CPU
    this process may use).
    """

    _param_names = ("lowercase", "ngram_range", "analyzer", "max_df", "min_df", "max_features", "vocabulary",
                    "binary", "dtype", "n_jobs")

    def __init__(self, *, lowercase=True, ngram_range=(1, 1), analyzer="word", max_df=1.0, min_df=1,
                 max_features=None, vocabulary=None, binary=False, dtype=np.int64, n_jobs=None):
        self.lowercase = lowercase
        self.vocabulary = vocabulary
        self.ngram_range = ngram_range
        self.analyzer = analyzer
        self.max_df = max_df
        self.min_df = min_df
        self.max_features = max_features
        self.binary = binary
        self.dtype = dtype
        self.n_jobs = n_jobs

    # -- scikit-learn's estimator protocol
    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._param_names}

    def set_params(self, **params):
        for name, value in params.items():
            if name not in self._param_names:
                raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- pickling (joblib, multiprocessing): the native vocabulary travels as its terms
    def __getstate__(self):
        state = dict(self.__dict__)
        if state.get("_vocab") is not None:
            state["_vocab"] = state["_vocab"].terms_bytes()
        return state

    def __setstate__(self, state):
        state = dict(state)
        if state.get("_vocab") is not None:
            state["_vocab"] = _native().Vocabulary.from_terms(list(state["_vocab"]))
        self.__dict__.update(state)

    # -- checks
    def _validate(self):
        _check_bool("lowercase", self.lowercase)
        _check_bool("binary", self.binary)
        ngr = self.ngram_range
        if (not isinstance(ngr, (tuple, list)) or len(ngr) != 2
                or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in ngr)):
            raise TypeError(f"ngram_range must be a tuple (min_n, max_n) of ints, got {ngr!r}")
        if ngr[0] > ngr[1]:
            raise ValueError(
                f"Invalid value for ngram_range={tuple(ngr)} lower boundary larger than the upper boundary."
            )
        if ngr[0] < 1:
            raise ValueError(f"ngram_range must have min_n >= 1, got {tuple(ngr)}")
        _check_df("max_df", self.max_df)
        _check_df("min_df", self.min_df)
        mf = self.max_features
        if mf is not None:
            if isinstance(mf, bool) or not isinstance(mf, numbers.Integral):
                raise TypeError(f"max_features must be None or an int >= 1, got {mf!r}")
            if mf < 1:
                raise ValueError(f"max_features must be None or an int >= 1, got {mf}")
        a = self.analyzer
        if isinstance(a, str):
            if a != "word":
                raise ValueError(
                    f"analyzer={a!r} is not supported: use 'word', a tokenizer (with encode_batch/encode) "
                    "or a callable returning a list of str"
                )
        elif not (_is_tokenizer(a) or callable(a)):
            raise TypeError(f"analyzer must be 'word', a tokenizer or a callable, got {type(a).__name__}")
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"dtype must be a numpy dtype, got {self.dtype!r}") from None
        if dt.kind not in "iuf":
            raise TypeError(f"dtype must be a numeric numpy dtype, got {dt}")
        _n_threads(self.n_jobs)

    def _kind(self):
        a = self.analyzer
        if isinstance(a, str):
            return "word"
        return "tokens" if _is_tokenizer(a) else "callable"

    def _check_fitted(self):
        if getattr(self, "_vocab", None) is None:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet: call fit or fit_transform first."
            )

    # -- counting (C++)
    def _count(self, docs, vocab, kind):
        """(vocab, indptr, indices, counts); learns the vocabulary when vocab is None."""
        nat = _native()
        threads = _n_threads(self.n_jobs)
        min_n, max_n = (int(n) for n in self.ngram_range)
        if kind == "word":
            prelowered = None
            if self.lowercase:
                sigma = [i for i, d in enumerate(docs) if _CAPITAL_SIGMA in d]
                if sigma:  # final/non-final sigma depends on context: let Python lower these
                    docs = list(docs)
                    flags = bytearray(len(docs))
                    for i in sigma:
                        docs[i] = docs[i].lower()
                        flags[i] = 1
                    prelowered = bytes(flags)
            if vocab is None:
                return nat.fit_words(docs, self.lowercase, prelowered, min_n, max_n, threads)
            return (vocab,) + tuple(nat.transform_words(vocab, docs, self.lowercase, prelowered, min_n, max_n, threads))
        if kind == "tokens":
            seqs = _encode_all(self.analyzer, docs)
            if len(seqs) != len(docs):
                raise ValueError(f"the tokenizer returned {len(seqs)} sequences for {len(docs)} documents")
            if vocab is None:
                return nat.fit_sequences(seqs, min_n, max_n, threads)
            return (vocab,) + tuple(nat.transform_sequences(vocab, seqs, min_n, max_n, threads))
        term_lists = []
        for i, d in enumerate(docs):
            terms = self.analyzer(d)
            if isinstance(terms, str):
                raise TypeError(f"the analyzer returned a str for document {i}; it must return a list of str")
            term_lists.append(terms if type(terms) is list else list(terms))
        if vocab is None:
            return nat.fit_terms(term_lists, threads)
        return (vocab,) + tuple(nat.transform_terms(vocab, term_lists, threads))

    def _fixed_vocabulary(self, kind):
        """The native vocabulary of the ``vocabulary`` option (scikit-learn's checks and messages)."""
        voc = self.vocabulary
        if isinstance(voc, str):
            raise TypeError("vocabulary must be a mapping or an iterable of terms, not a str")
        if isinstance(voc, (set, frozenset)):
            voc = sorted(voc)
        if hasattr(voc, "items"):
            voc = dict(voc)
            indices = set(voc.values())
            if len(indices) != len(voc):
                raise ValueError("Vocabulary contains repeated indices.")
            for i in range(len(voc)):
                if i not in indices:
                    raise ValueError(f"Vocabulary of size {len(voc)} doesn't contain index {i}.")
            terms = [None] * len(voc)
            for term, i in voc.items():
                terms[i] = term
        else:
            terms, seen = [], set()
            for term in voc:
                if term in seen:
                    raise ValueError(f"Duplicate term in vocabulary: {term!r}")
                seen.add(term)
                terms.append(term)
        if not terms:
            raise ValueError("empty vocabulary passed to fit")
        if kind == "tokens":
            keys = []
            for term in terms:
                ids = (term,) if isinstance(term, numbers.Integral) else tuple(term)
                if not ids or not all(isinstance(i, numbers.Integral) and 0 <= i < 2**32 for i in ids):
                    raise ValueError(f"with a tokenizer analyzer, vocabulary terms are tuples of token ids, got {term!r}")
                keys.append(np.array(ids, dtype=">u4").tobytes())
            return _native().Vocabulary.from_terms(keys)
        for term in terms:
            if not isinstance(term, str):
                raise TypeError(f"vocabulary terms must be str, got {type(term).__name__}")
        return _native().Vocabulary.from_terms(terms)

    def _fit_counts(self, raw_documents):
        """Learns the vocabulary; returns (indptr, indices, counts) over the kept columns."""
        self._validate()
        docs = _as_documents(raw_documents)
        kind = self._kind()
        if self.vocabulary is not None:  # fixed: counted as transform counts, nothing pruned
            vocab, indptr, indices, counts = self._count(docs, self._fixed_vocabulary(kind), kind)
            self._vocab = vocab
            self._fitted_kind = kind
            self._names = None
            self._vocabulary = None
            return indptr, indices, counts
        vocab, indptr, indices, counts = self._count(docs, None, kind)
        n_terms = len(vocab)
        if n_terms == 0:
            raise ValueError("empty vocabulary; perhaps the documents only contain stop words")
        n_doc = len(docs)
        max_df, min_df = self.max_df, self.min_df
        high = max_df if isinstance(max_df, numbers.Integral) else max_df * n_doc
        low = min_df if isinstance(min_df, numbers.Integral) else min_df * n_doc
        if high < low:
            raise ValueError("max_df corresponds to < documents than min_df")
        # scikit-learn's _limit_features, on the same arrays, so that ties break the same way.
        dfs = np.bincount(indices, minlength=n_terms)
        mask = (dfs <= high) & (dfs >= low)
        limit = self.max_features
        if limit is not None and mask.sum() > limit:
            if self.binary:
                tfs = dfs.astype(self._count_dtype())
            else:
                tfs = np.bincount(indices, weights=counts, minlength=n_terms).astype(self._count_dtype())
            mask_inds = (-tfs[mask]).argsort()[:limit]
            new_mask = np.zeros(n_terms, dtype=bool)
            new_mask[np.where(mask)[0][mask_inds]] = True
            mask = new_mask
        if not mask.all():
            kept = np.flatnonzero(mask)
            if len(kept) == 0:
                raise ValueError("After pruning, no terms remain. Try a lower min_df or a higher max_df.")
            vocab = vocab.subset(kept)
            new_index = (np.cumsum(mask) - 1).astype(np.int32)
            keep = mask[indices]
            kept_before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
            indptr = kept_before[indptr]
            indices = new_index[indices[keep]]
            counts = counts[keep]
        self._vocab = vocab
        self._fitted_kind = kind
        self._names = None
        self._vocabulary = None
        return indptr, indices, counts

    def _transform_counts(self, raw_documents):
        self._check_fitted()
        docs = _as_documents(raw_documents)
        _, indptr, indices, counts = self._count(docs, self._vocab, self._fitted_kind)
        return indptr, indices, counts

    def _count_dtype(self):
        return np.dtype(self.dtype)

    def _csr(self, indptr, indices, data):
        n_rows = len(indptr) - 1
        idx_dtype = np.int32 if len(indices) < 2**31 else np.int64
        return sp.csr_matrix(
            (data, indices.astype(idx_dtype, copy=False), indptr.astype(idx_dtype, copy=False)),
            shape=(n_rows, len(self._vocab)),
        )

    def _counts_matrix(self, indptr, indices, counts):
        data = np.ones(len(counts), dtype=self.dtype) if self.binary else counts.astype(self.dtype)
        return self._csr(indptr, indices, data)

    # -- public API
    def fit(self, raw_documents, y=None):
        """Learns the vocabulary of the documents (an iterable of str)."""
        self._fit_counts(raw_documents)
        return self

    def fit_transform(self, raw_documents, y=None):
        """Learns the vocabulary and returns the document-term count matrix (CSR)."""
        return self._counts_matrix(*self._fit_counts(raw_documents))

    def transform(self, raw_documents):
        """The document-term count matrix (CSR) over the fitted vocabulary."""
        return self._counts_matrix(*self._transform_counts(raw_documents))

    def get_feature_names_out(self, input_features=None):
        """The column names: the terms (token n-grams: their decoded text), as an object array."""
        self._check_fitted()
        if self._names is None:
            if self._fitted_kind == "tokens":
                token_bytes = token_bytes_fn(self.analyzer)
                cache = {}

                def piece(i):
                    b = cache.get(i)
                    if b is None:
                        b = cache[i] = bytes(token_bytes(int(i)))
                    return b

                names = [b"".join(piece(i) for i in np.frombuffer(key, dtype=">u4")).decode("utf-8", "backslashreplace")
                         for key in self._vocab.terms_bytes()]
            else:
                names = self._vocab.terms()
            arr = np.empty(len(names), dtype=object)
            arr[:] = names
            self._names = arr
        return self._names.copy()

    @property
    def vocabulary_(self) -> dict:
        """term -> column (token n-grams: tuple of ids -> column)."""
        self._check_fitted()
        if self._vocabulary is None:
            if self._fitted_kind == "tokens":
                keys = [tuple(int(i) for i in np.frombuffer(k, dtype=">u4")) for k in self._vocab.terms_bytes()]
            else:
                keys = self._vocab.terms()
            self._vocabulary = {k: i for i, k in enumerate(keys)}
        return self._vocabulary


class TfidfVectorizer(CountVectorizer):
    """TF-IDF features as a CSR matrix, like ``sklearn.feature_extraction.text.TfidfVectorizer``.

    On top of CountVectorizer's options: ``norm`` ("l2", "l1" or None, per row), ``use_idf``,
    ``smooth_idf`` (idf = ln((1 + n) / (1 + df)) + 1, else ln(n / df) + 1) and
    ``sublinear_tf`` (tf = 1 + ln(count)). ``dtype`` is float64 (or float32).
    """

    _param_names = CountVectorizer._param_names + ("norm", "use_idf", "smooth_idf", "sublinear_tf")

    def __init__(self, *, lowercase=True, ngram_range=(1, 1), analyzer="word", max_df=1.0, min_df=1,
                 max_features=None, vocabulary=None, binary=False, dtype=np.float64, norm="l2", use_idf=True,
                 smooth_idf=True, sublinear_tf=False, n_jobs=None):
        super().__init__(lowercase=lowercase, ngram_range=ngram_range, analyzer=analyzer, max_df=max_df,
                         min_df=min_df, max_features=max_features, vocabulary=vocabulary, binary=binary,
                         dtype=dtype, n_jobs=n_jobs)
        self.norm = norm
        self.use_idf = use_idf
        self.smooth_idf = smooth_idf
        self.sublinear_tf = sublinear_tf

    def _validate(self):
        super()._validate()
        if np.dtype(self.dtype) not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise TypeError(f"TfidfVectorizer's dtype must be float64 or float32, got {np.dtype(self.dtype)}")
        if self.norm not in ("l1", "l2", None):
            raise ValueError(f"norm must be 'l1', 'l2' or None, got {self.norm!r}")
        for name in ("use_idf", "smooth_idf", "sublinear_tf"):
            _check_bool(name, getattr(self, name))

    def _fit_idf(self, indices, n_samples):
        if not self.use_idf:
            self._idf = None
            return
        dtype = np.dtype(self.dtype)
        df = np.bincount(indices, minlength=len(self._vocab)).astype(dtype)
        # scikit-learn's TfidfTransformer.fit, operation for operation
        df += float(self.smooth_idf)
        n_samples += int(self.smooth_idf)
        idf = np.full_like(df, fill_value=n_samples, dtype=dtype)
        idf /= df
        np.log(idf, out=idf)
        idf += 1.0
        self._idf = idf

    def _weigh(self, indptr, indices, counts):
        norm = {None: 0, "l1": 1, "l2": 2}[self.norm]
        idf = None if self._idf is None else self._idf.astype(np.float64, copy=False)
        data = _native().tfidf(indptr, indices, counts, idf, bool(self.binary), bool(self.sublinear_tf), norm,
                               _n_threads(self.n_jobs))
        return self._csr(indptr, indices, data.astype(self.dtype, copy=False))

    def fit(self, raw_documents, y=None):
        """Learns the vocabulary and the idf."""
        indptr, indices, _ = self._fit_counts(raw_documents)
        self._fit_idf(indices, len(indptr) - 1)
        return self

    def fit_transform(self, raw_documents, y=None):
        """Learns the vocabulary and the idf; returns the TF-IDF matrix (CSR)."""
        indptr, indices, counts = self._fit_counts(raw_documents)
        self._fit_idf(indices, len(indptr) - 1)
        return self._weigh(indptr, indices, counts)

    def transform(self, raw_documents):
        """The TF-IDF matrix (CSR) over the fitted vocabulary and idf."""
        return self._weigh(*self._transform_counts(raw_documents))

    @property
    def idf_(self):
        """The inverse document frequency of each column (use_idf=True only)."""
        self._check_fitted()
        if self._idf is None:
            raise AttributeError("idf_ is only defined when use_idf=True")
        return self._idf


# ----------------------------------------------------------------------------- search index
_INDEX_FILE = "tfidf_index.json"
_INDEX_FORMAT = "fastlm.TfidfIndex"
_INDEX_VERSION = 1


class TfidfIndex:
    """TF-IDF retrieval over a fixed collection of texts.

    ``TfidfIndex(texts, ids=None, **options)`` fits a ``TfidfVectorizer(**options)`` (row
    norm l2) on the texts; ``search(query, k=5)`` returns the ``k`` texts most similar to the
    query by cosine similarity, best first (ties: collection order), as
    ``{"id", "text", "score"}`` dicts. Texts that share no term with the query are not
    returned. ``ids`` default to 0..n-1; they must be unique (and JSON values to ``save``).
    ``save(directory)`` writes ``tfidf_index.json`` (options, ids, texts, vocabulary) and
    ``tfidf_index.npz`` (the matrix and idf, plain arrays); ``TfidfIndex.load(directory)``
    reads them back without unpickling anything.
    """

    def __init__(self, texts, ids=None, **options):
        if "norm" in options and options["norm"] != "l2":
            raise ValueError("TfidfIndex scores by cosine similarity: norm must be 'l2'")
        texts = _as_documents(texts)
        if ids is None:
            ids = list(range(len(texts)))
        else:
            ids = list(ids)
            if len(ids) != len(texts):
                raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
            try:
                unique = len(set(ids)) == len(ids)
            except TypeError:
                raise TypeError("ids must be hashable (str or int)") from None
            if not unique:
                raise ValueError("ids must be unique")
        self.texts = texts
        self.ids = ids
        self.vectorizer = TfidfVectorizer(**options)
        self.matrix = self.vectorizer.fit_transform(texts) if texts else None

    def __len__(self):
        return len(self.texts)

    def search(self, query, k=5):
        """The k best texts for the query: a list of {"id", "text", "score"}, best first."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an int >= 1, got {k!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.matrix is None:
            return []
        q = self.vectorizer.transform([query])
        dense = np.zeros(self.matrix.shape[1])
        dense[q.indices] = q.data
        scores = self.matrix @ dense
        hits = np.flatnonzero(scores > 0)
        if len(hits) > k:  # keep the k best (ties broken by position) before sorting them
            part = np.argpartition(-scores[hits], k - 1)[:k]
            kth = scores[hits[part]].min()
            hits = hits[scores[hits] >= kth]
        order = hits[np.lexsort((hits, -scores[hits]))][:k]
        return [{"id": self.ids[i], "text": self.texts[i], "score": float(scores[i])} for i in order]

    # -- persistence
    def save(self, directory):
        """Writes the index to a directory (created if needed); every file is written atomically."""

        v = self.vectorizer
        if not isinstance(v.analyzer, str):
            raise ValueError("only an index with the word analyzer can be saved (the analyzer is not serializable)")
        options = {name: getattr(v, name) for name in v._param_names
                   if name not in ("analyzer", "n_jobs", "vocabulary")}
        options["ngram_range"] = list(options["ngram_range"])
        options["dtype"] = np.dtype(options["dtype"]).name
        for name in ("max_df", "min_df", "max_features"):
            if isinstance(options[name], numbers.Integral):
                options[name] = int(options[name])
            elif options[name] is not None:
                options[name] = float(options[name])
        meta = {
            "format": _INDEX_FORMAT,
            "version": _INDEX_VERSION,
            "options": options,
            "ids": self.ids,
            "texts": self.texts,
            "vocabulary": [] if self.matrix is None else list(v._vocab.terms()),
        }
        try:
            json.dumps(meta["ids"])
        except TypeError:
            raise ValueError("ids must be JSON values (str or int) to save the index") from None
        arrays = {}
        if self.matrix is not None:
            m = self.matrix
            arrays = {"indptr": m.indptr, "indices": m.indices, "data": m.data,
                      "shape": np.array(m.shape, dtype=np.int64)}
            if v._idf is not None:
                arrays["idf"] = v._idf
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        directory = Path(directory)
        atomic_write_bytes(directory / "tfidf_index.npz", buf.getvalue())
        atomic_write_json(directory / _INDEX_FILE, meta)

    @classmethod
    def load(cls, directory):
        """An index saved by ``save``."""
        directory = Path(directory)
        path = directory / _INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        meta = read_json(path)
        if not isinstance(meta, dict) or meta.get("format") != _INDEX_FORMAT:
            raise ValueError(f"{path} is not a fastlm TfidfIndex")
        if meta.get("version") != _INDEX_VERSION:
            raise ValueError(f"{path} has version {meta.get('version')!r}; this fastlm reads {_INDEX_VERSION}")
        try:
            options, ids, texts, terms = meta["options"], meta["ids"], meta["texts"], meta["vocabulary"]
            options["ngram_range"] = tuple(options["ngram_range"])
            options["dtype"] = np.dtype(options["dtype"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is incomplete: {e}") from None
        self = cls.__new__(cls)
        self.texts, self.ids = list(texts), list(ids)
        if len(self.texts) != len(self.ids):
            raise ValueError(f"{path}: ids and texts differ in length")
        self.vectorizer = v = TfidfVectorizer(**options)
        v._validate()
        with np.load(directory / "tfidf_index.npz", allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        if not self.texts:
            self.matrix = None
            return self
        try:
            shape = tuple(int(s) for s in arrays["shape"])
            self.matrix = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
            self.matrix.check_format(full_check=True)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{directory / 'tfidf_index.npz'} is not a valid index matrix: {e}") from None
        if shape != (len(self.texts), len(terms)):
            raise ValueError(f"{directory}: the matrix is {shape}, expected ({len(self.texts)}, {len(terms)})")
        v._vocab = _native().Vocabulary.from_terms(terms)
        v._fitted_kind = "word"
        v._names = v._vocabulary = None
        v._idf = arrays.get("idf")
        if v.use_idf and (v._idf is None or v._idf.shape != (len(terms),)):
            raise ValueError(f"{directory}: the idf does not match the vocabulary")
        return self
