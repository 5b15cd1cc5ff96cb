"""TF-IDF on 20 MB of text: fastlm.features.TfidfVectorizer vs scikit-learn's, same run.

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
"""
import glob
import os
import pathlib
import sysconfig

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
