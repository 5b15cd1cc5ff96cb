"""Scoring text with a causal LM: sliding-window perplexity and bits per byte, and the
log-likelihoods of requests.

Perplexity of a causal LM over a token sequence longer than its context uses overlapping
windows, as Hugging Face documents it: windows of ``max_length`` tokens start every
``stride`` tokens; in each window only the tokens not scored by an earlier window count,
and they see the whole window before them as context. With ``stride < max_length`` every
token but the first is scored exactly once; with disjoint windows (``stride == max_length``)
the first token of each window has no context and is not scored, as in Hugging Face's loop.

    nll = sum over scored tokens of -log p(token | its context),  perplexity = exp(nll / tokens)

``stride == max_length`` gives disjoint windows (fast, less context); a smaller stride gives
each scored token more context. Bits per byte divides the total NLL (in bits) by the UTF-8
bytes of the scored tokens, which compares models with different tokenizers.

``loglikelihood`` and ``loglikelihood_rolling`` score lists of requests in batches, as
EleutherAI's lm-evaluation-harness asks of a model (``fastlm.evaluation.harness`` adapts them to it):
the log-probability of a continuation given its context (and whether greedy decoding would
produce it), and the total log-probability of whole texts, cut into windows that score
every token once.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .._progress import progress_bar, progress_enabled
from ..generation.scoring import (  # noqa: F401  (the one loglikelihood; its helpers used below)
    _check_max_length, _request_ids, _score_pairs, _start_token, loglikelihood)


def _as_token_ids(data, tokenizer):
    """A 1-D int64 tensor of token ids."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 1 or data.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"token ids must be a 1-D integer tensor, got {data.dtype} {tuple(data.shape)}")
        return data.to(torch.int64)
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, int) for t in data):
        return torch.tensor(data, dtype=torch.int64)
    texts = _read_texts(data)
    if tokenizer is None:
        raise ValueError("evaluating text needs a tokenizer (tokenizer=...)")
    eot = getattr(tokenizer, "eot_token", None)
    ids = []
    for i, t in enumerate(texts):
        if i and eot is not None:
            ids.append(eot)
        ids.extend(tokenizer.encode_ordinary(t) if hasattr(tokenizer, "encode_ordinary") else tokenizer.encode(t))
    return torch.tensor(ids, dtype=torch.int64)


def _read_texts(data) -> list[str]:
    if isinstance(data, str) and not _looks_like_path(data):
        return [data]
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if paths and all(isinstance(p, str) and not _looks_like_path(p) for p in paths):
        return list(paths)  # a list of texts
    texts = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            texts.extend(f.read_text(encoding="utf-8", errors="replace") for f in sorted(p.rglob("*")) if f.is_file())
        elif p.is_file():
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return texts


def _looks_like_path(s: str) -> bool:
    return len(s) < 4096 and "\n" not in s and Path(s).exists()


def _token_bytes(tokenizer, ids) -> int | None:
    if tokenizer is None or not hasattr(tokenizer, "decode_bytes"):
        return None
    return len(tokenizer.decode_bytes([int(i) for i in ids]))


@torch.inference_mode()
def perplexity(model, data, tokenizer=None, stride: int | None = None, max_length: int | None = None,
               batch_size: int = 8, progress: bool = True) -> dict:
    """Sliding-window perplexity of ``model`` on ``data``.

    ``data``: text, a list of texts, files or a folder (read as UTF-8; needs ``tokenizer``),
    or a 1-D tensor / list of token ids. ``max_length`` defaults to the model's context and
    ``stride`` to half of it. Returns ``{"perplexity", "nll", "tokens", "windows"}`` plus
    ``"bits_per_byte"`` when the bytes of the scored tokens are known. ``progress``: a bar over
    the windows on a terminal (``fastlm._progress``); False never shows one.
    """
    ids = _as_token_ids(data, tokenizer)
    ctx = model.config.block_size
    max_length = ctx if max_length is None else int(max_length)
    if not 2 <= max_length <= ctx:
        raise ValueError(f"max_length must be between 2 and the model's context ({ctx}), got {max_length}")
    stride = max(1, max_length // 2) if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least two tokens")
    vocab = model.config.vocab_size
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab}) for this model")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Windows: (begin, end, first scored position). Each token p >= 1 is scored in exactly one.
    windows, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
        begin += stride
    nll, count = 0.0, 0
    bar = progress_bar(total=len(windows), desc="perplexity", unit="window", enabled=progress_enabled(progress))
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        by_len: dict[int, list] = {}
        for w in group:
            by_len.setdefault(w[1] - w[0], []).append(w)
        for length, ws in by_len.items():
            x = torch.stack([ids[b:e] for b, e, _ in ws]).to(device)
            logits = model(x).float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            tgt = x[:, 1:]
            tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (k, length - 1)
            for row, (b, e, first) in enumerate(ws):
                nll += tok_nll[row, first - b - 1:].double().sum().item()
                count += e - first
        bar.update(len(group))
    bar.close()
    model.train(was_training)
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}
    nbytes = _token_bytes(tokenizer, ids[1:])
    if nbytes:
        out["bits_per_byte"] = nll / math.log(2) / nbytes
    return out


# ----------------------------------------------------------------------------- log-likelihood of requests
def rolling_windows(n: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The windows that score tokens 1..n of ``[start] + ids`` (``n = len(ids)``) with no
    token scored twice: ``(begin, first, end)`` means the window's input is positions
    ``begin .. end - 2`` and it scores positions ``first .. end - 1``. Each window scores
    ``stride`` new tokens (default ``max_length``: disjoint windows, lm-evaluation-harness's
    scheme) and gives them up to ``max_length`` tokens of input; a smaller stride gives
    every scored token more context at the cost of more windows."""
    stride = max_length if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    windows = []
    for first in range(1, n + 1, stride):
        end = min(first + stride, n + 1)
        windows.append((max(0, end - 1 - max_length), first, end))
    return windows


def loglikelihood_rolling(model, texts, tokenizer=None, batch_size: int = 16, max_length: int | None = None,
                          stride: int | None = None, progress: bool = True) -> list[float]:
    """For each text (a string with ``tokenizer``, or token ids): the total log-probability of
    all its tokens, the first conditioned on the start token, the text cut into the windows of
    ``rolling_windows`` (each token scored exactly once) and the windows of all texts scored
    together in batches. lm-evaluation-harness's ``loglikelihood_rolling`` is ``stride=None``.
    ``progress``: a bar over the windows on a terminal; False never shows one."""
    max_length = _check_max_length(model, max_length)
    pairs, owner = [], []
    for k, text in enumerate(texts):
        seq = [_start_token(model, tokenizer)] + _request_ids(text, tokenizer)
        for begin, first, end in rolling_windows(len(seq) - 1, max_length, stride):
            pairs.append((seq[begin:first], seq[first:end]))
            owner.append(k)
    totals = [0.0] * len(texts)
    for k, (lp, _) in zip(owner, _score_pairs(model, pairs, batch_size, max_length, progress)):
        totals[k] += lp
    return totals
