"""``fastlm.evaluate`` moved to ``fastlm.evaluation`` (``scoring``: perplexity and
log-likelihoods; ``compare``: checkpoints side by side); this name stays importable."""
from .evaluation.compare import LM_COLUMNS, compare_checkpoints
from .evaluation.scoring import loglikelihood, loglikelihood_rolling, perplexity, rolling_windows

__all__ = ["perplexity", "loglikelihood", "loglikelihood_rolling", "rolling_windows", "compare_checkpoints",
           "LM_COLUMNS"]
