"""The incremental forward: the model's own blocks run over a KV cache.

Generation and the server both call these two functions, and both run ``GPT.blocks``, the
code the full forward runs; only two parameters differ (see ``fastlm.models.layers``):

- the attention of each layer writes the step's keys and values into the cache and attends
  over the cache (``_Prefill``, ``_Step`` below);
- the linear layers, norms and GELU run through ``_Run``: the op implementations chosen once
  per model, the projection weights kept in the layout their product reads fastest (packed
  into column panels for the CPU kernel of ``ops.decode_linear``, which reads each weight
  once, in address order, for all rows; else transposed, (in, out), for BLAS). The layers of
  a quantized model (``fastlm.models.quant.QuantLinear``) are already packed, and run
  ``ops.decode_linear_q`` over every row of a step or a prefill, as their forward does.

1. **Prefill.** Prompts of any lengths run in one pass without padding: their tokens are
   packed into one (1, N, C) sequence for the per-token work (norms, projections, MLP), and
   attention runs prompt by prompt over its own keys (causal), each prompt's keys and values
   written to its cache row at positions 0..len - 1.
2. **Step.** One token per row at position ``positions[b]``: each layer writes its key and
   value there (in place, nothing is reallocated) and attends with ``ops.decode_attention``
   over the valid prefix ``attend_lens[b]`` only, so rows of different lengths share a batch
   without any padding being attended. Where every op of the step is served by the CPU
   kernels and the model is of the family the fused step covers (``_fused_step_ok``), the
   whole step runs as one call of ``ops.gpt_decode_step``: the same kernels in the same
   order, without the per-op cost of Python; the blocks below are its specification.

The cache is any object whose ``layers[i]`` holds layer i's ``(k, v)``, each (B, Hkv, L, D)
(``fastlm.generation.KVCache``).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from .. import ops
from ..ops import decode_step as _fused
from .layers import Eager, Norm
from .quant import QuantLinear

__all__ = ["decoder", "prefill", "step"]


class _Run(Eager):
    """The linear layers, norms and GELU of the incremental forward, their implementations
    chosen once for the model's device and dtype. Built per model, rebuilt when its weights
    change (``_run``)."""

    def __init__(self, model):
        w = model.transformer.wte.weight
        norm = "layer_norm" if model.config.norm == "layernorm" else "rms_norm"
        self.layer_norm = norm == "layer_norm"
        chosen = {op: ops.resolve(op, w.device, w.dtype) for op in
                  ("decode_linear", "decode_linear_q", norm, "gelu", "decode_attention", "kv_cache_write")}
        self.packed = chosen["decode_linear"][0] != "reference"
        self._linear, self._linear_q = chosen["decode_linear"][1], chosen["decode_linear_q"][1]
        self._norm, self._gelu = chosen[norm][1], chosen["gelu"][1]
        self.attend, self.write_kv = chosen["decode_attention"][1], chosen["kv_cache_write"][1]
        # the ops this model's step runs (decode_linear_q only for a quantized model)
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        served = [b for op, (b, _) in chosen.items() if op != "decode_linear_q" or quantized]
        self.weights = {m: self._layout(m) for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))}
        self.norms = {m: (m.weight, m.bias, m.eps) for m in model.modules() if isinstance(m, Norm)}
        self.key = _weights_key(model)
        # the fused step: its arguments gathered once (see the module's doc)
        self.fused = None
        if all(b == "cpu" for b in served) and w.dtype == torch.float32 and _fused_step_ok(model):
            self.fused = self._fused_args(model)

    def call(self, module, *args):
        return module.forward(*args)  # inference: no hooks to run

    def _layout(self, linear):
        """(weight in the layout the product reads, bias or None, out features, packed format or
        None for a float weight)."""
        bias = None if linear.bias is None else linear.bias.detach()
        if isinstance(linear, QuantLinear):
            return linear.weight_q, bias, linear.out_features, linear.format
        weight = linear.weight.detach()
        if self.packed:
            return ops.pack_decode_weight(weight), bias, weight.shape[0], None
        return weight.t().contiguous(), bias, weight.shape[0], None

    def linear(self, module, x):
        w, b, n, fmt = self.weights[module]
        x2 = x.reshape(-1, x.shape[-1])
        if fmt is not None:
            y = self._linear_q(x2, w, b, n, fmt)
        elif self.packed:
            y = self._linear(x2, w, b, n)
        else:
            y = torch.mm(x2, w) if b is None else torch.addmm(b, x2, w)
        return y.view(*x.shape[:-1], n)

    def norm(self, module, x, residual=None):
        weight, bias, eps = self.norms[module]
        if self.layer_norm:
            return self._norm(x, weight, bias, eps, residual)
        return self._norm(x, weight, eps, residual)

    def gelu(self, x):
        return self._gelu(x)

    def dropout(self, module, x):
        return x


    def _fused_args(self, model):
        """The arguments of ``ops.gpt_decode_step`` for ``model``, or None where its block
        projections are not all in one weight format."""
        cfg, t = model.config, model.transformer
        weights, formats = [], set()
        for block in t.h:
            for norm, linears in ((block.ln_1, (block.attn.c_attn, block.attn.c_proj)),
                                  (block.ln_2, (block.mlp.c_fc, block.mlp.c_proj))):
                weights += [norm.weight, getattr(norm, "bias", None)]
                for lin in linears:
                    w, b, _, fmt = self.weights[lin]
                    formats.add(fmt or "f32")
                    weights += [w, b]
        if len(formats) > 1:
            return None
        weights += [t.ln_f.weight, getattr(t.ln_f, "bias", None)]
        head_w, head_b, _, head_fmt = self.weights[model.lm_head]
        return dict(wte=t.wte.weight.detach(), wpe=t.wpe.weight.detach() if cfg.pos == "learned" else None,
                    weights=[None if x is None else x.detach() for x in weights], n_head=cfg.n_head,
                    n_kv_head=cfg.n_kv_head, hidden=cfg.hidden_dim, rms=cfg.norm == "rmsnorm",
                    eps=t.ln_f.eps, weight_format=formats.pop() if formats else "f32", head_weight=head_w,
                    head_bias=head_b, head_format=head_fmt or "f32")


def _fused_step_ok(model) -> bool:
    """Whether ``model`` is of the family ``ops.gpt_decode_step`` computes: a plain fastlm GPT
    (its own blocks, final norm and output layer), learned positions, a GELU MLP, no QK-norm,
    no logit soft-cap, and one epsilon for every norm."""
    from .gpt import GPT
    from .layers import MLP, Block, CausalSelfAttention

    cfg = model.config
    if type(model) is not GPT or cfg.arch != "gpt" or not _fused.available():
        return False
    if cfg.pos != "learned" or cfg.mlp != "gelu" or cfg.qk_norm or cfg.logit_softcap is not None:
        return False
    t = model.transformer
    for block in t.h:
        parts = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        if (type(block) is not Block or type(block.attn) is not CausalSelfAttention or type(block.mlp) is not MLP
                or any(type(m) not in (nn.Linear, QuantLinear) for m in parts)
                or any(type(m) is not Norm or m.eps != t.ln_f.eps for m in (block.ln_1, block.ln_2))):
            return False
    return type(t.ln_f) is Norm and type(model.lm_head) in (nn.Linear, QuantLinear)


def _weights_key(model):
    # the parameters and the buffers: a quantized layer's packed weight is a buffer
    return tuple((p.data_ptr(), p._version, p.dtype) for p in (*model.parameters(), *model.buffers()))


_RUNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _run(model) -> _Run:
    r = _RUNS.get(model)
    if r is None or r.key != _weights_key(model):
        r = _RUNS[model] = None  # free the stale copy before building the new one
        r = _RUNS[model] = _Run(model)
    return r


class _Prefill:
    """Layer i's attention over packed prompts: prompt by prompt, causal, its keys and values
    written to its cache row."""

    def __init__(self, cache, segments):
        self.cache, self.segments = cache, segments  # (row, start, length) per prompt

    def __call__(self, i, q, k, v):
        kc, vc = self.cache.layers[i]
        out = torch.empty_like(q)
        for row, s0, n in self.segments:
            qs, ks, vs = q[:, :, s0:s0 + n], k[:, :, s0:s0 + n], v[:, :, s0:s0 + n]
            kc[row, :, :n] = ks[0]
            vc[row, :, :n] = vs[0]
            out[:, :, s0:s0 + n] = ops.attention(qs, ks, vs, causal=True)
        return out


class _Step:
    """Layer i's attention for one new token per row: its key and value written at
    ``positions[b]``, then attention over the first ``attend_lens[b]`` cache positions."""

    def __init__(self, cache, run: _Run, positions, attend_lens):
        self.cache, self.run, self.positions, self.attend_lens = cache, run, positions, attend_lens

    def __call__(self, i, q, k, v):
        kc, vc = self.cache.layers[i]
        self.run.write_kv(kc, vc, k[:, :, 0], v[:, :, 0], self.positions)
        return self.run.attend(q, kc, vc, self.attend_lens)


def decoder(model) -> "_Run":
    """The incremental forward of ``model``: its weights laid out for decoding, made once per
    model and made again when its weights change (a cache keeps the one it was given)."""
    return _run(model)


@torch.no_grad()
def prefill(model, cache, prompts, rows, run: "_Run | None" = None) -> torch.Tensor:
    """Encode ``prompts`` (lists of ids) into cache rows ``rows`` in one pass; returns the
    logits (R, vocab) of each prompt's last token. ``run``: ``decoder(model)`` (default)."""
    run = run or _run(model)
    device = model.transformer.wte.weight.device
    lengths = [len(p) for p in prompts]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    ids = torch.tensor([[t for p in prompts for t in p]], dtype=torch.long).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device).view(1, -1)
    x = model.embed(ids, positions, run)
    segments = list(zip(rows, starts, lengths))
    h, delta = model.blocks(x, model.rope_at(positions[0]), _Prefill(cache, segments), run)
    last = torch.tensor([s0 + n - 1 for s0, n in zip(starts, lengths)], device=device)
    y = model.final_norm(h[0, last], None if delta is None else delta[0, last], run)
    return model.logits(y, run)


