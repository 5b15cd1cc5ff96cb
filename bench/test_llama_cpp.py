"""fastlm against llama.cpp on the same weights: batch-1 greedy decode and time to first token.

    pip install llama-cpp-python        # builds llama.cpp from source (the "bench" extra)
    pytest bench/test_llama_cpp.py --benchmark-only -s --benchmark-json=llama.json

Each model (random weights, seeded) is written once with ``model.save_gguf`` and loaded by
llama.cpp (llama-cpp-python's ``Llama``, 2 threads, its default CPU backend); fastlm runs the
same model object. Before timing, each pair checks that both sides compute the same thing:
the same 32 greedy tokens from the same prompt ids (llama.cpp's f32 GELU rounds its input
through float16, so on some weights a near-tie may flip: the check names the first differing
position). Tokens go in as ids on both sides, so the tokenizers take no part.

Groups:
  "llama decode small"   4 layers x 256, vocab 8192; 32-token prompt, 128 new tokens
  "llama decode 124M"    GPT-2 124M shape, vocab 50257; 32-token prompt, 64 new tokens
  "llama ttft 124M"      a 512-token prompt to its first token's logits
  "llama converter gguf load"  a GGUF written by llama.cpp's convert_hf_to_gguf.py (f32, f16,
                         q8_0) from a checkpoint fastlm saved, loaded by fastlm: the same greedy
                         tokens as the float model in f32 (checked), and the load timed
llama.cpp's side is a loop of ``eval`` (one token) and a NumPy argmax of its logits: the work
of a greedy decode, with llama-cpp-python's per-call overhead (a few microseconds a token).
"""
import time

import numpy as np
import pytest
import torch

from fastlm import GPT, GPTConfig, Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

torch.set_num_threads(2)

SMALL = dict(vocab_size=8192, block_size=1024, n_layer=4, n_head=4, n_embd=256)
GPT2_124M = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
MEDIANS = {}


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(f"word{i % 97} item{i % 13}." for i in range(4000))
    return Tokenizer.train([text], 400)


