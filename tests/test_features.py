"""fastlm.features against scikit-learn: the same matrices (to 1e-9), feature names and errors.

The corpora are made here: random words with a Zipf-like spread, and hypothesis-drawn
Unicode text with the characters where a tokenizer is easiest to get wrong (combining
marks, U+0130, sharp s, capital sigma, digits, underscores, CJK, emoji, surrogates).
"""
import gzip
import base64
import random
import re
import sys

import numpy as np
import pytest
import scipy.sparse as sp

sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastlm import features  # noqa: E402
from fastlm.features import CountVectorizer, NotFittedError, TfidfIndex, TfidfVectorizer  # noqa: E402

TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")


def _corpus(seed, n_docs=60, n_words=400, max_len=80):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\u00e9\u00df\u0130\u03a3\u00c9"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(n_words)]
    weights = [1.0 / (i + 1) for i in range(n_words)]
    seps = [" ", " ", " ", ", ", ". ", "\n", "-", "_", "'", " 42 ", "\u3000", " \u00b7 "]
    docs = []
    for _ in range(n_docs):
        n = rng.randint(0, max_len)
        toks = rng.choices(words, weights, k=n)
        docs.append("".join(t + rng.choice(seps) for t in toks))
    return docs


def _same(a, b, tol=1e-9):
    """Same CSR shape and dtype, entries equal to tol (float32 is weighted in float64 here and in
    float32 by scikit-learn: equal to float32's rounding)."""
    assert sp.issparse(a) and a.format == "csr"
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    if a.dtype == np.float32:
        tol = max(tol, 1e-6)
    diff = abs(a - b)
    assert (diff.max() if diff.nnz else 0.0) <= tol


def _check_like_sklearn(cls, sk_cls, docs, transform_docs=None, **options):
    """Both fit_transform and transform agree, or both raise ValueError with the same text."""
    ours, theirs = cls(**options), sk_cls(**options)
    try:
        expected = theirs.fit_transform(docs)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            ours.fit_transform(docs)
        assert str(got.value) == str(e)
        return None
    got = ours.fit_transform(docs)
    _same(got, expected)
    assert list(ours.get_feature_names_out()) == list(theirs.get_feature_names_out())
    assert ours.vocabulary_ == theirs.vocabulary_
    if transform_docs is not None:
        _same(ours.transform(transform_docs), theirs.transform(transform_docs))
    if hasattr(theirs, "idf_") and options.get("use_idf", True):
        np.testing.assert_allclose(ours.idf_, theirs.idf_, rtol=1e-12)
    return got


# ----------------------------------------------------------------------------- the tokenizer
def test_word_tables_cover_every_code_point():
    """The C++ tokenizer equals re.findall(token_pattern, s.lower()) on every code point."""
    nat = features._native()
    skip = {0x03A3} | set(range(0xD800, 0xE000))  # sigma: lowered by Python; surrogates: not UTF-8
    cps = [c for c in range(0x110000) if c not in skip]
    for lower in (True, False):
        for start in range(0, len(cps), 1 << 17):
            chunk = cps[start:start + (1 << 17)]
            text = " ".join("x" + chr(c) + "y" for c in chunk)
            got = nat.word_tokens(text, lower)
            want = TOKEN_PATTERN.findall(text.lower() if lower else text)
            assert got == want


@pytest.mark.parametrize("text", [
    "\u0130stanbul \u0130I \u0130\u0130",  # U+0130 lowers to i + combining dot (a non-word char)
    "Stra\u00dfe STRASSE \u1e9e",  # sharp s stays, capital sharp s lowers to sharp s
    "\u03a3\u0391\u03a3 \u03bf\u03b4\u03bf\u03a3. \u03a3 A\u03a3",  # capital sigma: final or not
    "x\u0301y e\u0301te\u0301 a\u20dd",  # combining marks split words
    "\u65e5\u672c\u8a9e \u6f22\u5b57 \U0001f600\U0001f600 a\U0001f600b",  # CJK, emoji
    "__init__ _a a_ 3.14 1st 42 \u0661\u0662 \u00bd\u00bd",  # underscores, digits, numerics
    "\u212a\u212b K\u00c5",  # Kelvin and Angstrom signs lower to ASCII k / a-ring
    "lone \ud800 surrogate\udfff here",
])
def test_tricky_text_like_sklearn(text):
    docs = [text, text.upper(), text.lower(), "plain words here"]
    for lowercase in (True, False):
        _check_like_sklearn(CountVectorizer, sklearn_text.CountVectorizer, docs, docs[::-1],
                            lowercase=lowercase, ngram_range=(1, 2))


