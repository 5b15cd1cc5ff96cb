"""The Python-side analyzers of ``CountVectorizer``/``TfidfVectorizer``: text -> list of terms.

scikit-learn's analyzers, step for step, so that the terms (and so the matrices) are equal:

- preprocessing: ``str.lower()`` (when ``lowercase``), then ``strip_accents`` ("ascii": NFKD,
  then drop what is not ASCII; "unicode": NFKD, then drop combining characters; or a
  callable), unless a ``preprocessor`` callable replaces both;
- ``"word"``: tokens from ``tokenizer`` (a callable) or the ``token_pattern`` regex (its one
  group when it has one), stop words removed, then n-grams of consecutive tokens joined by a
  space;
- ``"char"``: runs of two or more whitespace characters become one space, then every
  character n-gram of the text;
- ``"char_wb"``: the same whitespace folding, then the character n-grams of each
  whitespace-separated word padded with one space on each side (a word shorter than n gives
  one n-gram, itself padded).

And one analyzer of fastlm's own, for text with and without spaces between words:

- ``"multilingual"``: in scripts written without spaces (Han, Hiragana, Katakana, Hangul,
  Thai, Lao, Khmer, Myanmar) a run of characters gives its overlapping character bigrams (a
  one-character run gives itself, as Lucene's CJK bigram filter does); the rest gives the
  word analyzer's terms (the token pattern's words, stop words removed, ``ngram_range`` word
  n-grams). On text without such characters it equals ``"word"``. Stop words are removed
  from the character terms too (so "的" or "是" can be listed). Bigrams ranked the planted
  passage first more often than unigrams + bigrams on the retrieval check of
  ``bench/retrieval_scripts.py`` (figures in bench/RESULTS.md); a one-character query inside
  a longer run of the documents finds nothing.

The word analyzer with the default pattern and no other option is counted in C++ instead
(``vectorizers.py``); these functions serve every other case.
"""
from __future__ import annotations

import re
import unicodedata

from .stop_words import ENGLISH_STOP_WORDS

__all__ = ["strip_accents_ascii", "strip_accents_unicode", "build_analyzer", "DEFAULT_TOKEN_PATTERN",
           "UNSPACED_SCRIPTS"]

DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_WHITE_SPACES = re.compile(r"\s\s+")

# Unicode blocks of scripts written without spaces between words (and Hangul, whose words
# carry their particles attached): Thai, Lao, Myanmar, Hangul Jamo, Khmer, CJK punctuation's
# iteration marks excluded, Hiragana, Katakana (and its extensions), Hangul compatibility
# Jamo, CJK ideographs (extension A, the main block, compatibility), Hangul syllables,
# half-width Katakana, CJK extensions B and beyond.
UNSPACED_SCRIPTS = ("\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3005\u3040-\u30ff"
                    "\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
                    "\U00020000-\U0003134f")
_MULTILINGUAL = re.compile(rf"(?P<run>[{UNSPACED_SCRIPTS}]+)|(?P<word>(?:(?![{UNSPACED_SCRIPTS}])\w){{2,}})")


def strip_accents_unicode(s: str) -> str:
    """NFKD, then the combining characters dropped (scikit-learn's ``strip_accents="unicode"``)."""
    if s.isascii():  # nothing to strip
        return s
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def strip_accents_ascii(s: str) -> str:
    """NFKD, then every non-ASCII character dropped (scikit-learn's ``strip_accents="ascii"``)."""
    return unicodedata.normalize("NFKD", s).encode("ASCII", "ignore").decode("ASCII")


def stop_word_set(stop_words):
    """The stop words as a frozenset: None, ``"english"`` (the in-package list) or an iterable of str."""
    if stop_words is None:
        return None
    if isinstance(stop_words, str):
        if stop_words == "english":
            return ENGLISH_STOP_WORDS
        raise ValueError(f"not a built-in stop list: {stop_words!r} (use 'english', a list of str, or None)")
    try:
        words = frozenset(stop_words)
    except TypeError:
        raise TypeError(f"stop_words must be None, 'english' or a list of str, "
                        f"got {type(stop_words).__name__}") from None
    if not all(isinstance(w, str) for w in words):
        raise TypeError("stop_words must hold str only")
    return words


