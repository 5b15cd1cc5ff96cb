"""Former home of continuous batching, kept so that ``fastlm.batching`` imports keep working:
the engine now lives in ``fastlm.generation.engine``."""
from .generation.engine import Engine, QueueFull, Request

__all__ = ["Engine", "Request", "QueueFull"]
