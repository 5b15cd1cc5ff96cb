"""TF-IDF on 20 MB of text: fastlm.features.TfidfVectorizer vs scikit-learn's, same run; and
Word2Vec against gensim (training words/s with 2 workers, similarity agreement), at the end.

One round = fit_transform(docs) + transform(docs) with the default options (the word
analyzer, l2 norm, smoothed idf; then the same with ngram_range=(1, 2)), on ~20 MB of
documents: the Python standard library's
.py files cut into ~4 kB pieces (plus tinyshakespeare's paragraphs when the shared data is
at hand). fastlm runs with 1 thread and with 2; the first round of each is a warm-up (the
Unicode tables are built then); the figure is the median of the rest. Before timing, the
matrices are checked equal to scikit-learn's (to 1e-9).

    pytest bench/test_features.py --benchmark-only --benchmark-columns=median,min,max,rounds
    (add --benchmark-json=out.json to keep the figures; the speedups are in extra_info)

Target: fastlm at least 3x scikit-learn's median.

Word2Vec alone: pytest bench/test_features.py -k word2vec --benchmark-columns=median,min,max,rounds -s
"""
import glob
import os
import pathlib
import sysconfig

import numpy as np

import pytest

sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")

from fastlm.features import TfidfVectorizer  # noqa: E402

TARGET_BYTES = 20_000_000
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
ROUNDS = 3
MEDIANS = {}


def _corpus(target=TARGET_BYTES, piece=4000):
    docs, total = [], 0
    for path in (SHAKESPEARE, pathlib.Path("/work/shared/data/tinyshakespeare.txt")):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            docs += [p for p in text.split("\n\n") if p.strip()]
            total += len(text)
            break
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True) if "site-packages" not in f)
    for f in files:
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        cur, n = [], 0
        for line in text.splitlines(keepends=True):
            cur.append(line)
            n += len(line)
            if n >= piece:
                docs.append("".join(cur))
                total += n
                cur, n = [], 0
        if cur:
            docs.append("".join(cur))
            total += n
        if total >= target:
            break
    return docs


@pytest.fixture(scope="module")
def corpus():
    docs = _corpus()
    size = sum(len(d.encode()) for d in docs)
    if size < 0.9 * TARGET_BYTES:
        pytest.skip(f"only {size / 1e6:.1f} MB of text found")
    ours = TfidfVectorizer(n_jobs=1)
    theirs = sklearn_text.TfidfVectorizer()
    diff = abs(ours.fit_transform(docs) - theirs.fit_transform(docs)).max()
    assert diff <= 1e-9 and list(ours.get_feature_names_out()) == list(theirs.get_feature_names_out())
    return docs, size


def _round(make):
    def run(docs):  # make() builds a fresh vectorizer
        v = make()
        v.fit_transform(docs)
        return v.transform(docs)

    return run


IMPLS = {
    "sklearn": lambda **o: sklearn_text.TfidfVectorizer(**o),
    "fastlm-1-thread": lambda **o: TfidfVectorizer(n_jobs=1, **o),
    "fastlm-2-threads": lambda **o: TfidfVectorizer(n_jobs=2, **o),
}


