"""``fastlm.metrics`` moved to ``fastlm.evaluation`` (``metrics``: the pure metrics; ``tasks``:
``evaluate_task`` and ``plot_confusion``); this name stays importable."""
from .evaluation.metrics import (accuracy, classification_report, confusion_matrix, corpus_bleu, format_confusion,
                                 precision_recall_f1, tokenize_13a)
from .evaluation.tasks import evaluate_task, plot_confusion

__all__ = ["accuracy", "confusion_matrix", "precision_recall_f1", "classification_report", "format_confusion",
           "plot_confusion", "tokenize_13a", "corpus_bleu", "evaluate_task"]
