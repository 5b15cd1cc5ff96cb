"""The quality of quantized weights on a model trained to a real loss: a small byte-level GPT
trained here for a few hundred steps on tiny Shakespeare (the Python standard library's own
source where that file is absent), then its perplexity on held-out text with each weight
format against float32's. The targets (issue #20): int8 within 1% of float32, int4 within 5%,
bf16 within 0.5%; fp16 is held to bf16's."""
import copy
import math
import pathlib

import pytest
import torch

from fastlm import GPT, GPTConfig

from conftest import SHARED_DATA

TARGETS = {"int8": 0.01, "int4": 0.05, "bf16": 0.005, "fp16": 0.005}
BLOCK = 64


def _text() -> bytes:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_bytes()
    root = pathlib.Path(pathlib.__file__).parent  # the stdlib's sources
    return b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))[:60])[:1_000_000]


def _perplexity(model, data):
    """exp(mean next-byte cross-entropy) over non-overlapping windows of ``data``."""
    n = (len(data) - 1) // BLOCK
    x = data[: n * BLOCK].view(n, BLOCK)
    y = data[1: n * BLOCK + 1].view(n, BLOCK)
    with torch.no_grad():
        losses = [model(x[i:i + 32], targets=y[i:i + 32])[1] * len(x[i:i + 32]) for i in range(0, n, 32)]
    return math.exp(float(sum(losses)) / n)


def _train(model, opt, train, g, steps):
    for step in range(steps):
        for group in opt.param_groups:  # linear warmup, then cosine decay to a tenth
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        i = torch.randint(0, len(train) - BLOCK - 1, (16,), generator=g)
        x = torch.stack([train[j:j + BLOCK] for j in i.tolist()])
        y = torch.stack([train[j + 1:j + BLOCK + 1] for j in i.tolist()])
        loss = model.loss(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained():
    data = torch.frombuffer(bytearray(_text()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:split + 64 * BLOCK + 1]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    steps = 300
    threads = torch.get_num_threads()
    # a few hundred small steps on one thread: a second core that other work keeps busy then
    # cannot stall every step at the threads' join
    torch.set_num_threads(1)
    try:
        _train(model, opt, train, g, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    # the perplexity of the training text's byte frequencies (add-one smoothed) on the held-out text
    counts = torch.bincount(train, minlength=256).double() + 1
    unigram = math.exp(-(counts / counts.sum())[held_out[1:]].log().mean().item())
    return model, held_out, _perplexity(model, held_out), unigram


def test_the_model_is_trained(trained):
    _, _, ppl, unigram = trained
    # well below what byte frequencies alone give (and 256, uniform): it has learned spelling
    assert ppl < 0.6 * unigram, (ppl, unigram)


@pytest.mark.parametrize("weights", list(TARGETS))
def test_perplexity_of_each_format_stays_near_float32(trained, weights):
    model, held_out, ppl, _ = trained
    q_ppl = _perplexity(copy.deepcopy(model).quantize(weights), held_out)
    change = q_ppl / ppl - 1
    assert abs(change) <= TARGETS[weights], f"{weights}: perplexity {q_ppl:.4f} vs float32 {ppl:.4f} ({change:+.3%})"
