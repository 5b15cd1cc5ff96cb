"""fastlm.Tokenizer: the same ids as tiktoken (r50k, cl100k, o200k) and Hugging Face tokenizers,
round trips, training, file formats, malformed files and adversarial inputs."""
import base64
import gzip
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm import Tokenizer
from fastlm.tokenizer import PATTERNS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _tiktoken_local import tiktoken_encoding  # noqa: E402

# o200k_base's real rank file is not among the shared data: its pattern and special tokens are
# tested over cl100k's ranks (see pair()), and the real file where tiktoken has it cached.
ENCODINGS = ["r50k_base", "cl100k_base", "o200k_base"]


# ../shared/data as in conftest.py; FASTLM_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = pathlib.Path(os.environ.get("FASTLM_SHARED_DATA")
                           or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="module")
def data_dir():
    if not (SHARED_DATA / "r50k_base.tiktoken.gz").is_file():
        pytest.skip(f"the real vocabularies are absent from {SHARED_DATA} (r50k_base.tiktoken.gz); "
                    "set FASTLM_SHARED_DATA to the folder that has them")
    return SHARED_DATA


_TOKS = {}


def pair(name, data_dir):
    """(fastlm Tokenizer, tiktoken Encoding) for one encoding, built once. "o200k_base" is
    o200k's pattern and special tokens over cl100k's ranks, in tiktoken and in fastlm."""
    if name not in _TOKS:
        if name == "o200k_base":
            _TOKS[name] = _o200k_over_cl100k(data_dir)
            return _TOKS[name]
        path = data_dir / f"{name}.tiktoken.gz"
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        pytest.importorskip("tiktoken")
        _TOKS[name] = (Tokenizer.load(path), tiktoken_encoding(name, data_dir))
    return _TOKS[name]


O200K_SPECIALS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


def _o200k_over_cl100k(data_dir):
    tiktoken = pytest.importorskip("tiktoken")
    path = data_dir / "cl100k_base.tiktoken.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ranks = tiktoken_encoding("cl100k_base", data_dir)._mergeable_ranks
    enc = tiktoken.Encoding(name="o200k_base", pat_str=PATTERNS["o200k"], mergeable_ranks=ranks,
                            special_tokens=O200K_SPECIALS)
    tok = Tokenizer.load(path, pattern="o200k", special_tokens=O200K_SPECIALS)
    assert tok.pattern == "o200k"
    return tok, enc


def _stdlib_code() -> str:
    import inspect
    import json as j

    return inspect.getsource(j.decoder) + inspect.getsource(inspect.getmodule(pathlib.Path))[:20000]


TEXTS = {
    "prose": "It was the best of times, it was the worst of times; it was the age of wisdom... "
             "Mr. O'Neil said: \"Don't!\" -- and left (quickly).\n\nThe end.",
    "code": None,  # filled from the stdlib below
    "chinese": "自然语言处理是人工智能的一个分支。我们今天学习分词器，价格是１２３元。",
    "japanese": "吾輩は猫である。名前はまだ無い。カタカナとひらがな、ｶﾀｶﾅ半角も。",
    "korean_arabic_hindi": "안녕하세요 세계 مرحبا بالعالم नमस्ते दुनिया ১২৩ ٣٤٥",
    "emoji": "👍👍🏽👍🏿 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️‍🔥 🧑🏾‍🚀!!",
    "combining": "e\u0301 a\u0300\u0301\u0302 Z\u0351\u0352\u0353a\u0354l\u0355go \u0915\u094d\u0937 n\u0303\u0303",
    "spaces": "a  b   c    d\n\n\ne\t\t\tf \t \n \r\n\r\n  \n\t x  \n" + " " * 100 + "y" + "\n" * 50 + "\t" * 30,
    "trailing_spaces": "end with spaces   ",
    "trailing_newlines": "end with newlines \n\n",
    "unicode_spaces": "a\u00a0b\u3000c\u2028d\u2029e\u0085f\u1680g\u202fh\u205fi\u000bj\u000ck\u001cl\u001dm\u200bn",
    "digits": "0 12 345 6789 1234567890 3.14159 1e10 0x1F ١٢٣٤ ⅷ ½ 2024-01-01 +44(0)20",
    "contractions": "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D 'Re 'rE 'Ve 'lL 'Ll 'x ' s' '' ''s "
                    "I'M YOU'RE we'Ve she'LL they'D don'T it'S x'ſ",
    "punctuation": "!!! ??? ... --- ((( ))) {\"a\": [1, 2]} <|endoftext|> <|fim_prefix|> @#$%^&*",
    "nul_and_controls": "a\x00b\x00\x00c \x00 \x01\x02\x7f\x1b[0m\x08",
    "mixed_case_words": "HTTPServer getHTTPResponseCode XMLHttpRequest iPhone McDonald's",
}