def _pair(cfg, tokenizer, tmp_path_factory, dtype="f32"):
    """fastlm's model (quantized to ``dtype``'s format unless f32) and llama.cpp's on the GGUF
    file written from the same float weights in ``dtype``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg)).eval()
    path = model.save_gguf(tmp_path_factory.mktemp("llama") / f"model-{dtype}.gguf", dtype, tokenizer)
    if dtype != "f32":
        model.quantize(FASTLM_FORMAT[dtype])
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, logits_all=True,
                          verbose=False)
    return model, llm, path


# fastlm's weight format against each of llama.cpp's: the same blocks (save_gguf writes fastlm's
# own q8_0 / q4_0 quantization); f16 against fastlm's bf16 as well as its fp16
FASTLM_FORMAT = {"f16": "fp16", "q8_0": "int8", "q4_0": "int4"}


@pytest.fixture(scope="module")
def small(tokenizer, tmp_path_factory):
    return _pair(SMALL, tokenizer, tmp_path_factory)


@pytest.fixture(scope="module")
def big(tokenizer, tmp_path_factory):
    return _pair(GPT2_124M, tokenizer, tmp_path_factory)


def _prompt(n, seed=1):
    return torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llama_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def _fastlm_greedy(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()


def _check_same(model, llm, prompt):
    ours, theirs = _fastlm_greedy(model, prompt, 32), _llama_greedy(llm, prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is None, f"fastlm's and llama.cpp's greedy tokens differ from position {first}"


def _bench(benchmark, group, impl, fn, rounds, tokens):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, tokens=tokens)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    if benchmark.stats is not None:
        MEDIANS[(group, impl)] = (benchmark.stats.stats.median, tokens)


@pytest.mark.parametrize("impl", ["fastlm", "llama.cpp"])
def test_llama_decode_small(benchmark, small, impl):
    model, llm, _ = small
    prompt = _prompt(32)
    if impl == "fastlm":
        _check_same(model, llm, prompt)
    fn = (lambda: _fastlm_greedy(model, prompt, 128)) if impl == "fastlm" else (lambda: _llama_greedy(llm, prompt, 128))
    _bench(benchmark, "llama decode small", impl, fn, 7, 128)


@pytest.mark.parametrize("impl", ["fastlm", "llama.cpp"])
def test_llama_decode_124m(benchmark, big, impl):
    model, llm, _ = big
    prompt = _prompt(32)
    if impl == "fastlm":
        _check_same(model, llm, prompt)
    fn = (lambda: _fastlm_greedy(model, prompt, 64)) if impl == "fastlm" else (lambda: _llama_greedy(llm, prompt, 64))
    _bench(benchmark, "llama decode 124M", impl, fn, 3, 64)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("impl", ["fastlm", "llama.cpp"])
def test_llama_decode_small_formats(benchmark, tokenizer, tmp_path_factory, dtype, impl):
    model, llm, _ = _formats(SMALL, "small", tokenizer, tmp_path_factory, dtype)
    prompt = _prompt(32)
    if impl == "fastlm":
        _report_agreement(model, llm, prompt, f"small {dtype}")
    fn = (lambda: _fastlm_greedy(model, prompt, 128)) if impl == "fastlm" else (lambda: _llama_greedy(llm, prompt, 128))
    _bench(benchmark, f"llama decode small {dtype}", impl, fn, 7, 128)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("impl", ["fastlm", "llama.cpp"])
def test_llama_decode_124m_formats(benchmark, tokenizer, tmp_path_factory, dtype, impl):
    model, llm, _ = _formats(GPT2_124M, "124M", tokenizer, tmp_path_factory, dtype)
    prompt = _prompt(32)
    if impl == "fastlm":
        _report_agreement(model, llm, prompt, f"124M {dtype}")
    fn = (lambda: _fastlm_greedy(model, prompt, 64)) if impl == "fastlm" else (lambda: _llama_greedy(llm, prompt, 64))
    _bench(benchmark, f"llama decode 124M {dtype}", impl, fn, 3, 64)


_FORMATS = {}


def _formats(cfg, name, tokenizer, tmp_path_factory, dtype):
    key = (name, dtype)
    if key not in _FORMATS:
        _FORMATS.clear()  # one model pair alive at a time
        _FORMATS[key] = _pair(cfg, tokenizer, tmp_path_factory, dtype)
    return _FORMATS[key]


def _report_agreement(model, llm, prompt, what):
    """Reduced formats: llama.cpp also rounds the activations (q8_0 dot products, f16 GELU), so
    the greedy tokens may part; how many agree is printed, not asserted."""
    ours, theirs = _fastlm_greedy(model, prompt, 32), _llama_greedy(llm, prompt, 32)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 32)
    print(f"\n  {what}: the first {same} of 32 greedy tokens agree")


@pytest.mark.parametrize("impl", ["fastlm", "llama.cpp"])
def test_llama_ttft_124m(benchmark, big, impl):
    model, _, path = big
    prompt = _prompt(512, seed=2)
    if impl == "fastlm":
        fn = lambda: _fastlm_greedy(model, prompt, 1)  # noqa: E731
    else:
        # a context that keeps only the last position's logits, as a generation does
        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False)

        def fn():
            llm.reset()
            llm.eval(prompt)

    _bench(benchmark, "llama ttft 124M", impl, fn, 5, 1)


# ----------------------------------------------------------------------------- llama.cpp's converter
R50K = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "r50k_base.tiktoken.gz"


def _converter():
    """llama.cpp's ``convert_hf_to_gguf.py`` as llama-cpp-python installs it (it imports
    ``mistral_common``), or None."""
    import importlib.util
    import pathlib

    script = pathlib.Path(llama_cpp.__file__).resolve().parents[1] / "bin" / "convert_hf_to_gguf.py"
    return script if script.is_file() and importlib.util.find_spec("mistral_common") else None


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_converter_gguf_loads(benchmark, tmp_path, outtype):
    """A GGUF that llama.cpp's own converter writes from a checkpoint fastlm saved (GPT-2's
    vocabulary, which the converter recognizes) loads in fastlm with the float model's greedy
    tokens (f32: required; f16 and q8_0, dequantized on load: reported), and its tokenizer
    encodes as GPT-2's does. Timed: ``GPT.from_pretrained`` of the file."""
    import subprocess
    import sys

    script = _converter()
    if script is None or not R50K.is_file():
        pytest.skip("needs llama-cpp-python's convert_hf_to_gguf.py, mistral_common and ../shared/data")
    tok = Tokenizer.load(R50K)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=2, n_head=4, n_embd=64,
                          eos_token_id=tok.eot_token)).eval()
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    out = tmp_path / f"converted-{outtype}.gguf"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "hf"), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = GPT.from_pretrained(out)
    text = "The quick brown fox jumps over the lazy dog, and then it's gone."
    assert Tokenizer.load(out).encode(text) == tok.encode(text)
    prompt = torch.tensor([tok.encode(text)])
    want = model.generate(prompt, max_new_tokens=32)[0].tolist()
    got = loaded.generate(prompt, max_new_tokens=32)[0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)) - prompt.shape[1]
    print(f"\n  llama.cpp's converter, {outtype}: the first {same} of 32 greedy tokens agree with the float model")
    if outtype == "f32":
        assert got == want
    benchmark.group = "llama converter gguf load"
    benchmark.extra_info.update(impl=f"fastlm GPT.from_pretrained, {outtype}", agreeing_tokens=same)
    benchmark.pedantic(lambda: GPT.from_pretrained(out), rounds=3, warmup_rounds=0)


def teardown_module(module):
    if not MEDIANS:
        return
    print("\nfastlm vs llama.cpp (2 threads; f32 unless named): medians, ratio = llama.cpp time / fastlm time")
    for group in dict.fromkeys(g for g, _ in MEDIANS):
        f, l = MEDIANS.get((group, "fastlm")), MEDIANS.get((group, "llama.cpp"))
        if f and l:
            rate = "" if "ttft" in group else f"; {f[1] / f[0]:.1f} vs {l[1] / l[0]:.1f} tokens/s"
            print(f"  {group}: fastlm {f[0] * 1e3:.1f} ms, llama.cpp {l[0] * 1e3:.1f} ms, ratio {l[0] / f[0]:.2f}x{rate}")