def _bench(benchmark, corpus, impl, **options):
    docs, size = corpus
    make = IMPLS[impl]
    benchmark.pedantic(_round(lambda: make(**options)), args=(docs,), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: one plain run, no statistics
        return
    median = benchmark.stats.stats.median
    key = tuple(sorted(options.items()))
    MEDIANS[key, impl] = median
    benchmark.extra_info["MB"] = round(size / 1e6, 2)
    benchmark.extra_info["MB_per_s"] = round(2 * size / 1e6 / median, 1)  # text is read twice a round
    if impl != "sklearn" and (key, "sklearn") in MEDIANS:
        base = MEDIANS[key, "sklearn"]
        benchmark.extra_info["speedup_vs_sklearn"] = round(base / median, 2)
        print(f"\n{impl} {dict(options)}: {base / median:.2f}x scikit-learn (median {median:.3f} s vs {base:.3f} s, "
              f"{size / 1e6:.1f} MB)")


@pytest.mark.benchmark(group="tfidf-fit-transform-20MB")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tfidf_20mb(benchmark, corpus, impl):
    _bench(benchmark, corpus, impl)


@pytest.mark.benchmark(group="tfidf-fit-transform-20MB-bigrams")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_tfidf_bigrams_20mb(benchmark, corpus, impl):
    _bench(benchmark, corpus, impl, ngram_range=(1, 2))


# ----------------------------------------------------------------------------- Word2Vec
# Training words/s of fastlm.features.Word2Vec against gensim's, same corpus, same settings,
# 2 workers each, in the same run: tiny Shakespeare, lowercased \w+ tokens a line, the text
# repeated W2V_REPEAT times. A round is the whole constructor (vocabulary + training), as a
# user calls it; words/s = epochs * corpus words / median round. Target: fastlm >= 1.5x gensim.
# Then the agreement of the two models: the Spearman correlation of their cosine similarities
# over all pairs of the W2V_PAIR_WORDS most frequent words (and, as the ceiling, of gensim
# with itself under another seed).
W2V_REPEAT = 1
W2V_SETTINGS = dict(vector_size=100, window=5, min_count=5, negative=5, epochs=5, workers=2, sample=1e-3)
W2V_PAIR_WORDS = 300
W2V_MEDIANS = {}


@pytest.fixture(scope="module")
def shakespeare_sentences():
    import re

    for path in (SHAKESPEARE, pathlib.Path("/work/shared/data/tinyshakespeare.txt")):
        if path.is_file():
            lines = path.read_text(encoding="utf-8").lower().splitlines()
            sents = [s for s in (re.findall(r"\w+", line) for line in lines) if s]
            return sents
    pytest.skip("tinyshakespeare.txt not found")


def _w2v_impls():
    gensim_models = pytest.importorskip("gensim.models")
    from fastlm.features import Word2Vec

    return {"gensim": gensim_models.Word2Vec, "fastlm": Word2Vec}


@pytest.mark.benchmark(group="word2vec-train-2-workers")
@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
@pytest.mark.parametrize("impl", ["gensim", "fastlm"])
def test_word2vec_words_per_second(benchmark, shakespeare_sentences, impl, sg):
    import statistics
    import time

    cls = _w2v_impls()[impl]
    sents = shakespeare_sentences * W2V_REPEAT
    words = sum(map(len, sents))
    cpu = []

    def run():  # the process's CPU seconds too: on a shared box they vary less than the wall time
        t = time.process_time()
        cls(sents, sg=sg, **W2V_SETTINGS)
        cpu.append(time.process_time() - t)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:
        return
    median, cpu_median = benchmark.stats.stats.median, statistics.median(cpu[1:])
    W2V_MEDIANS[sg, impl] = median, cpu_median
    rate = W2V_SETTINGS["epochs"] * words / median
    benchmark.extra_info.update(corpus_words=words, words_per_s=round(rate), cpu_s=round(cpu_median, 3))
    if impl == "fastlm" and (sg, "gensim") in W2V_MEDIANS:
        base, base_cpu = W2V_MEDIANS[sg, "gensim"]
        benchmark.extra_info["speedup_vs_gensim"] = round(base / median, 2)
        benchmark.extra_info["cpu_speedup_vs_gensim"] = round(base_cpu / cpu_median, 2)
        print(f"\nword2vec {'skip-gram' if sg else 'CBOW'}: fastlm {rate / 1e6:.2f} M words/s, "
              f"{base / median:.2f}x gensim ({median:.2f} s vs {base:.2f} s, {words} words x "
              f"{W2V_SETTINGS['epochs']} epochs); CPU time {base_cpu / cpu_median:.2f}x less "
              f"({cpu_median:.2f} s vs {base_cpu:.2f} s)")


@pytest.mark.parametrize("sg", [1, 0], ids=["skipgram", "cbow"])
def test_word2vec_similarity_agreement_with_gensim(shakespeare_sentences, sg):
    from scipy.stats import spearmanr

    impls = _w2v_impls()
    models = {
        "fastlm": impls["fastlm"](shakespeare_sentences, sg=sg, seed=1, **W2V_SETTINGS),
        "gensim": impls["gensim"](shakespeare_sentences, sg=sg, seed=1, **W2V_SETTINGS),
        "gensim-seed-2": impls["gensim"](shakespeare_sentences, sg=sg, seed=2, **W2V_SETTINGS),
    }
    words = models["gensim"].wv.index_to_key[:W2V_PAIR_WORDS]
    assert set(words) <= set(models["fastlm"].wv.index_to_key)
    iu = np.triu_indices(len(words), 1)

    def sims(m):
        v = m.wv[words]
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return (v @ v.T)[iu]

    s = {k: sims(m) for k, m in models.items()}
    rho = spearmanr(s["fastlm"], s["gensim"]).statistic
    ceiling = spearmanr(s["gensim-seed-2"], s["gensim"]).statistic
    print(f"\nword2vec {'skip-gram' if sg else 'CBOW'} on tiny Shakespeare, {len(iu[0])} pairs of the "
          f"{len(words)} most frequent words: Spearman(fastlm, gensim) = {rho:.3f}; "
          f"gensim seed 1 vs seed 2 = {ceiling:.3f}")
    assert rho > 0.5