TRICKY = list("aAbBzZ_09 \n\t.,-'") + ["\u0130", "\u00df", "\u1e9e", "\u03a3", "\u03c3", "\u03c2", "\u0301", "\u0307",
                                        "\u00e9", "\u00c9", "\u65e5", "\u672c", "\U0001f600", "\u0661", "\u00bd",
                                        "\u212a", "\u3000", "\u00a0", "\ud800", "\u0345", "\u1f88"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(st.text(alphabet=st.sampled_from(TRICKY) | st.characters(), max_size=40), min_size=1, max_size=8),
    lowercase=st.booleans(),
    ngram=st.sampled_from([(1, 1), (1, 2), (2, 3)]),
    n_jobs=st.sampled_from([1, 2, 3]),
)
def test_random_unicode_like_sklearn(docs, lowercase, ngram, n_jobs):
    options = dict(lowercase=lowercase, ngram_range=ngram)
    ours = CountVectorizer(n_jobs=n_jobs, **options)
    theirs = sklearn_text.CountVectorizer(**options)
    try:
        expected = theirs.fit_transform(docs)
    except ValueError as e:
        with pytest.raises(ValueError, match="empty vocabulary"):
            ours.fit_transform(docs)
        assert "empty vocabulary" in str(e)
        return
    _same(ours.fit_transform(docs), expected)
    assert list(ours.get_feature_names_out()) == list(theirs.get_feature_names_out())
    _same(TfidfVectorizer(n_jobs=n_jobs, **options).fit_transform(docs),
          sklearn_text.TfidfVectorizer(**options).fit_transform(docs))


# ----------------------------------------------------------------------------- options
TFIDF_OPTIONS = [
    {},
    {"norm": "l1"},
    {"norm": None},
    {"use_idf": False},
    {"smooth_idf": False},
    {"sublinear_tf": True},
    {"sublinear_tf": True, "norm": "l1", "smooth_idf": False},
    {"binary": True},
    {"lowercase": False},
    {"ngram_range": (1, 3)},
    {"ngram_range": (2, 2), "max_features": 40},
    {"min_df": 2},
    {"min_df": 0.05, "max_df": 0.5},
    {"max_df": 3},
    {"max_df": 0.9, "min_df": 3, "max_features": 25},
    {"max_features": 1},
    {"max_features": 100, "binary": True},
    {"dtype": np.float32},
    {"min_df": 0.9, "max_df": 0.1},  # max_df corresponds to < documents than min_df
    {"min_df": 1000},  # nothing remains
]


