"""Former home of generation, kept so that ``fastlm.generate`` imports keep working: it now
lives in the ``fastlm.generation`` package (cache, sampling, stopping, text, generate, scoring)."""
from .generation.cache import KVCache
from .generation.generate import GenerateOutput, encode_prompt, generate, stream
from .generation.sampling import (GREEDY_TEMPERATURE, SamplingOptions, argmax, choose, process_logits,
                                  processes_greedy, sampling_options, undecodable_ids, unusable_rows,
                                  warn_unused_sampling)
from .generation.scoring import Score, score
from .generation.scoring import loglikelihood as _loglikelihood_batch
from .generation.text import TextStream

__all__ = ["KVCache", "GenerateOutput", "generate", "stream", "score", "loglikelihood", "GREEDY_TEMPERATURE"]

# The former private names, under which code outside the package reached them.
_Options, _options, _process_logits = SamplingOptions, sampling_options, process_logits
_processes_greedy, _argmax, _unusable_rows = processes_greedy, argmax, unusable_rows
_warn_unused_sampling, _TextStream, _encode = warn_unused_sampling, TextStream, encode_prompt


def loglikelihood(model, context, continuation, tokenizer=None) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) for one
    request: ``fastlm.generation.loglikelihood`` (which takes a list of requests) on one."""
    return _loglikelihood_batch(model, [(context, continuation)], tokenizer, batch_size=1)[0]
