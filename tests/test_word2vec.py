"""fastlm.features.Word2Vec and KeyedVectors: quality against gensim on planted analogies, the
word2vec file formats both ways with gensim, save/load, determinism, and errors on bad input
and hostile files."""
import json
import threading

import numpy as np
import pytest

from fastlm._io import CheckpointError
from fastlm.features import KeyedVectors, Word2Vec

from _w2v_corpus import analogies, analogy_accuracy, planted_corpus

gensim_models = pytest.importorskip("gensim.models")

SETTINGS = dict(vector_size=40, window=5, min_count=5, negative=5, epochs=5, seed=1)


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(concepts=16, sentences=12000, seed=0)


@pytest.fixture(scope="module")
def skipgram(corpus):
    return Word2Vec(corpus, sg=1, workers=1, **SETTINGS)


# ----------------------------------------------------------------------------- quality
@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
def test_planted_analogies_at_least_gensims(corpus, skipgram, sg):
    """Same corpus, same settings, one worker each: fastlm solves the planted analogies at
    least as often as gensim, and nearly all of them."""
    model = skipgram if sg else Word2Vec(corpus, sg=0, workers=1, **SETTINGS)
    ref = gensim_models.Word2Vec(corpus, sg=sg, workers=1, **SETTINGS)
    questions = analogies(16)
    ours, theirs = analogy_accuracy(model.wv, questions), analogy_accuracy(ref.wv, questions)
    assert ours >= 0.95
    assert ours >= theirs
    # the same vocabulary, in the same order (by count, most frequent first)
    assert sorted(model.wv.index_to_key) == sorted(ref.wv.index_to_key)
    counts = dict(zip(model.wv.index_to_key, model.counts.tolist()))
    assert all(counts[k] == ref.wv.get_vecattr(k, "count") for k in ref.wv.index_to_key)
    assert np.all(np.diff(model.counts) <= 0)


def test_training_moves_the_vectors_and_passes_every_word(corpus):
    model = Word2Vec(vector_size=16, min_count=5, workers=1, epochs=2)
    model.build_vocab(corpus)
    before = model.wv.vectors.copy()
    passed, _ = model.train(corpus)
    assert passed == 2 * model.corpus_total_words == 2 * sum(map(len, corpus))
    assert not np.allclose(before, model.wv.vectors)
    assert np.abs(model.syn1neg).sum() > 0


def test_workers_one_and_a_seed_repeat_exactly(corpus):
    small = corpus[:3000]
    a = Word2Vec(small, sg=1, workers=1, **SETTINGS)
    b = Word2Vec(small, sg=1, workers=1, **SETTINGS)
    c = Word2Vec(small, sg=1, workers=1, **{**SETTINGS, "seed": 2})
    assert np.array_equal(a.wv.vectors, b.wv.vectors) and np.array_equal(a.syn1neg, b.syn1neg)
    assert not np.allclose(a.wv.vectors, c.wv.vectors)


def test_the_baseline_kernel_trains_as_well(corpus, monkeypatch):
    """FASTLM_CPU_ISA=baseline: the plain-loop kernel (the AVX2 one serves otherwise, where
    the CPU has it) solves the analogies too, repeatably."""
    from fastlm.features._native import _extension

    assert _extension().word2vec_isa("baseline") == "baseline"
    monkeypatch.setenv("FASTLM_CPU_ISA", "baseline")
    a = Word2Vec(corpus[:6000], sg=1, workers=1, **SETTINGS)
    b = Word2Vec(corpus[:6000], sg=1, workers=1, **SETTINGS)
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    assert analogy_accuracy(a.wv, analogies(16)) >= 0.95