@pytest.fixture(scope="module")
def texts():
    t = dict(TEXTS)
    t["code"] = _stdlib_code()
    return t


# ----------------------------------------------------------------------------- tiktoken
@pytest.mark.parametrize("name", ENCODINGS)
def test_same_ids_as_tiktoken(name, data_dir, texts):
    tok, enc = pair(name, data_dir)
    assert tok.n_vocab == enc.n_vocab
    assert tok.eot_token == enc.eot_token
    assert tok.special_tokens == enc._special_tokens
    for key, text in texts.items():
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text), key
        assert tok.encode(text, disallowed_special=()) == enc.encode(text, disallowed_special=()), key
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all"), key
    everything = "\n".join(texts.values())
    assert tok.encode_ordinary(everything) == enc.encode_ordinary(everything)


@pytest.mark.parametrize("name", ENCODINGS)
def test_same_ids_as_tiktoken_shakespeare_and_long_line(name, data_dir):
    tok, enc = pair(name, data_dir)
    text = (data_dir / "tinyshakespeare.txt").read_text()[:300_000]
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)
    # 1 MB on a single line.
    rng = random.Random(0)
    words = text.split()
    line = " ".join(rng.choice(words) for _ in range(200_000))[:1_000_000]
    assert "\n" not in line and len(line) == 1_000_000
    assert tok.encode_ordinary(line) == enc.encode_ordinary(line)


@pytest.mark.parametrize("name", ENCODINGS)
def test_same_ids_as_tiktoken_whole_unicode_range(name, data_dir):
    """Characters from all planes (recently assigned letters and numbers included) between
    ASCII letters, digits, spaces and apostrophes."""
    tok, enc = pair(name, data_dir)
    rng = random.Random(2)
    texts = []
    for _ in range(2000):
        chars = []
        for _ in range(24):
            if rng.random() < 0.5:
                chars.append(rng.choice(" a1\n'.\tZ"))
            else:
                cp = rng.choice([rng.randrange(0x80, 0x3400), rng.randrange(0xA000, 0x10000),
                                 rng.randrange(0x10000, 0x32000), rng.randrange(0xE0000, 0x110000)])
                if not 0xD800 <= cp <= 0xDFFF:
                    chars.append(chr(cp))
        texts.append("".join(chars))
    assert tok.encode_ordinary_batch(texts) == enc.encode_ordinary_batch(texts, num_threads=1)


@pytest.mark.parametrize("name", ENCODINGS)
def test_same_ids_as_tiktoken_long_pretokens(name, data_dir):
    """Pre-tokens longer than 256 bytes take the heap-based merge."""
    tok, enc = pair(name, data_dir)
    rng = random.Random(3)
    for s in ["a" * 3000, "ab" * 1500, "".join(rng.choice("abcdefghijklmnop") for _ in range(4000)),
              " " + "".join(rng.choice("etaoinshrdlu") for _ in range(2000)), "é" * 700 + "x",
              "".join(rng.choice("0123456789") for _ in range(1000)), "!?" * 400, " " * 1000 + "x",
              "\n" * 600 + "y"]:
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), s[:20]


@pytest.mark.parametrize("name", ENCODINGS)
def test_lone_surrogates_replaced_like_tiktoken(name, data_dir):
    tok, enc = pair(name, data_dir)
    for s in ["a\ud800b", "\udfff", "x \ud83d\ude00 \ud83d y"]:
        assert tok.encode(s) == enc.encode(s)
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s)


# Characters drawn from every class the scanners distinguish.
_ALPHABET = st.sampled_from(
    list("abcXYZ sS'tTmMdDlLvVeErR019 \t\n\r\x0b\x0c.,!?-_()\"'<|>")
    + ["\u00a0", "\u3000", "\u2028", "\u0085", "\x1c", "\x00", "é", "ß", "Ж", "中", "日", "١", "½", "ⅷ",
       "\u0301", "👍", "🏽", "\u200d", "ſ", "İ", "K", "\ufeff", "\U0001F600", "\U00010400"])


