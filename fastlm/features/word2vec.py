"""``Word2Vec``: skip-gram and CBOW word vectors with negative sampling, trained in C++.

gensim's interface and defaults where it has them::

    model = Word2Vec(sentences, vector_size=100, window=5, min_count=5, sg=0, negative=5,
                     epochs=5, workers=3, seed=1, alpha=0.025, min_alpha=0.0001, sample=1e-3)
    model.wv["king"]; model.wv.most_similar(positive=["king", "woman"], negative=["man"])
    model.wv.similarity("king", "queen"); model.wv.key_to_index; model.wv.vectors
    model.save("w2v"); Word2Vec.load("w2v")              # a folder: JSON + safetensors, no pickle
    model.wv.save_word2vec_format("w2v.txt")             # or binary=True; gensim reads both

``sentences`` is one of: an iterable of token lists (read once, so a generator will do); a
path to a text file (``str`` or ``os.PathLike``; one sentence a line, tokens split on
whitespace, read in bounded pieces; also ``corpus_file=``); or, with ``tokenizer=`` (a
``fastlm.Tokenizer``), an iterable of texts cut into the tokenizer's BPE pieces, so scripts
without spaces (Chinese, Japanese) get vectors too. A piece's key is its text with the
surrounding whitespace removed (``" the"`` and ``"the"`` are one key), whitespace-only pieces
are skipped, and bytes that are not whole UTF-8 characters are written as ``\\xNN`` escapes.
Sentences longer than 10,000 tokens are cut into pieces of 10,000 (gensim truncates them).

The algorithm is word2vec.c's (and gensim's): the vocabulary keeps words seen at least
``min_count`` times, most frequent first (ties in order of first appearance); each occurrence
of a word seen ``c`` times in ``N`` is kept in a pass with probability
``(sqrt(c / t) + 1) * t / c``, ``t = sample * N`` (``sample > 1`` is ``t`` itself; 0 keeps
all); the window around a word is ``window - b``, ``b`` uniform in ``[0, window)``; noise words
are drawn from the unigram distribution raised to ``ns_exponent``; the learning rate falls
linearly from ``alpha`` to ``min_alpha`` over all epochs. Training runs in the C++ extension
(``csrc/features/word2vec.cpp``) on ``workers`` threads with the GIL released, updating the
shared matrices without locks (Hogwild), so results with ``workers > 1`` vary from run to run
as gensim's do; with ``workers=1`` and a ``seed`` they are the same every run (on one
machine: the AVX2 kernel, used where the CPU has AVX2 and FMA, rounds differently from the
baseline one, which ``FASTLM_CPU_ISA=baseline`` selects).

``max_vocab_size`` bounds the distinct tokens held while counting (word2vec.c's pruning of
the rarest; the corpus is then read a second time, so it must be a list or a file).

Only negative sampling is implemented (``hs=0``, ``negative >= 1``).
"""
from __future__ import annotations

import numbers
import os
from array import array
from pathlib import Path

import numpy as np

from .._io import CheckpointError, atomic_write_bytes, atomic_write_json, read_json
from ._native import _extension
from .keyedvectors import KeyedVectors

MAX_SENTENCE_TOKENS = 10_000
_LINE_BYTES = 1 << 20  # a corpus file is read up to this many bytes at a time
_CONFIG = "word2vec.json"
_WEIGHTS = "word2vec.safetensors"
_FORMAT = "fastlm-word2vec"


