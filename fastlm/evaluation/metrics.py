"""Task metrics, pure functions of labels and texts: classification scores, a confusion
matrix, corpus BLEU.

Classification: ``accuracy``, ``confusion_matrix`` (rows: true label, columns: predicted,
labels sorted unless given, as scikit-learn's), ``precision_recall_f1`` (per class; 0 where
a ratio has no denominator, scikit-learn's ``zero_division`` default), ``classification_report``
(all of them as one dict) and ``format_confusion`` (a terminal table).

Translation: ``corpus_bleu(hypotheses, references)`` is BLEU on a 0-100 scale. It is
sacrebleu's ``corpus_bleu`` when sacrebleu is installed, else the built-in form of the same
standard: 13a tokenization (mteval-v13a, sacrebleu's default), n-grams up to 4 clipped by
the largest count in any reference, the brevity penalty with each hypothesis's closest
reference length (ties: the shorter), and "exp" smoothing of zero precisions.

Scoring saved pipelines on a file with these (``evaluate_task``) and the confusion-matrix PNG
are in ``fastlm.evaluation.tasks``.
"""
from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

__all__ = ["accuracy", "confusion_matrix", "precision_recall_f1", "classification_report", "format_confusion",
           "tokenize_13a", "corpus_bleu"]


# ----------------------------------------------------------------------------- classification
def _check_pair(y_true, y_pred):
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels, y_pred {len(y_pred)}")
    if not y_true:
        raise ValueError("no labels to score")
    return y_true, y_pred


def accuracy(y_true, y_pred) -> float:
    """The share of predictions equal to the true label."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true, y_pred, labels=None) -> np.ndarray:
    """Counts (n_labels, n_labels): row i, column j = examples of label i predicted as j.
    ``labels`` default to the sorted labels seen in either list."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    pos = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if t in pos and p in pos:
            m[pos[t], pos[p]] += 1
    return m


def _ratio(a, b):
    return float(a) / float(b) if b else 0.0


def precision_recall_f1(y_true, y_pred, labels=None) -> dict:
    """{label: {"precision", "recall", "f1", "support"}} for each label."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    m = confusion_matrix(y_true, y_pred, labels)
    out = {}
    for i, label in enumerate(labels):
        tp, predicted, actual = m[i, i], m[:, i].sum(), m[i, :].sum()
        p, r = _ratio(tp, predicted), _ratio(tp, actual)
        out[label] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": int(actual)}
    return out


def classification_report(y_true, y_pred, labels=None) -> dict:
    """Accuracy, per-class precision/recall/F1, macro F1 and the confusion matrix, as one dict."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    per_class = precision_recall_f1(y_true, y_pred, labels)
    return {
        "n": len(y_true),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels).tolist(),
    }


def format_confusion(matrix, labels) -> str:
    """The confusion matrix as a text table (rows: true label, columns: predicted)."""
    names = [str(x) for x in labels]
    m = np.asarray(matrix)
    corner = "true \\ pred"
    width = max([len(n) for n in names] + [len(str(int(m.max()))) if m.size else 1, len(corner)])
    lines = [" ".join([corner.ljust(width)] + [n.rjust(width) for n in names])]
    for name, row in zip(names, m):
        lines.append(" ".join([f"{name:<{width}}"] + [f"{int(v):>{width}}" for v in row]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- BLEU
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma, unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a's tokenization (sacrebleu's default "13a"): tokens joined by one space."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _ngrams(tokens, max_n):
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _reference_streams(references, n_hyp):
    """references as streams: a list of str (one reference each) or a list of streams."""
    if isinstance(references, str):
        raise TypeError("references must be a list of strings (or a list of such lists), not a str")
    references = list(references)
    streams = [references] if references and all(isinstance(r, str) for r in references) else references
    for s in streams:
        if isinstance(s, str) or len(s) != n_hyp:
            raise ValueError(f"each reference stream must hold one string per hypothesis ({n_hyp})")
    return streams


def _builtin_bleu(hypotheses, streams, max_n=4) -> float:
    correct, total = [0] * max_n, [0] * max_n
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        refs = [tokenize_13a(s[i].rstrip()).split() for s in streams]
        ref_counts = Counter()
        for r in refs:
            for g, c in _ngrams(r, max_n).items():
                ref_counts[g] = max(ref_counts[g], c)
        h = tokenize_13a(hyp.rstrip()).split()
        sys_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in refs)[1]  # closest length, ties: shorter
        for g, c in _ngrams(h, max_n).items():
            total[len(g) - 1] += c
            correct[len(g) - 1] += min(c, ref_counts[g])
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    log_sum, smooth = 0.0, 1.0
    for n in range(max_n):
        if total[n] == 0:  # no n-grams of this order at all: the score is 0
            return 0.0
        if correct[n] == 0:  # "exp" smoothing (NIST mteval): 1/2, 1/4, ... of a match
            smooth *= 2
            p = 100.0 / (smooth * total[n])
        else:
            p = 100.0 * correct[n] / total[n]
        log_sum += math.log(p)
    return bp * math.exp(log_sum / max_n)


def corpus_bleu(hypotheses, references, use_sacrebleu: bool | None = None) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` (a list of str) against ``references``: a list of
    str (one reference per hypothesis) or a list of reference streams (lists of str, each one
    per hypothesis). ``use_sacrebleu``: None uses sacrebleu when it is installed, True needs
    it, False takes the built-in implementation."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a list of strings, not a str")
    hypotheses = list(hypotheses)
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    streams = _reference_streams(references, len(hypotheses))
    if use_sacrebleu is not False:
        try:
            import sacrebleu
        except ImportError:
            if use_sacrebleu:
                raise ImportError("use_sacrebleu=True needs sacrebleu: pip install sacrebleu") from None
        else:
            return float(sacrebleu.corpus_bleu(hypotheses, streams).score)
    return _builtin_bleu(hypotheses, streams)
