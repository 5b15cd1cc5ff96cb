"""Generation: the KV cache, the one token picker, the one set of stop rules, streaming text,
``generate``/``stream``, continuous batching for the server, chat sessions, and scoring.

cache.py (over ``fastlm.models.decode``), sampling.py, stopping.py, text.py -> generate.py,
engine.py; chat.py (``ChatSession``: a conversation kept within the context, replies streamed)
over generate.py; scoring.py runs the full forward only.
"""
from .cache import KVCache
from .chat import ChatSession, ContextFull
from .engine import Engine, QueueFull, Request
from .generate import GenerateOutput, encode_prompt, generate, stream
from .sampling import GREEDY_TEMPERATURE, SamplingOptions, choose, sampling_options, undecodable_ids
from .scoring import Score, loglikelihood, score
from .stopping import stop_reason
from .text import TextStream

__all__ = ["KVCache", "ChatSession", "ContextFull", "Engine", "QueueFull", "Request", "GenerateOutput", "generate",
           "stream", "encode_prompt", "GREEDY_TEMPERATURE", "SamplingOptions", "sampling_options", "choose",
           "undecodable_ids", "Score", "loglikelihood", "score", "stop_reason", "TextStream"]
