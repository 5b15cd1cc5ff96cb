"""``KeyedVectors``: word vectors by key, with gensim's interface, and the word2vec file formats.

``kv[key]`` (a vector; a list of keys gives a matrix), ``kv.key_to_index``, ``kv.index_to_key``,
``kv.vectors`` (float32, one row per key), ``similarity(a, b)`` (cosine),
``most_similar(positive=[...], negative=[...], topn=10)`` (gensim's rule: the mean of the unit
vectors, +1 for positive keys and -1 for negative ones, ranked by cosine, the query keys
left out).

``save_word2vec_format(path, binary=False)`` writes word2vec.c's formats, which gensim's
``KeyedVectors.load_word2vec_format`` reads: a header line ``"<count> <dim>\\n"``, then one
entry per key in index order: text, ``key`` and the values (``%.9g``, which gives every
float32 back exactly) separated by spaces, one line each; binary, ``key`` + a space + ``dim``
little-endian float32 + ``\\n``. ``KeyedVectors.load_word2vec_format`` reads both (and files
without the trailing newline, as gensim writes them). A file is treated as hostile: the header
is checked (count >= 0, 1 <= dim <= ``MAX_DIM``, the vectors fit in the file's size for a
binary file), a key is at most ``MAX_KEY_BYTES`` bytes and a text line at most as long as its
values can be, and each entry must have exactly ``dim`` finite-or-not numbers; anything else
raises ``ValueError`` naming the file and entry.
"""
from __future__ import annotations

import os
import re

import numpy as np

MAX_DIM = 1 << 16
MAX_KEY_BYTES = 4096
_WS = re.compile(r"\s")