@pytest.mark.parametrize("name", ENCODINGS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_ALPHABET, max_size=60).map("".join))
def test_hypothesis_same_ids_as_tiktoken(name, data_dir, s):
    tok, enc = pair(name, data_dir)
    assert tok.encode_ordinary(s) == enc.encode_ordinary(s)


@pytest.mark.parametrize("name", ENCODINGS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_hypothesis_any_text(name, data_dir, s):
    tok, enc = pair(name, data_dir)
    ids = tok.encode_ordinary(s)
    assert ids == enc.encode_ordinary(s)
    assert tok.decode(ids) == s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=100))
def test_hypothesis_bytes_round_trip(data_dir, b):
    tok, _ = pair("r50k_base", data_dir)
    assert tok.decode_bytes(tok.encode_bytes(b)) == b


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=40), max_size=12), st.integers(1, 3))
def test_hypothesis_batch_equals_one_by_one(data_dir, batch, threads):
    tok, _ = pair("cl100k_base", data_dir)
    kw = dict(disallowed_special=())
    assert tok.encode_batch(batch, num_threads=threads, **kw) == [tok.encode(t, **kw) for t in batch]
    kw = dict(allowed_special="all")
    assert tok.encode_batch(batch, num_threads=threads, **kw) == [tok.encode(t, **kw) for t in batch]


def test_concurrent_python_threads(data_dir):
    from concurrent.futures import ThreadPoolExecutor

    tok, enc = pair("r50k_base", data_dir)
    text = (data_dir / "tinyshakespeare.txt").read_text()
    parts = [text[i * 50_000:(i + 1) * 50_000] for i in range(8)]
    want = [enc.encode_ordinary(p) for p in parts]
    tok.clear_cache()
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(tok.encode_ordinary, parts * 2))
    assert got == want * 2
    assert tok.encode_batch(parts, 2, disallowed_special=()) == want


def test_batch_cache_shared_by_threads_and_calls(data_dir):
    # encode_batch's threads share one pre-token cache that fills up (40k distinct words
    # in a batch it sizes for far fewer) and is replaced by the next call; Python threads
    # run batches on it at the same time.
    from concurrent.futures import ThreadPoolExecutor
    import random

    tok, enc = pair("r50k_base", data_dir)
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyzéø"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 14))) for _ in range(40_000)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 400))) for _ in range(300)]
    want = [enc.encode_ordinary(t) for t in texts]
    tok.clear_cache()
    for threads in (1, 2, 4, 3):
        assert tok.encode_batch(texts, threads, disallowed_special=()) == want
    with ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda k: tok.encode_batch(texts[k::3], 2, disallowed_special=()), range(3)))
    assert got == [want[k::3] for k in range(3)]


def test_special_tokens_semantics(data_dir):
    tok, enc = pair("cl100k_base", data_dir)
    s = "hi <|endoftext|> there<|fim_prefix|>x<|endofprompt|>"
    for kw in [dict(allowed_special="all"), dict(disallowed_special=()),
               dict(allowed_special={"<|endoftext|>"}, disallowed_special=()),
               dict(allowed_special={"<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>"})]:
        assert tok.encode(s, **kw) == enc.encode(s, **kw), kw
    for kw in [{}, dict(allowed_special={"<|endoftext|>"})]:
        with pytest.raises(ValueError, match="disallowed special token"):
            tok.encode(s, **kw)
        with pytest.raises(ValueError):
            enc.encode(s, **kw)
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode_batch(["fine", s])
    assert tok.encode_ordinary(s) == enc.encode_ordinary(s)
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    assert tok.decode([tok.eot_token]) == "<|endoftext|>"
    assert tok.token_bytes(100276) == b"<|endofprompt|>"


def test_decode_never_raises_and_checks_ids(data_dir):
    import numpy as np

    tok, enc = pair("r50k_base", data_dir)
    ids = tok.encode("héllo 👍 wörld")
    for k in range(len(ids) + 1):
        assert tok.decode(ids[:k]) == enc.decode(ids[:k])
    assert tok.decode_bytes(ids) == enc.decode_bytes(ids)
    assert tok.decode(np.array(ids, dtype=np.int64)) == "héllo 👍 wörld"
    assert tok.decode(tuple(ids)) == "héllo 👍 wörld"
    assert tok.decode([]) == ""
    for bad in ([-1], [tok.n_vocab], [2**40]):
        with pytest.raises(ValueError, match="out of range|not in the vocabulary"):
            tok.decode(bad)
    with pytest.raises(TypeError):
        tok.decode(["a"])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    assert [tok.token_bytes(i) for i in ids] == [enc.decode_single_token_bytes(i) for i in ids]