def compile_token_pattern(token_pattern):
    if not isinstance(token_pattern, str):
        raise TypeError(f"token_pattern must be a str (a regular expression), got {type(token_pattern).__name__}")
    try:
        pattern = re.compile(token_pattern)
    except re.error as e:
        raise ValueError(f"token_pattern {token_pattern!r} is not a valid regular expression: {e}") from None
    if pattern.groups > 1:
        raise ValueError("More than 1 capturing group in token pattern. Only a single group should be captured.")
    return pattern


def _preprocessor(lowercase, strip_accents, preprocessor):
    if preprocessor is not None:
        return preprocessor
    strip = strip_accents if callable(strip_accents) else \
        {None: None, "ascii": strip_accents_ascii, "unicode": strip_accents_unicode}[strip_accents]
    if lowercase and strip is not None:
        return lambda doc: strip(doc.lower())
    if lowercase:
        return str.lower
    if strip is not None:
        return strip
    return None


def _word_ngrams(tokens, stop, min_n, max_n):
    if stop is not None:
        tokens = [w for w in tokens if w not in stop]
    if max_n == 1:
        return tokens
    original = tokens
    n_original = len(original)
    tokens = list(original) if min_n == 1 else []
    if min_n == 1:
        min_n = 2
    for n in range(min_n, min(max_n + 1, n_original + 1)):
        for i in range(n_original - n + 1):
            tokens.append(" ".join(original[i:i + n]))
    return tokens


def _char_ngrams(text, min_n, max_n):
    text = _WHITE_SPACES.sub(" ", text)
    length = len(text)
    grams = []
    if min_n == 1:
        grams = list(text)
        min_n = 2
    for n in range(min_n, min(max_n + 1, length + 1)):
        for i in range(length - n + 1):
            grams.append(text[i:i + n])
    return grams


def _char_wb_ngrams(text, min_n, max_n):
    text = _WHITE_SPACES.sub(" ", text)
    grams = []
    for word in text.split():
        word = " " + word + " "
        length = len(word)
        for n in range(min_n, max_n + 1):
            offset = 0
            grams.append(word[offset:offset + n])
            while offset + n < length:
                offset += 1
                grams.append(word[offset:offset + n])
            if offset == 0:  # a word shorter than n: counted once
                break
    return grams


def _multilingual_terms(text, stop, min_n, max_n):
    words, terms = [], []
    for m in _MULTILINGUAL.finditer(text):
        run = m.group("run")
        if run is None:
            words.append(m.group("word"))
            continue
        grams = [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
        terms.extend(grams if stop is None else [g for g in grams if g not in stop])
    return _word_ngrams(words, stop, min_n, max_n) + terms


def build_analyzer(kind, *, lowercase=True, strip_accents=None, preprocessor=None, tokenizer=None,
                   token_pattern=DEFAULT_TOKEN_PATTERN, stop_words=None, ngram_range=(1, 1)):
    """A function text -> list of terms for ``kind`` ("word", "char", "char_wb" or
    "multilingual"), with scikit-learn's options (checked by the vectorizer)."""
    pre = _preprocessor(lowercase, strip_accents, preprocessor)
    min_n, max_n = int(ngram_range[0]), int(ngram_range[1])
    if kind in ("char", "char_wb"):
        grams = _char_ngrams if kind == "char" else _char_wb_ngrams
        if pre is None:
            return lambda doc: grams(doc, min_n, max_n)
        return lambda doc: grams(pre(doc), min_n, max_n)
    stop = stop_word_set(stop_words)
    if kind == "multilingual":
        return lambda doc: _multilingual_terms(pre(doc) if pre is not None else doc, stop, min_n, max_n)
    if tokenizer is None:
        pattern = compile_token_pattern(token_pattern)
        tokenize = pattern.findall
    else:
        tokenize = tokenizer

    def analyze(doc):
        if pre is not None:
            doc = pre(doc)
        return _word_ngrams(tokenize(doc), stop, min_n, max_n)

    return analyze
