"""Retrieval with and without spaces: which analyzer ranks the planted passage first.

The passages and questions of tests/data/multilingual_passages.json (Chinese, Japanese, Thai,
mixed Chinese-English, English; each question paraphrases one passage) are indexed with
``fastlm.features.TfidfIndex`` under several analyzers; for each we print how many questions
rank their passage first (top-1) and the mean reciprocal rank (MRR).

    PYTHONPATH=. python bench/retrieval_scripts.py
"""
import json
import re
from pathlib import Path

from fastlm.features import TfidfIndex
from fastlm.features.analyzers import UNSPACED_SCRIPTS

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "multilingual_passages.json"
_RUN = re.compile(rf"(?P<run>[{UNSPACED_SCRIPTS}]+)|(?P<word>(?:(?![{UNSPACED_SCRIPTS}])\w){{2,}})")


def _runs(unigrams, bigrams):
    """Word terms, and for each unspaced-script run its unigrams and/or bigrams."""
    def analyze(doc):
        out = []
        for m in _RUN.finditer(doc.lower()):
            run = m.group("run")
            if run is None:
                out.append(m.group("word"))
                continue
            if unigrams or len(run) == 1:
                out += list(run)
            if bigrams:
                out += [run[i:i + 2] for i in range(len(run) - 1)]
        return out
    return analyze


CONFIGS = {
    "word (scikit-learn's default)": {"analyzer": "word"},
    "char (1, 2)": {"analyzer": "char", "ngram_range": (1, 2)},
    "char_wb (2, 3)": {"analyzer": "char_wb", "ngram_range": (2, 3)},
    "words + run unigrams": {"analyzer": _runs(True, False)},
    "words + run unigrams and bigrams": {"analyzer": _runs(True, True)},
    "multilingual (words + run bigrams)": {"analyzer": "multilingual"},
}


def main():
    data = json.loads(DATA.read_text(encoding="utf-8"))
    ids, texts = list(data["passages"]), list(data["passages"].values())
    questions = data["questions"]
    print(f"{len(texts)} passages, {len(questions)} questions")
    print(f"| analyzer | top-1 | MRR |\n| --- | --- | --- |")
    for name, options in CONFIGS.items():
        index = TfidfIndex(texts, ids=ids, sublinear_tf=True, **options)
        top1, rr = 0, 0.0
        for question, want in questions:
            ranked = [h["id"] for h in index.search(question, k=len(texts))]
            top1 += bool(ranked) and ranked[0] == want
            rr += 1 / (ranked.index(want) + 1) if want in ranked else 0.0
        print(f"| {name} | {top1}/{len(questions)} | {rr / len(questions):.3f} |")


if __name__ == "__main__":
    main()
