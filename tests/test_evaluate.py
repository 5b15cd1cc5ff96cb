"""Sliding-window perplexity against transformers' own computation on the same weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import GPT, GPTConfig
from fastlm.evaluate import perplexity

transformers = pytest.importorskip("transformers")


def _hf_strided_nll(hf, ids, max_length, stride):
    """Hugging Face's documented strided loop, with each window's loss summed exactly."""
    n, nll, count, prev_end = ids.numel(), 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        x = ids[begin:end].unsqueeze(0)
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf(x).logits
        shift_logits, shift_labels = logits[:, :-1].double(), labels[:, 1:]
        nll += F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += int((shift_labels != -100).sum())
        prev_end = end
        if end == n:
            break
    return nll / count, count


@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 16), (32, 7), (20, 1)])
def test_perplexity_matches_transformers(tmp_path, max_length, stride):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=89, n_positions=32, n_embd=32,
                                                              n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path)
    m = GPT.from_pretrained(tmp_path)
    ids = torch.randint(0, 89, (157,))
    res = perplexity(m, ids, max_length=max_length, stride=stride)
    ref_nll, ref_count = _hf_strided_nll(hf, ids, max_length, stride)
    assert res["tokens"] == ref_count
    # Overlapping windows score every token but the first; disjoint ones lose each window's first.
    assert ref_count == (156 if stride < max_length else 156 - (res["windows"] - 1))
    assert abs(res["nll"] - ref_nll) / ref_nll < 1e-4
    assert abs(res["perplexity"] - math.exp(ref_nll)) / math.exp(ref_nll) < 1e-4


def test_perplexity_short_input_and_bad_arguments():
    m = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=8))
    r = perplexity(m, torch.tensor([1, 2, 3]))
    assert r["tokens"] == 2 and r["windows"] == 1
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(m, torch.tensor([1]))
    with pytest.raises(ValueError, match="max_length"):
        perplexity(m, torch.tensor([1, 2, 3]), max_length=17)
    with pytest.raises(ValueError, match="stride"):
        perplexity(m, torch.tensor([1, 2, 3]), stride=0)
    with pytest.raises(ValueError, match="token ids must lie"):
        perplexity(m, torch.tensor([1, 2, 30]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(m, "some text")
