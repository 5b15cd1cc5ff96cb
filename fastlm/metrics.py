"""Task metrics: classification scores, a confusion matrix, corpus BLEU, and ``evaluate_task``.

Classification: ``accuracy``, ``confusion_matrix`` (rows: true label, columns: predicted,
labels sorted unless given, as scikit-learn's), ``precision_recall_f1`` (per class; 0 where
a ratio has no denominator, scikit-learn's ``zero_division`` default), ``classification_report``
(all of them as one dict), ``format_confusion`` (a terminal table) and ``plot_confusion`` (a
PNG, written atomically).

Translation: ``corpus_bleu(hypotheses, references)`` is BLEU on a 0-100 scale. It is
sacrebleu's ``corpus_bleu`` when sacrebleu is installed, else the built-in form of the same
standard: 13a tokenization (mteval-v13a, sacrebleu's default), n-grams up to 4 clipped by
the largest count in any reference, the brevity penalty with each hypothesis's closest
reference length (ties: the shorter), and "exp" smoothing of zero precisions.

``evaluate_task(task, model_dirs, data, json_out=None, png_out=None)`` scores saved
classification or translation pipelines on a JSONL file, prints a table and returns a dict.
"""
from __future__ import annotations

import io
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["accuracy", "confusion_matrix", "precision_recall_f1", "classification_report", "format_confusion",
           "plot_confusion", "tokenize_13a", "corpus_bleu", "evaluate_task"]


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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("a PNG needs matplotlib: pip install matplotlib") from None
    return plt


def _save_figure(fig, path) -> None:
    from ._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(matrices, labels, path, titles=None) -> None:
    """Write confusion matrices (one, or a list drawn side by side) as a PNG at ``path``."""
    plt = _pyplot()
    if np.ndim(matrices) == 2:
        matrices = [matrices]
    titles = list(titles) if titles is not None else [""] * len(matrices)
    n = len(matrices)
    size = 1.2 + 0.55 * len(labels)
    fig, axes = plt.subplots(1, n, figsize=(max(3.5, size) * n, max(3.2, size)), dpi=100, squeeze=False)
    for ax, m, title in zip(axes[0], matrices, titles):
        m = np.asarray(m)
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(len(labels)), [str(x) for x in labels], rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), [str(x) for x in labels])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        top = m.max() if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                        color="white" if top and m[i, j] > top / 2 else "black")
    fig.tight_layout()
    _save_figure(fig, path)


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


# ----------------------------------------------------------------------------- evaluate_task
_TASKS = {"classification": "text-classification", "translation": "translation"}


def _print_table(rows, columns):
    cells = [[str(c) for c in columns]] + [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
                                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def evaluate_task(task, model_dirs, data, json_out=None, png_out=None) -> dict:
    """Score saved pipelines (``model_dirs``: one directory or several) on ``data``, a JSONL
    file (``text``/``label`` for "classification", ``source``/``target`` for "translation").

    Classification: accuracy, macro F1, per-class precision/recall/F1 and the confusion
    matrix of each model; translation: corpus BLEU. Prints a table (and, for classification,
    each model's confusion matrix), writes the result as JSON to ``json_out`` and a PNG to
    ``png_out`` (confusion matrices, or BLEU bars) when given, and returns the result dict
    ``{"task", "data", "n", "models": [{"model", ...}, ...]}``."""
    from ._io import atomic_write_json
    from .finetune import read_examples
    from .pipelines import load_pipeline

    if task not in _TASKS:
        raise ValueError(f"evaluate_task: task must be one of {sorted(_TASKS)}, got {task!r}")
    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    if not dirs:
        raise ValueError("evaluate_task: no model directories given")
    pipes = [load_pipeline(d) for d in dirs]
    for d, pipe in zip(dirs, pipes):
        if pipe.task != _TASKS[task]:
            raise ValueError(f"{d} holds a {pipe.task!r} pipeline, not a {task} model")
    fields = ("text", "label") if task == "classification" else ("source", "target")
    examples = read_examples(data, fields)
    results = []
    for d, pipe in zip(dirs, pipes):
        if task == "classification":
            known = set(pipe.labels)
            for ex in examples:
                if ex["label"] not in known:
                    raise ValueError(f"{data} line {ex['line']}: label {ex['label']!r} is not one of the model's "
                                     f"labels {pipe.labels} ({d})")
            predicted = [r[0]["label"] for r in pipe([ex["text"] for ex in examples], top_k=1)]
            report = classification_report([ex["label"] for ex in examples], predicted, labels=pipe.labels)
            results.append({"model": str(d), **report})
        else:
            hyps = [r["translation_text"] for r in pipe([ex["source"] for ex in examples])]
            results.append({"model": str(d), "bleu": corpus_bleu(hyps, [ex["target"] for ex in examples])})
    out = {"task": task, "data": str(data), "n": len(examples), "models": results}
    if task == "classification":
        _print_table(results, ["model", "accuracy", "macro_f1"])
        for r in results:
            print(f"\n{r['model']}: confusion matrix")
            print(format_confusion(r["confusion_matrix"], r["labels"]))
            _print_table([{"label": str(k), **v} for k, v in r["per_class"].items()],
                         ["label", "precision", "recall", "f1", "support"])
    else:
        _print_table(results, ["model", "bleu"])
    if json_out is not None:
        atomic_write_json(json_out, out)
    if png_out is not None:
        if task == "classification":
            labels = results[0]["labels"]
            if any(r["labels"] != labels for r in results):
                raise ValueError("the models have different labels: one confusion-matrix PNG cannot show them all")
            plot_confusion([np.array(r["confusion_matrix"]) for r in results], labels, png_out,
                           titles=[f"{Path(r['model']).name}: acc {r['accuracy']:.3f}" for r in results])
        else:
            plt = _pyplot()
            fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(results), 3.5), dpi=100)
            ax.bar([Path(r["model"]).name for r in results], [r["bleu"] for r in results])
            ax.set_ylabel("BLEU")
            ax.set_ylim(0, 100)
            fig.tight_layout()
            _save_figure(fig, png_out)
    return out
