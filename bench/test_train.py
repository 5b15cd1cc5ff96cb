"""Training speed: fastlm's Trainer step against the same model and recipe on plain PyTorch.

fastlm: ``Trainer.train_step`` (the fastest fastlm.ops backends, the output layer fused
with the loss, ``AdamW(fused=True)``, gradients set to None).
Competitor ("plain PyTorch", what a nanoGPT user runs): the same GPT on the reference
backend (``F.scaled_dot_product_attention``, ``F.layer_norm``, ``F.cross_entropy`` on full
logits) with the default ``torch.optim.AdamW``; the same clipping, the same batches.

Shapes:
  (a) nanoGPT's CPU recipe on character-level tiny Shakespeare: 4 layers, 4 heads, 128 wide,
      block 64, batch 12, no biases (nanoGPT's default; bytes: vocabulary 257). Per-op overhead
      dominates.
  (b) 4 layers, 4 heads, 256 wide, vocabulary 8192, batch 4 x 256 (~34 GFLOP a step):
      the matmuls dominate.
  (c) shape (a)'s model on one token a step (batch 1, block 1): next to no arithmetic, so
      the time is the step's fixed cost (Python, dispatch, autograd, the optimizer), which
      shape (a)'s step pays on top of its arithmetic.

Throughput: ``pytest bench/test_train.py --benchmark-only -k throughput``; the ratio is
median(plain) / median(fastlm) in each group. Each group also times "matmul floor": the
step's fp32 matrix products alone (torch.mm, MKL, warm operands), a lower bound on any step
of that shape; median(plain) / median(floor) is the most any implementation could reach.
Time to quality (recipe (a), 2000 steps, lr 1e-3 cosine to 2000, dropout 0, target val
loss <= 1.88):
``pytest bench/test_train.py -k quality -s`` (several minutes per path).
Muon's orthogonalisation in float32, the Gram form against the plain steps:
``pytest bench/test_train.py --benchmark-only -k orthogonalize``.
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
    "a_shakespeare_char": dict(model=dict(vocab_size=257, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False),
                               batch=12),
    "b_vocab8192": dict(model=dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256), batch=4),
    # shape a's model on one token a step: next to no arithmetic, so its time is the step's fixed
    # cost (Python, dispatch, autograd, the optimizer's and the clipping's calls)
    "c_one_token": dict(model=dict(vocab_size=257, block_size=1, n_layer=4, n_head=4, n_embd=128, bias=False),
                        batch=1),
}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


def _random_token_folder(path: Path, vocab: int, n_tokens: int = 400_000, seed: int = 0) -> Path:
    """A prepared-data folder of random tokens (what the data are does not change a step's time)."""
    from fastlm.checkpoint import atomic_write_json

    path.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    np.random.default_rng(seed).integers(0, vocab, n_tokens).astype(dtype).tofile(path / "train.bin")
    atomic_write_json(path / "meta.json", {"format": "fastlm-tokens", "version": 1, "dtype": np.dtype(dtype).name,
                                           "vocab_size": vocab, "eot_token": vocab - 1, "tokenizer": "tokenizer",
                                           "counts": {"train": {"tokens": n_tokens, "bytes": n_tokens}}})
    return path


class Step:
    """One optimisation step of either path. fastlm: ``Trainer.train_step`` itself (its batch
    drawing from the memory map included). plain: nanoGPT's loop on the reference backend,
    batches from the same memory map."""

    def __init__(self, shape: str, path: str, data_root: Path, seed: int = 0):
        from fastlm import Trainer
        from fastlm.data import TokenData

        spec = SHAPES[shape]
        torch.manual_seed(seed)
        self.model = GPT(GPTConfig(dropout=0.0, **spec["model"]))
        self.path = path
        B, T, V = spec["batch"], spec["model"]["block_size"], spec["model"]["vocab_size"]
        folder = data_root / f"{shape}"
        self.data = TokenData(folder if (folder / "meta.json").is_file() else _random_token_folder(folder, V))
        self.cfg = TrainConfig(out_dir=str(data_root / "run"), batch_size=B, block_size=T, grad_clip=1.0,
                               progress=False, plot=False, device="cpu", seed=seed, lr=1e-3)
        self.rng = np.random.default_rng(seed)
        self.tokens = B * T
        if path == "fastlm":
            self.trainer = Trainer(self.model, self.cfg, self.data)
            self.opt = self.trainer.optimizer
        else:
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.model.parameters() if p.dim() < 2]
            groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
            self.opt = torch.optim.AdamW(groups, lr=1e-3, betas=(self.cfg.beta1, self.cfg.beta2))

    def ctx(self):
        return ops.use_backend("reference") if self.path == "plain" else contextlib.nullcontext()

    def batch(self):
        return self.data.batch("train", self.cfg.batch_size, self.cfg.block_size, self.rng)

    def __call__(self, lr: float = 1e-3):
        if self.path == "fastlm":
            return self.trainer.train_step(lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.batch()
        with self.ctx():
            logits = self.model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


@pytest.mark.parametrize("path", ["plain", "fastlm"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_throughput(benchmark, shape, path, tmp_path_factory):
    step = Step(shape, path, tmp_path_factory.mktemp("data"))
    benchmark.group = f"train-step {shape} threads={THREADS}"
    benchmark.extra_info["tokens_per_step"] = step.tokens
    rounds = 8 if shape.startswith("b") else 30
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=3, iterations=1)
    loss = step().item()
    assert math.isfinite(loss)


class MatmulFloor:
    """The fp32 matrix products of one training step of a shape, alone: for each linear layer
    (i -> o) over N = batch x block tokens, the forward N x i x o, the input gradient
    N x o x i and the weight gradient o x N x i; the output layer likewise (attention's own
    products not counted). torch.mm (MKL) into preallocated outputs, operands warm: a lower
    bound on any step of that shape, whatever else it fuses."""

    def __init__(self, shape: str):
        spec = SHAPES[shape]
        m = spec["model"]
        N, C, V = spec["batch"] * m["block_size"], m["n_embd"], m["vocab_size"]
        dims = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * m["n_layer"] + [(C, V)]
        shapes = [s for i, o in dims for s in ((N, i, o), (N, o, i), (o, N, i))]
        g = torch.Generator().manual_seed(0)
        self.ops = [(torch.randn(a, k, generator=g), torch.randn(k, b, generator=g), torch.empty(a, b))
                    for a, k, b in shapes]
        self.flops = sum(2 * a * k * b for a, k, b in shapes)

    def __call__(self):
        for a, b, c in self.ops:
            torch.mm(a, b, out=c)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_throughput_matmul_floor(benchmark, shape):
    floor = MatmulFloor(shape)
    benchmark.group = f"train-step {shape} threads={THREADS}"
    benchmark.extra_info.update(gflop=floor.flops / 1e9, products=len(floor.ops))
    benchmark.pedantic(floor, rounds=8 if shape.startswith("b") else 30, warmup_rounds=3, iterations=1)


# ----------------------------------------------------------------------------- Muon's orthogonalisation
# The same-shaped batches Muon orthogonalises each step for the 4 x 4 x 128 model of shape (a)
# (query/key/value 128 x 384, the MLP's two 128 x 512 on their short side) and for a 4 x 1024
# model (1024 x 4096), in float32 (the products' dtype where bf16 is not native): the Gram form
# fastlm takes for matrices at least twice as wide as tall, against the plain steps of the same
# iteration ("plain", the competitor). Both start from the same normalised input.
NS_BATCHES = {"4 x 128x384": (4, 128, 384), "8 x 128x512": (8, 128, 512), "4 x 1024x4096": (4, 1024, 4096)}


@pytest.mark.parametrize("impl", ["plain", "fastlm"])
@pytest.mark.parametrize("batch", list(NS_BATCHES))
def test_orthogonalize_float32(benchmark, batch, impl):
    from fastlm import optim

    shape = NS_BATCHES[batch]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    fn = optim._gram_iteration if impl == "fastlm" else optim._plain_iteration
    want = optim._plain_iteration(x.double(), 5)
    assert ((fn(x, 5).double() - want).norm() / want.norm()).item() < 1e-5
    benchmark.group = f"orthogonalize float32 {batch} threads={THREADS}"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(lambda: fn(x, 5), rounds=20 if shape[-1] < 1024 else 5, warmup_rounds=2, iterations=1)


# ----------------------------------------------------------------------------- time to quality
def _shakespeare(root: Path) -> Path:
    """tiny Shakespeare as bytes (vocabulary 256 + end-of-text), 90/10 split like nanoGPT."""
    from fastlm.data import prepare

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    from fastlm import Tokenizer

    tok = Tokenizer.train([""], 256)
    prepare([SHAKESPEARE], root / "a_shakespeare_char", tokenizer=tok, val_fraction=0.1, progress=False, verbose=False)
    return root


def _run_recipe(path: str, root: Path, iters=2000, eval_interval=250, eval_iters=200, seed=1337):
    step = Step("a_shakespeare_char", path, root, seed=seed)
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=iters, lr_decay_iters=iters)

    def evaluate():
        r = np.random.default_rng(0)
        step.model.eval()
        with torch.no_grad(), step.ctx():
            losses = []
            for _ in range(eval_iters):
                x, y = step.data.batch("val", 12, 64, r)
                losses.append((step.model.loss(x, y) if path == "fastlm" else
                               F.cross_entropy(step.model(x).view(-1, 257), y.view(-1))).item())
        step.model.train()
        return sum(losses) / len(losses)

    t_train, curve, reached = 0.0, [], None
    for it in range(iters):
        t0 = time.perf_counter()
        step(lr_at(it, cfg))
        t_train += time.perf_counter() - t0
        if (it + 1) % min(eval_interval, iters) == 0:
            v = evaluate()
            curve.append((it + 1, round(v, 4), round(t_train, 1)))
            if reached is None and v <= 1.88:
                reached = t_train
    return curve, reached, t_train


def test_time_to_quality(benchmark, tmp_path_factory):
    root = _shakespeare(tmp_path_factory.mktemp("data"))
    results = {}
    for path in ("plain", "fastlm"):
        curve, reached, total = _run_recipe(path, root, iters=int(os.environ.get("FASTLM_BENCH_ITERS", "2000")))
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
