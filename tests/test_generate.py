"""Generation: the KV-cache decode against a cache-free forward and transformers, sampling,
stop conditions, batching, streaming text, context overflow, scoring, argument checks."""
import base64
import gzip
import json
import math
import random
import warnings

import pytest
import torch

import fastlm
from fastlm import GPT, GPTConfig
from fastlm.generate import GenerateOutput, _options, _process_logits, _TextStream, generate, loglikelihood, score

GPT2_LIKE = dict(pos="learned")
MODERN = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)


def make_model(vocab=97, block=64, seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, n_embd=32, initializer_range=std, **kw)
    return GPT(cfg).eval()


def full_forward_greedy(model, prompt, n):
    """Reference: the whole sequence through the cache-free forward at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """A byte-level vocabulary heavy in fragments of multi-byte characters: the 256 bytes, then
    random slices of emoji/CJK/accented text that cut characters apart, then an end token."""

    def __init__(self, seed=0):
        rng = random.Random(seed)
        text = "你好世界，漢字かなカナ한국어😀🎉👍🏽🇫🇷 naïve café Ωμέγα ∑∫≈ ok".encode()
        pieces = {bytes([i]) for i in range(256)}
        while len(pieces) < 400:
            i = rng.randrange(len(text) - 1)
            pieces.add(text[i:i + rng.randint(2, 6)])
        self.vocab = sorted(pieces, key=lambda b: (len(b), b))
        self.eot_token = len(self.vocab)
        self.n_vocab = len(self.vocab) + 1
        self._index = {b: i for i, b in enumerate(self.vocab)}

    def encode(self, text):
        data, ids, i = text.encode(), [], 0
        while i < len(data):
            for n in range(6, 0, -1):
                if data[i:i + n] in self._index:
                    ids.append(self._index[data[i:i + n]])
                    i += n
                    break
        return ids

    def token_bytes(self, i):
        return b"<|eot|>" if i == self.eot_token else self.vocab[i]

    def decode_bytes(self, ids):
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


_R50K = {}


@pytest.fixture
def r50k(shared_data):
    """GPT-2's real vocabulary as a tiktoken Encoding (byte-level BPE: emoji and CJK characters
    split across tokens)."""
    tiktoken = pytest.importorskip("tiktoken")
    path = shared_data / "r50k_base.tiktoken.gz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    if "enc" in _R50K:
        return _R50K["enc"]
    ranks = {}
    for line in gzip.decompress(path.read_bytes()).splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    _R50K["enc"] = tiktoken.Encoding("r50k_test", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
    return _R50K["enc"]


# ----------------------------------------------------------------------------- greedy correctness
@pytest.mark.parametrize("arch", [GPT2_LIKE, MODERN], ids=["gpt2", "modern"])
def test_greedy_matches_full_forward_every_step(arch):
    model = make_model(**arch)
    prompt = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=30)
    assert out[0].tolist() == full_forward_greedy(model, prompt, 30)


@pytest.mark.parametrize("arch", [GPT2_LIKE, MODERN], ids=["gpt2", "modern"])
def test_logprobs_match_full_forward(arch):
    model = make_model(**arch)
    prompt = [3, 14, 15, 92, 65]
    res = generate(model, prompt, max_new_tokens=12, logprobs=True, top_logprobs=3, return_dict_in_generate=True)
    seq = res.sequences
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq]))[0].double(), dim=-1)
    for i, t in enumerate(res.tokens[0]):
        row = lp[len(prompt) - 1 + i]
        assert res.logprobs[0][i] == pytest.approx(row[t].item(), abs=1e-4)
        top = res.top_logprobs[0][i]
        assert [a for a, _ in top] == row.topk(3).indices.tolist()
        assert top[0][0] == t  # greedy: the chosen token is the most likely one
        assert all(x >= y for (_, x), (_, y) in zip(top, top[1:]))


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_identical_to_transformers(tmp_path, penalty):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64, initializer_range=0.1)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                          repetition_penalty=penalty, pad_token_id=0)
    out = model.generate(x, max_new_tokens=64, repetition_penalty=penalty)
    assert out.tolist() == ref.tolist()


def test_batched_equals_one_by_one_and_eos_per_row():
    model = make_model(**MODERN)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42], [7, 7]]
    singles = [model.generate(p, max_new_tokens=15) for p in prompts]
    assert model.generate(prompts, max_new_tokens=15) == singles
    # EOS: the token row 1 produces at its 4th step ends that row alone
    eos = singles[1][len(prompts[1]) + 3]
    res = generate(model, prompts, max_new_tokens=15, eos_token_id=eos, return_dict_in_generate=True)
    for p, single, toks, reason in zip(prompts, singles, res.tokens, res.finish_reasons):
        new = single[len(p):]
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert toks == new[:cut]
        assert reason == ("stop" if eos in new else "length")
    assert res.finish_reasons[1] == "stop" and len(res.tokens[1]) <= 4


def test_padded_tensor_input_with_attention_mask():
    model = make_model()
    prompts = [[9, 8, 7, 6], [1, 2]]
    ids = torch.tensor([[9, 8, 7, 6], [0, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    ref = [model.generate(p, max_new_tokens=6) for p in prompts]
    assert out.shape == (2, 10)
    assert out[0].tolist() == ref[0] and out[1, 4:].tolist() == ref[1][2:]


# ----------------------------------------------------------------------------- sampling
def test_sampling_reproducible_with_seed():
    model = make_model()
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5)
    a = model.generate([1, 2, 3], seed=7, **kw)
    assert a == model.generate([1, 2, 3], seed=7, **kw)
    assert a != model.generate([1, 2, 3], seed=8, **kw)
    torch.manual_seed(3)  # without a seed: the global generator, like transformers
    b = model.generate([1, 2, 3], **kw)
    torch.manual_seed(3)
    assert b == model.generate([1, 2, 3], **kw)


def test_temperature_zero_is_greedy():
    model = make_model()
    greedy = model.generate([4, 5, 6], max_new_tokens=15)
    assert model.generate([4, 5, 6], max_new_tokens=15, do_sample=True, temperature=0.0, seed=1) == greedy


def _first_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0, -1].double()


def test_top_k_never_outside_k_and_distribution():
    model = make_model(std=0.15)
    prompt = [10, 20, 30]
    logits = _first_logits(model, prompt)
    n = 4000
    res = generate(model, [prompt] * n, max_new_tokens=1, do_sample=True, top_k=5, temperature=0.7, seed=0,
                   return_dict_in_generate=True)
    got = torch.tensor([t[0] for t in res.tokens])
    top = logits.topk(5)
    assert set(got.tolist()) <= set(top.indices.tolist())
    want = torch.softmax(top.values / 0.7, dim=0)
    freq = torch.tensor([(got == i).sum().item() / n for i in top.indices.tolist()], dtype=torch.float64)
    assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n) + 1e-3


def test_top_p_keeps_the_nucleus():
    model = make_model(std=0.15)
    prompt = [3, 1, 4]
    logits = _first_logits(model, prompt)
    p = 0.6
    probs = torch.softmax(logits, dim=0)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    k = int((cum < p).sum()) + 1  # the smallest set whose mass reaches p
    nucleus = order[:k]
    n = 4000
    res = generate(model, [prompt] * n, max_new_tokens=1, do_sample=True, top_p=p, seed=1,
                   return_dict_in_generate=True)
    got = torch.tensor([t[0] for t in res.tokens])
    assert set(got.tolist()) <= set(nucleus.tolist())
    want = probs[nucleus] / probs[nucleus].sum()
    freq = torch.tensor([(got == i).sum().item() / n for i in nucleus.tolist()], dtype=torch.float64)
    assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n) + 1e-3


def test_processors_unit():
    model = make_model()
    opts = _options(model, [3], 5, None, True, 1.0, None, 0.5, 1.0, None, None, None, False, 0, "stop")
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_process_logits(logits, None, opts))[0].tolist()
    assert kept == [True, False, False, False]  # 0.5 alone reaches p = 0.5
    opts.top_p = 0.55
    assert torch.isfinite(_process_logits(logits, None, opts))[0].tolist() == [True, True, False, False]


# ----------------------------------------------------------------------------- stop conditions
def test_stop_strings_and_token_sequences():
    tok = ByteTokenizer()
    model = make_model(vocab=tok.n_vocab, std=0.5)
    prompt = tok.encode("hello ")
    free = generate(model, prompt, max_new_tokens=40, tokenizer=tok, eos_token_id=[], return_dict_in_generate=True)
    text = free.texts[0]
    assert text == tok.decode(free.tokens[0])
    stop = text[10:13]
    first = text.find(stop)
    res = generate(model, prompt, max_new_tokens=40, tokenizer=tok, eos_token_id=[], stop=[stop, "\x00never\x00"],
                   return_dict_in_generate=True)
    assert res.finish_reasons == ["stop"]
    assert res.texts[0] == text[:first]
    assert tok.decode(res.tokens[0]).find(stop) >= 0  # the token completing the stop string is kept
    assert free.tokens[0][:len(res.tokens[0])] == res.tokens[0]
    # a sequence of token ids works without a tokenizer
    seq = free.tokens[0][5:7]
    res = generate(model, prompt, max_new_tokens=40, eos_token_id=[], stop=[seq], return_dict_in_generate=True)
    assert res.tokens[0][-2:] == seq and res.finish_reasons == ["stop"]


def test_max_new_tokens_zero_and_length_reason():
    model = make_model()
    res = generate(model, [1, 2], max_new_tokens=0, return_dict_in_generate=True)
    assert res.sequences == [1, 2] and res.finish_reasons == ["length"]
    res = generate(model, [1, 2], max_new_tokens=5, return_dict_in_generate=True)
    assert len(res.tokens[0]) == 5 and res.finish_reasons == ["length"]


# ----------------------------------------------------------------------------- context overflow
def test_context_overflow_stops_with_length():
    model = make_model(block=16)
    with pytest.warns(UserWarning, match="context"):
        res = generate(model, list(range(10)), max_new_tokens=20, return_dict_in_generate=True)
    assert len(res.sequences) == 16 and res.finish_reasons == ["length"]
    assert res.sequences == full_forward_greedy(model, list(range(10)), 6)
    with pytest.raises(ValueError, match="context"):
        generate(model, list(range(20)), max_new_tokens=2)


@pytest.mark.parametrize("arch", [GPT2_LIKE, MODERN], ids=["gpt2", "modern"])
def test_context_overflow_slides(arch):
    model = make_model(block=16, **arch)
    keep = 8
    prompts = [list(range(10)), list(range(20, 40))]  # the second is longer than the context
    res = generate(model, prompts, max_new_tokens=30, context_overflow="slide", return_dict_in_generate=True)
    for p, toks in zip(prompts, res.tokens):
        assert len(toks) == 30
        ctx = p[-keep:] if len(p) > 16 else list(p)
        ref = []
        with torch.no_grad():
            for _ in range(30):
                t = int(model(torch.tensor([ctx]))[0, -1].argmax())
                ref.append(t)
                ctx.append(t)
                if len(ctx) > 16:
                    ctx = ctx[-keep:]
        assert toks == ref


# ----------------------------------------------------------------------------- streaming
def test_text_stream_never_emits_half_characters(r50k):
    text = "Emoji 😀🎉👍🏽🇫🇷 and CJK 你好世界，漢字 and more: naïve ∑ 🧑‍🚀!"
    ids = r50k.encode(text)
    assert len(ids) > len(text.encode()) // 3  # characters really are split across tokens
    ts = _TextStream(r50k.decode_single_token_bytes)
    deltas = [ts.push(i) for i in ids] + [ts.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_back_possible_stop():
    tok = ByteTokenizer()
    ts = _TextStream(tok.token_bytes, stop=["END", "😀!"])
    out = []
    for piece in "abcEN".encode():
        out.append(ts.push(tok._index[bytes([piece])]))
    assert "".join(out) == "abc"  # "EN" may begin "END": held back
    assert ts.push(tok._index[b"X"]) == "ENX"  # decided: not a stop string
    for b in "😀".encode():
        assert ts.push(tok._index[bytes([b])]) == ""
    assert ts.push(tok._index[b"!"]) == "" and ts.stopped
    assert ts.text == "abcENX"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_concatenation_equals_text_byte_heavy(seed):
    tok = ByteTokenizer(seed)
    model = make_model(vocab=tok.n_vocab, block=128, std=0.6, seed=seed)
    kw = dict(max_new_tokens=60, do_sample=True, seed=seed, eos_token_id=[])
    deltas = list(fastlm.stream(model, tok, "你好 😀", **kw))
    res = generate(model, tok.encode("你好 😀"), tokenizer=tok, return_dict_in_generate=True, **kw)
    assert "".join(deltas) == res.texts[0] == tok.decode(res.tokens[0])
    # with a stop string taken from the text, the stream ends right before it
    text = res.texts[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    deltas = list(fastlm.stream(model, tok, "你好 😀", stop=stop, **kw))
    assert "".join(deltas) == text[:text.find(stop)]
    assert not torch.is_inference_mode_enabled()


def test_stream_real_vocabulary_and_batch(r50k):
    model = make_model(vocab=50257, std=0.5)
    prompts = ["Hello 你好", "🎉 party", "x"]
    kw = dict(max_new_tokens=25, do_sample=True, seed=3, top_k=50)
    steps = list(fastlm.stream(model, r50k, prompts, **kw))
    joined = ["".join(s[i] for s in steps) for i in range(3)]
    ids = [r50k.encode(p) for p in prompts]
    res = generate(model, ids, tokenizer=r50k, return_dict_in_generate=True, eos_token_id=50256, **kw)
    assert joined == res.texts
    for toks, text in zip(res.tokens, res.texts):
        toks = [t for t in toks if t != 50256]
        assert text == r50k.decode_bytes(toks).decode("utf-8", errors="replace")


def test_streamer_protocol():
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, ids):
            self.puts.append(ids.tolist())

        def end(self):
            self.ended = True

    model = make_model()
    s = Collect()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, streamer=s)
    assert s.ended and s.puts[0] == [[1, 2, 3]]
    assert [p[0] for p in s.puts[1:]] == out[0, 3:].tolist()


# ----------------------------------------------------------------------------- scoring
def test_score_and_loglikelihood():
    model = make_model(block=16)
    tok = ByteTokenizer()
    model = make_model(vocab=tok.n_vocab, block=16)
    ctx, cont = tok.encode("ab"), tok.encode("cdé")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].double(), -1)
    want = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    got, greedy = loglikelihood(model, "ab", "cdé", tokenizer=tok)
    assert got == pytest.approx(want, abs=1e-4)
    assert greedy == all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
    g = model.generate(ctx, max_new_tokens=3)[len(ctx):]
    assert loglikelihood(model, ctx, g)[1] is True
    # score: every token, the first after the end-of-text token; long texts in windows
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    s = score(model, ids, tokenizer=tok)
    assert len(s.logprobs) == 40 and s.token_ids == ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([[tok.eot_token] + ids[:15]]))[0].double(), -1)
    assert s.logprobs[:16] == pytest.approx([lp[i, t].item() for i, t in enumerate(ids[:16])], abs=1e-4)
    assert s.total == pytest.approx(sum(s.logprobs)) and s.perplexity > 1


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw, err, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(eos_token_id=10_000), ValueError, "eos_token_id"),
    (dict(stop="x"), ValueError, "tokenizer"),
    (dict(context_overflow="wrap"), ValueError, "context_overflow"),
])
def test_bad_arguments(kw, err, match):
    model = make_model()
    with pytest.raises(err, match=match):
        model.generate([1, 2, 3], **{"max_new_tokens": 3, **kw})


@pytest.mark.parametrize("ids", [[], [[1, 2], []], torch.zeros(1, 0, dtype=torch.long), [1, 500], [[1.5]]])
def test_bad_prompts(ids):
    model = make_model()
    with pytest.raises((ValueError, TypeError)):
        model.generate(ids, max_new_tokens=2)


def test_empty_text_prompt():
    model = make_model(vocab=ByteTokenizer().n_vocab)
    with pytest.raises(ValueError, match="empty"):
        list(fastlm.stream(model, ByteTokenizer(), "", max_new_tokens=2))


def test_weights_change_is_seen():
    model = make_model()
    a = model.generate([1, 2, 3], max_new_tokens=10)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert model.generate([1, 2, 3], max_new_tokens=10) == full_forward_greedy(model, [1, 2, 3], 10)
    assert isinstance(a, list)


# ----------------------------------------------------------------------------- hostile options, odd checkpoints
def test_tiny_temperature_is_greedy_and_nan_rows_take_the_argmax():
    model = make_model()
    greedy = model.generate([4, 5, 6], max_new_tokens=15)
    for t in (1e-300, 9e-6):  # dividing by these overflows: below GREEDY_TEMPERATURE decoding is greedy
        assert model.generate([4, 5, 6], max_new_tokens=15, do_sample=True, temperature=t, seed=1) == greedy
    # a penalty that sends seen logits to +inf: such a row takes its raw argmax instead of failing
    out = generate(model, [[4, 5, 6], [7, 8]], max_new_tokens=15, do_sample=True, repetition_penalty=1e-300, seed=2,
                   return_dict_in_generate=True)
    assert all(len(t) == 15 and all(0 <= i < 97 for i in t) for t in out.tokens)


def test_argmax_skips_nans():
    from fastlm.generate import _argmax

    x = torch.tensor([[0.0, float("nan"), 3.0, 1.0], [float("nan")] * 4, [5.0, 1.0, 2.0, 5.0]])
    assert _argmax(x).tolist() == [2, 0, 0]
    assert _argmax(x.double()).tolist() == [2, 0, 0]


def test_min_p():
    model = make_model(std=0.15)
    greedy = model.generate([3, 1, 4], max_new_tokens=12)
    for seed in (0, 1):  # min_p = 1 keeps the most likely id alone
        assert model.generate([3, 1, 4], max_new_tokens=12, do_sample=True, temperature=1.5, min_p=1.0,
                              seed=seed) == greedy
    opts = _options(model, [3], 5, None, True, 1.0, None, None, 1.0, None, None, None, False, 0, "stop", min_p=0.3)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.14, 0.06]]))
    assert torch.isfinite(_process_logits(logits, None, opts))[0].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="min_p"):
        model.generate([1], max_new_tokens=1, do_sample=True, min_p=1.5)


def test_penalties_and_bias_processors():
    model = make_model()
    opts = _options(model, [3], 5, None, False, 1.0, None, None, 1.0, None, None, None, False, 0, "stop",
                    presence_penalty=0.5, frequency_penalty=0.25, logit_bias={2: 3.0})
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 4.0, 0.0]])
    bias = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    got = _process_logits(logits, None, opts, counts, bias)
    assert got.tolist() == [[0.0, -0.75, 3.0 - 1.5, 0.0]]


def test_undecodable_ids_are_never_chosen():
    tok = ByteTokenizer()
    model = make_model(vocab=tok.n_vocab + 20, std=0.5)
    with torch.no_grad():
        model.transformer.wte.weight[tok.n_vocab:] *= 20  # the padded ids outweigh every real one
    prompt = tok.encode("hello")
    assert max(model.generate(prompt, max_new_tokens=10)) >= tok.n_vocab  # without a tokenizer they are chosen
    for kw in (dict(), dict(do_sample=True, seed=0)):
        res = generate(model, prompt, max_new_tokens=10, tokenizer=tok, logprobs=True, top_logprobs=5,
                       return_dict_in_generate=True, **kw)
        assert max(res.tokens[0]) < tok.n_vocab
        assert all(a < tok.n_vocab for step in res.top_logprobs[0] for a, _ in step)
    assert "".join(fastlm.stream(model, tok, "hello", max_new_tokens=10)) == generate(
        model, prompt, max_new_tokens=10, tokenizer=tok, return_dict_in_generate=True).texts[0]


def test_sampling_options_without_do_sample_warn():
    model = make_model()
    greedy = model.generate([1, 2, 3], max_new_tokens=8)
    with pytest.warns(UserWarning, match=r"do_sample is False, so temperature=0\.7, top_k=5 are not used"):
        assert model.generate([1, 2, 3], max_new_tokens=8, temperature=0.7, top_k=5) == greedy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate([1, 2, 3], max_new_tokens=8, temperature=0)  # asks for greedy decoding
        model.generate([1, 2, 3], max_new_tokens=8, top_p=1.0, top_k=0)  # the neutral values
        model.generate([1, 2, 3], max_new_tokens=8, do_sample=True, temperature=0.7, seed=0)
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="top_p=0.5 is not used"):
        list(fastlm.stream(make_model(vocab=tok.n_vocab), tok, "hi", max_new_tokens=3, top_p=0.5))


def test_checkpoint_whose_eos_lies_outside_its_vocabulary(tmp_path):
    """transformers' GPT2Config defaults eos_token_id to 50256 whatever the vocabulary: the id is
    dropped with a warning when the checkpoint loads, and generation works."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    assert cfg.eos_token_id == 50256
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="eos_token_id=50256 lies outside the vocabulary of 400"):
        model = GPT.from_pretrained(tmp_path)
    assert model.config.eos_token_id is None and model.config.bos_token_id is None
    assert len(model.generate([1, 2, 3], max_new_tokens=5)) == 8
    tok = ByteTokenizer()  # its end-of-text id, 400, is outside the model's 400 ids too
    assert tok.eot_token == 400
    assert len(list(fastlm.stream(model, tok, "hi", max_new_tokens=5))) >= 1
    with pytest.raises(ValueError, match="eos_token_id"):  # asked for explicitly, it is still an error
        model.generate([1, 2, 3], max_new_tokens=5, eos_token_id=50256)
    # the pipeline reads generation_config.json's copy of the id the same way
    assert "eos_token_id" in json.loads((tmp_path / "generation_config.json").read_text())
    with pytest.warns(UserWarning, match="generation_config.json: eos_token_id=50256"):
        pipe = fastlm.pipeline("text-generation", model=str(tmp_path), tokenizer=tok)
    assert pipe("hi", max_new_tokens=4)[0]["generated_text"].startswith("hi")
