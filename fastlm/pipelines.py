"""``fastlm.pipeline("text-generation", model=...)``, shaped like Hugging Face's pipeline.

``pipeline("text-generation", model="my-model")("Once upon a time")`` returns
``[{"generated_text": "Once upon a time..."}]``. The model is a ``fastlm.GPT`` or a checkpoint
directory (its ``generation_config.json`` gives the default options); the tokenizer is any
tiktoken-like object (``encode``, ``decode_bytes``/``token_bytes``, ``eot_token``) or a
directory, by default the model's, loaded with ``fastlm.Tokenizer.load``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .generate import GenerateOutput, _encode, generate
from .model import GPT

__all__ = ["pipeline", "TextGenerationPipeline", "load_tokenizer"]

_GEN_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "eos_token_id")


def pipeline(task: str, model=None, tokenizer=None, device=None, dtype=None, **kwargs):
    """The one task is "text-generation"; ``model`` is a ``fastlm.GPT`` or a checkpoint directory."""
    if task != "text-generation":
        raise ValueError(f"fastlm.pipeline supports the task 'text-generation', got {task!r}")
    if model is None:
        raise ValueError("pipeline('text-generation') needs model= (a fastlm.GPT or a checkpoint directory)")
    return TextGenerationPipeline(model, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs)


def load_tokenizer(path):
    """``fastlm.Tokenizer.load(path)``, with a clear error where it cannot serve."""
    try:
        from .tokenizer import Tokenizer
    except ImportError as e:
        raise ValueError(f"no tokenizer given and fastlm's Tokenizer is not available ({e}); "
                         "pass tokenizer= (any object with encode and decode_bytes, e.g. a tiktoken Encoding)") from None
    try:
        return Tokenizer.load(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}; pass tokenizer=...") from None


class TextGenerationPipeline:
    def __init__(self, model, tokenizer=None, device=None, dtype=None, **defaults):
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            model = GPT.from_pretrained(path, dtype=dtype, device=device)
        elif not isinstance(model, GPT):
            raise TypeError(f"model must be a fastlm.GPT or a checkpoint directory, got {type(model).__name__}")
        self.model = model
        if tokenizer is None:
            if path is None:
                raise ValueError("pipeline: pass tokenizer= when model is a GPT object")
            tokenizer = load_tokenizer(path)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.defaults = {}
        if path is not None and (path / "generation_config.json").is_file():
            import json

            cfg = json.loads((path / "generation_config.json").read_text())
            self.defaults = {k: cfg[k] for k in _GEN_KEYS if cfg.get(k) is not None}
        unknown = set(defaults) - set(_GEN_KEYS) - {"stop", "seed"}
        if unknown:
            raise TypeError(f"pipeline got unexpected keyword arguments {sorted(unknown)}")
        self.defaults.update(defaults)
        if self.defaults.get("eos_token_id") is None and model.config.eos_token_id is None:
            eot = getattr(tokenizer, "eot_token", None)
            if eot is not None:
                self.defaults["eos_token_id"] = eot

    def __call__(self, text_inputs, num_return_sequences: int = 1, return_full_text: bool = True,
                 return_tensors: bool = False, **kwargs):
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        if not texts:
            raise ValueError("pipeline: no text given")
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return_sequences!r}")
        opts = {**self.defaults, **kwargs}
        unknown = set(opts) - set(_GEN_KEYS) - {"stop", "seed", "context_overflow"}
        if unknown:
            raise TypeError(f"pipeline got unexpected keyword arguments {sorted(unknown)}")
        if num_return_sequences > 1 and not (opts.get("do_sample") and opts.get("temperature", 1.0) != 0):
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding would repeat one answer)")
        if opts.get("max_new_tokens") is None and opts.get("max_length") is None:
            opts["max_new_tokens"] = 50
        if opts.get("max_new_tokens") is not None:
            opts.pop("max_length", None)
        prompts = [_encode(self.tokenizer, t) for t in texts]
        batch = [p for p in prompts for _ in range(num_return_sequences)]
        out: GenerateOutput = generate(self.model, batch, tokenizer=self.tokenizer, return_dict_in_generate=True, **opts)
        results = []
        for i, text in enumerate(texts):
            group = []
            for j in range(i * num_return_sequences, (i + 1) * num_return_sequences):
                if return_tensors:
                    ids = (prompts[i] if return_full_text else []) + out.tokens[j]
                    group.append({"generated_token_ids": ids})
                else:
                    group.append({"generated_text": (text if return_full_text else "") + out.texts[j]})
            results.append(group)
        return results[0] if single else results
