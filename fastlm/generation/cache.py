"""The KV cache: keys and values of every layer for a batch of sequences, allocated once."""
from __future__ import annotations

from typing import Sequence

import torch

from ..models import decode

__all__ = ["KVCache", "kv_cache_dtype"]

# The names kv_dtype= accepts, and the storage types a KV cache may have.
_KV_NAMES = {"fp32": torch.float32, "f32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "f16": torch.float16, "float16": torch.float16}
_KV_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kv_cache_dtype(kv_dtype, model) -> torch.dtype:
    """The storage dtype of a KV cache for ``model``: ``kv_dtype`` None is the model's dtype;
    "bf16"/"fp16"/"fp32" (or "bfloat16", "float16", "float32") or a torch floating dtype name
    one. A float32 model with a bf16 / fp16 cache keeps float32 weights and activations: only
    the cache's storage is narrower (its keys and values rounded to nearest even as they are
    written)."""
    md = model.transformer.wte.weight.dtype
    if kv_dtype is None:
        return md
    if isinstance(kv_dtype, str):
        d = _KV_NAMES.get(kv_dtype.lower())
        if d is None:
            raise ValueError(f"kv_dtype must be one of {', '.join(sorted(_KV_NAMES))} or a torch float dtype, "
                             f"got {kv_dtype!r}")
    elif isinstance(kv_dtype, torch.dtype):
        if kv_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_dtype must be a floating dtype ({', '.join(map(str, _KV_DTYPES))}), got {kv_dtype}")
        d = kv_dtype
    else:
        raise TypeError(f"kv_dtype must be None, a string such as 'bf16' or a torch.dtype, got {type(kv_dtype).__name__}")
    # The cache write rounds float32 keys and values into a narrower cache; other pairs are not
    # converted (kv_cache_write takes the cache's dtype or float32).
    if d != md and md != torch.float32:
        raise ValueError(f"kv_dtype {d} differs from the model's {md}: a cache of another dtype needs a float32 model")
    return d


class KVCache:
    """Keys and values of every layer for B sequences of up to ``max_len`` tokens: one
    (n_layer, 2, B, Hkv, max_len, D) tensor, ``kv``; ``layers[i]`` holds layer i's (k, v)
    views of it, each (B, Hkv, max_len, D); ``lens[b]`` tokens of row b are valid.

    ``dtype``: the cache's storage type, as ``kv_cache_dtype`` reads it (default the model's;
    "bf16" / "fp16" halve the bytes a decode step reads from it). ``storage``: an existing
    tensor of that shape to use instead of allocating one (a view of another cache: ``rows``)."""

    def __init__(self, model, batch_size: int, max_len: int, dtype=None, device=None, *, storage=None):
        cfg = model.config
        if max_len < 1 or max_len > cfg.block_size:
            raise ValueError(f"KVCache: max_len must be in [1, {cfg.block_size}], got {max_len}")
        self.model = model
        self.max_len = max_len
        if storage is None:
            p = model.transformer.wte.weight
            # Not zeroed: attention reads a row only below its length, whatever lies past it.
            storage = torch.empty(cfg.n_layer, 2, batch_size, cfg.n_kv_head, max_len, cfg.head_dim,
                                  dtype=kv_cache_dtype(dtype, model), device=device or p.device)
        elif tuple(storage.shape[2:5:2]) != (batch_size, max_len):
            raise ValueError(f"KVCache: storage of shape {tuple(storage.shape)} does not hold {batch_size} rows "
                             f"of {max_len} positions")
        self.kv = storage
        self.lens = [0] * batch_size
        self.layers = [(storage[i, 0], storage[i, 1]) for i in range(cfg.n_layer)]
        self.decoder = None  # the model's incremental forward, taken at the first pass
        self._views: dict = {}

    def rows(self, n: int, length: int | None = None) -> "KVCache":
        """A cache over rows 0..n-1 and positions 0..length-1 (default all) of this one, sharing
        its storage (with the whole length, a contiguous prefix of each layer's block). Views
        are kept and handed out again; their ``lens`` are the caller's to set."""
        length = self.max_len if length is None else length
        v = self._views.get((n, length))
        if v is None:
            v = self._views[(n, length)] = KVCache(self.model, n, length, storage=self.kv[:, :, :n, :, :length])
        return v

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> torch.Tensor:
        """Encode whole prompts into (empty or reset) rows in one pass; returns the logits
        (R, vocab) of each prompt's last token. ``rows`` defaults to all rows."""
        lengths = [len(p) for p in prompts]
        rows = list(range(len(self.lens))) if rows is None else list(rows)
        if len(rows) != len(prompts):
            raise ValueError(f"KVCache.prefill: {len(prompts)} prompts for {len(rows)} rows")
        if min(lengths) < 1 or max(lengths) > self.max_len:
            raise ValueError(f"KVCache.prefill: prompt lengths must be in [1, {self.max_len}], got {lengths}")
        if self.decoder is None:
            self.decoder = decode.decoder(self.model)
        logits = decode.prefill(self.model, self, prompts, rows, self.decoder)
        for r, n in zip(rows, lengths):
            self.lens[r] = n
        return logits

    def decode(self, tokens: torch.Tensor, advance: Sequence[bool]) -> torch.Tensor:
        """Feed one token per row (tokens (B,)) at position lens[b]; returns logits (B, vocab).
        Rows with advance[b] False (finished ones) are computed but their length stays."""
        pos = [min(n, self.max_len - 1) for n in self.lens]
        device = self.kv.device
        positions = torch.tensor(pos, dtype=torch.long, device=device)
        attend_lens = torch.tensor([q + 1 for q in pos], dtype=torch.long, device=device)
        if self.decoder is None:
            self.decoder = decode.decoder(self.model)
        logits = decode.step(self.model, self, tokens, positions, attend_lens, self.decoder)
        for b, a in enumerate(advance):
            if a:
                self.lens[b] += 1
        return logits