def test_two_workers_train_well_and_release_the_gil(corpus):
    """Hogwild threads: the answer is as good, and Python keeps running meanwhile."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("m", Word2Vec(corpus, sg=1, workers=2, **SETTINGS)))
    ticks = 0
    t.start()
    while t.is_alive():
        ticks += 1
        t.join(0.001)
    assert ticks > 20  # the training took seconds; a held GIL would allow about none
    assert analogy_accuracy(box["m"].wv, analogies(16)) >= 0.95


# ----------------------------------------------------------------------------- KeyedVectors
def test_most_similar_and_similarity_match_gensims(skipgram, tmp_path):
    path = tmp_path / "v.txt"
    skipgram.wv.save_word2vec_format(path)
    ref = gensim_models.KeyedVectors.load_word2vec_format(str(path))
    wv = skipgram.wv
    for pos, neg in ((["c1_b", "c2_a"], ["c1_a"]), (["k3_1"], []), ([], ["fa_0"]), (["c0_a", "z1"], ["z2", "c4_b"])):
        ours = wv.most_similar(positive=pos, negative=neg, topn=7)
        theirs = ref.most_similar(positive=pos, negative=neg, topn=7)
        assert [k for k, _ in ours] == [k for k, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
    assert wv.most_similar("c5_a", topn=3) == wv.most_similar(positive=["c5_a"], topn=3)
    assert wv.similarity("c1_a", "c2_a") == pytest.approx(ref.similarity("c1_a", "c2_a"), abs=1e-6)
    assert wv.similarity("c1_a", "c1_a") == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(wv["c3_b"], wv.vectors[wv.key_to_index["c3_b"]])
    assert wv[["c3_b", "z0"]].shape == (2, 40)
    assert wv.index_to_key[wv.key_to_index["k2_2"]] == "k2_2" and "k2_2" in wv and "nope" not in wv
    with pytest.raises(KeyError, match="nope"):
        wv["nope"]
    with pytest.raises(KeyError):
        wv.most_similar(positive=["nope"])
    with pytest.raises(ValueError):
        wv.most_similar()


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_word2vec_formats_both_ways_with_gensim(binary, tmp_path):
    rng = np.random.default_rng(0)
    keys = ["the", "自然语言", "ü", "x" * 50, "a\\xe4", "é"]
    vecs = (rng.standard_normal((len(keys), 7)) * 10.0 ** rng.integers(-8, 8, (len(keys), 7))).astype(np.float32)
    ours = KeyedVectors._from(keys, vecs)
    path = tmp_path / "ours.w2v"
    ours.save_word2vec_format(path, binary=binary)
    theirs = gensim_models.KeyedVectors.load_word2vec_format(str(path), binary=binary)
    assert theirs.index_to_key == keys
    np.testing.assert_array_equal(theirs.vectors, vecs)
    back = KeyedVectors.load_word2vec_format(path, binary=binary)
    assert back.index_to_key == keys
    np.testing.assert_array_equal(back.vectors, vecs)
    # and gensim's own file, read by fastlm
    path2 = tmp_path / "gensim.w2v"
    theirs.save_word2vec_format(str(path2), binary=binary)
    again = KeyedVectors.load_word2vec_format(path2, binary=binary)
    assert again.index_to_key == keys
    np.testing.assert_array_equal(again.vectors, vecs)
    assert KeyedVectors.load_word2vec_format(path2, binary=binary, limit=2).index_to_key == keys[:2]


def test_keys_the_format_cannot_hold_are_refused(tmp_path):
    for bad in ("two words", "", "tab\there"):
        with pytest.raises(ValueError, match="cannot be written"):
            KeyedVectors._from([bad], np.zeros((1, 3))).save_word2vec_format(tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "content, binary, match",
    [
        (b"", False, "first line"),
        (b"2 3 4\n", False, "first line"),
        (b"-1 3\n", False, "first line"),
        (b"1 0\na\n", False, "dimension"),
        (b"1 999999999\n", False, "dimension"),
        (b"100000000 3\na 1 2 3\n", False, "more than the file holds"),
        (b"100000000 3\n", True, "more than the file holds"),
        (b"2 2\na 1 2\nb 1\n", False, "1 values, expected 2"),
        (b"2 2\na 1 2\nb 1 x\n", False, "not a number"),
        (b"2 2\na 1 2\na 3 4\n", False, "twice"),
        (b"2 2\na 1.0000000000 2.0000000000\n", False, "header says 2"),
        (b"1 2\n\xff\xfe 1 2\n", False, "not UTF-8"),
        (b"2 1\na \x00\x00\x80\x3f\nb \x00\x00", True, "ends inside entry 1"),
        (b"1 1\n" + b"k" * 5000 + b" \x00\x00\x80\x3f", True, "longer than"),
        (b"1 1\n" + b"k" * 5000 + b" 1\n", False, "longer than"),
    ],
)
def test_hostile_word2vec_files_raise_clear_errors(tmp_path, content, binary, match):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        KeyedVectors.load_word2vec_format(path, binary=binary)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_and_damaged_files(skipgram, tmp_path):
    skipgram.save(tmp_path / "m")
    back = Word2Vec.load(tmp_path / "m")
    assert back.wv.index_to_key == skipgram.wv.index_to_key
    np.testing.assert_array_equal(back.wv.vectors, skipgram.wv.vectors)
    np.testing.assert_array_equal(back.syn1neg, skipgram.syn1neg)
    np.testing.assert_array_equal(back.counts, skipgram.counts)
    assert (back.sg, back.window, back.vector_size) == (1, 5, 40)
    # loading continues training from the saved state
    back.train([["c1_a", "k1_0", "fa_1"]] * 50, epochs=1)
    assert not np.array_equal(back.wv["c1_a"], skipgram.wv["c1_a"])

    cfg_path = tmp_path / "m" / "word2vec.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "vector_size": 41}))
    with pytest.raises(CheckpointError, match="shapes"):
        Word2Vec.load(tmp_path / "m")
    cfg_path.write_text(json.dumps({**cfg, "window": -3}))
    with pytest.raises(CheckpointError, match="window"):
        Word2Vec.load(tmp_path / "m")
    cfg_path.write_text(json.dumps({**cfg, "format": "pickle"}))
    with pytest.raises(CheckpointError, match="not a fastlm Word2Vec"):
        Word2Vec.load(tmp_path / "m")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "m" / "word2vec.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        Word2Vec.load(tmp_path / "m")


# ----------------------------------------------------------------------------- corpora
def test_a_file_corpus_trains_like_the_same_token_lists(tmp_path, corpus):
    small = corpus[:2000]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join("  ".join(s) + (" \t" if i % 3 else "") for i, s in enumerate(small)) + "\n",
                    encoding="utf-8")
    a = Word2Vec(small, workers=1, **SETTINGS)
    b = Word2Vec(str(path), workers=1, **SETTINGS)
    c = Word2Vec(corpus_file=path, workers=1, **SETTINGS)
    assert a.wv.index_to_key == b.wv.index_to_key
    np.testing.assert_array_equal(a.wv.vectors, b.wv.vectors)
    np.testing.assert_array_equal(a.wv.vectors, c.wv.vectors)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok words\n\xff\xfe\n")
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        Word2Vec(bad, min_count=1)


def test_max_vocab_size_prunes_the_rarest_while_counting(corpus):
    small = corpus[:2000]
    full = Word2Vec(small, workers=1, **SETTINGS)
    roomy = Word2Vec(small, workers=1, max_vocab_size=10_000, **SETTINGS)
    assert roomy.wv.index_to_key == full.wv.index_to_key
    np.testing.assert_array_equal(roomy.wv.vectors, full.wv.vectors)
    rare = [[f"rare{i}", "c0_a", "k0_1"] for i in range(3000)]  # 3000 words seen once
    tight = Word2Vec(rare + small, workers=1, max_vocab_size=400, **{**SETTINGS, "min_count": 1})
    loose = Word2Vec(rare + small, workers=1, **{**SETTINGS, "min_count": 1})
    assert len(loose.wv) > 3000 > 400 >= len(tight.wv)
    assert {"c0_a", "k0_1", "c5_b", "fa_0"} <= set(tight.wv.index_to_key)
    with pytest.raises(ValueError, match="twice"):
        Word2Vec(iter(small), max_vocab_size=100)


def test_chinese_texts_through_a_bpe_tokenizer():
    from fastlm import Tokenizer

    rng = np.random.default_rng(0)
    groups = [["自然", "语言", "处理"], ["机器", "翻译", "文本"], ["情感", "分析", "评论"]]
    texts = []
    for _ in range(1500):
        g = groups[int(rng.integers(3))]
        texts.append("".join(rng.permutation(g)) + "。")
    tok = Tokenizer.train(texts, vocab_size=300)
    model = Word2Vec(texts, tokenizer=tok, vector_size=16, window=3, min_count=3, sg=1, workers=1)
    keys = set(model.wv.index_to_key)
    assert {"自然", "语言", "翻译"} <= keys
    assert all(k == k.strip() and k for k in keys)
    assert model.wv.similarity("自然", "语言") > model.wv.similarity("自然", "翻译")


def test_bad_arguments_raise_clear_errors(corpus):
    for kw, match in [
        ({"vector_size": 0}, "vector_size"), ({"window": 0}, "window"), ({"min_count": 0}, "min_count"),
        ({"negative": 0}, "negative"), ({"epochs": 0}, "epochs"), ({"workers": 0}, "workers"),
        ({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"min_alpha": -1.0}, "min_alpha"),
        ({"sample": -0.1}, "sample"), ({"sg": 2}, "sg"), ({"hs": 1}, "negative sampling"),
        ({"vector_size": 1.5}, "vector_size"), ({"seed": -1}, "seed"), ({"cbow_mean": 3}, "cbow_mean"),
    ]:
        with pytest.raises(ValueError, match=match):
            Word2Vec(corpus[:10], **kw)
    with pytest.raises(TypeError, match="tokenizer="):
        Word2Vec(["a sentence as one text", "another"], min_count=1)
    with pytest.raises(TypeError, match="tokens must be str"):
        Word2Vec([[1, 2, 3]], min_count=1)
    with pytest.raises(TypeError, match="str"):
        Word2Vec([[["nested"]]], min_count=1)
    with pytest.raises(TypeError, match="iterable"):
        Word2Vec(42)
    with pytest.raises(FileNotFoundError):
        Word2Vec("no/such/corpus.txt")
    with pytest.raises(ValueError, match="vocabulary would be empty"):
        Word2Vec([["rare", "words"]], min_count=5)
    with pytest.raises(ValueError, match="vocabulary"):
        Word2Vec().train(corpus[:10])
    with pytest.raises(ValueError, match="not both"):
        Word2Vec(corpus[:10], corpus_file="x.txt")


def test_the_extension_checks_what_it_is_given():
    from fastlm.features._native import _extension

    native = _extension()
    syn0 = np.zeros((3, 4), np.float32)
    ok = dict(corpus=np.array([0, 1, 2], np.int32), sent_ends=np.array([3], np.int64), syn0=syn0,
              syn1neg=np.zeros((3, 4), np.float32), keep=np.ones(3, np.float32), table=np.array([0, 1, 2], np.int32),
              sg=True, cbow_mean=True, window=2, negative=1, epochs=1, alpha=0.025, min_alpha=0.0, seed=1, n_threads=1)
    assert native.word2vec_train(**ok) == 3
    for change, match in [
        ({"corpus": np.array([0, 3, 1], np.int32)}, "outside the vocabulary"),
        ({"table": np.array([-1], np.int32)}, "outside the vocabulary"),
        ({"sent_ends": np.array([4], np.int64)}, "ascending"),
        ({"sent_ends": np.array([2], np.int64)}, "corpus end"),
        ({"syn1neg": np.zeros((2, 4), np.float32)}, "elements"),
        ({"keep": np.ones(3, np.float64)}, "dtype"),
        ({"syn1neg": np.zeros((4, 3), np.float32).T}, "contiguous"),
        ({"window": 0}, ">= 1"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            native.word2vec_train(**{**ok, **change})