def test_encode_to_numpy_and_pretokenize(data_dir):
    tok, enc = pair("r50k_base", data_dir)
    s = "Hello there, world's 123!  \n"
    assert tok.encode_to_numpy(s).tolist() == enc.encode(s)
    import regex

    assert tok.pretokenize(s) == regex.findall(enc._pat_str, s)


# ----------------------------------------------------------------------------- Hugging Face
def _hf_train(texts, vocab_size, pattern="gpt2"):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    return hf


@pytest.fixture(scope="module")
def shakespeare(data_dir):
    text = (data_dir / "tinyshakespeare.txt").read_text()
    return text[:800_000], text[800_000:]


def test_train_compression_matches_hf_bpetrainer(shakespeare):
    pytest.importorskip("tokenizers")
    train, held = shakespeare
    lines = train.splitlines(keepends=True)
    for vocab_size in (600, 3000):
        tok = Tokenizer.train(lines, vocab_size)
        hf = _hf_train(lines, vocab_size)
        assert tok.n_vocab == hf.get_vocab_size() == vocab_size
        ours = len(held.encode()) / len(tok.encode_ordinary(held))
        theirs = len(held.encode()) / len(hf.encode(held).ids)
        assert abs(ours / theirs - 1) < 0.01, (vocab_size, ours, theirs)
        # The merges, applied at encode time, reproduce the segmentation training ended with.
        assert len(tok.encode_ordinary("".join(lines))) == tok.train_stats["corpus_tokens"]


def test_train_deterministic_files_and_bytes_only(shakespeare, tmp_path):
    train, _ = shakespeare
    text = train[:200_000]
    a = Tokenizer.train([text], 1000, num_threads=1)
    b = Tokenizer.train([text[:100_000], text[100_000:]], 1000, num_threads=2)
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    with open(p) as f:
        c = Tokenizer.train([f], 1000)
    d = Tokenizer.train(p, 1000)
    probe = text[:5000]
    assert a.encode(probe) == c.encode(probe) == d.encode(probe)
    assert a._core.merges() == c._core.merges()
    # Cutting the corpus in two at a newline gives the same counts here.
    assert a._core.merges() == b._core.merges()
    plain = Tokenizer.train([text], 256)
    assert plain.n_vocab == 257 and plain.eot_token == 256
    assert plain.encode("héllo") == list("héllo".encode())
    # Special-token text in the corpus is cut out, never merged.
    s = Tokenizer.train(["ab<|endoftext|>ab" * 50], 300)
    assert s.n_vocab == 259 and s.eot_token == 258  # only two merges exist: ab, abab
    assert all(b"<" not in s.token_bytes(i) for i in range(256, 258))
    with pytest.raises(ValueError):
        Tokenizer.train(["x"], 0)
    with pytest.raises(TypeError):
        Tokenizer.train([123], 300)


