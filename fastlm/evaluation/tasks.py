"""Scoring saved task pipelines on labelled data: ``evaluate_task(task, model_dirs, data)`` runs
each classification or translation pipeline over a JSONL file, scores it with
``fastlm.evaluation.metrics``, prints a table and returns (and optionally writes) the result;
``plot_confusion`` draws confusion matrices as a PNG, written atomically."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .._progress import progress_bar, progress_enabled
from .metrics import classification_report, corpus_bleu, format_confusion

__all__ = ["evaluate_task", "plot_confusion"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("a PNG needs matplotlib: pip install matplotlib") from None
    return plt


def _save_figure(fig, path) -> None:
    from .._io import atomic_write_bytes

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


_TASKS = {"classification": "text-classification", "translation": "translation"}


def _print_table(rows, columns):
    cells = [[str(c) for c in columns]] + [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
                                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def evaluate_task(task, model_dirs, data, json_out=None, png_out=None, progress: bool = True) -> dict:
    """Score saved pipelines (``model_dirs``: one directory or several) on ``data``, a JSONL
    file (``text``/``label`` for "classification", ``source``/``target`` for "translation").

    Classification: accuracy, macro F1, per-class precision/recall/F1 and the confusion
    matrix of each model; translation: corpus BLEU. Prints a table (and, for classification,
    each model's confusion matrix), writes the result as JSON to ``json_out`` and a PNG to
    ``png_out`` (confusion matrices, or BLEU bars) when given, and returns the result dict
    ``{"task", "data", "n", "models": [{"model", ...}, ...]}``. ``progress``: a bar over the
    models on a terminal; False never shows one."""
    from .._io import atomic_write_json
    from ..finetune import read_examples
    from ..pipelines import load_pipeline

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
    for d, pipe in progress_bar(list(zip(dirs, pipes)), desc=f"evaluating ({task})", unit="model",
                                enabled=progress_enabled(progress)):
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
