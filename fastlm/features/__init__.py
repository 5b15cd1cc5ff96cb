"""Classic text features, fast and exact: token counts, TF-IDF, and a TF-IDF search index.

``CountVectorizer`` and ``TfidfVectorizer`` follow scikit-learn's interface (``fit``,
``transform``, ``fit_transform``, ``get_feature_names_out``, ``vocabulary_``, ``idf_``) and
options, and return ``scipy.sparse`` CSR matrices equal to scikit-learn's for the same
tokenization. The counting runs in C++ (``fastlm._features``) on several threads with the
GIL released; what is left in Python is numpy work on whole arrays.

``Word2Vec`` trains skip-gram or CBOW word vectors (negative sampling) in C++ on threads with
gensim's interface; its ``wv`` is a ``KeyedVectors`` (lookups, ``most_similar``, the word2vec
text and binary formats).

Submodules: ``vectorizers`` (``CountVectorizer``, ``TfidfVectorizer``, ``NotFittedError``;
its docstring explains the analyzers), ``analyzers`` (the analyzers made in Python: char,
char_wb, the word options, multilingual), ``stop_words`` (the English list), ``index``
(``TfidfIndex``), ``word2vec`` (``Word2Vec``), ``keyedvectors`` (``KeyedVectors``), ``_native`` (the C++
extension and its Unicode tables) and ``_text`` (checks on documents and options).
"""
from ._native import _native  # noqa: F401 - fastlm.features._native(), as before the split
from .index import TfidfIndex
from .keyedvectors import KeyedVectors
from .vectorizers import CountVectorizer, NotFittedError, TfidfVectorizer
from .word2vec import Word2Vec

__all__ = ["CountVectorizer", "TfidfVectorizer", "TfidfIndex", "NotFittedError", "Word2Vec", "KeyedVectors"]

# The public classes keep the module path they have always had (``fastlm.features.X``): in
# pickles, reprs and documentation.
for _cls in (CountVectorizer, TfidfVectorizer, TfidfIndex, NotFittedError, Word2Vec, KeyedVectors):
    _cls.__module__ = __name__
del _cls