def test_save_load_round_trip_with_hf_and_transformers(shakespeare, tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer

    train, held = shakespeare
    tok = Tokenizer.train([train[:300_000]], 2000)
    tok.save(tmp_path)
    probe = held[:20_000] + TEXTS["emoji"] + TEXTS["contractions"] + TEXTS["spaces"] + TEXTS["chinese"]
    ids = tok.encode_ordinary(probe)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(probe).ids == ids
    assert hf.decode(ids) == probe
    for path in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.json"):
        again = Tokenizer.load(path)
        assert again.encode_ordinary(probe) == ids
        assert again.special_tokens == tok.special_tokens
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert fast.encode(probe) == ids
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert slow.encode(held[:3000]) == tok.encode_ordinary(held[:3000])


def test_load_vocabulary_trained_by_hf(shakespeare, tmp_path):
    pytest.importorskip("tokenizers")
    train, held = shakespeare
    hf = _hf_train([train[:300_000]], 1500)
    hf.save(str(tmp_path / "tokenizer.json"))
    hf.model.save(str(tmp_path))  # vocab.json + merges.txt
    probe = held[:20_000] + TEXTS["emoji"] + TEXTS["spaces"] + TEXTS["japanese"] + TEXTS["digits"]
    want = hf.encode(probe).ids
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode_ordinary(probe) == want
    assert Tokenizer.load(tmp_path / "vocab.json").encode_ordinary(probe) == want
    # The old merge spelling ("a b" strings) as well as the new (["a", "b"]).
    obj = json.loads((tmp_path / "tokenizer.json").read_text())
    m = obj["model"]["merges"]
    obj["model"]["merges"] = [" ".join(x) if isinstance(x, list) else x for x in m]
    (tmp_path / "old.json").write_text(json.dumps(obj))
    assert Tokenizer.load(tmp_path / "old.json").encode_ordinary(probe) == want


@pytest.mark.parametrize("name", ENCODINGS)
def test_tiktoken_vocabulary_saved_for_hf(name, data_dir, tmp_path, texts):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer

    tok, enc = pair(name, data_dir)
    tok.save(tmp_path)
    # (Hugging Face always turns special-token text into special tokens: leave it out.)
    probe = "\n".join(texts.values()).replace("<|", "< |")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(probe).ids == enc.encode_ordinary(probe)
    assert Tokenizer.load(tmp_path).encode_ordinary(probe) == enc.encode_ordinary(probe)


def test_from_tiktoken(data_dir):
    tok, enc = pair("cl100k_base", data_dir)
    t2 = Tokenizer.from_tiktoken(enc)
    s = TEXTS["prose"] + TEXTS["digits"]
    assert t2.encode(s) == enc.encode(s) and t2.n_vocab == enc.n_vocab


def test_o200k_pattern_and_specials_are_tiktokens():
    pytest.importorskip("tiktoken")
    import tiktoken_ext.openai_public as op

    orig = op.load_tiktoken_bpe
    op.load_tiktoken_bpe = lambda *a, **k: {}  # the constructor's spec only, nothing read
    try:
        spec = op.o200k_base()
    finally:
        op.load_tiktoken_bpe = orig
    assert PATTERNS["o200k"] == spec["pat_str"]
    assert spec["special_tokens"] == O200K_SPECIALS


def test_o200k_words_cases_and_marks(data_dir):
    """The splits that set o200k apart: case changes inside words, contractions in any case
    kept on the word, marks, and '/' after punctuation and newlines."""
    tok, enc = pair("o200k_base", data_dir)
    assert Tokenizer.from_tiktoken(enc).pattern == "o200k"  # tiktoken's pattern string is recognised
    try:
        import regex
    except ImportError:
        regex = None
    for s in ["HTTPServer getHTTPResponseCode iPhone McDonald'S DON'T I'M we'Ll", "Ǆemo ǅemo ǆemo ʰʰ ʰA Aʰ aʰB",
              "\u0301A \u0301\u0301 !\u0301 \u0301!", "!\n/ x;\r\n//y a/b", "日本'S 'S '", "ΑΒΓαβγ ΣΊΣΥΦΟΣ",
              " \u0301x\n\n  \n"]:
        assert tok.encode_ordinary(s) == enc.encode_ordinary(s), s
        if regex is not None:  # the pre-tokens too, against a second regex engine
            assert tok.pretokenize(s) == regex.findall(PATTERNS["o200k"], s), s


def test_o200k_training_cuts_long_texts_between_pretokens():
    """Training cuts texts past 128 KiB after newlines; o200k's "!\\n/" is one pre-token, never cut."""
    text = "ab!\n/cd\n" * 40000
    tok = Tokenizer.train([text], vocab_size=300, pattern="o200k")
    assert tok.pretokenize("ab!\n/cd\n") == ["ab", "!\n/", "cd", "\n"]
    assert tok.train_stats["words"] == 4 and tok.train_stats["corpus_tokens"] == 4 * 40000


def test_o200k_from_tiktoken_cache_only(tmp_path, monkeypatch):
    """Tokenizer.from_tiktoken("o200k_base") reads the rank file where tiktoken caches it and
    never downloads it."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    from fastlm.tokenizer import formats

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not download"):
        Tokenizer.from_tiktoken("o200k_base")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(FileNotFoundError, match="switched off"):
        Tokenizer.from_tiktoken("o200k_base")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # A small rank file in the cache: its path is the one tiktoken itself reads (tiktoken is kept
    # off the network by a read_file that fails).
    data = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)) + \
        base64.b64encode(b"ab") + b" 256\n"
    path = formats.tiktoken_cache_path("o200k_base")
    path.write_bytes(data)
    url = formats._TIKTOKEN_RANK_FILES["o200k_base"][0]

    def no_network(blobpath):
        raise AssertionError(f"tiktoken would download {blobpath}: the cache path differs")

    monkeypatch.setattr(tiktoken_load, "read_file", no_network)
    assert tiktoken_load.read_file_cached(url) == data
    with pytest.raises(ValueError, match="SHA-256"):
        Tokenizer.from_tiktoken("o200k_base")
    import hashlib
    monkeypatch.setitem(formats._TIKTOKEN_RANK_FILES, "o200k_base", (url, hashlib.sha256(data).hexdigest()))
    tok = Tokenizer.from_tiktoken("o200k_base")
    assert (tok.name, tok.pattern, tok.special_tokens) == ("o200k_base", "o200k", O200K_SPECIALS)
    assert tok.encode("ab<|endofprompt|>", allowed_special="all") == [256, 200018]


def test_o200k_real_file_from_tiktoken_cache(texts):
    """The real o200k_base, where tiktoken has cached its rank file."""
    tiktoken = pytest.importorskip("tiktoken")
    from fastlm.tokenizer import formats

    path = formats.tiktoken_cache_path("o200k_base")
    if path is None or not path.is_file():
        pytest.skip(f"o200k_base's rank file is not in tiktoken's cache ({path})")
    tok, enc = Tokenizer.from_tiktoken("o200k_base"), tiktoken.get_encoding("o200k_base")
    assert tok.n_vocab == enc.n_vocab and tok.special_tokens == enc._special_tokens
    for key, text in texts.items():
        assert tok.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all"), key


# ----------------------------------------------------------------------------- malformed files
def _tiktoken_file(tmp_path, lines):
    p = tmp_path / "x.tiktoken"
    p.write_bytes(b"".join(line + b"\n" for line in lines))
    return p


def _byte_lines():
    return [base64.b64encode(bytes([b])) + b" " + str(b).encode() for b in range(256)]


def test_malformed_files_give_clear_errors(tmp_path):
    good = _byte_lines() + [base64.b64encode(b"ab") + b" 256"]
    assert Tokenizer.load(_tiktoken_file(tmp_path, good)).encode("abab") == [256, 256]
    with pytest.raises(ValueError, match="bad base64"):
        Tokenizer.load(_tiktoken_file(tmp_path, good + [b"!!!notbase64 257"]))
    with pytest.raises(ValueError, match="duplicate rank"):
        Tokenizer.load(_tiktoken_file(tmp_path, good + [base64.b64encode(b"cd") + b" 256"]))
    with pytest.raises(ValueError, match="repeats rank"):
        Tokenizer.load(_tiktoken_file(tmp_path, good + [base64.b64encode(b"ab") + b" 257"]))
    with pytest.raises(ValueError, match="bad rank"):
        Tokenizer.load(_tiktoken_file(tmp_path, good + [base64.b64encode(b"cd") + b" x"]))
    with pytest.raises(ValueError, match="single byte"):
        Tokenizer.load(_tiktoken_file(tmp_path, _byte_lines()[1:]))
    bad_gz = tmp_path / "y.tiktoken.gz"
    bad_gz.write_bytes(gzip.compress(b"".join(x + b"\n" for x in good))[:-20])
    with pytest.raises(ValueError, match="gzip"):
        Tokenizer.load(bad_gz)

    tok = Tokenizer.train(["hello hello world"], 270)
    tok.save(tmp_path / "ok")
    text = (tmp_path / "ok" / "tokenizer.json").read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(tmp_path / "trunc.json")
    obj = json.loads(text)
    obj["model"]["merges"].append(["Ġnope", "zz"])
    (tmp_path / "unknown.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.load(tmp_path / "unknown.json")
    obj = json.loads(text)
    obj["model"]["merges"].append("a b c")
    (tmp_path / "spell.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="expected 'A B'"):
        Tokenizer.load(tmp_path / "spell.json")
    obj = json.loads(text)
    obj["model"]["type"] = "WordPiece"
    (tmp_path / "wp.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="not a BPE"):
        Tokenizer.load(tmp_path / "wp.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")
    merges = (tmp_path / "ok" / "merges.txt").read_text() + "Ġq Ġr\n"
    (tmp_path / "ok" / "merges.txt").write_text(merges)
    (tmp_path / "ok" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="merge .* names a token"):
        Tokenizer.load(tmp_path / "ok")
    with pytest.raises(ValueError, match="unknown pre-tokenization pattern"):
        Tokenizer.train(["x"], 300, pattern="o300k")


# ----------------------------------------------------------------------------- limits
def test_limits_are_the_cores():
    from fastlm import _tokenizer
    from fastlm import tokenizer as T

    assert (T.MAX_VOCAB, T.MAX_TOKEN_BYTES) == (_tokenizer.MAX_VOCAB, _tokenizer.MAX_TOKEN_BYTES)


def test_ids_past_the_limit_refused_before_allocating(tmp_path):
    from fastlm import _tokenizer
    from fastlm.tokenizer import MAX_VOCAB

    byte_tokens = [bytes([b]) for b in range(256)]
    for big in (MAX_VOCAB, 100_000_000):
        with pytest.raises(ValueError, match="MAX_VOCAB"):
            Tokenizer(byte_tokens, special_tokens={"<|endoftext|>": big})
        # The core refuses it too, whoever calls it.
        with pytest.raises(ValueError, match="past the limit"):
            _tokenizer.Core(byte_tokens, [], False, [("<|x|>", big)], 0)
        # tokenizer.json whose added token has the id
        tok = Tokenizer.train(["hello hello world"], 270)
        tok.save(tmp_path / "hf")
        obj = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
        obj["added_tokens"][0]["id"] = big
        obj["model"]["vocab"]["<|endoftext|>"] = big
        (tmp_path / "big.json").write_text(json.dumps(obj))
        with pytest.raises(ValueError, match="MAX_VOCAB"):
            Tokenizer.load(tmp_path / "big.json")
        # vocab.json with an ordinary token at the id
        vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text())
        vocab["zzz"] = big
        (tmp_path / "hf" / "tokenizer.json").unlink()
        (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
        with pytest.raises(ValueError, match="MAX_VOCAB"):
            Tokenizer.load(tmp_path / "hf")
        # a .tiktoken rank
        with pytest.raises(ValueError, match="MAX_VOCAB"):
            Tokenizer.load(_tiktoken_file(tmp_path, _byte_lines() + [base64.b64encode(b"ab") + b" %d" % big]))
        with pytest.raises(ValueError, match="MAX_VOCAB"):
            Tokenizer.train(["hello"], big + 1)
    with pytest.raises(ValueError, match="bad id"):
        Tokenizer(byte_tokens, special_tokens={"<|endoftext|>": True})


def test_token_length_limit(tmp_path):
    import time

    from fastlm import _tokenizer
    from fastlm.tokenizer import MAX_TOKEN_BYTES

    byte_tokens = [bytes([b]) for b in range(256)]
    longest = b"a" * MAX_TOKEN_BYTES
    ok = Tokenizer.load(_tiktoken_file(tmp_path, _byte_lines() + [base64.b64encode(longest) + b" 256"]))
    assert ok.token_bytes(256) == longest
    for n in (MAX_TOKEN_BYTES + 1, 1 << 20):
        line = base64.b64encode(b"a" * n) + b" 256"
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="MAX_TOKEN_BYTES"):
            Tokenizer.load(_tiktoken_file(tmp_path, _byte_lines() + [line]))
        with pytest.raises(ValueError, match="past the limit"):
            _tokenizer.Core(byte_tokens + [b"a" * n], [], True, [], 0)
        with pytest.raises(ValueError, match="past the limit"):
            Tokenizer(byte_tokens, special_tokens={"x" * n: 256})
        assert time.monotonic() - t0 < 5
    # Training never makes a token past the limit, however long a repeated word is.
    tok = Tokenizer.train(["a" * 5000 + " " + "a" * 5000], 300)
    assert max(len(tok.token_bytes(i)) for i in range(tok.n_vocab - 1)) <= MAX_TOKEN_BYTES
    assert tok.decode(tok.encode("a" * 5000)) == "a" * 5000


def test_tiktoken_merges_derived_like_tiktoken():
    """A vocabulary where every split of every long token is a merge: the merges fastlm
    derives from the ranks give tiktoken's ids."""
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    for k in range(2, 300):
        ranks[b"a" * k] = len(ranks)
    for k in range(2, 40):
        ranks[b"ab" * k] = len(ranks)
    enc = tiktoken.Encoding("t", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={})
    tok = Tokenizer([t for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])], rank_by_id=True)
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice(["a" * rng.randint(1, 400), "ab" * rng.randint(1, 60), " ", "b"])
                    for _ in range(rng.randint(1, 6)))
        assert tok.encode(s) == enc.encode(s), s


