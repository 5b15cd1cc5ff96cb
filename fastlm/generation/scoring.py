"""Scoring text with a model: log-probabilities of tokens, of continuations, of whole texts.

``loglikelihood`` scores (context, continuation) requests in batches, as EleutherAI's
lm-evaluation-harness asks of a model (``fastlm.evaluate`` builds rolling log-likelihoods and
perplexity on it); ``score`` gives the log-probability of every token of one text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._progress import progress_bar, progress_enabled

__all__ = ["loglikelihood", "score", "Score"]


def _request_ids(x, tokenizer) -> list[int]:
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError("text requests need a tokenizer (tokenizer=...)")
        return list(tokenizer.encode_ordinary(x) if hasattr(tokenizer, "encode_ordinary") else tokenizer.encode(x))
    return [int(t) for t in x]


def _start_token(model, tokenizer) -> int:
    for t in (getattr(tokenizer, "eot_token", None), model.config.bos_token_id, model.config.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("an empty context needs a start token: the tokenizer's eot_token or the model's bos/eos id")


@torch.inference_mode()
def _score_pairs(model, pairs: list[tuple[list, list]], batch_size: int, max_length: int,
                 progress: bool = True) -> list[tuple[float, bool]]:
    """(sum log p, all greedy) of each (context ids, continuation ids); inputs cut from the
    left to ``max_length`` tokens, sorted longest first and right-padded into batches (a
    causal model's real tokens never see the padding after them). ``progress``: a bar over
    the pairs on a terminal (``fastlm._progress``)."""
    device = next(model.parameters()).device
    inputs = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("loglikelihood: a continuation is empty")
        if len(cont) > max_length:
            raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens exceeds max_length {max_length}")
        inputs.append((ctx + cont)[:-1][-max_length:])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    out: list = [None] * len(pairs)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(pairs), desc="scoring", unit="request", enabled=progress_enabled(progress))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = len(inputs[rows[0]])
            x = torch.zeros(len(rows), width, dtype=torch.int64)
            for r, i in enumerate(rows):
                x[r, :len(inputs[i])] = torch.tensor(inputs[i])
            logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
            for r, i in enumerate(rows):
                cont = pairs[i][1]
                end = len(inputs[i])
                lp = logp[r, end - len(cont):end]
                tgt = torch.tensor(cont, device=lp.device)
                out[i] = (lp.gather(-1, tgt[:, None]).double().sum().item(), bool((lp.argmax(-1) == tgt).all()))
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out


def loglikelihood(model, requests, tokenizer=None, batch_size: int = 16,
                  max_length: int | None = None, progress: bool = True) -> list[tuple[float, bool]]:
    """For each ``(context, continuation)`` in ``requests``: the sum of log p(continuation |
    context) and whether greedy decoding would produce the continuation, as lm-evaluation-
    harness defines them. Contexts and continuations are strings (encoded separately, with
    ``tokenizer``) or lists of token ids; an empty context is the start token (the
    tokenizer's ``eot_token``, else the model's BOS/EOS). Inputs longer than ``max_length``
    (default: the model's context) keep their last tokens. Requests are scored in batches
    of ``batch_size``, longest first; the results come back in the requests' order.
    ``progress``: a bar on a terminal; False never shows one."""
    max_length = _check_max_length(model, max_length)
    pairs = []
    for context, continuation in requests:
        ctx, cont = _request_ids(context, tokenizer), _request_ids(continuation, tokenizer)
        pairs.append((ctx or [_start_token(model, tokenizer)], cont))
    return _score_pairs(model, pairs, batch_size, max_length, progress)


def _check_max_length(model, max_length):
    ctx = model.config.block_size
    max_length = ctx if max_length is None else int(max_length)
    if not 1 <= max_length <= ctx:
        raise ValueError(f"max_length must be between 1 and the model's context ({ctx}), got {max_length}")
    return max_length


# ----------------------------------------------------------------------------- one text
def _ids(tokenizer, x):
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer (pass tokenizer=...)")
        return list(tokenizer.encode(x))
    return [int(t) for t in x]


@torch.inference_mode()
def _token_logprobs(model, context: list, targets: list) -> tuple[list, list]:
    """log p(targets[i] | context + targets[:i]) and whether each target is the argmax; the
    input is cut from the left to the model's context when too long."""
    seq = (context + targets)[:-1]
    n = len(targets)
    block = model.config.block_size
    if len(seq) > block:
        if n > block:
            raise ValueError(f"continuation of {n} tokens exceeds the model's context of {block}")
        seq = seq[-block:]
    logits = model(torch.tensor([seq], device=model.device))[0, -n:].float()
    lp = torch.log_softmax(logits, dim=-1)
    tgt = torch.tensor(targets, device=lp.device)
    return lp.gather(-1, tgt.view(-1, 1)).squeeze(-1).tolist(), (lp.argmax(-1) == tgt).tolist()


@dataclass
class Score:
    """What ``score`` returns: the tokens of the text and the log-probability of each."""

    token_ids: list
    logprobs: list

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total / max(len(self.logprobs), 1))


def score(model, text, tokenizer=None) -> Score:
    """Log-probability of every token of ``text`` (a string with ``tokenizer``, or ids), the
    first conditioned on the start token (the tokenizer's eot_token), texts longer than the
    context in consecutive windows (each token sees the tokens of its window before it)."""
    ids = _ids(tokenizer, text)
    if not ids:
        raise ValueError("score: the text is empty")
    start = _start_token(model, tokenizer)
    block = model.config.block_size
    out = []
    for i in range(0, len(ids), block):
        ctx = [start] if i == 0 else [ids[i - 1]]
        out += _token_logprobs(model, ctx, ids[i:i + block])[0]
    return Score(ids, out)
