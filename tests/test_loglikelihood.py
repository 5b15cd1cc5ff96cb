"""Batched log-likelihood of (context, continuation) requests and rolling log-likelihood of
texts, against one request at a time and against transformers' GPT-2 on the same weights."""
import pytest
import torch
import torch.nn.functional as F

from fastlm import GPT
from fastlm.evaluate import loglikelihood, loglikelihood_rolling, rolling_windows
from fastlm.generate import loglikelihood as loglikelihood_one

transformers = pytest.importorskip("transformers")

VOCAB, CTX, START = 89, 32, 88


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=32,
                                                              n_layer=2, n_head=4, bos_token_id=START,
                                                              eos_token_id=START)).eval()
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return hf, GPT.from_pretrained(path)


def _hf_logprobs(hf, seq):
    """log p(seq[i] | seq[:i]) for i >= 1, one forward pass of transformers' model over seq[:-1]."""
    with torch.no_grad():
        logits = hf(torch.tensor([seq[:-1]])).logits[0].double()
    lp = F.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1), lp.argmax(-1) == torch.tensor(seq[1:])


def _requests(seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for ctx_len, cont_len in [(0, 3), (5, 1), (12, 4), (1, 1), (40, 6), (20, 12), (3, 7), (31, 1), (8, 32)]:
        out.append((torch.randint(0, VOCAB - 1, (ctx_len,), generator=g).tolist(),
                    torch.randint(0, VOCAB - 1, (cont_len,), generator=g).tolist()))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_loglikelihood_matches_one_at_a_time_and_transformers(models, batch_size):
    hf, m = models
    reqs = _requests()
    got = loglikelihood(m, reqs, batch_size=batch_size)
    assert len(got) == len(reqs)
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        one_lp, one_greedy = loglikelihood_one(m, ctx, cont)
        assert abs(lp - one_lp) <= 1e-4 * abs(one_lp) + 1e-5 and greedy == one_greedy
        # transformers on the same weights: the input cut from the left to the context, as lm-eval does
        seq = ((ctx or [START]) + cont)[-(CTX + 1):]
        ref, ref_greedy = _hf_logprobs(hf, seq)
        ref_lp = ref[-len(cont):].sum().item()
        assert abs(lp - ref_lp) <= 1e-4 * abs(ref_lp) + 1e-5, (len(ctx), len(cont), lp, ref_lp)
        assert greedy == bool(ref_greedy[-len(cont):].all())


def test_greedy_continuation_is_reported_greedy(models):
    _, m = models
    ctx = [3, 14, 15, 9, 26]
    cont = []
    for _ in range(4):  # the model's own argmax continuation
        with torch.no_grad():
            cont.append(int(m(torch.tensor([ctx + cont]))[0, -1].argmax()))
    (lp, greedy), (_, not_greedy) = loglikelihood(m, [(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % VOCAB])])
    assert greedy and not not_greedy and lp < 0


def test_rolling_windows_score_every_token_once():
    for n in (1, 5, 31, 32, 33, 100):
        for max_length, stride in [(32, None), (32, 8), (7, 1), (1, None)]:
            ws = rolling_windows(n, max_length, stride)
            scored = [p for _, first, end in ws for p in range(first, end)]
            assert scored == list(range(1, n + 1))
            for begin, first, end in ws:
                assert 0 <= begin < first < end and end - 1 - begin <= max_length
                if begin:  # a window has the full max_length of input whenever the text allows
                    assert end - 1 - begin == max_length
    # lm-eval's scheme: max_length predictions a window; the last window reaches back for full context
    assert rolling_windows(70, 32) == [(0, 1, 33), (32, 33, 65), (38, 65, 71)]
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(10, 8, 9)


@pytest.mark.parametrize("stride", [None, 8, 1])
def test_rolling_loglikelihood_matches_straightforward_windows(models, stride):
    hf, m = models
    g = torch.Generator().manual_seed(2)
    texts = [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in (1, 20, 32, 33, 75)]
    got = loglikelihood_rolling(m, texts, batch_size=4, stride=stride)
    for ids, total in zip(texts, got):
        seq = [START] + ids
        ref, step = 0.0, stride or CTX
        for first in range(1, len(seq), step):  # each token once, with up to CTX tokens before it
            end = min(first + step, len(seq))
            begin = max(0, end - 1 - CTX)
            ref += _hf_logprobs(hf, seq[begin:end])[0][first - begin - 1:].sum().item()
        assert abs(total - ref) <= 1e-4 * abs(ref), (len(ids), total, ref)
    # short texts are one window: the plain log-probability of the text after the start token
    assert abs(got[1] - _hf_logprobs(hf, [START] + texts[1])[0].sum().item()) < 1e-3


def test_text_requests_and_errors(models, tmp_path):
    _, m = models

    class ByteTok:  # a byte-level tokenizer: one id per byte (below the vocabulary here)
        eot_token = START

        def encode(self, s):
            return [b % 80 for b in s.encode()]

    tok = ByteTok()
    (a, _), = loglikelihood(m, [("ab", "cd")], tokenizer=tok)
    (b, _), = loglikelihood(m, [(tok.encode("ab"), tok.encode("cd"))])
    assert a == b
    assert loglikelihood_rolling(m, ["abcd"], tokenizer=tok) == loglikelihood_rolling(m, [tok.encode("abcd")])
    with pytest.raises(ValueError, match="continuation is empty"):
        loglikelihood(m, [([1, 2], [])])
    with pytest.raises(ValueError, match="exceeds max_length"):
        loglikelihood(m, [([1], [2] * 9)], max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        loglikelihood(m, [([1], [2])], max_length=CTX + 1)
    with pytest.raises(ValueError, match="need a tokenizer"):
        loglikelihood(m, [("ab", "cd")])
