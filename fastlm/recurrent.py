"""Former home of the recurrent baselines, kept so that ``fastlm.recurrent`` imports keep
working: they now live in ``fastlm.models.recurrent``."""
from .models.recurrent import RecurrentLM

__all__ = ["RecurrentLM"]
