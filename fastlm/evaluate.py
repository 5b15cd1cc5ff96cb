"""Evaluation: sliding-window perplexity and bits per byte.

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
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


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
               batch_size: int = 8) -> dict:
    """Sliding-window perplexity of ``model`` on ``data``.

    ``data``: text, a list of texts, files or a folder (read as UTF-8; needs ``tokenizer``),
    or a 1-D tensor / list of token ids. ``max_length`` defaults to the model's context and
    ``stride`` to half of it. Returns ``{"perplexity", "nll", "tokens", "windows"}`` plus
    ``"bits_per_byte"`` when the bytes of the scored tokens are known.
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
    model.train(was_training)
    out = {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}
    nbytes = _token_bytes(tokenizer, ids[1:])
    if nbytes:
        out["bits_per_byte"] = nll / math.log(2) / nbytes
    return out
