"""Generation speed: fastlm's KV-cache generate against transformers' GPT2LMHeadModel.generate
(with its KV cache) on the same random weights and the same prompt; fp32, 2 threads, greedy.

    pytest bench/test_generate.py --benchmark-only --benchmark-json=gen.json

Groups (each a pair, fastlm and transformers, on identical inputs):
  "decode small"      4 layers, 256 wide, 4 heads, vocab 8192; 32-token prompt, 128 new tokens
  "decode 124M"       GPT-2 124M shape; 32-token prompt, 64 new tokens
  "ttft 124M"         time to the first token for a 512-token prompt (prefill)
  "batch small"       fastlm, batch 8 of prompts of 8..64 tokens, 128 new tokens each, vs batch 1
  "batch pairs"       the same 8 prompts served one at a time (8 batch-1 generations) and then
                      as one batch of 8, alternated over 7 rounds (5 at 124M), with fp32 and int8 weights, and
                      int8 with a bfloat16 KV cache on both sides ("kv-bf16"): the median of the per-round
                      throughput ratios (each round takes under a second, so a shift in the
                      shared machine's load between two separately timed benchmarks does not
                      enter the ratio, and both sides do the same work: "batch small" runs
                      batch 1 on the shortest prompt alone)
  "prefill product"   one prefill product, x (M, K) W^T + b: fastlm.ops.decode_linear on the
                      packed weight against F.linear (MKL) on the plain one; the small config's
                      fc layer at M = 269 (the batch-8 prompts) and the 124M config's at M = 512
  "kv write"          one decode step's K/V writes into the small config's batch-8 cache (4
                      layers): fastlm.ops.kv_cache_write against two index_put_ calls a layer
  "ceiling copy"      a 256 MB copy: the memory bandwidth that bounds a weight-streaming decode
  "decode formats"    fastlm alone, batch 1, at each weight format (fp32, bf16, fp16, int8 = q8_0,
                      int4 = q4_0; ``model.quantize``) on the small config with GPT-2's vocabulary
                      (4 layers, 256 wide, vocab 50257, where the output layer is most of the
                      weights); 32-token prompt, 128 new tokens
  "decode kv dtype"   fastlm alone: 32 decode steps over a long context (1536 positions of a
                      2048-position cache, the small config with block_size 2048), batch 1 and
                      batch 8, with a float32 and a bfloat16 KV cache (``KVCache(dtype=...)``,
                      ``kv_dtype=`` in generate): the bf16 cache halves the bytes each step reads
                      from the cache; the model stays float32
Before timing, each group checks that its sides compute the same thing: fastlm's greedy tokens
equal transformers' on the same weights and prompt (batch 1 and every row of batch 8), the 8
prompts as one batch give the tokens they give one at a time, the prefill product is within
1e-5 (relative) of the float64 product, and kv_cache_write leaves the cache index_put_ leaves.
The floor of a batch-1 decode step is reading every weight once (fp32): 22 MB (small) and
498 MB (124M) per token. At the end the ratios (median time of the competitor / fastlm, so
> 1 is faster) and the fraction of the copy-bandwidth bound are printed.
"""
import sys
import time

import pytest
import torch

import fastlm.ops
from checks import assert_close
from fastlm import GPT, GPTConfig
from fastlm.generation import KVCache

transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)

SMALL = dict(vocab_size=8192, block_size=1024, n_layer=4, n_head=4, n_embd=256)
GPT2_124M = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
MEDIANS = {}


def _models(cfg, tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval()
    d = tmp_path_factory.mktemp("gen-bench")
    model.save_pretrained(d)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    return model, hf


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _models(SMALL, tmp_path_factory)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return _models(GPT2_124M, tmp_path_factory)


def _prompt(T, vocab, seed=0):
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def _fastlm(model, x, n):
    return lambda: model.generate(x, max_new_tokens=n)


def _hf(hf, x, n):
    mask = torch.ones_like(x)

    def run():
        with torch.inference_mode():
            return hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)

    return run