class Word2Vec:
    def __init__(self, sentences=None, corpus_file=None, vector_size=100, alpha=0.025, window=5, min_count=5,
                 max_vocab_size=None, sample=1e-3, seed=1, workers=3, min_alpha=0.0001, sg=0, hs=0, negative=5,
                 ns_exponent=0.75, cbow_mean=1, epochs=5, tokenizer=None):
        self.vector_size = _int("vector_size", vector_size, 1, 1 << 16)
        self.window = _int("window", window, 1, 1 << 20)
        self.min_count = _int("min_count", min_count, 1)
        self.max_vocab_size = None if max_vocab_size is None else _int("max_vocab_size", max_vocab_size, 1)
        self.negative = _int("negative", negative, 1, 1000)
        self.epochs = _int("epochs", epochs, 1)
        self.workers = _int("workers", workers, 1, 1024)
        self.seed = _int("seed", seed, 0, (1 << 64) - 1)
        self.alpha = _float("alpha", alpha, lo_open=0.0)
        self.min_alpha = _float("min_alpha", min_alpha, lo=0.0)
        self.sample = _float("sample", sample, lo=0.0)
        self.ns_exponent = _float("ns_exponent", ns_exponent, lo=0.0, hi=10.0)
        if sg not in (0, 1):
            raise ValueError(f"sg must be 0 (CBOW) or 1 (skip-gram), got {sg!r}")
        if cbow_mean not in (0, 1):
            raise ValueError(f"cbow_mean must be 0 or 1, got {cbow_mean!r}")
        if hs not in (0,):
            raise ValueError("only negative sampling is implemented: hs must be 0")
        self.sg, self.cbow_mean, self.hs = int(sg), int(cbow_mean), 0
        self.tokenizer = tokenizer
        self.wv = KeyedVectors(self.vector_size)
        self.counts = np.zeros(0, dtype=np.int64)
        self.syn1neg = np.zeros((0, self.vector_size), dtype=np.float32)
        self.corpus_total_words = 0
        if sentences is not None and corpus_file is not None:
            raise ValueError("pass sentences or corpus_file, not both")
        if sentences is not None or corpus_file is not None:
            corpus, ends = self.build_vocab(sentences, corpus_file=corpus_file, _keep_corpus=True)
            self._train_encoded(corpus, ends, self.epochs, self.alpha, self.min_alpha)

    # ------------------------------------------------------------------ vocabulary
    def build_vocab(self, corpus_iterable=None, corpus_file=None, _keep_corpus=False):
        """Count the tokens (one pass), keep those seen ``min_count`` times, and set up fresh
        vectors (uniform in [-0.5, 0.5) / vector_size, seeded) and zero output weights."""
        if self.max_vocab_size is not None:
            return self._build_vocab_pruned(corpus_iterable, corpus_file, _keep_corpus)
        ids, ends, index = _encode_new(_sentences(corpus_iterable, corpus_file, self.tokenizer))
        counts = np.bincount(ids, minlength=len(index)).astype(np.int64) if len(index) else np.zeros(0, np.int64)
        order = self._vocab_order(counts)
        words = list(index)
        keys = [words[i] for i in order]
        remap = np.full(len(index), -1, dtype=np.int32)
        remap[order] = np.arange(order.size, dtype=np.int32)
        self._set_vocab(keys, counts[order])
        corpus, ends = _remap(ids, ends, remap)
        self.corpus_total_words = int(corpus.size)
        if _keep_corpus:
            return corpus, ends
        return None

    def _build_vocab_pruned(self, corpus_iterable, corpus_file, keep_corpus):
        """max_vocab_size: count with at most that many distinct tokens held (word2vec.c's
        rule: when there are more, drop those seen at most `reduce` times, `reduce` = 1, 2, ...;
        a dropped token counts from zero if it comes back), then read the corpus again to
        encode it."""
        if corpus_file is None and hasattr(corpus_iterable, "__next__"):
            raise ValueError("max_vocab_size reads the corpus twice: pass a list or a file, not an iterator")
        counter: dict = {}
        reduce = 1
        for sent in _sentences(corpus_iterable, corpus_file, self.tokenizer):
            _check_sentence(sent)
            for w in sent:
                if not isinstance(w, str):
                    raise TypeError(f"tokens must be str, got {type(w).__name__} ({w!r})")
                counter[w] = counter.get(w, 0) + 1
            if len(counter) > self.max_vocab_size:
                counter = {w: c for w, c in counter.items() if c > reduce}
                reduce += 1
        words = list(counter)
        counts = np.fromiter(counter.values(), dtype=np.int64, count=len(words))
        order = self._vocab_order(counts)
        self._set_vocab([words[i] for i in order], counts[order])
        corpus, ends = _encode_known(_sentences(corpus_iterable, corpus_file, self.tokenizer), self.wv.key_to_index)
        self.corpus_total_words = int(corpus.size)
        return (corpus, ends) if keep_corpus else None

    def _vocab_order(self, counts):
        """Indices of the tokens kept (count >= min_count), most frequent first, ties in order."""
        kept = np.flatnonzero(counts >= self.min_count)
        if kept.size == 0:
            raise ValueError(f"no token occurs at least min_count={self.min_count} times: the vocabulary would be empty")
        if kept.size > np.iinfo(np.int32).max:  # pragma: no cover - billions of distinct words
            raise ValueError("the vocabulary is too large")
        return kept[np.argsort(-counts[kept], kind="stable")]

    def _set_vocab(self, keys, counts):
        self.counts = counts
        rng = np.random.default_rng(self.seed)
        vectors = ((rng.random((len(keys), self.vector_size), dtype=np.float32) - 0.5) / self.vector_size)
        self.wv = KeyedVectors._from(keys, vectors)
        self.syn1neg = np.zeros_like(vectors)

    # ------------------------------------------------------------------ training
    def train(self, corpus_iterable=None, corpus_file=None, total_examples=None, total_words=None, epochs=None,
              start_alpha=None, end_alpha=None, **_ignored):
        """Train (more) on a corpus with the vocabulary fixed: tokens outside it are skipped.
        ``total_examples``/``total_words`` are accepted for gensim's sake and not needed (the
        corpus is read once before training); returns (words passed, words passed), gensim's
        pair, both counted before subsampling."""
        if len(self.wv) == 0:
            raise ValueError("build the vocabulary first (build_vocab) or pass sentences to Word2Vec(...)")
        epochs = self.epochs if epochs is None else _int("epochs", epochs, 1)
        a0 = self.alpha if start_alpha is None else _float("start_alpha", start_alpha, lo_open=0.0)
        a1 = self.min_alpha if end_alpha is None else _float("end_alpha", end_alpha, lo=0.0)
        corpus, ends = _encode_known(_sentences(corpus_iterable, corpus_file, self.tokenizer), self.wv.key_to_index)
        return self._train_encoded(corpus, ends, epochs, a0, a1)

    def _train_encoded(self, corpus, ends, epochs, alpha, min_alpha):
        native = _extension()
        if corpus.size == 0:
            return 0, 0
        passed = native.word2vec_train(
            corpus, ends, self.wv.vectors, self.syn1neg, self._keep_probabilities(), self._noise_table(),
            bool(self.sg), bool(self.cbow_mean), self.window, self.negative, epochs, float(alpha),
            float(min_alpha), self.seed, self.workers, _isa(),
        )
        self.wv.fill_norms(force=True)
        return int(passed), int(passed)

    def _keep_probabilities(self) -> np.ndarray:
        counts = self.counts.astype(np.float64)
        if self.sample == 0:
            return np.ones(len(counts), dtype=np.float32)
        t = self.sample if self.sample > 1 else self.sample * counts.sum()
        keep = (np.sqrt(counts / t) + 1) * t / counts
        return np.minimum(keep, 1.0).astype(np.float32)

    def _noise_table(self) -> np.ndarray:
        """word2vec.c's table: slot i holds the word whose share of count**ns_exponent covers
        (i + 0.5) / size, so a uniform slot draws a word with that probability."""
        p = self.counts.astype(np.float64) ** self.ns_exponent
        cum = np.cumsum(p / p.sum())
        size = int(min(1 << 26, max(1 << 20, 64 * len(p))))
        table = np.searchsorted(cum, (np.arange(size, dtype=np.float64) + 0.5) / size, side="right")
        return np.minimum(table, len(p) - 1).astype(np.int32)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """A folder: ``word2vec.json`` (the settings) and ``word2vec.safetensors`` (vectors,
        output weights, counts and the keys as UTF-8 with their end offsets)."""
        from safetensors.numpy import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        blobs = [k.encode("utf-8") for k in self.wv.index_to_key]
        key_ends = np.cumsum([len(b) for b in blobs], dtype=np.int64) if blobs else np.zeros(0, np.int64)
        tensors = {
            "vectors": np.ascontiguousarray(self.wv.vectors, dtype=np.float32),
            "syn1neg": np.ascontiguousarray(self.syn1neg, dtype=np.float32),
            "counts": self.counts.astype(np.int64),
            "keys_utf8": np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(),
            "key_ends": key_ends,
        }
        atomic_write_bytes(path / _WEIGHTS, save(tensors))
        atomic_write_json(path / _CONFIG, {"format": _FORMAT, **self._settings()})

    def _settings(self) -> dict:
        return {k: getattr(self, k) for k in ("vector_size", "alpha", "window", "min_count", "max_vocab_size", "sample", "seed",
                                              "workers", "min_alpha", "sg", "hs", "negative", "ns_exponent",
                                              "cbow_mean", "epochs", "corpus_total_words")}

    @classmethod
    def load(cls, path) -> "Word2Vec":
        """A model written by ``save``; ``fastlm._io.CheckpointError`` when a file is damaged or
        does not fit the other."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        cfg = read_json(path / _CONFIG)
        if not isinstance(cfg, dict) or cfg.get("format") != _FORMAT:
            raise CheckpointError(f"{path / _CONFIG} is not a fastlm Word2Vec file")
        total = cfg.pop("corpus_total_words", 0)
        cfg.pop("format")
        try:
            model = cls(**cfg)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path / _CONFIG}: invalid settings: {e}") from None
        try:
            t = load_file(str(path / _WEIGHTS))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path / _WEIGHTS}: {e}") from None
        want = {"vectors": np.float32, "syn1neg": np.float32, "counts": np.int64, "keys_utf8": np.uint8,
                "key_ends": np.int64}
        for name, dtype in want.items():
            if name not in t or t[name].dtype != dtype:
                raise CheckpointError(f"{path / _WEIGHTS}: tensor {name!r} missing or not {np.dtype(dtype).name}")
        vec, syn1, counts, blob, key_ends = (t[n] for n in want)
        v = key_ends.shape[0] if key_ends.ndim == 1 else -1
        if (vec.shape != (v, model.vector_size) or syn1.shape != vec.shape or counts.shape != (v,)
                or blob.ndim != 1 or (v and (np.any(np.diff(key_ends) < 1) or key_ends[0] < 1
                                             or key_ends[-1] != blob.size)) or np.any(counts < 0)):
            raise CheckpointError(f"{path / _WEIGHTS}: the tensors' shapes do not fit each other and the settings")
        raw = blob.tobytes()
        starts = np.concatenate([[0], key_ends[:-1]]).tolist()
        try:
            keys = [raw[a:b].decode("utf-8") for a, b in zip(starts, key_ends.tolist())]
            model.wv = KeyedVectors._from(keys, vec)
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path / _WEIGHTS}: invalid keys: {e}") from None
        model.syn1neg, model.counts = np.ascontiguousarray(syn1), counts
        model.corpus_total_words = int(total) if isinstance(total, int) else 0
        return model

    def __repr__(self) -> str:
        return (f"Word2Vec<vocab={len(self.wv)}, vector_size={self.vector_size}, "
                f"{'skip-gram' if self.sg else 'CBOW'}, window={self.window}, negative={self.negative}>")


def _isa() -> str:
    """FASTLM_CPU_ISA=baseline selects the baseline kernel, as it does for fastlm.ops."""
    return "baseline" if os.environ.get("FASTLM_CPU_ISA", "").strip().lower() == "baseline" else ""


# ---------------------------------------------------------------------- argument checks
def _int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {rng}, got {value!r}")
    return int(value)


def _float(name, value, lo=None, lo_open=None, hi=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or (lo is not None and value < lo) or (lo_open is not None and value <= lo_open) \
            or (hi is not None and value > hi):
        bound = f">= {lo}" if lo is not None else f"> {lo_open}"
        raise ValueError(f"{name} must be a finite number {bound}" + (f" and <= {hi}" if hi is not None else "")
                         + f", got {value!r}")
    return float(value)


# ---------------------------------------------------------------------- reading sentences
def _sentences(sentences, corpus_file, tokenizer):
    """The corpus as an iterator of token lists, whatever form it came in."""
    if corpus_file is not None:
        sentences = corpus_file
        if not isinstance(sentences, (str, os.PathLike)):
            raise TypeError(f"corpus_file must be a path, got {type(sentences).__name__}")
    if sentences is None:
        raise ValueError("no corpus: pass sentences (token lists, texts with tokenizer=, or a file path) or corpus_file")
    if isinstance(sentences, (str, os.PathLike)):
        path = Path(sentences)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {str(path)!r} not found (sentences as text need tokenizer= and a list)")
        if tokenizer is not None:
            return _tokenized(_file_lines(path), tokenizer)
        return (line.split() for line in _file_lines(path))
    if isinstance(sentences, (bytes, bytearray)):
        raise TypeError("sentences must be an iterable of token lists, a file path, or texts with tokenizer=")
    try:
        it = iter(sentences)
    except TypeError:
        raise TypeError(f"sentences must be iterable, got {type(sentences).__name__}") from None
    if tokenizer is not None:
        return _tokenized(it, tokenizer)
    return it


def _file_lines(path):
    """Lines of a UTF-8 text file, each read up to _LINE_BYTES; a longer line comes out in
    pieces cut at whitespace (a token that straddles a cut is kept whole)."""
    carry = b""
    with open(path, "rb") as f:
        n = 0
        while True:
            chunk = f.readline(_LINE_BYTES)
            if not chunk:
                break
            n += chunk.endswith(b"\n")
            data = carry + chunk
            carry = b""
            if not chunk.endswith(b"\n") and len(chunk) == _LINE_BYTES:
                cut = max(data.rfind(b" "), data.rfind(b"\t"))
                if cut > 0 and len(data) - cut < _LINE_BYTES:
                    data, carry = data[:cut], data[cut:]
                elif len(data) > 4 * _LINE_BYTES:
                    raise ValueError(f"{path}: a token longer than {4 * _LINE_BYTES} bytes near line {n + 1}")
                else:
                    carry, data = data, b""
                    continue
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {n} is not UTF-8 ({e.reason} at byte {e.start})") from None
        if carry:
            yield carry.decode("utf-8", "strict")


def _tokenized(texts, tokenizer):
    """Texts cut into the tokenizer's pieces, each piece's key as the module docstring says."""
    if not hasattr(tokenizer, "encode_ordinary") or not hasattr(tokenizer, "token_bytes"):
        raise TypeError("tokenizer must be a fastlm.Tokenizer (encode_ordinary and token_bytes)")
    keys = {}

    def key(i):
        k = keys.get(i)
        if k is None:
            k = keys[i] = tokenizer.token_bytes(i).decode("utf-8", "backslashreplace").strip()
        return k

    batch = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"with tokenizer=, sentences must be texts (str), got {type(text).__name__}")
        batch.append(text)
        if len(batch) == 1024:
            yield from _pieces(tokenizer, batch, key)
            batch = []
    if batch:
        yield from _pieces(tokenizer, batch, key)


def _pieces(tokenizer, batch, key):
    encoded = tokenizer.encode_batch(batch) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode_ordinary, batch)
    for ids in encoded:
        yield [k for k in map(key, ids) if k]


def _check_sentence(sent):
    if isinstance(sent, (str, bytes)) or not isinstance(sent, (list, tuple)):
        raise TypeError(
            f"a sentence must be a list of str tokens, got {type(sent).__name__}"
            + (" (pass tokenizer= to cut texts into tokens)" if isinstance(sent, str) else "")
        )


def _encode_new(sentences):
    """(ids, sentence ends, {token: id}) with ids in order of first appearance."""
    index: dict = {}
    get = index.get
    ids = array("i")
    ends = []
    n = 0
    for sent in sentences:
        _check_sentence(sent)
        try:
            row = list(map(get, sent))  # the common case, all tokens seen before, at C speed
            if None in row:
                row = [index.setdefault(w, len(index)) for w in sent]
        except TypeError:
            raise TypeError("tokens must be str") from None
        ids.extend(row)
        n = _add_ends(ends, n, len(row))
    for w in index:
        if not isinstance(w, str):
            raise TypeError(f"tokens must be str, got {type(w).__name__} ({w!r})")
    return np.frombuffer(ids, dtype=np.int32) if len(ids) else np.zeros(0, np.int32), np.array(ends, np.int64), index


def _encode_known(sentences, key_to_index):
    """(ids, sentence ends) for a fixed vocabulary: unknown tokens are dropped."""
    get = key_to_index.get
    ids = array("i")
    ends = []
    n = 0
    for sent in sentences:
        _check_sentence(sent)
        try:
            row = [i for i in map(get, sent) if i is not None]
        except TypeError:
            raise TypeError("tokens must be str") from None
        ids.extend(row)
        n = _add_ends(ends, n, len(row))
    corpus = np.frombuffer(ids, dtype=np.int32) if len(ids) else np.zeros(0, np.int32)
    return corpus, np.array(ends, np.int64)


def _add_ends(ends, n, length):
    """Append the end offsets of one sentence of ``length`` tokens starting at ``n``, cut into
    pieces of at most MAX_SENTENCE_TOKENS; returns the new end."""
    if length == 0:
        return n
    for cut in range(n + MAX_SENTENCE_TOKENS, n + length, MAX_SENTENCE_TOKENS):
        ends.append(cut)
    ends.append(n + length)
    return n + length


def _remap(ids, ends, remap):
    """The corpus in final vocabulary ids, tokens outside the vocabulary dropped, and the
    sentence ends moved to match (sentences left empty are dropped)."""
    if ids.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    mapped = remap[ids]
    keep = mapped >= 0
    csum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    new_ends = np.unique(csum[ends])
    new_ends = new_ends[new_ends > 0]
    return np.ascontiguousarray(mapped[keep]), new_ends.astype(np.int64)


__all__ = ["Word2Vec", "KeyedVectors"]
