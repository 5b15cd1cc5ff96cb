"""A KV cache stored as bfloat16 / float16 under a float32 model (``kv_dtype``): the CPU decode
attention reads it as stored (against the float64 reference on the same rounded values),
kv_cache_write rounds float32 entries exactly as torch's ``.to()`` does, and generation with a
bf16 cache follows the float32-cache run (API, fused step, reference backend, CLI)."""
import pytest
import torch

import fastlm
from conftest import on_backend
from fastlm import GPT, GPTConfig
from fastlm import reference as R
from fastlm.generation import KVCache, generate
from fastlm.models import decode as D

HAS_CPU = "cpu" in fastlm.ops.backends()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="fastlm._C is not built")
HALF = [torch.bfloat16, torch.float16]


def _decode_case(B, H, Hkv, Tq, L, Dh, lens, kv_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, Dh, generator=g)
    kc = torch.randn(B, Hkv, L, Dh, generator=g).to(kv_dtype)
    vc = torch.randn(B, Hkv, L, Dh, generator=g).to(kv_dtype)
    return q, kc, vc, torch.tensor(lens)


# (B, H, Hkv, Tq, L, D, lens): one row per head (decode_row), GQA, ragged lengths, D not a
# multiple of 8, Tq > 1, a cache split across threads, an empty row
SHAPES = [
    (1, 4, 4, 1, 300, 64, [300]),
    (3, 8, 2, 1, 100, 32, [1, 57, 100]),
    (2, 6, 3, 1, 90, 20, [90, 17]),
    (2, 4, 1, 3, 129, 128, [129, 5]),
    (2, 6, 2, 2, 70, 13, [70, 3]),
    (1, 2, 2, 1, 2048, 64, [2000]),
    (2, 2, 2, 1, 16, 16, [0, 16]),
]


@needs_cpu
@pytest.mark.parametrize("kv_dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_reads_a_half_cache(kv_dtype, shape):
    B, H, Hkv, Tq, L, Dh, lens = shape
    q, kc, vc, cl = _decode_case(B, H, Hkv, Tq, L, Dh, lens, kv_dtype, seed=L + Dh)
    # NaN past each row's length: the kernel must not read it (nor convert it)
    for b, n in enumerate(lens):
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    want = R.decode_attention(q.double(), kc.double(), vc.double(), cl)
    with on_backend("cpu"):
        out = fastlm.ops.decode_attention(q, kc, vc, cl)
    assert out.dtype == torch.float32 and out.shape == q.shape
    err = (out.double() - want).norm() / want.norm().clamp_min(1e-30)
    assert err < 1e-5, err
    # the reference backend on the same cache agrees too (it converts only the valid prefix)
    with on_backend("reference"):
        ref = fastlm.ops.decode_attention(q, kc, vc, cl)
    assert (ref.double() - want).norm() / want.norm().clamp_min(1e-30) < 1e-5


@needs_cpu
@pytest.mark.parametrize("kv_dtype", HALF)
def test_decode_attention_half_cache_at_every_level(kv_dtype):
    q, kc, vc, cl = _decode_case(2, 8, 2, 1, 200, 64, [200, 77], kv_dtype, seed=3)
    want = R.decode_attention(q.double(), kc.double(), vc.double(), cl)
    for level in fastlm.ops.cpu_isas():
        with on_backend(f"cpu@{level}"):
            out = fastlm.ops.decode_attention(q, kc, vc, cl)
        assert (out.double() - want).norm() / want.norm() < 1e-5, level


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kv_dtype", HALF)
def test_kv_cache_write_rounds_as_torch(backend, kv_dtype):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("fastlm._C not built")
    g = torch.Generator().manual_seed(5)
    B, Hkv, L, Dh = 3, 2, 9, 40
    kc = torch.zeros(B, Hkv, L, Dh, dtype=kv_dtype)
    vc = torch.zeros(B, Hkv, L, Dh, dtype=kv_dtype)
    qkv = torch.randn(B, 3 * Hkv * Dh, generator=g) * 3
    qkv[0, Hkv * Dh:Hkv * Dh + 4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 70000.0])  # ties, overflow
    k = qkv[:, Hkv * Dh:2 * Hkv * Dh].view(B, Hkv, Dh)  # strided, as a decode step makes them
    v = qkv[:, 2 * Hkv * Dh:].view(B, Hkv, Dh)
    pos = torch.tensor([8, 0, 3])
    with on_backend(backend):
        fastlm.ops.kv_cache_write(kc, vc, k, v, pos)
    for b in range(B):
        assert torch.equal(kc[b, :, pos[b]], k[b].to(kv_dtype))
        assert torch.equal(vc[b, :, pos[b]], v[b].to(kv_dtype))
    assert int((kc != 0).sum() + (vc != 0).sum()) == 2 * B * Hkv * Dh  # nothing else written