def _check_greedy(model, hf, x, n):
    """fastlm's greedy continuation of prompt x (1, T) equals transformers' on the same weights."""
    ours, theirs = model.generate(x, max_new_tokens=n), _hf(hf, x, n)()
    assert ours.shape == theirs.shape and torch.equal(ours, theirs), \
        f"fastlm's tokens differ from transformers' from position {_first_difference(ours[0], theirs[0])}"


def _first_difference(a, b):
    a, b = list(map(int, a)), list(map(int, b))
    return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))


def _record(key, benchmark, work):
    """Keep the median for the closing report; none under --benchmark-disable (one plain run)."""
    if benchmark.stats is not None:
        MEDIANS[key] = (benchmark.stats.stats.median, work)


def _bench(benchmark, group, impl, fn, rounds, tokens):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, tokens=tokens)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    _record((group, impl), benchmark, tokens)


@pytest.mark.parametrize("impl", ["fastlm", "transformers"])
def test_decode_small(benchmark, small, impl):
    model, hf = small
    x = _prompt(32, SMALL["vocab_size"])
    fn = _fastlm(model, x, 128) if impl == "fastlm" else _hf(hf, x, 128)
    if impl == "fastlm":
        _check_greedy(model, hf, x, 128)
    _bench(benchmark, "decode small", impl, fn, 7, 128)


@pytest.mark.parametrize("impl", ["fastlm", "transformers"])
def test_decode_124m(benchmark, big, impl):
    model, hf = big
    x = _prompt(32, GPT2_124M["vocab_size"])
    fn = _fastlm(model, x, 64) if impl == "fastlm" else _hf(hf, x, 64)
    if impl == "fastlm":
        _check_greedy(model, hf, x, 64)
    _bench(benchmark, "decode 124M", impl, fn, 3, 64)


@pytest.mark.parametrize("impl", ["fastlm", "transformers"])
def test_ttft_124m(benchmark, big, impl):
    model, hf = big
    x = _prompt(512, GPT2_124M["vocab_size"], seed=1)
    fn = _fastlm(model, x, 1) if impl == "fastlm" else _hf(hf, x, 1)
    if impl == "fastlm":
        _check_greedy(model, hf, x, 1)
    _bench(benchmark, "ttft 124M", impl, fn, 5, 1)