_FUSED_KV = (torch.float32, torch.bfloat16, torch.float16)  # the cache types the fused step reads


def _fused_caches(cache):
    """The caches of each layer as the fused step takes them (k0, v0, k1, v1, ...), or None
    where they are not all contiguous of one of float32, bfloat16, float16 (a view over fewer
    positions than its storage holds is not contiguous)."""
    kv = [t for pair in cache.layers for t in pair]
    if kv and kv[0].dtype in _FUSED_KV and all(t.dtype == kv[0].dtype and t.is_contiguous() for t in kv):
        return kv
    return None


@torch.no_grad()
def step(model, cache, tokens, positions, attend_lens, run: "_Run | None" = None) -> torch.Tensor:
    """One token per row (tokens (B,)) at ``positions`` (B,), attending over the first
    ``attend_lens`` (B,) cache positions of its row; returns the logits (B, vocab)."""
    run = run or _run(model)
    if run.fused is not None:
        kv = _fused_caches(cache)
        if kv is not None:
            return _fused.gpt_decode_step(tokens.view(-1), positions, attend_lens, kv=kv, **run.fused)
    x = model.embed(tokens.view(-1, 1), positions.view(-1, 1), run)
    rope = model.rope_at(positions.view(-1, 1, 1))  # (B, 1, 1, D/2): broadcast over heads
    h, delta = model.blocks(x, rope, _Step(cache, run, positions, attend_lens), run)
    y = model.final_norm(h[:, 0], None if delta is None else delta[:, 0], run)
    return model.logits(y, run)
