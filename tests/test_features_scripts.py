"""Features for every script: scikit-learn's char/char_wb analyzers and text options, equal to
scikit-learn's output, and retrieval over Chinese, Japanese, Thai and mixed text with the
index's default analyzer ("multilingual")."""
import json
import random
import warnings
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.features import CountVectorizer, TfidfIndex, TfidfVectorizer
from fastlm.features.stop_words import ENGLISH_STOP_WORDS

from test_features import _check_like_sklearn

sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")

DATA = json.loads((Path(__file__).parent / "data" / "multilingual_passages.json").read_text(encoding="utf-8"))

# Letters with accents and ligatures, decomposed forms, Greek sigma, CJK, kana, Thai, Hangul,
# digits, punctuation and every kind of whitespace run.
_PIECES = (list("abcdefgh xyzAEIOU ")
           + ["café", "Ångström", "naïve", "e\u0301", "ﬁ", "İ", "ß", "ΣΟΦΙΑ", "σς"]
           + ["自然语言处理", "什么", "日本語のテキスト", "カタカナ", "ภาษาไทย", "한국어", "ｱｲｳ"]
           + ["42", "x_1", "—", "?!", "  ", "\t", "\n\n", "the", "and", "of", "is", "about"])


def _random_docs(seed, n=40):
    rng = random.Random(seed)
    return ["".join(rng.choice(_PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(0, 25)))
            for _ in range(n)]


_OPTIONS = [
    {"analyzer": "char"},
    {"analyzer": "char", "ngram_range": (1, 3), "lowercase": False},
    {"analyzer": "char", "ngram_range": (2, 4), "strip_accents": "ascii"},
    {"analyzer": "char_wb", "ngram_range": (2, 5)},
    {"analyzer": "char_wb", "ngram_range": (1, 3), "strip_accents": "unicode", "min_df": 2},
    {"analyzer": "char_wb", "ngram_range": (3, 3), "max_features": 50},
    {"stop_words": "english"},
    {"stop_words": ["the", "and", "café", "什么"], "ngram_range": (1, 3)},
    {"strip_accents": "unicode", "lowercase": False},
    {"strip_accents": "ascii", "stop_words": "english", "ngram_range": (1, 2)},
    {"token_pattern": r"(?u)\b\w+\b"},
    {"token_pattern": r"\S+", "ngram_range": (2, 2)},
    {"token_pattern": r"(\w)\w"},  # one group: the group is the token
    {"tokenizer": str.split, "token_pattern": None},
    {"tokenizer": lambda s: s.split("a"), "token_pattern": None, "stop_words": ["b"], "ngram_range": (1, 2)},
    {"preprocessor": str.upper, "token_pattern": r"\w"},
    {"analyzer": "char", "preprocessor": lambda s: s[::-1], "ngram_range": (2, 2)},
]


@pytest.mark.parametrize("options", _OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())[:60])
def test_analyzers_and_options_like_sklearn(options):
    docs, others = _random_docs(seed=len(str(options))), _random_docs(seed=99, n=15)
    _check_like_sklearn(CountVectorizer, sklearn_text.CountVectorizer, docs, others, **options)
    _check_like_sklearn(TfidfVectorizer, sklearn_text.TfidfVectorizer, docs, others, sublinear_tf=True, **options)


def test_build_analyzer_like_sklearn():
    docs = _random_docs(seed=5, n=20)
    for options in _OPTIONS + [{}, {"ngram_range": (1, 3)}]:
        ours = CountVectorizer(**options).build_analyzer()
        theirs = sklearn_text.CountVectorizer(**options).build_analyzer()
        assert [ours(d) for d in docs] == [theirs(d) for d in docs]


def test_english_stop_words_are_sklearns():
    assert ENGLISH_STOP_WORDS == sklearn_text.ENGLISH_STOP_WORDS