def test_file_size_limit(tmp_path):
    import zlib

    from fastlm.tokenizer import MAX_FILE_BYTES

    # A gzip bomb: a small file that inflates past the limit.
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    bomb = b"".join(c.compress(chunk) for _ in range((MAX_FILE_BYTES >> 20) + 1)) + c.flush()
    assert len(bomb) < 1 << 20
    (tmp_path / "bomb.tiktoken.gz").write_bytes(bomb)
    with pytest.raises(ValueError, match="MAX_FILE_BYTES"):
        Tokenizer.load(tmp_path / "bomb.tiktoken.gz")
    # A plain file past the limit (sparse: no disk used).
    with open(tmp_path / "big.tiktoken", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match="MAX_FILE_BYTES"):
        Tokenizer.load(tmp_path / "big.tiktoken")
    # Several gzip members are one file, as gzip reads them.
    lines = b"".join(x + b"\n" for x in _byte_lines() + [base64.b64encode(b"ab") + b" 256"])
    (tmp_path / "two.tiktoken.gz").write_bytes(gzip.compress(lines[:1000]) + gzip.compress(lines[1000:]))
    assert Tokenizer.load(tmp_path / "two.tiktoken.gz").encode("ab") == [256]
    # JSON nested past the parser's depth is a bad file, not a crash.
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deep"):
        Tokenizer.load(tmp_path / "deep.json")


