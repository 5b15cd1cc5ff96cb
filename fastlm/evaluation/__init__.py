"""Evaluation: scoring text with a model, comparing checkpoints, task metrics, and the
lm-evaluation-harness adapter.

===========  ========================================================================
module       what it holds
===========  ========================================================================
scoring.py   ``perplexity`` (sliding windows, bits per byte), ``loglikelihood``,
             ``loglikelihood_rolling``, ``rolling_windows``
compare.py   ``compare_checkpoints``: the same text through several checkpoints
metrics.py   pure metrics: accuracy, confusion matrix, precision/recall/F1, corpus BLEU
tasks.py     ``evaluate_task``: saved pipelines scored on a JSONL file; ``plot_confusion``
harness.py   ``FastLM`` for lm-eval (needs lm-eval; imported only on demand)
===========  ========================================================================
"""
from .compare import LM_COLUMNS, compare_checkpoints
from .metrics import (accuracy, classification_report, confusion_matrix, corpus_bleu, format_confusion,
                      precision_recall_f1, tokenize_13a)
from .scoring import loglikelihood, loglikelihood_rolling, perplexity, rolling_windows
from .tasks import evaluate_task, plot_confusion

__all__ = ["perplexity", "loglikelihood", "loglikelihood_rolling", "rolling_windows", "compare_checkpoints",
           "LM_COLUMNS", "accuracy", "confusion_matrix", "precision_recall_f1", "classification_report",
           "format_confusion", "tokenize_13a", "corpus_bleu", "evaluate_task", "plot_confusion"]
