"""Training speed: fastlm's Trainer step against the same model and recipe on plain PyTorch.

fastlm: ``Trainer.train_step`` (the fastest fastlm.ops backends, the output layer fused
with the loss, ``AdamW(fused=True)``, gradients set to None).
Competitor ("plain PyTorch", what a nanoGPT user runs): the same GPT on the reference
backend (``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.cross_entropy`` on full
logits) with the default ``torch.optim.AdamW``; the same clipping, the same batches.

Shapes:
  (a) nanoGPT's CPU recipe on character-level tiny Shakespeare: 4 layers, 4 heads, 128 wide,
      block 64, batch 12 (bytes: vocabulary 257). Per-op overhead dominates.
  (b) 4 layers, 4 heads, 256 wide, vocabulary 8192, batch 4 x 256 (~34 GFLOP a step):
      the matmuls dominate.

Throughput: ``pytest bench/test_train.py --benchmark-only -k throughput``; the ratio is
median(plain) / median(fastlm) in each group. Time to quality (recipe (a), 2000 steps,
lr 1e-3 cosine to 2000, dropout 0, target val loss <= 1.88):
``pytest bench/test_train.py -k quality -s`` (several minutes per path).
Threads: FASTLM_BENCH_THREADS (default 2); fp32.
"""
import contextlib
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlm import GPT, GPTConfig, ops
from fastlm.train import TrainConfig, lr_at

THREADS = int(os.environ.get("FASTLM_BENCH_THREADS", "2"))
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
if not SHAKESPEARE.is_file():
    SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")

SHAPES = {
    "a_shakespeare_char": dict(model=dict(vocab_size=257, block_size=64, n_layer=4, n_head=4, n_embd=128), batch=12),
    "b_vocab8192": dict(model=dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256), batch=4),
}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


class Step:
    """One optimisation step of either path over a fixed rotation of random batches."""

    def __init__(self, shape: str, path: str, seed: int = 0):
        spec = SHAPES[shape]
        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(dropout=0.0, **spec["model"]))
        self.path = path
        cfg = TrainConfig()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=1e-3, betas=(cfg.beta1, cfg.beta2))
        self.opt = torch.optim.AdamW(groups, fused=True, **kw) if path == "fastlm" else torch.optim.AdamW(groups, **kw)
        g = torch.Generator().manual_seed(seed + 1)
        B, T, V = spec["batch"], spec["model"]["block_size"], spec["model"]["vocab_size"]
        self.batches = [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g))
                        for _ in range(4)]
        self.i = 0
        self.tokens = B * T

    def ctx(self):
        return ops.use_backend("reference") if self.path == "plain" else contextlib.nullcontext()

    def __call__(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.ctx():
            if self.path == "fastlm":
                loss = self.model.loss(x, y)
            else:
                logits = self.model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


@pytest.mark.parametrize("path", ["plain", "fastlm"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_throughput(benchmark, shape, path):
    step = Step(shape, path)
    benchmark.group = f"train-step {shape} threads={THREADS}"
    benchmark.extra_info["tokens_per_step"] = step.tokens
    rounds = 30 if shape.startswith("a") else 8
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=3, iterations=1)
    loss = step().item()
    assert math.isfinite(loss)


# ----------------------------------------------------------------------------- time to quality
def _shakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    data = np.frombuffer(SHAKESPEARE.read_bytes(), dtype=np.uint8).astype(np.int64)
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def _run_recipe(path: str, train, val, iters=2000, eval_interval=250, eval_iters=200, seed=1337):
    step = Step("a_shakespeare_char", path, seed=seed)
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=iters, lr_decay_iters=iters)
    rng = np.random.default_rng(seed)
    B, T = 12, 64

    def batch(data, r):
        ix = r.integers(0, len(data) - T - 1, size=B)
        rows = torch.from_numpy(data[ix[:, None] + np.arange(T + 1)])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def evaluate():
        r = np.random.default_rng(0)
        step.model.eval()
        with torch.no_grad(), step.ctx():
            losses = []
            for _ in range(eval_iters):
                x, y = batch(val, r)
                losses.append((step.model.loss(x, y) if path == "fastlm" else
                               F.cross_entropy(step.model(x).view(-1, 257), y.view(-1))).item())
        step.model.train()
        return sum(losses) / len(losses)

    t_train, curve, reached = 0.0, [], None
    for it in range(iters):
        for g in step.opt.param_groups:
            g["lr"] = lr_at(it, cfg)
        step.batches = [batch(train, rng)]
        step.i = 0
        t0 = time.perf_counter()
        step()
        t_train += time.perf_counter() - t0
        if (it + 1) % eval_interval == 0:
            v = evaluate()
            curve.append((it + 1, round(v, 4), round(t_train, 1)))
            if reached is None and v <= 1.88:
                reached = t_train
    return curve, reached, t_train


def test_time_to_quality(benchmark):
    train, val = _shakespeare()
    results = {}
    for path in ("plain", "fastlm"):
        curve, reached, total = _run_recipe(path, train, val)
        results[path] = (curve, reached, total)
        print(f"\n{path}: val loss curve (step, val_loss, train seconds) {curve}; "
              f"reached 1.88 after {reached} s; total {total:.1f} s")
    benchmark.group = f"time-to-quality threads={THREADS}"
    benchmark.extra_info.update({p: {"curve": r[0], "seconds_to_1.88": r[1], "total_seconds": r[2]}
                                 for p, r in results.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert results["fastlm"][0][-1][1] <= 1.88, "fastlm did not reach val loss 1.88"
    if results["plain"][1] and results["fastlm"][1]:
        print(f"time ratio fastlm / plain: {results['fastlm'][1] / results['plain'][1]:.2f}")
