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
    filler_p = 1.0 / np.arange(1, fillers + 1)
    filler_p /= filler_p.sum()
    out = []
    for _ in range(sentences):
        i = int(rng.integers(concepts))
        f = "ab"[int(rng.integers(2))]
        words = [f"k{i}_{j}" for j in rng.choice(context, 3, replace=False)]
        words += [f"f{f}_{j}" for j in rng.choice(forms_context, 3, replace=False)]
        words += [f"z{j}" for j in rng.choice(fillers, 4, p=filler_p)]
        rng.shuffle(words)
        words.insert(len(words) // 2, f"c{i}_{f}")
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
