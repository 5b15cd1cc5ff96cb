"""A generated corpus with planted analogies, for the Word2Vec tests and benchmark.

Each of ``concepts`` concepts i has two forms, the words ``c{i}_a`` and ``c{i}_b``. A sentence
about form f of concept i holds that word among three words drawn from the concept's own
context words ``k{i}_*``, three drawn from the form's context words ``fa_*`` / ``fb_*``, and four
Zipf-distributed filler words ``z*``. A word's vector is then learnt from its concept's
context and its form's, so c{i}_b - c{i}_a + c{j}_a lands near c{j}_b: the analogies
(c{i}_a : c{i}_b :: c{j}_a : c{j}_b) for every ordered pair i != j.
"""
import numpy as np


def planted_corpus(concepts=20, sentences=20000, seed=0, context=6, forms_context=6, fillers=200):
    rng = np.random.default_rng(seed)
    n = sentences
    concept = rng.integers(concepts, size=n)
    form = rng.integers(2, size=n)
    # three distinct concept-context and three distinct form-context words a sentence
    ctx = np.argsort(rng.random((n, context)), axis=1)[:, :3]
    fctx = np.argsort(rng.random((n, forms_context)), axis=1)[:, :3]
    filler_p = 1.0 / np.arange(1, fillers + 1)
    fill = rng.choice(fillers, size=(n, 4), p=filler_p / filler_p.sum())
    order = np.argsort(rng.random((n, 10)), axis=1)
    out = []
    for s in range(n):
        i, f = int(concept[s]), "ab"[form[s]]
        words = [f"k{i}_{j}" for j in ctx[s]] + [f"f{f}_{j}" for j in fctx[s]] + [f"z{j}" for j in fill[s]]
        words = [words[j] for j in order[s]]
        words.insert(5, f"c{i}_{f}")
        out.append(words)
    return out


def analogies(concepts=20):
    """(a, b, c, expected d) for every ordered pair of concepts."""
    return [(f"c{i}_a", f"c{i}_b", f"c{j}_a", f"c{j}_b")
            for i in range(concepts) for j in range(concepts) if i != j]


def analogy_accuracy(wv, questions):
    """The share of questions whose top answer (the query words left out) is the expected word."""
    hits = 0
    for a, b, c, d in questions:
        hits += wv.most_similar(positive=[b, c], negative=[a], topn=1)[0][0] == d
    return hits / len(questions)