def test_bad_kv_dtypes_are_clear_errors():
    kc = torch.zeros(1, 1, 4, 8, dtype=torch.int32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 8)
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.ops.decode_attention(q, kc, kc, torch.tensor([1]))
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.ops.kv_cache_write(kc, kc, k, k, torch.tensor([0]))
    kb, vf = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 4, 8)
    with pytest.raises(TypeError, match="v_cache"):
        fastlm.ops.decode_attention(q, kb, vf, torch.tensor([1]))
    with pytest.raises(TypeError, match="dtype"):  # float64 entries into a bf16 cache: no silent rounding
        fastlm.ops.kv_cache_write(kb, kb, k.double(), k.double(), torch.tensor([0]))
    if HAS_CPU:
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            torch.ops.fastlm.decode_attention(q, kc, kc, torch.tensor([1]), 1.0)
        with pytest.raises(TypeError, match="kv_cache_write"):
            torch.ops.fastlm.kv_cache_write(kc, kc, k, k, torch.tensor([0]))
    model = _model()
    for bad in ("int8", "bf17", torch.int32):
        with pytest.raises(ValueError, match="kv_dtype"):
            generate(model, [1, 2, 3], max_new_tokens=2, kv_dtype=bad)
    with pytest.raises(TypeError, match="kv_dtype"):
        generate(model, [1, 2, 3], max_new_tokens=2, kv_dtype=16)
    with pytest.raises(ValueError, match="kv_dtype"):
        KVCache(model, 1, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32 model"):
        KVCache(_model().to(torch.bfloat16), 1, 8, dtype=torch.float32)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, block_size=128, n_layer=2, n_head=4, n_embd=64, initializer_range=0.3)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def _step_logits(model, prompt, n, kv_dtype):
    """Greedy decoding of n tokens through a KVCache of kv_dtype: (tokens, logits of each step)."""
    cache = KVCache(model, 1, len(prompt) + n, dtype=kv_dtype)
    assert cache.kv.dtype == {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kv_dtype]
    logits = cache.prefill([prompt])
    toks, all_logits = [], [logits[0].float()]
    for _ in range(n - 1):
        t = int(logits[0].argmax())
        toks.append(t)
        logits = cache.decode(torch.tensor([t]), [True])
        all_logits.append(logits[0].float())
    toks.append(int(logits[0].argmax()))
    return toks, torch.stack(all_logits)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_generation_with_a_half_cache_follows_float32(backend, kv_dtype, n_kv_head):
    """Greedy tokens agree with the float32-cache run for the first steps, and the logits of
    each step (fed the same tokens) stay close; the model's weights and activations stay
    float32."""
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("fastlm._C not built")
    model = _model(n_kv_head=n_kv_head)
    prompt = [5, 17, 42, 8, 3, 66, 21]
    with on_backend(backend):
        want, _ = _step_logits(model, prompt, 24, None)
        got, _ = _step_logits(model, prompt, 24, kv_dtype)
        assert got[:8] == want[:8]
        # teacher-forced on the float32 tokens: the logits differ only by the cache's rounding
        d = torch.float16 if kv_dtype == "fp16" else torch.bfloat16
        c32, ch = KVCache(model, 1, 40), KVCache(model, 1, 40, dtype=d)
        l32, lh = c32.prefill([prompt]), ch.prefill([prompt])
        for t in want:
            err = (lh - l32).abs().max() / l32.abs().max()
            assert err < (2e-2 if kv_dtype == "bf16" else 3e-3), err
            l32, lh = c32.decode(torch.tensor([t]), [True]), ch.decode(torch.tensor([t]), [True])
        out = generate(model, prompt, max_new_tokens=12, kv_dtype=kv_dtype)
        ref = generate(model, prompt, max_new_tokens=12)
    assert out[:len(prompt) + 8] == ref[:len(prompt) + 8]
    assert model.transformer.wte.weight.dtype == torch.float32


