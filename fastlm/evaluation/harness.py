"""An adapter for EleutherAI's lm-evaluation-harness: ``FastLM``, registered as ``"fastlm"``.

Importing this module needs lm-eval (``pip install 'fastlm[eval]'``); ``import fastlm`` does
not. Once imported, lm-eval finds the model by name::

    import fastlm.harness, lm_eval
    lm_eval.simple_evaluate(model="fastlm", model_args="pretrained=out/best", tasks=["lambada_openai"])

or from the shell, ``python -m fastlm.harness`` takes lm-eval's own command line with this
model registered (``--model fastlm --model_args pretrained=out/best --tasks ...``).

The three request kinds map onto fastlm's library: ``loglikelihood`` and
``loglikelihood_rolling`` onto ``fastlm.evaluation.scoring`` (batched, longest first), and
``generate_until`` onto ``fastlm.generate.generate`` (greedy unless the task samples): requests
with the same generation options (stop strings, ``max_gen_toks``, sampling) run together,
``batch_size`` at a time, each sequence stopping on its own, and the answers come back in the
requests' order. A progress bar shows on a terminal unless lm-eval passes ``disable_tqdm``.
Context and continuation are encoded as lm-eval's Hugging Face model does: trailing spaces
of the context move to the continuation, the pair is encoded whole and the continuation is
what follows the context's own tokens.
"""
from __future__ import annotations


try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("fastlm.evaluation.harness needs lm-evaluation-harness: pip install 'fastlm[eval]' "
                      f"(or pip install lm-eval) ({e})") from None

import torch

from .._progress import progress_bar, progress_enabled
from ..generation.generate import generate
from . import scoring

__all__ = ["FastLM"]


@register_model("fastlm")
class FastLM(LM):
    """A fastlm model for lm-eval. ``pretrained``: a checkpoint directory (its tokenizer is
    loaded from it unless ``tokenizer`` is given); or pass ``model=`` (a ``fastlm.GPT``) and
    ``tokenizer=`` objects directly. ``batch_size``: requests scored per forward pass.
    lm-eval's other model options (``max_batch_size``, ...) are accepted and not used."""

    def __init__(self, pretrained=None, model=None, tokenizer=None, batch_size=16, device=None,
                 max_length=None, dtype=None, **kwargs):
        super().__init__()
        from ..models import load_model
        from ..tokenizer import resolve_tokenizer

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's default is "cuda"
        if model is None:
            if pretrained is None:
                raise ValueError("FastLM needs pretrained=CHECKPOINT_DIR or model=")
            model = load_model(pretrained, dtype=_dtype(dtype), device=device)
        tokenizer = resolve_tokenizer(tokenizer, pretrained, "FastLM")
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.tokenizer = tokenizer
        # lm-eval passes "auto" or "auto:N" for automatic batch sizes; a fixed size serves here.
        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length) if max_length else model.config.block_size

    # -- encoding
    def _encode(self, text: str) -> list[int]:
        return scoring._request_ids(text, self.tokenizer)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [scoring._start_token(self.model, self.tokenizer)], self._encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # -- the three request kinds
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = scoring.loglikelihood(self.model, pairs, batch_size=self.batch_size, max_length=self.max_length,
                                        progress=not disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [self._encode(req.args[0]) for req in requests]
        results = scoring.loglikelihood_rolling(self.model, texts, tokenizer=self.tokenizer,
                                                 batch_size=self.batch_size, max_length=self.max_length,
                                                 progress=not disable_tqdm)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with equal options share batches (generate takes one set of options and
        # one set of stop strings); the longest prompts go first so that a batch's prompts are
        # alike in length.
        jobs = [self._generation_job(*req.args) for req in requests]
        groups: dict = {}
        for i, (prompt, opts) in enumerate(jobs):
            groups.setdefault(repr(sorted(opts.items())), []).append(i)
        out: list = [None] * len(requests)
        bar = progress_bar(total=len(requests), desc="generate_until", unit="request",
                           enabled=progress_enabled(not disable_tqdm))
        try:
            for members in groups.values():
                members.sort(key=lambda i: -len(jobs[i][0]))
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    texts = self._generate_batch([jobs[i][0] for i in batch], jobs[batch[0]][1])
                    for i, text in zip(batch, texts):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        finally:
            bar.close()
        return out

    def _generation_job(self, context: str, gen_kwargs) -> tuple[list[int], dict]:
        """(prompt ids, generate's options) of one request: lm-eval's ``until``,
        ``max_gen_toks``, ``do_sample``, ``temperature`` and the samplers' options; the prompt
        keeps its last tokens so that prompt and answer fit the context."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        block = self.model.config.block_size
        max_new = max(1, min(int(kw.pop("max_gen_toks", 256)), block - 1))
        prompt = (self._encode(context) or [scoring._start_token(self.model, self.tokenizer)])[-(block - max_new):]
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        opts = {k: kw[k] for k in ("top_k", "top_p", "repetition_penalty", "seed") if kw.get(k) is not None}
        return prompt, {"until": tuple(until), "max_new_tokens": max_new, "do_sample": do_sample and temperature > 0,
                        "temperature": temperature, **opts}

    def _generate_batch(self, prompts: list[list[int]], opts: dict) -> list[str]:
        """The answers to prompts that share options, from one batched ``generate``: each text
        ends before the first of the stop strings it holds."""
        opts = dict(opts)
        until = list(opts.pop("until"))
        res = generate(self.model, prompts, stop=until or None, tokenizer=self.tokenizer,
                       return_dict_in_generate=True, **opts)
        texts = []
        for text in res.texts:
            for s in until:
                text = text.split(s)[0]
            texts.append(text)
        return texts


def _dtype(name):
    if name in (None, "auto"):
        return None
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name))


def main(argv=None):
    """lm-eval's command line with the ``fastlm`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli_evaluate()


if __name__ == "__main__":
    main()