@pytest.mark.parametrize("options", TFIDF_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("n_jobs", [1, 2])
def test_tfidf_options_like_sklearn(options, n_jobs):
    docs = _corpus(seed=len(str(options)) * 7 + n_jobs)
    held_out = _corpus(seed=99, n_docs=20)
    tol_options = dict(options)
    ours = _check_like_sklearn(lambda **o: TfidfVectorizer(n_jobs=n_jobs, **o), sklearn_text.TfidfVectorizer,
                               docs, held_out, **tol_options)
    if ours is not None:
        assert ours.dtype == np.dtype(options.get("dtype", np.float64))


@pytest.mark.parametrize("options", [
    {}, {"binary": True}, {"ngram_range": (1, 2), "min_df": 2}, {"max_features": 30}, {"max_df": 0.3},
    {"dtype": np.int32}, {"lowercase": False, "max_features": 10, "ngram_range": (1, 2)},
])
def test_counts_like_sklearn(options):
    docs = _corpus(seed=3)
    _check_like_sklearn(CountVectorizer, sklearn_text.CountVectorizer, docs, _corpus(seed=4, n_docs=10), **options)


def test_max_features_ties_break_like_sklearn():
    # every term has the same total count: which ones survive is decided by the argsort
    docs = [" ".join(f"w{i:03d}" for i in range(j, j + 50)) for j in range(0, 500, 50)]
    for cls, sk in ((CountVectorizer, sklearn_text.CountVectorizer), (TfidfVectorizer, sklearn_text.TfidfVectorizer)):
        for limit in (1, 7, 100, 333):
            _check_like_sklearn(cls, sk, docs, docs[:3], max_features=limit)


def test_fixed_vocabulary_like_sklearn():
    docs = _corpus(seed=12)
    learned = list(sklearn_text.CountVectorizer().fit(docs).get_feature_names_out())
    rng = random.Random(0)
    picked = rng.sample(learned, 30) + ["absent", "\u00e9t\u00e9 x"]
    as_dict = {t: i for i, t in enumerate(reversed(picked))}
    for voc in (picked, as_dict, set(picked)):
        for cls, sk in ((CountVectorizer, sklearn_text.CountVectorizer),
                        (TfidfVectorizer, sklearn_text.TfidfVectorizer)):
            _check_like_sklearn(cls, sk, docs, docs[:7], vocabulary=voc, ngram_range=(1, 2), min_df=3)
    for bad, message in (([], "empty vocabulary"), (["a", "a"], "Duplicate term"), ({"a": 0, "b": 2}, "index 1"),
                         ({"a": 0, "b": 0}, "repeated indices")):
        with pytest.raises(ValueError, match=message):
            CountVectorizer(vocabulary=bad).fit(docs)
    with pytest.raises(TypeError, match="str"):
        CountVectorizer(vocabulary=[1, 2]).fit(docs)
    v = CountVectorizer(analyzer=_ToyTokenizer(), vocabulary=[(98, 99), 97], ngram_range=(1, 2)).fit(["abc"])
    assert v.transform(["abcabc", "x"]).toarray().tolist() == [[2, 2], [0, 0]]
    with pytest.raises(ValueError, match="tuples of token ids"):
        CountVectorizer(analyzer=_ToyTokenizer(), vocabulary=["ab"]).fit(["abc"])


def test_threads_give_the_same_matrix():
    docs = _corpus(seed=11, n_docs=300)
    ref = TfidfVectorizer(n_jobs=1, ngram_range=(1, 2)).fit_transform(docs)
    for n_jobs in (2, 3, 8, None):
        v = TfidfVectorizer(n_jobs=n_jobs, ngram_range=(1, 2))
        got = v.fit_transform(docs)
        assert (got != ref).nnz == 0
        assert got.has_sorted_indices
        assert (v.transform(docs) != ref).nnz == 0


def test_fit_then_transform_equals_fit_transform():
    docs = _corpus(seed=5)
    v = TfidfVectorizer(sublinear_tf=True)
    a = v.fit_transform(docs)
    b = TfidfVectorizer(sublinear_tf=True).fit(docs).transform(docs)
    assert (a != b).nnz == 0


def test_inputs_other_than_lists():
    docs = _corpus(seed=6, n_docs=10)
    ref = CountVectorizer().fit_transform(docs)
    assert (CountVectorizer().fit_transform(iter(docs)) != ref).nnz == 0
    assert (CountVectorizer().fit_transform(tuple(docs)) != ref).nnz == 0
    assert (CountVectorizer().fit_transform([d.encode() for d in docs]) != ref).nnz == 0
    assert (CountVectorizer().fit_transform(np.array(docs, dtype=object)) != ref).nnz == 0


def test_pickle_round_trip():
    import pickle

    docs = _corpus(seed=13)
    v = TfidfVectorizer(ngram_range=(1, 2)).fit(docs)
    w = pickle.loads(pickle.dumps(v))
    assert (w.transform(docs) != v.transform(docs)).nnz == 0
    assert list(w.get_feature_names_out()) == list(v.get_feature_names_out())
    assert pickle.loads(pickle.dumps(TfidfVectorizer())).get_params() == TfidfVectorizer().get_params()


def test_sklearn_clone_and_params():
    from sklearn.base import clone

    v = TfidfVectorizer(min_df=2, ngram_range=(1, 2))
    c = clone(v)
    assert c.get_params() == v.get_params() and c is not v
    assert "min_df=2" in repr(v)
    with pytest.raises(ValueError, match="invalid parameter"):
        v.set_params(tokenizer_pattern="x")
    assert v.set_params(token_pattern=r"\w+").token_pattern == r"\w+"


# ----------------------------------------------------------------------------- other analyzers
def test_callable_analyzer_like_sklearn():
    docs = _corpus(seed=8)

    def analyzer(doc):
        return [w[::-1] for w in doc.split()] + ["\u03a3" + doc[:1]]

    _check_like_sklearn(TfidfVectorizer, sklearn_text.TfidfVectorizer, docs, docs[:5], analyzer=analyzer)
    _check_like_sklearn(CountVectorizer, sklearn_text.CountVectorizer, docs, docs[:5], analyzer=analyzer,
                        max_features=20)
    with pytest.raises(TypeError, match="list of str"):
        CountVectorizer(analyzer=lambda d: d).fit(docs)
    with pytest.raises(TypeError, match="non-str"):
        CountVectorizer(analyzer=lambda d: [1, 2]).fit(docs)


def _tiktoken_encoding(shared_data):
    tiktoken = pytest.importorskip("tiktoken")
    path = shared_data / "r50k_base.tiktoken.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    ranks = {}
    for line in gzip.decompress(path.read_bytes()).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("r50k_test", pat_str=pat, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.mark.parametrize("ngram_range", [(1, 1), (1, 2)])
def test_tokenizer_analyzer_like_sklearn(shared_data, ngram_range):
    enc = _tiktoken_encoding(shared_data)
    docs = _corpus(seed=9, n_docs=40) + ["Hello world <|endoftext|> caf\u00e9 \U0001f600"]
    lo, hi = ngram_range

    def sk_analyzer(doc):  # the same terms, spelled as strings of ids
        ids = enc.encode_ordinary(doc)
        return [" ".join(map(str, ids[i:i + n])) for n in range(lo, hi + 1) for i in range(len(ids) - n + 1)]

    ours = TfidfVectorizer(analyzer=enc, ngram_range=ngram_range)
    theirs = sklearn_text.TfidfVectorizer(analyzer=sk_analyzer)
    got, expected = ours.fit_transform(docs), theirs.fit_transform(docs)
    # columns: ours in id-sequence order, scikit-learn's in string order; match them by terms
    perm = [theirs.vocabulary_[" ".join(map(str, key))] for key in ours.vocabulary_]
    assert list(ours.vocabulary_.values()) == list(range(len(perm)))
    _same(got, expected[:, perm])
    _same(ours.transform(docs[:4]), theirs.transform(docs[:4])[:, perm])
    keys = list(ours.vocabulary_)
    assert keys == sorted(keys)
    names = ours.get_feature_names_out()
    for key, name in zip(keys[:200], names[:200]):
        assert name == b"".join(enc.decode_single_token_bytes(i) for i in key).decode("utf-8", "backslashreplace")


class _ToyTokenizer:
    """A fastlm.Tokenizer-shaped object: encode_batch and token_bytes."""

    def encode_batch(self, texts, num_threads=None):
        return [list(t.encode()) for t in texts]

    def token_bytes(self, i):
        return bytes([i])


def test_tokenizer_interface_without_tiktoken():
    docs = ["abc", "abd", "\u00e9"]
    v = CountVectorizer(analyzer=_ToyTokenizer())
    x = v.fit_transform(docs).toarray()
    assert list(v.vocabulary_) == [(97,), (98,), (99,), (100,), (0xA9,), (0xC3,)]
    assert list(v.get_feature_names_out()) == ["a", "b", "c", "d", "\\xa9", "\\xc3"]
    assert x.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]
    v2 = CountVectorizer(analyzer=_ToyTokenizer(), ngram_range=(2, 2)).fit(docs)
    assert list(v2.get_feature_names_out()) == ["ab", "bc", "bd", "\u00e9"]


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    docs = ["some text here", "more text"]
    with pytest.raises(ValueError, match="string object received"):
        CountVectorizer().fit("one document")
    with pytest.raises(TypeError, match="document 1 is a NoneType"):
        CountVectorizer().fit(["ok", None])
    with pytest.raises(TypeError, match="document 0 is a float"):
        TfidfVectorizer().fit([float("nan")])
    with pytest.raises(TypeError, match="iterable"):
        CountVectorizer().fit(42)
    with pytest.raises(ValueError, match="lower boundary larger"):
        CountVectorizer(ngram_range=(2, 1)).fit(docs)
    with pytest.raises(ValueError, match="min_n >= 1"):
        CountVectorizer(ngram_range=(0, 1)).fit(docs)
    with pytest.raises(TypeError, match="ngram_range"):
        CountVectorizer(ngram_range=2).fit(docs)
    with pytest.raises(ValueError, match="norm"):
        TfidfVectorizer(norm="l3").fit(docs)
    with pytest.raises(ValueError, match="max_df"):
        CountVectorizer(max_df=1.5).fit(docs)
    with pytest.raises(ValueError, match="min_df"):
        CountVectorizer(min_df=-1).fit(docs)
    with pytest.raises(TypeError, match="max_df"):
        CountVectorizer(max_df="all").fit(docs)
    with pytest.raises(ValueError, match="max_features"):
        CountVectorizer(max_features=0).fit(docs)
    with pytest.raises(TypeError, match="max_features"):
        CountVectorizer(max_features=2.5).fit(docs)
    with pytest.raises(ValueError, match="analyzer='chars'"):
        CountVectorizer(analyzer="chars").fit(docs)
    with pytest.raises(TypeError, match="analyzer"):
        CountVectorizer(analyzer=3).fit(docs)
    with pytest.raises(ValueError, match="n_jobs"):
        CountVectorizer(n_jobs=0).fit(docs)
    with pytest.raises(TypeError, match="dtype"):
        TfidfVectorizer(dtype=np.int64).fit(docs)
    with pytest.raises(TypeError, match="lowercase"):
        CountVectorizer(lowercase="yes").fit(docs)
    with pytest.raises(ValueError, match="empty vocabulary"):
        CountVectorizer().fit(["a b c", "", "!!"])
    with pytest.raises(ValueError, match="empty vocabulary"):
        CountVectorizer().fit([])
    with pytest.raises(ValueError, match="max_df corresponds to < documents than min_df"):
        CountVectorizer(min_df=2, max_df=1).fit(docs)
    with pytest.raises(ValueError, match="no terms remain"):
        CountVectorizer(min_df=2, max_df=2).fit(["aa bb", "cc dd"])
    for method in ("transform", "get_feature_names_out"):
        with pytest.raises(NotFittedError, match="not fitted"):
            getattr(TfidfVectorizer(), method)(*([docs] if method == "transform" else []))
    with pytest.raises(AttributeError):
        TfidfVectorizer().vocabulary_
    with pytest.raises(AttributeError, match="use_idf"):
        TfidfVectorizer(use_idf=False).fit(docs).idf_
    with pytest.raises(ValueError, match="string object received"):
        CountVectorizer().fit(docs).transform("text")


def test_native_checks():
    nat = features._native()
    with pytest.raises(ValueError, match="out of range"):
        nat.fit_sequences([[1, -2]], 1, 1, 1)
    with pytest.raises(TypeError, match="integers"):
        nat.fit_sequences([[1, "a"]], 1, 1, 1)
    with pytest.raises(ValueError, match="n-gram"):
        nat.fit_words(["a"], True, None, 2, 1, 1)
    with pytest.raises(ValueError, match="n_threads"):
        nat.fit_words(["a"], True, None, 1, 1, 0)
    with pytest.raises(ValueError, match="duplicate"):
        nat.Vocabulary.from_terms(["a", "a"])
    with pytest.raises(ValueError, match="idf"):
        nat.tfidf(np.array([0, 1]), np.array([5], dtype=np.int32), np.array([1], dtype=np.int32),
                  np.ones(3), False, False, 2, 1)


# ----------------------------------------------------------------------------- TfidfIndex
def _passages(seed=0, n=200):
    rng = random.Random(seed)
    words = "river stone market winter garden lamp copper harbor violin meadow signal ledger orbit canyon".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def test_index_ranks_the_planted_fact_first():
    texts = _passages()
    fact = "The capital of Zanzibaria is Quelltown, founded by the cartographer Oyelaran in 1807."
    texts[137] = texts[137][:80] + " " + fact + " " + texts[137][80:]
    index = TfidfIndex(texts, ids=[f"p{i}" for i in range(len(texts))])
    hits = index.search("What is the capital of Zanzibaria?", k=3)
    assert hits[0]["id"] == "p137" and hits[0]["text"] == texts[137]
    assert set(hits[0]) == {"id", "text", "score"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1 + 1e-12
    assert index.search("who founded Quelltown", k=1)[0]["id"] == "p137"
    assert index.search("zzzz qqqq") == []
    assert len(index) == len(texts)


def test_index_scores_are_cosine_similarities():
    texts = _passages(seed=2, n=30)
    index = TfidfIndex(texts, sublinear_tf=True)
    ref = sklearn_text.TfidfVectorizer(sublinear_tf=True)
    m = ref.fit_transform(texts)
    q = ref.transform(["copper lamp harbor harbor"])
    want = (m @ q.T).toarray().ravel()
    hits = index.search("copper lamp harbor harbor", k=10)
    order = sorted(range(len(texts)), key=lambda i: (-want[i], i))[:10]
    assert [h["id"] for h in hits] == order
    np.testing.assert_allclose([h["score"] for h in hits], want[order], rtol=1e-12)


def test_index_save_and_load(tmp_path):
    texts = _passages(seed=3, n=50) + ["\u0130stanbul \u03a3\u039f\u03a6\u0399\u0391 caf\u00e9 \U0001f600 text"]
    index = TfidfIndex(texts, ids=list(range(100, 151)), ngram_range=(1, 2), min_df=1)
    index.save(tmp_path / "idx")
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.endswith(".tmp")]
    loaded = TfidfIndex.load(tmp_path / "idx")
    for query in ("garden lamp", "\u0130stanbul", "\u03c3\u03bf\u03c6\u03b9\u03b1", "violin canyon orbit"):
        assert loaded.search(query, k=5) == index.search(query, k=5)
    # U+0130 lowers to "i" + U+0307 (not a word character): the token is "stanbul"
    assert loaded.search("\u0130stanbul", k=1)[0]["id"] == 150
    assert loaded.search("istanbul") == []


def test_index_bad_inputs(tmp_path):
    texts = _passages(n=5)
    with pytest.raises(ValueError, match="ids"):
        TfidfIndex(texts, ids=[1, 2])
    with pytest.raises(ValueError, match="unique"):
        TfidfIndex(texts, ids=[1, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="norm"):
        TfidfIndex(texts, norm="l1")
    with pytest.raises(ValueError, match="string object received"):
        TfidfIndex("one text")
    index = TfidfIndex(texts)
    with pytest.raises(TypeError, match="query"):
        index.search(["a list"])
    for k in (0, -1, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="k"):
            index.search("river", k=k)
    with pytest.raises(FileNotFoundError):
        TfidfIndex.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tfidf_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="tfidf_index.json"):
        TfidfIndex.load(tmp_path / "bad")
    with pytest.raises(ValueError, match="named analyzer"):
        TfidfIndex(texts, analyzer=str.split).save(tmp_path / "x")
    with pytest.raises(ValueError, match="callable option"):
        TfidfIndex(texts, strip_accents=str.upper).save(tmp_path / "x")
