"""``CountVectorizer`` and ``TfidfVectorizer``: scikit-learn's interface (``fit``, ``transform``,
``fit_transform``, ``get_feature_names_out``, ``vocabulary_``, ``idf_``) and options, returning
``scipy.sparse`` CSR matrices equal to scikit-learn's for the same tokenization.

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

scikit-learn's ``analyzer="char"`` and ``"char_wb"``, and the options ``stop_words`` (a list,
or ``"english"``: scikit-learn's list, shipped in ``stop_words.py``), ``token_pattern``,
``strip_accents`` ("ascii", "unicode" or a callable), ``tokenizer`` and ``preprocessor``
(callables) give the same terms as scikit-learn's; those terms are made in Python
(``analyzers.py``) and counted in C++. ``analyzer="multilingual"`` (fastlm's) adds character
bigrams for scripts written without spaces (see ``analyzers.py``).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse as sp

from ..tokenizer import token_bytes_fn
from ._native import _CAPITAL_SIGMA, _n_threads, _native
from .analyzers import DEFAULT_TOKEN_PATTERN, build_analyzer, compile_token_pattern, stop_word_set
from ._text import _as_documents, _check_bool, _check_df, _encode_all, _is_tokenizer

__all__ = ["CountVectorizer", "TfidfVectorizer", "NotFittedError"]


_STRING_ANALYZERS = ("word", "char", "char_wb", "multilingual")


class NotFittedError(ValueError, AttributeError):
    """The vectorizer is used before ``fit`` (same bases as scikit-learn's NotFittedError)."""


class CountVectorizer:
    """Token counts as a CSR matrix, like ``sklearn.feature_extraction.text.CountVectorizer``.

    Options (scikit-learn's meaning): ``lowercase``, ``ngram_range``, ``analyzer``
    (``"word"``, ``"char"``, ``"char_wb"``, fastlm's ``"multilingual"``, a tokenizer, or a
    callable), ``preprocessor``, ``tokenizer``, ``token_pattern``, ``stop_words``,
    ``strip_accents``, ``max_df``/``min_df`` (int: documents, float:
    proportion), ``max_features``, ``vocabulary`` (a fixed vocabulary: a mapping term ->
    column or an iterable of terms; with a tokenizer analyzer a term is a tuple of ids),
    ``binary``, ``dtype``; and ``n_jobs``, the threads that count (None or -1: every CPU
    this process may use).
    """

    _param_names = ("strip_accents", "lowercase", "preprocessor", "tokenizer", "stop_words", "token_pattern",
                    "ngram_range", "analyzer", "max_df", "min_df", "max_features", "vocabulary", "binary", "dtype",
                    "n_jobs")

    def __init__(self, *, strip_accents=None, lowercase=True, preprocessor=None, tokenizer=None, stop_words=None,
                 token_pattern=DEFAULT_TOKEN_PATTERN, ngram_range=(1, 1), analyzer="word", max_df=1.0, min_df=1,
                 max_features=None, vocabulary=None, binary=False, dtype=np.int64, n_jobs=None):
        self.strip_accents = strip_accents
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.stop_words = stop_words
        self.token_pattern = token_pattern
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
            if a not in _STRING_ANALYZERS:
                raise ValueError(
                    f"analyzer={a!r} is not supported: use 'word', 'char', 'char_wb', 'multilingual', a tokenizer "
                    "(with encode_batch/encode) or a callable returning a list of str"
                )
        elif not (_is_tokenizer(a) or callable(a)):
            raise TypeError(f"analyzer must be 'word', 'char', 'char_wb', 'multilingual', a tokenizer or a callable, "
                            f"got {type(a).__name__}")
        sa = self.strip_accents
        if not (sa is None or sa in ("ascii", "unicode") or callable(sa)):
            raise ValueError(f"strip_accents must be None, 'ascii', 'unicode' or a callable, got {sa!r}")
        for name in ("preprocessor", "tokenizer"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be None or a callable, got {type(getattr(self, name)).__name__}")
        stop_word_set(self.stop_words)
        if self.token_pattern is not None:
            compile_token_pattern(self.token_pattern)
        elif a in ("word", "multilingual") and self.tokenizer is None:
            raise ValueError("token_pattern=None needs a tokenizer= callable")
        if a == "multilingual" and (self.tokenizer is not None or self.token_pattern != DEFAULT_TOKEN_PATTERN):
            raise ValueError("analyzer='multilingual' uses the default token pattern; tokenizer= and token_pattern= "
                             "go with analyzer='word'")
        self._warn_unused()
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"dtype must be a numpy dtype, got {self.dtype!r}") from None
        if dt.kind not in "iuf":
            raise TypeError(f"dtype must be a numeric numpy dtype, got {dt}")
        _n_threads(self.n_jobs)

    def _warn_unused(self):
        """scikit-learn's warnings for options the analyzer does not use."""
        a = self.analyzer
        unused = []
        if a not in ("word", "multilingual"):
            unused += [n for n in ("stop_words", "tokenizer") if getattr(self, n) is not None]
            if self.token_pattern not in (None, DEFAULT_TOKEN_PATTERN):
                unused.append("token_pattern")
        if not isinstance(a, str):
            unused += [n for n in ("preprocessor", "strip_accents") if getattr(self, n) is not None]
            if tuple(self.ngram_range) != (1, 1) and not _is_tokenizer(a):
                unused.append("ngram_range")
        for name in unused:
            warnings.warn(f"The parameter {name!r} will not be used since analyzer={a!r}", UserWarning, stacklevel=4)
        if a == "word" and self.tokenizer is not None and self.token_pattern is not None:
            warnings.warn("The parameter 'token_pattern' will not be used since 'tokenizer' is not None",
                          UserWarning, stacklevel=4)

    def _kind(self):
        """How documents become terms: "word" (C++: the default word analyzer), "terms" (a
        string analyzer with options, in Python), "tokens" (a tokenizer) or "callable"."""
        a = self.analyzer
        if isinstance(a, str):
            plain = (self.tokenizer is None and self.preprocessor is None and self.stop_words is None
                     and self.strip_accents is None and self.token_pattern == DEFAULT_TOKEN_PATTERN)
            return "word" if a == "word" and plain else "terms"
        return "tokens" if _is_tokenizer(a) else "callable"

    def _analyzer_fn(self, kind):
        """text -> list of terms, for the kinds counted from Python's terms."""
        if kind == "callable":
            return self.analyzer
        return build_analyzer(self.analyzer, lowercase=self.lowercase, strip_accents=self.strip_accents,
                              preprocessor=self.preprocessor, tokenizer=self.tokenizer,
                              token_pattern=self.token_pattern, stop_words=self.stop_words,
                              ngram_range=self.ngram_range)

    def build_analyzer(self):
        """The function text -> list of terms this vectorizer counts (scikit-learn's method).
        Not for a tokenizer analyzer, whose terms are token ids."""
        self._validate()
        kind = self._kind()
        if kind == "tokens":
            raise TypeError("with a tokenizer analyzer the terms are token-id n-grams; encode with the tokenizer")
        if kind == "word":  # what the C++ counter computes
            return build_analyzer("word", lowercase=self.lowercase, ngram_range=self.ngram_range)
        return self._analyzer_fn(kind)

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
        analyze = self._analyzer_fn(kind)
        term_lists = []
        for i, d in enumerate(docs):
            terms = analyze(d)
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

    def __init__(self, *, strip_accents=None, lowercase=True, preprocessor=None, tokenizer=None, stop_words=None,
                 token_pattern=DEFAULT_TOKEN_PATTERN, ngram_range=(1, 1), analyzer="word", max_df=1.0, min_df=1,
                 max_features=None, vocabulary=None, binary=False, dtype=np.float64, norm="l2", use_idf=True,
                 smooth_idf=True, sublinear_tf=False, n_jobs=None):
        super().__init__(strip_accents=strip_accents, lowercase=lowercase, preprocessor=preprocessor,
                         tokenizer=tokenizer, stop_words=stop_words, token_pattern=token_pattern,
                         ngram_range=ngram_range, analyzer=analyzer, max_df=max_df,
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


