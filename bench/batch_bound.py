"""What bounds batch 8 against batch 1 in a decode step (int8 weights): the fused step at B = 1
and B = 8, and, in the same run, its parts alone, so the ratio 8 t1 / t8 can be set against the
most the extra work of a batch allows.

    python bench/batch_bound.py [--config small|124M] [--weights int8] [--kv fp32|bf16]
        [--positions 100] [--rounds 15] [--json bench/results/batch_bound_<YYYY-MM-DD>_<tag>.json]

Timed, alternated round by round (medians; the box's memory speed drifts):
  step1, step8   ``fastlm.models.decode.step`` (the fused C++ step) with every row attending
                 over ``--positions`` + 1 cache positions;
  prod1, prod8   the step's products alone: ``ops.decode_linear_q`` on its packed weights,
                 every block projection and the output layer, M = 1 and M = 8 rows;
  att1, att8     the decode attention alone over a cache of the same size, every layer;
  read, read_l3  torch summing a 256 MB tensor (memory) and a 6 MB one (the last-level cache):
                 the box's read bandwidths in the same minutes.
Each part alone is called from Python (a few microseconds a call), the same number of calls at
B = 1 and B = 8, so the differences prod8 - prod1 and att8 - att1 are the batch's extra work.
The bounds: with everything but the products costing at B = 8 what it costs at B = 1,
8 t1 / (t1 + prod8 - prod1); with the attention's growth as measured too,
8 t1 / (t1 + prod8 - prod1 + att8 - att1). The issue's target (batch 8 >= 4x batch 1) is out of
reach where the bound is below 4.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fastlm
from fastlm import GPT, GPTConfig
from fastlm.generation.cache import KVCache
from fastlm.models import decode

CONFIGS = {"small": dict(vocab_size=8192, block_size=1024, n_layer=4, n_head=4, n_embd=256),
           "124M": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=list(CONFIGS), default="small")
    ap.add_argument("--weights", choices=["int8", "int4"], default="int8")
    ap.add_argument("--kv", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--positions", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval().quantize(args.weights)
    run = decode.decoder(model)
    if run.fused is None:
        raise SystemExit("the fused decode step does not serve this model here (no CPU kernels?)")
    kv_dtype = None if args.kv == "fp32" else args.kv
    P, D = args.positions, cfg["n_embd"] // cfg["n_head"]

    def cache_of(B):
        cache = KVCache(model, B, P + 8, dtype=kv_dtype)
        for pair in cache.layers:
            for t in pair:
                t.normal_()
        return cache

    def step(B):
        cache = cache_of(B)
        tok = torch.randint(0, cfg["vocab_size"], (B,))
        pos = torch.full((B,), P, dtype=torch.long)
        return lambda: decode.step(model, cache, tok, pos, pos + 1, run)

    linears = [m for blk in model.transformer.h for m in (blk.attn.c_attn, blk.attn.c_proj, blk.mlp.c_fc,
                                                           blk.mlp.c_proj)] + [model.lm_head]
    xs = {M: {m.in_features: torch.randn(M, m.in_features) for m in linears} for M in (1, 8)}

    def products(M):
        def fn():
            for m in linears:
                fastlm.ops.decode_linear_q(xs[M][m.in_features], m.weight_q, m.bias, m.out_features, format=m.format)
        return fn

    def attention(B):
        cache = cache_of(B)
        q = torch.randn(B, cfg["n_head"], 1, D)
        lens = torch.full((B,), P + 1, dtype=torch.long)

        def fn():
            for kc, vc in cache.layers:
                fastlm.ops.decode_attention(q, kc, vc, lens)
        return fn

    src, small_src = torch.randn(64 << 20), torch.randn(3 << 19)
    fns = {"step1": step(1), "step8": step(8), "prod1": products(1), "prod8": products(8),
           "att1": attention(1), "att8": attention(8), "read": src.sum,
           "read_l3": small_src.sum}
    calls = 50 if args.config == "small" else 10
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(5):
                fn()
        for _ in range(args.rounds):
            for k, fn in fns.items():
                n = 2 if k == "read" else calls
                t = time.perf_counter()
                for _ in range(n):
                    fn()
                times[k].append((time.perf_counter() - t) / n)
    med = {k: statistics.median(v) for k, v in times.items()}
    macs = {M: M * sum(m.in_features * m.out_features for m in linears) for M in (1, 8)}
    cache_bytes = {B: 2 * B * cfg["n_head"] * (P + 1) * D * (4 if args.kv == "fp32" else 2) * cfg["n_layer"]
                   for B in (1, 8)}
    t1, t8 = med["step1"], med["step8"]
    extra_p, extra_a = med["prod8"] - med["prod1"], med["att8"] - med["att1"]
    out = {
        "config": args.config, "weights": args.weights, "kv": args.kv, "positions": P,
        "level": fastlm.ops.cpu_isa(), "threads": torch.get_num_threads(),
        "ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "step_ratio": 8 * t1 / t8,
        "extra_product_rate_gmacs": (macs[8] - macs[1]) / extra_p / 1e9,
        "attention_gbs": {B: cache_bytes[B] / med[f"att{B}"] / 1e9 for B in (1, 8)},
        "read_gbs": src.numel() * 4 / med["read"] / 1e9,
        "read_l3_gbs": small_src.numel() * 4 / med["read_l3"] / 1e9,
        "bound_products": 8 * t1 / (t1 + extra_p),
        "bound_products_attention": 8 * t1 / (t1 + extra_p + extra_a),
    }
    print(f"{args.config}, {args.weights}, KV {args.kv}, {P + 1} positions, level {out['level']}, "
          f"{out['threads']} threads (medians of {args.rounds} rounds)")
    for k, v in med.items():
        print(f"  {k:6s} {v * 1e3:9.4f} ms")
    print(f"  batch 8 over batch 1, the step: {out['step_ratio']:.2f}x")
    print(f"  the batch's extra products: {(macs[8] - macs[1]) / 1e6:.1f} M multiply-adds in "
          f"{extra_p * 1e3:.4f} ms ({out['extra_product_rate_gmacs']:.0f} GMAC/s)")
    print(f"  the attention: B=1 {cache_bytes[1] / 1e6:.1f} MB at {out['attention_gbs'][1]:.1f} GB/s, "
          f"B=8 {cache_bytes[8] / 1e6:.1f} MB at {out['attention_gbs'][8]:.1f} GB/s; read bandwidth "
          f"{out['read_gbs']:.1f} GB/s (from the cache {out['read_l3_gbs']:.1f})")
    print(f"  bound, products only: {out['bound_products']:.2f}x; products and attention: "
          f"{out['bound_products_attention']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