@pytest.mark.parametrize("batch", [1, 8])
def test_batch_small(benchmark, small, batch):
    model, hf = small
    g = torch.Generator().manual_seed(3)
    lengths = [8, 64, 20, 33, 47, 12, 58, 27][:batch]
    prompts = [torch.randint(0, SMALL["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    for p, row in zip(prompts, model.generate(prompts, max_new_tokens=128)):  # each row: transformers' alone
        want = _hf(hf, torch.tensor([p]), 128)()[0].tolist()
        assert row == want, f"batch {batch}: fastlm's row differs from transformers' from {_first_difference(row, want)}"
    _bench(benchmark, "batch small", f"fastlm batch {batch}", lambda: model.generate(prompts, max_new_tokens=128),
           5, 128 * batch)


PAIRS = {}


# The small config's weights stay in L3 (its batch 1 is not bound by reading them); GPT-2 124M's
# (132 MB in int8) stream from memory at batch 1, the case batching is for.
@pytest.mark.parametrize("weights", ["fp32", "int8", "int8 124M", "int8 kv-bf16", "int8 124M kv-bf16"])
def test_batch_pairs(benchmark, request, weights):
    import copy

    base, cfg = (request.getfixturevalue("big")[0], GPT2_124M) if "124M" in weights else \
        (request.getfixturevalue("small")[0], SMALL)
    fmt = weights.split()[0]
    model = base if fmt == "fp32" else copy.deepcopy(base).quantize(fmt)
    # "kv-bf16": the KV cache in bfloat16 on both sides (llama.cpp keeps its cache in f16 by default)
    kv = "bf16" if "kv-bf16" in weights else None
    g = torch.Generator().manual_seed(3)
    lengths = [8, 64, 20, 33, 47, 12, 58, 27]
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    times = {1: [], 8: []}
    one_at_a_time = [model.generate([p], max_new_tokens=128, kv_dtype=kv)[0] for p in prompts]
    assert model.generate(prompts, max_new_tokens=128, kv_dtype=kv) == one_at_a_time, "the batch's tokens differ from batch 1's"

    def round_():
        t = time.perf_counter()
        for p in prompts:
            model.generate([p], max_new_tokens=128, kv_dtype=kv)
        times[1].append(time.perf_counter() - t)
        t = time.perf_counter()
        model.generate(prompts, max_new_tokens=128, kv_dtype=kv)
        times[8].append(time.perf_counter() - t)

    benchmark.group = f"batch pairs {weights}"
    round_()  # warm-up, not recorded
    times[1].clear()
    times[8].clear()
    benchmark.pedantic(round_, rounds=5 if "124M" in weights else 7, warmup_rounds=0)
    ratios = sorted(t1 / t8 for t1, t8 in zip(times[1], times[8]))  # same 1024 tokens on both sides
    PAIRS[weights] = dict(ratios=ratios, b1=sorted(times[1]), b8=sorted(times[8]))
    benchmark.extra_info.update(impl=f"fastlm {weights}: 8 prompts one at a time, then as one batch", ratios=ratios,
                                one_at_a_time_s=times[1], batch8_s=times[8])


PREFILL_SHAPES = {"small fc, M 269": (269, 256, 1024), "124M fc, M 512": (512, 768, 3072)}


@pytest.mark.parametrize("shape", list(PREFILL_SHAPES))
@pytest.mark.parametrize("impl", ["fastlm", "F.linear"])
def test_prefill_product(benchmark, shape, impl):
    M, K, N = PREFILL_SHAPES[shape]
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    if impl == "fastlm":
        wp = fastlm.ops.pack_decode_weight(w)
        fn = lambda: fastlm.ops.decode_linear(x, wp, b, N)  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.linear(x, w, b)  # noqa: E731
    with torch.inference_mode():
        assert_close(fn(), torch.nn.functional.linear(x.double(), w.double(), b.double()), 1e-5, f"{impl}'s product")
    benchmark.group = f"prefill product {shape}"
    benchmark.extra_info.update(impl=impl, gflop=2 * M * K * N / 1e9)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    _record((f"prefill product {shape}", impl), benchmark, 2 * M * K * N)


@pytest.mark.parametrize("impl", ["fastlm", "index_put"])
def test_kv_write(benchmark, impl):
    B, Hkv, D, L, layers = 8, SMALL["n_head"], SMALL["n_embd"] // SMALL["n_head"], 192, SMALL["n_layer"]
    g = torch.Generator().manual_seed(4)
    kv = torch.randn(layers, 2, B, Hkv, L, D, generator=g)
    qkv = torch.randn(B, 3 * Hkv * D, generator=g)  # k and v as a step makes them: slices of one row
    k, v = qkv[:, Hkv * D:2 * Hkv * D].view(B, Hkv, D), qkv[:, 2 * Hkv * D:].view(B, Hkv, D)
    pos = torch.randint(64, L, (B,), generator=g)
    write = fastlm.ops.resolve("kv_cache_write", k.device, k.dtype)[1]
    rows = torch.arange(B)

    def fastlm_write(cache):
        for i in range(layers):
            write(cache[i, 0], cache[i, 1], k, v, pos)

    def index_put(cache):
        for i in range(layers):
            cache[i, 0].transpose(1, 2).index_put_((rows, pos), k)
            cache[i, 1].transpose(1, 2).index_put_((rows, pos), v)

    ours, theirs = kv.clone(), kv.clone()
    fastlm_write(ours)
    index_put(theirs)
    assert torch.equal(ours, theirs), "kv_cache_write leaves another cache than index_put_"
    chosen = fastlm_write if impl == "fastlm" else index_put

    def run():
        chosen(kv)
    benchmark.group = "kv write"
    benchmark.extra_info.update(impl=impl)
    benchmark.pedantic(run, rounds=200, warmup_rounds=10)
    _record(("kv write", impl), benchmark, 0)


def test_ceiling_copy(benchmark):
    a = torch.randn(64 * 1024 * 1024)
    b = torch.empty_like(a)
    _bench(benchmark, "ceiling copy", "copy", lambda: b.copy_(a), 7, 0)


# ----------------------------------------------------------------------------- weight formats
SMALL_50K = dict(SMALL, vocab_size=50257)
FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
# bytes a weight takes: q8_0 is 32 int8 values + a float16 scale a block, q4_0 32 nibbles + a scale
BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 34 / 32, "int4": 18 / 32}
# relative logit change from fp32 a format may make on the random weights (its rounding, no more;
# int8 and int4 round the layers' inputs to 8 bits too)
FORMAT_ERROR = {"fp32": 0, "bf16": 1e-2, "fp16": 2e-3, "int8": 4e-2, "int4": 0.5}


@pytest.fixture(scope="module")
def small_50k():
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL_50K)).eval()


