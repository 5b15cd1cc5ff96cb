"""Tokenizer speed: fastlm against tiktoken, Hugging Face tokenizers and bpe-openai, same
vocabulary, same text, in one run (medians). Text: the Python stdlib corpus (about 12 MB)
and tinyshakespeare. Vocabularies: ../shared/data/{r50k,cl100k}_base.tiktoken.gz.

    python -m pytest bench/test_tokenizer.py --benchmark-only --benchmark-json=tok.json
    python bench/tables.py tok.json                 # the ratio table for bench/RESULTS.md

Encoding is timed single-threaded (one encode call on the whole text) with fastlm's
pre-token cache emptied before every round ("cold"); "warm" keeps it, as a long-running
process would. Before timing, fastlm's ids (and bpe-openai's) are checked equal to tiktoken's
on the same text, and fastlm's decode equal to the text; Hugging Face's ids are checked after
its (slow) timed calls. Set FASTLM_SHARED_DATA to the data folder when ../shared/data is elsewhere.
"""
import os
import pathlib
import statistics
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from _tiktoken_local import tiktoken_encoding  # noqa: E402

from fastlm.data import stdlib_corpus  # noqa: E402

from fastlm import Tokenizer  # noqa: E402

DATA = pathlib.Path(os.environ.get("FASTLM_SHARED_DATA")
                    or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")
ROUNDS = int(os.environ.get("FASTLM_BENCH_ROUNDS", "5"))


def _need(path):
    if not path.is_file():
        pytest.skip(f"{path} is absent (set FASTLM_SHARED_DATA)")


@pytest.fixture(scope="module")
def corpora():
    _need(DATA / "tinyshakespeare.txt")
    files = [d.text for d in stdlib_corpus()]
    return {"stdlib": "".join(files), "shakespeare": (DATA / "tinyshakespeare.txt").read_text(), "files": files}


_TOK = {}
_WANT = {}  # (vocabulary, text) -> tiktoken's ids: what every encoder must return


def toks(name, tmp_path_factory=None):
    if name not in _TOK:
        _need(DATA / f"{name}.tiktoken.gz")
        ours = Tokenizer.load(DATA / f"{name}.tiktoken.gz")
        _TOK[name] = (ours, tiktoken_encoding(name, DATA))
    return _TOK[name]


def _info(benchmark, text_bytes, competitor, what):
    benchmark.extra_info.update(bytes=text_bytes, impl=competitor, what=what)


def _run(benchmark, fn, setup=None, rounds=ROUNDS):
    return benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 2 else 0)


# ----------------------------------------------------------------------------- encode, one thread
@pytest.mark.parametrize("text", ["stdlib", "shakespeare"])
@pytest.mark.parametrize("name", ["r50k_base", "cl100k_base"])
@pytest.mark.parametrize("impl", ["fastlm", "fastlm-warm", "tiktoken", "hf-tokenizers", "bpe-openai"])
def test_encode(benchmark, corpora, name, text, impl, tmp_path_factory):
    ours, enc = toks(name)
    s = corpora[text]
    benchmark.group = f"encode {name} {text} 1 thread"
    _info(benchmark, len(s.encode()), impl, "encode")
    key = (name, text)
    if key not in _WANT:
        _WANT[key] = enc.encode_ordinary(s)
    want = _WANT[key]
    if impl == "fastlm":
        fn, setup = (lambda: ours.encode_ordinary(s)), (lambda: ours.clear_cache())
    elif impl == "fastlm-warm":
        fn, setup = (lambda: ours.encode_ordinary(s)), None
    elif impl == "tiktoken":
        fn, setup = (lambda: enc.encode_ordinary(s)), None
    elif impl == "hf-tokenizers":
        pytest.importorskip("tokenizers")
        from tokenizers import Tokenizer as HFTokenizer

        d = tmp_path_factory.mktemp(name)
        ours.save(d)
        hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
        if text == "stdlib" and name == "cl100k_base":
            pytest.skip("one r50k stdlib run stands for Hugging Face tokenizers (about 1 MB/s)")
        fn, setup = (lambda: hf.encode(s, add_special_tokens=False).ids), None
        rounds = 2 if text == "stdlib" else 3
        ids = _run(benchmark, fn, setup, rounds)
        assert ids == want, "Hugging Face's ids differ from tiktoken's"
        return
    else:
        bindings = pytest.importorskip("bpe_openai._bindings")
        if name not in bindings.supported_encodings():
            pytest.skip(f"bpe-openai has no {name} (it has {bindings.supported_encodings()})")
        backend = bindings.tokenizer_for_encoding(name)
        fn, setup = (lambda: backend.encode(s)), None
    assert list(fn()) == want, f"{impl}'s ids differ from tiktoken's"
    _run(benchmark, fn, setup)


# ----------------------------------------------------------------------------- encode_batch threads
@pytest.mark.parametrize("threads", [1, 2])
def test_encode_batch_threads(benchmark, corpora, threads):
    ours, _ = toks("r50k_base")
    files = corpora["files"]
    benchmark.group = "encode_batch r50k_base stdlib files"
    _info(benchmark, sum(len(f.encode()) for f in files), f"fastlm-{threads}t", "encode_batch")
    cpu = []

    def fn():
        c0 = time.process_time()
        out = ours.encode_batch(files, num_threads=threads, disallowed_special=())
        cpu.append(time.process_time() - c0)
        return out

    _run(benchmark, fn, lambda: ours.clear_cache())
    # CPU seconds of the whole process (all threads): on a machine shared with other jobs the
    # wall-clock speed-up of 2 threads can only show when a second core is actually free.
    benchmark.extra_info["cpu_s_median"] = statistics.median(cpu)


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("text", ["stdlib", "shakespeare"])
@pytest.mark.parametrize("impl", ["fastlm", "tiktoken"])
def test_decode(benchmark, corpora, text, impl):
    ours, enc = toks("r50k_base")
    s = corpora[text]
    ids = enc.encode_ordinary(s)
    benchmark.group = f"decode r50k_base {text}"
    _info(benchmark, len(s.encode()), impl, "decode")
    fn = (lambda: ours.decode(ids)) if impl == "fastlm" else (lambda: enc.decode(ids))
    assert fn() == s, f"{impl}'s decode is not the text"
    _run(benchmark, fn)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("impl", ["fastlm", "hf-tokenizers"])
def test_train_32768(benchmark, corpora, impl):
    files = corpora["files"]
    benchmark.group = "train 32768 stdlib"
    _info(benchmark, sum(len(f.encode()) for f in files), impl, "train")
    if impl == "fastlm":
        fn = lambda: Tokenizer.train(files, 32768)  # noqa: E731
    else:
        pytest.importorskip("tokenizers")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        def fn():
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            tr = trainers.BpeTrainer(vocab_size=32768, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            hf.train_from_iterator(files, tr)
            return hf
    out = _run(benchmark, fn, rounds=3)
    n = out.n_vocab if impl == "fastlm" else out.get_vocab_size()
    assert n == 32768