@needs_cpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_fused_step_reads_a_half_cache(kv_dtype):
    """The fused whole-model step takes a bf16 / fp16 cache and computes what the Python step
    computes on it (the same kernels): the same logits and the same cache contents."""
    model = _model()
    run = D.decoder(model)
    assert run.fused is not None
    prompt = [[5, 17, 42, 8], [3, 66]]
    caches = [KVCache(model, 2, 32, dtype=kv_dtype) for _ in range(2)]
    for c in caches:
        c.prefill(prompt)
    tokens, pos = torch.tensor([9, 11]), torch.tensor([4, 2])
    fused = D.step(model, caches[0], tokens, pos, pos + 1)
    assert D._fused_caches(caches[0]) is not None
    run.fused, saved = None, run.fused
    try:
        plain = D.step(model, caches[1], tokens, pos, pos + 1)
    finally:
        run.fused = saved
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)
    for b, n in enumerate((pos + 1).tolist()):  # the written positions, rounded alike (the rest is unset)
        assert torch.equal(caches[0].kv[:, :, b, :, :n], caches[1].kv[:, :, b, :, :n])


def test_engine_kv_dtype():
    from fastlm.generation.engine import Engine

    model = _model()
    eng = Engine(model, max_batch=2, max_len=32, kv_dtype="bf16")
    try:
        assert eng.cache.kv.dtype == torch.bfloat16
    finally:
        eng.stop()


def test_cli_generate_kv_dtype(tmp_path, capsys):
    from fastlm.cli import main

    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4
    tok = fastlm.Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32, initializer_range=0.3,
                  eos_token_id=tok.eot_token)).save_pretrained(tmp_path)
    tok.save(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--prompt", "whether", "--max-new-tokens", "6"]
    assert main(args + ["--kv-dtype", "bf16"]) == 0
    half = capsys.readouterr().out
    pipe = fastlm.pipeline("text-generation", model=tmp_path)
    assert half == pipe("whether", max_new_tokens=6, kv_dtype="bf16")[0]["generated_text"] + "\n"
    assert half.startswith("whether") and len(half) > len("whether\n")
    with pytest.raises(SystemExit):
        main(args + ["--kv-dtype", "int8"])
    assert "--kv-dtype" in capsys.readouterr().err


def test_server_engine_uses_the_configured_kv_dtype():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import json
    import urllib.request

    from fastlm.serve import ServeConfig
    from fastlm.serve.app import create_app
    from fastlm.serve.server import ServerThread

    tok = fastlm.Tokenizer.train(["to be or not to be, that is the question " * 8], vocab_size=280)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    app = create_app(model, tok, ServeConfig(max_batch=2, kv_dtype="bf16"))
    s = ServerThread(app).start()
    try:
        assert app.state.fastlm.engine.cache.kv.dtype == torch.bfloat16
        req = urllib.request.Request(s.url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "fastlm", "prompt": "to be", "max_tokens": 5,
                                                      "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        s.stop()