@pytest.mark.parametrize("weights", FORMATS)
def test_decode_formats(benchmark, small_50k, weights):
    import copy

    model = small_50k if weights == "fp32" else copy.deepcopy(small_50k).quantize(weights)
    x = _prompt(32, SMALL_50K["vocab_size"])
    with torch.no_grad():  # the quantized model computes the fp32 one's logits up to its format's rounding
        got, want = model(x), small_50k(x)
    assert ((got - want).norm() / want.norm()).item() <= FORMAT_ERROR[weights]
    _bench(benchmark, "decode formats", weights, _fastlm(model, x, 128), 7, 128)


# ----------------------------------------------------------------------------- KV cache storage type
KV_LEN, KV_CONTEXT, KV_STEPS = 2048, 1536, 32


@pytest.fixture(scope="module")
def small_long():
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(SMALL, block_size=KV_LEN))).eval()


def _long_cache(model, batch, dtype):
    """A cache of KV_LEN positions whose first KV_CONTEXT hold random keys and values (what
    a prefill leaves, without timing one), the same values for every dtype (rounded to it)."""
    cache = KVCache(model, batch, KV_LEN, dtype=dtype)
    g = torch.Generator().manual_seed(batch)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    cache.lens = [KV_CONTEXT] * batch
    return cache


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
def test_decode_kv_dtype(benchmark, small_long, batch, kv_dtype):
    model = small_long
    tokens = torch.randint(0, SMALL["vocab_size"], (batch,), generator=torch.Generator().manual_seed(1))
    cache = _long_cache(model, batch, kv_dtype)
    with torch.inference_mode():  # the bf16 cache gives the float32 cache's logits up to its rounding
        want = _long_cache(model, batch, "fp32").decode(tokens, [True] * batch)
        got = _long_cache(model, batch, kv_dtype).decode(tokens, [True] * batch)
    assert ((got - want).norm() / want.norm()).item() <= (1e-6 if kv_dtype == "fp32" else 2e-2)

    def run():
        cache.lens = [KV_CONTEXT] * batch
        with torch.inference_mode():
            for _ in range(KV_STEPS):
                cache.decode(tokens, [True] * batch)

    _bench(benchmark, "decode kv dtype", f"batch {batch} {kv_dtype}", run, 7, KV_STEPS * batch)