class KeyedVectors:
    def __init__(self, vector_size: int, count: int = 0):
        if isinstance(vector_size, bool) or not isinstance(vector_size, (int, np.integer)) or vector_size < 1:
            raise ValueError(f"vector_size must be an int >= 1, got {vector_size!r}")
        self.vector_size = int(vector_size)
        self.vectors = np.zeros((int(count), self.vector_size), dtype=np.float32)
        self.index_to_key: list = []
        self.key_to_index: dict = {}
        self._norms = None

    @classmethod
    def _from(cls, keys, vectors) -> "KeyedVectors":
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys for vectors of shape {vectors.shape}")
        kv = cls(vectors.shape[1])
        kv.vectors = vectors
        kv.index_to_key = list(keys)
        kv.key_to_index = {k: i for i, k in enumerate(kv.index_to_key)}
        if len(kv.key_to_index) != len(kv.index_to_key):
            raise ValueError("the keys are not unique")
        return kv

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self.index_to_key)

    def __contains__(self, key) -> bool:
        return key in self.key_to_index

    def get_index(self, key) -> int:
        try:
            return self.key_to_index[key]
        except (KeyError, TypeError):
            raise KeyError(f"Key {key!r} not present") from None

    def get_vector(self, key, norm: bool = False) -> np.ndarray:
        i = self.get_index(key)
        return self.get_normed_vectors()[i] if norm else self.vectors[i]

    def __getitem__(self, key):
        if isinstance(key, (list, tuple)):
            return np.stack([self.get_vector(k) for k in key]) if key else np.zeros((0, self.vector_size), np.float32)
        return self.get_vector(key)

    def get_normed_vectors(self) -> np.ndarray:
        """The vectors divided by their l2 norms (zero vectors stay zero); kept until
        ``vectors`` is replaced (after changing it in place, call ``fill_norms(force=True)``)."""
        self.fill_norms()
        return self._norms[1]

    def fill_norms(self, force: bool = False) -> None:
        if force or self._norms is None or self._norms[0] is not self.vectors:
            norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
            self._norms = (self.vectors, self.vectors / np.where(norms > 0, norms, 1))

    # ------------------------------------------------------------------ similarity
    def similarity(self, key1, key2) -> float:
        """Cosine similarity of two keys' vectors."""
        a, b = self.get_vector(key1), self.get_vector(key2)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0 or nb == 0:
            return 0.0
        return float(np.dot(a, b) / (na * nb))

    def most_similar(self, positive=None, negative=None, topn: int | None = 10):
        """[(key, cosine)] of the ``topn`` keys nearest to the mean of the positive keys' unit
        vectors minus the negative keys' (vectors may stand in for keys), the query keys left
        out; ``topn=None`` gives all cosines as an array in index order."""
        positive = _as_list(positive)
        negative = _as_list(negative)
        if not positive and not negative:
            raise ValueError("most_similar needs at least one positive or negative key")
        if topn is not None and (isinstance(topn, bool) or not isinstance(topn, (int, np.integer)) or topn < 0):
            raise ValueError(f"topn must be None or an int >= 0, got {topn!r}")
        normed = self.get_normed_vectors()
        terms, skip = [], set()
        for weight, items in ((1.0, positive), (-1.0, negative)):
            for item in items:
                if isinstance(item, np.ndarray):
                    if item.shape != (self.vector_size,):
                        raise ValueError(f"a query vector must have shape ({self.vector_size},), got {item.shape}")
                    n = float(np.linalg.norm(item))
                    terms.append(weight * (item / n if n > 0 else item))
                else:
                    i = self.get_index(item)
                    skip.add(i)
                    terms.append(weight * normed[i])
        query = np.mean(terms, axis=0)
        n = float(np.linalg.norm(query))
        if n > 0:
            query = query / n
        sims = normed @ query.astype(np.float32)
        if topn is None:
            return sims
        k = min(len(sims), topn + len(skip))
        if k == 0:
            return []
        best = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        best = best[np.lexsort((best, -sims[best]))]  # by cosine, ties by index
        return [(self.index_to_key[i], float(sims[i])) for i in best if i not in skip][:topn]

    # ------------------------------------------------------------------ word2vec formats
    def save_word2vec_format(self, fname, binary: bool = False, write_header: bool = True) -> None:
        """Write the vectors in word2vec.c's text (default) or binary format (see the module)."""
        for k in self.index_to_key:
            if not isinstance(k, str) or not k or _WS.search(k):
                raise ValueError(
                    f"key {k!r} cannot be written in the word2vec format (keys must be non-empty str without whitespace)"
                )
        tmp = f"{os.fspath(fname)}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                if write_header:
                    f.write(f"{len(self)} {self.vector_size}\n".encode())
                vecs = self.vectors.astype("<f4", copy=False)
                for key, row in zip(self.index_to_key, vecs):
                    if binary:
                        f.write(key.encode("utf-8") + b" " + row.tobytes() + b"\n")
                    else:
                        f.write((key + " " + " ".join("%.9g" % v for v in row.tolist()) + "\n").encode("utf-8"))
            os.replace(tmp, fname)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load_word2vec_format(cls, fname, binary: bool = False, limit: int | None = None,
                             unicode_errors: str = "strict", datatype=np.float32) -> "KeyedVectors":
        """Read a word2vec.c text or binary file (gensim's and word2vec.c's both); ``limit``
        reads only the first so many vectors."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        fname = os.fspath(fname)
        size = os.path.getsize(fname)
        with open(fname, "rb") as f:
            header = f.readline(256)
            parts = header.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or not header.endswith(b"\n"):
                raise ValueError(f"{fname}: the first line must be '<count> <dim>', got {header[:80]!r}")
            count, dim = int(parts[0]), int(parts[1])
            if not 1 <= dim <= MAX_DIM:
                raise ValueError(f"{fname}: dimension {dim} is outside 1..{MAX_DIM}")
            if binary and count * (dim * 4 + 2) > size:
                raise ValueError(f"{fname}: the header says {count} vectors of {dim} floats, more than the file holds")
            if not binary and count * (2 * dim + 2) > size:
                raise ValueError(f"{fname}: the header says {count} vectors of {dim} values, more than the file holds")
            if limit is not None:
                count = min(count, limit)
            vectors = np.empty((count, dim), dtype=np.float32)
            keys = []
            reader = _binary_entries if binary else _text_entries
            for i, (key, row) in enumerate(reader(f, fname, count, dim, unicode_errors)):
                keys.append(key)
                vectors[i] = row
        if len(keys) != count:
            raise ValueError(f"{fname}: the header says {count} vectors, the file holds {len(keys)}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"{fname}: a key appears twice")
        return cls._from(keys, vectors.astype(datatype, copy=False))


def _as_list(x):
    if x is None:
        return []
    if isinstance(x, (str, np.ndarray)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def _decode_key(raw: bytes, fname, i, errors) -> str:
    try:
        key = raw.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise ValueError(f"{fname}: key {i} is not UTF-8 (pass unicode_errors='replace' to read it anyway)") from None
    if not key:
        raise ValueError(f"{fname}: entry {i} has an empty key")
    return key


def _text_entries(f, fname, count, dim, errors):
    max_line = MAX_KEY_BYTES + dim * 64 + 2
    for i in range(count):
        line = f.readline(max_line + 1)
        if not line:
            return
        if len(line) > max_line:
            raise ValueError(f"{fname}: line {i + 2} is longer than an entry of {dim} values can be")
        parts = line.rstrip(b"\r\n").rstrip(b" ").split(b" ")
        if len(parts) != dim + 1:
            raise ValueError(f"{fname}: line {i + 2} has {len(parts) - 1} values, expected {dim}")
        if len(parts[0]) > MAX_KEY_BYTES:
            raise ValueError(f"{fname}: the key on line {i + 2} is longer than {MAX_KEY_BYTES} bytes")
        try:
            row = np.array([float(p) for p in parts[1:]], dtype=np.float32)
        except ValueError:
            raise ValueError(f"{fname}: line {i + 2} holds a value that is not a number") from None
        yield _decode_key(parts[0], fname, i, errors), row


def _binary_entries(f, fname, count, dim, errors):
    nbytes = dim * 4
    buf = b""
    pos = 0
    for i in range(count):
        # the key: bytes up to a space, newlines before it skipped (word2vec.c ends entries with one)
        while True:
            sp = buf.find(b" ", pos)
            if sp >= 0:
                break
            if len(buf) - pos > MAX_KEY_BYTES:
                raise ValueError(f"{fname}: the key of entry {i} is longer than {MAX_KEY_BYTES} bytes")
            more = f.read(1 << 20)
            if not more:
                raise ValueError(f"{fname}: the file ends inside entry {i}")
            buf, pos = buf[pos:] + more, 0
        raw = buf[pos:sp].lstrip(b"\n")
        if len(raw) > MAX_KEY_BYTES:
            raise ValueError(f"{fname}: the key of entry {i} is longer than {MAX_KEY_BYTES} bytes")
        pos = sp + 1
        while len(buf) - pos < nbytes:
            more = f.read(max(1 << 20, nbytes))
            if not more:
                raise ValueError(f"{fname}: the file ends inside entry {i}")
            buf, pos = buf[pos:] + more, 0
        row = np.frombuffer(buf, dtype="<f4", count=dim, offset=pos)
        pos += nbytes
        yield _decode_key(raw, fname, i, errors), row