# ----------------------------------------------------------------------------- adversarial
def test_adversarial_inputs(data_dir):
    tok, _ = pair("r50k_base", data_dir)
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEF0123456789.,;:!?()[]{}<>|/\\"
    block = "".join(rng.choice(alphabet) for _ in range(1 << 20))
    big = block * 50  # 50 MB without a space
    ids = tok.encode_to_numpy(big, disallowed_special=())
    assert 0 < len(ids) < len(big)
    assert tok.decode_bytes(ids[: len(ids) // 50 + 10])[: 1 << 16] == big.encode()[: 1 << 16]
    del big
    # One long pre-token (5 MB of letters) merges in bounded memory.
    ids = tok.encode_to_numpy("ab" * 2_500_000)
    assert tok.decode_bytes(ids) == b"ab" * 2_500_000
    # A million special-token look-alikes.
    s = "<|endoftext|" * 1_000_000
    assert tok.decode(tok.encode(s)) == s
    s = "<|endoftext|>" * 1_000_000
    assert tok.encode(s, allowed_special="all") == [tok.eot_token] * 1_000_000
    with pytest.raises(ValueError):
        tok.encode(s)


# ----------------------------------------------------------------------------- CLI
class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def test_cli_train_encode_decode(tmp_path, shakespeare, capsys, monkeypatch):
    import io

    from fastlm.cli import main

    train, _ = shakespeare
    corpus = tmp_path / "c.txt"
    corpus.write_text(train[:100_000])

    def run(*args, input=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(input or ""))
        capsys.readouterr()
        rc = main(["tokenizer", *args])
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)

    r = run("train", "--data", str(corpus), "--vocab-size", "500", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(tmp_path / "tok")
    r = run("encode", "--tokenizer", str(tmp_path / "tok"), "--text", "First Citizen: hi")
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert ids == tok.encode("First Citizen: hi")
    r = run("decode", "--tokenizer", str(tmp_path / "tok"), input=r.stdout)
    assert r.returncode == 0 and r.stdout == "First Citizen: hi"
    r = run("encode", "--tokenizer", str(tmp_path / "tok"), input="from stdin\n")
    assert [int(x) for x in r.stdout.split()] == tok.encode("from stdin\n")
    r = run("encode", "--tokenizer", str(tmp_path / "nope"), "--text", "x")
    assert r.returncode == 2 and "error" in r.stderr
    # The module entry point runs too.
    r = subprocess.run([sys.executable, "-m", "fastlm", "tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"),
                        *map(str, ids)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "First Citizen: hi", r.stderr