def _weights_bytes(cfg, weights="fp32"):
    C, V, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"]
    return BYTES_PER_WEIGHT[weights] * (L * 12 * C * C + V * C)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = sys.__stdout__
    copy = MEDIANS.get(("ceiling copy", "copy"))
    gbs = 2 * 4 * 64 * 1024 * 1024 / copy[0] / 1e9 if copy else None
    print("\n\ngeneration (fp32, 2 threads): median tokens/s and ratios", file=out)
    if gbs:
        print(f"  copy bandwidth {gbs:.1f} GB/s (read + write)", file=out)
    for group, cfg in (("decode small", SMALL), ("decode 124M", GPT2_124M), ("ttft 124M", None)):
        a, b = MEDIANS.get((group, "fastlm")), MEDIANS.get((group, "transformers"))
        if not (a and b):
            continue
        if group.startswith("ttft"):
            print(f"  {group}: fastlm {a[0] * 1e3:.0f} ms, transformers {b[0] * 1e3:.0f} ms, "
                  f"ratio {b[0] / a[0]:.2f}x", file=out)
            continue
        line = (f"  {group}: fastlm {a[1] / a[0]:.1f} tok/s, transformers {b[1] / b[0]:.1f} tok/s, "
                f"ratio {b[0] / a[0]:.2f}x")
        if gbs:
            bound = gbs * 1e9 / _weights_bytes(cfg)  # weights read once per token at the copy bandwidth
            line += f", {a[1] / a[0] / bound:.0%} of the weight-read bound ({bound:.0f} tok/s)"
        print(line, file=out)
    b1, b8 = MEDIANS.get(("batch small", "fastlm batch 1")), MEDIANS.get(("batch small", "fastlm batch 8"))
    if b1 and b8:
        print(f"  batch small: batch 8 {b8[1] / b8[0]:.0f} tok/s vs batch 1 {b1[1] / b1[0]:.0f} tok/s, "
              f"ratio {(b8[1] / b8[0]) / (b1[1] / b1[0]):.2f}x", file=out)
    for weights, pairs in PAIRS.items():
        r, n = pairs["ratios"], len(pairs["ratios"])
        t1, t8 = pairs["b1"][n // 2], pairs["b8"][n // 2]
        print(f"  batch pairs, {weights} (8 prompts one at a time vs one batch of 8): median of {n} per-round "
              f"ratios {r[n // 2]:.2f}x (range {r[0]:.2f}-{r[-1]:.2f}); batch 8 {1024 / t8:.0f} tok/s, "
              f"one at a time {1024 / t1:.0f} tok/s (medians)", file=out)
    for shape in PREFILL_SHAPES:
        pf, pm = MEDIANS.get((f"prefill product {shape}", "fastlm")), MEDIANS.get((f"prefill product {shape}", "F.linear"))
        if pf and pm:
            print(f"  prefill product {shape}: fastlm {pf[1] / pf[0] / 1e9:.0f} GFLOP/s, F.linear "
                  f"{pm[1] / pm[0] / 1e9:.0f} GFLOP/s, ratio {pm[0] / pf[0]:.2f}x", file=out)
    f32 = MEDIANS.get(("decode formats", "fp32"))
    for weights in FORMATS:
        m = MEDIANS.get(("decode formats", weights))
        if not m:
            continue
        line = f"  decode formats (4 x 256, vocab 50257), {weights}: {m[1] / m[0]:.0f} tok/s"
        if f32:
            line += f", {f32[0] / m[0]:.2f}x fp32"
        if gbs:
            bound = gbs * 1e9 / _weights_bytes(SMALL_50K, weights)
            line += f", {m[1] / m[0] / bound:.0%} of the weight-read bound ({bound:.0f} tok/s)"
        print(line, file=out)
    for batch in (1, 8):
        f, h = MEDIANS.get(("decode kv dtype", f"batch {batch} fp32")), MEDIANS.get(("decode kv dtype", f"batch {batch} bf16"))
        if f and h:
            print(f"  decode kv dtype (context {KV_CONTEXT}), batch {batch}: fp32 cache {f[1] / f[0]:.0f} tok/s, "
                  f"bf16 cache {h[1] / h[0]:.0f} tok/s, ratio {f[0] / h[0]:.2f}x", file=out)
    kf, ki = MEDIANS.get(("kv write", "fastlm")), MEDIANS.get(("kv write", "index_put"))
    if kf and ki:
        print(f"  kv write (batch 8, 4 layers): fastlm {kf[0] * 1e6:.1f} us, index_put {ki[0] * 1e6:.1f} us, "
              f"ratio {ki[0] / kf[0]:.2f}x", file=out)
