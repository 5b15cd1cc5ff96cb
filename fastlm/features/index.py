"""``TfidfIndex``: TF-IDF retrieval over a fixed collection of texts, saved and loaded as JSON and
plain arrays."""
from __future__ import annotations

import io
import json
import numbers
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._io import atomic_write_bytes, atomic_write_json, read_json
from ._native import _native
from ._text import _as_documents
from .vectorizers import TfidfVectorizer

__all__ = ["TfidfIndex"]

_INDEX_FILE = "tfidf_index.json"
_INDEX_FORMAT = "fastlm.TfidfIndex"
_INDEX_VERSION = 1


class TfidfIndex:
    """TF-IDF retrieval over a fixed collection of texts.

    ``TfidfIndex(texts, ids=None, **options)`` fits a ``TfidfVectorizer(**options)`` (row
    norm l2) on the texts, by default with ``analyzer="multilingual"``: scikit-learn's word
    terms for scripts written with spaces, character bigrams for runs of Chinese, Japanese,
    Korean, Thai, Lao, Khmer or Myanmar (see ``fastlm.features.analyzers``), so a question
    finds its passage with or without spaces between words. ``search(query, k=5)`` returns
    the ``k`` texts most similar to the query by cosine similarity, best first (ties:
    collection order), as ``{"id", "text", "score"}`` dicts. Texts that share no term with
    the query are not returned. ``ids`` default to 0..n-1; they must be unique (and JSON
    values to ``save``). ``save(directory)`` writes ``tfidf_index.json`` (options with the
    analyzer's name, ids, texts, vocabulary) and ``tfidf_index.npz`` (the matrix and idf,
    plain arrays); ``TfidfIndex.load(directory)`` reads them back without unpickling
    anything (a file without an analyzer name was written with "word"). An index with a
    callable analyzer or option cannot be saved.
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
        options.setdefault("analyzer", "multilingual")
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
        if not isinstance(v.analyzer, str) or any(
                callable(getattr(v, n)) for n in ("preprocessor", "tokenizer", "strip_accents")):
            raise ValueError("only an index with a named analyzer ('word', 'char', 'char_wb', 'multilingual') and no "
                             "callable option can be saved (a function is not serializable)")
        options = {name: getattr(v, name) for name in v._param_names
                   if name not in ("n_jobs", "vocabulary")}
        if isinstance(options["stop_words"], (set, frozenset, tuple, list)):
            options["stop_words"] = sorted(options["stop_words"])
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
            options.setdefault("analyzer", "word")  # files written before the analyzer was saved
            if not isinstance(options["analyzer"], str):
                raise TypeError("the analyzer must be a name")
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
        v._fitted_kind = v._kind()
        v._names = v._vocabulary = None
        v._idf = arrays.get("idf")
        if v.use_idf and (v._idf is None or v._idf.shape != (len(terms),)):
            raise ValueError(f"{directory}: the idf does not match the vocabulary")
        return self
