"""``kv_cache_write``: a decode step's new keys and values written into the preallocated KV
caches in place, one row per (sequence, key/value head) at that sequence's position.

The kernel is the custom op ``fastlm::kv_cache_write`` (csrc/cpu/kv_cache.cpp; the CPU only),
which mutates its two cache arguments and returns nothing, so it has no autograd.
"""
from __future__ import annotations

import torch

from . import _forms
from ._checks import FLOATS, check_float, check_index, check_same
from ._dispatch import resolve


def kv_cache_write(k_cache, v_cache, k, v, positions) -> None:
    """Write a decode step's new keys and values (k, v: (B, Hkv, D)) into the caches
    ((B, Hkv, L, D)) in place, at position ``positions[b]`` of each sequence b. k, v have the
    caches' dtype, or are float32 for a bfloat16 / float16 cache (rounded to nearest even, as
    ``.to()`` rounds)."""
    for name, cache, x in (("k", k_cache, k), ("v", v_cache, v)):
        check_float(f"{name}_cache", cache)
        check_float(name, x)
        # float32 entries into a bf16 / fp16 cache are rounded to it (to nearest even)
        narrowing = x.dtype == torch.float32 and cache.dtype in (torch.bfloat16, torch.float16)
        check_same(name, x, f"{name}_cache", cache, dtype=not narrowing)
        if cache.dim() != 4 or x.dim() != 3 or x.shape != (cache.shape[0], cache.shape[1], cache.shape[3]):
            raise ValueError(f"kv_cache_write: {name}_cache must be (B, Hkv, L, D) and {name} (B, Hkv, D), "
                             f"got {tuple(cache.shape)} and {tuple(x.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"kv_cache_write: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    B, L = k_cache.shape[0], k_cache.shape[2]
    check_index("kv_cache_write", "positions", positions, (B,), k_cache.device, "the cache")
    if B and (int(positions.min()) < 0 or int(positions.max()) >= L):
        raise ValueError(f"kv_cache_write: positions must lie in [0, L = {L}), got {positions.tolist()}")
    resolve("kv_cache_write", k_cache.device, k_cache.dtype)[1](k_cache, v_cache, k, v, positions)


def _kv_cache_write_form(ns):
    write = _forms.op(ns, "kv_cache_write")

    def kv_cache_write(k_cache, v_cache, k, v, positions):
        write(k_cache, v_cache, k, v, positions)

    return kv_cache_write


def _register_fakes() -> None:
    """The C++ op returns nothing (it writes its cache arguments), under fake tensors too."""

    @torch.library.register_fake("fastlm::kv_cache_write")
    def _(k_cache, v_cache, k, v, positions):
        return None


def _register() -> None:
    _forms.install({"kv_cache_write": (_kv_cache_write_form, FLOATS)}, fakes=_register_fakes, backends=("cpu",))