def test_bad_options_raise_clear_errors():
    docs = ["some text here", "more text"]
    cases = [({"strip_accents": "latin"}, ValueError, "strip_accents"),
             ({"token_pattern": r"(a)(b)"}, ValueError, "capturing group"),
             ({"token_pattern": "("}, ValueError, "not a valid regular expression"),
             ({"token_pattern": 3}, TypeError, "token_pattern"),
             ({"token_pattern": None}, ValueError, "tokenizer"),
             ({"stop_words": "french"}, ValueError, "stop list"),
             ({"stop_words": [1, 2]}, TypeError, "stop_words"),
             ({"stop_words": 5}, TypeError, "stop_words"),
             ({"tokenizer": "split"}, TypeError, "tokenizer"),
             ({"preprocessor": 1}, TypeError, "preprocessor"),
             ({"analyzer": "multilingual", "tokenizer": str.split}, ValueError, "multilingual")]
    for options, exc, message in cases:
        with pytest.raises(exc, match=message):
            TfidfVectorizer(**options).fit(docs)
    with pytest.warns(UserWarning, match="'stop_words' will not be used"):
        CountVectorizer(analyzer="char", stop_words="english").fit(docs)
    with pytest.warns(UserWarning, match="'token_pattern' will not be used"):
        CountVectorizer(tokenizer=str.split).fit(docs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CountVectorizer(analyzer="char_wb", ngram_range=(2, 3)).fit(docs)


# ----------------------------------------------------------------------------- retrieval
def _index():
    return TfidfIndex(list(DATA["passages"].values()), ids=list(DATA["passages"]), sublinear_tf=True)


def test_multilingual_equals_word_without_unspaced_scripts():
    docs = _random_docs(seed=3)
    docs = ["".join(c for c in d if not ("\u0e00" <= c <= "\u0e7f" or c >= "\u1100")) for d in docs]
    for options in ({}, {"ngram_range": (1, 2), "stop_words": "english", "strip_accents": "unicode"}):
        a = TfidfVectorizer(analyzer="multilingual", **options).fit(docs)
        b = sklearn_text.TfidfVectorizer(**options).fit(docs)
        assert list(a.get_feature_names_out()) == list(b.get_feature_names_out())
        assert abs(a.transform(docs) - b.transform(docs)).max() <= 1e-12


def test_multilingual_terms():
    analyze = CountVectorizer(analyzer="multilingual", stop_words=["是", "中"]).build_analyzer()
    # words first, then each run's bigrams; a one-character run is itself; stop words go
    assert analyze("什么是NLP? 自然语言 a 中 是") == ["nlp", "什么", "么是", "自然", "然语", "语言"]
    assert analyze("富士山の標高") == ["富士", "士山", "山の", "の標", "標高"]


@pytest.mark.parametrize("lang", ["zh", "ja", "mix", "th", "en"])
def test_planted_passage_ranks_first_in_each_language(lang):
    index = _index()
    questions = [(q, want) for q, want in DATA["questions"] if want.startswith(lang + "-")]
    assert questions
    for question, want in questions:
        assert index.search(question, k=1)[0]["id"] == want, question
    if lang in ("zh", "ja"):  # scikit-learn's word analyzer takes a whole sentence for one word
        word = TfidfIndex(list(DATA["passages"].values()), ids=list(DATA["passages"]), analyzer="word")
        assert sum(bool(word.search(q, k=1)) and word.search(q, k=1)[0]["id"] == w for q, w in questions) \
            < len(questions)


def test_multilingual_index_save_and_load(tmp_path):
    texts = list(DATA["passages"].values())
    index = TfidfIndex(texts, stop_words=["的", "是"], strip_accents="unicode", ngram_range=(1, 2))
    index.save(tmp_path / "idx")
    loaded = TfidfIndex.load(tmp_path / "idx")
    assert loaded.vectorizer.analyzer == "multilingual" and loaded.vectorizer.stop_words == ["是", "的"]
    for question, _ in DATA["questions"]:
        assert loaded.search(question, k=3) == index.search(question, k=3)


def test_question_answering_cites_the_chinese_source(tmp_path):
    text = "自然语言处理 机器翻译 情感分析 中文分词 过拟合 " * 4
    tok = fastlm.Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    fastlm.GPT(fastlm.GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=16,
                                eos_token_id=tok.eot_token)).save_pretrained(tmp_path)
    tok.save(tmp_path)
    documents = {f"{name}.txt": passage for name, passage in DATA["passages"].items() if name.startswith("zh-")}
    qa = fastlm.pipeline("question-answering", model=str(tmp_path), documents=documents, max_new_tokens=4)
    out = qa("什么是自然语言处理?")
    assert out["grounded"] and out["sources"][0]["document"] == "zh-nlp.txt"
    assert out["sources"][0]["passage"] == DATA["passages"]["zh-nlp"]
    assert qa("怎样缓解过拟合？")["sources"][0]["document"] == "zh-overfit.txt"
