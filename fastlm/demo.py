"""``fastlm demo``: the whole path on the built-in corpus, in a few minutes on a laptop CPU.

Prepare the Python standard library's source as a corpus, train a byte-level BPE tokenizer
on it, train a small GPT for a bounded time, save it, draw the loss curve, and print
completions of a few Python prompts.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:")


def sample(model, tokenizer, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, top_k: int = 40,
           seed: int = 0) -> str:
    """The prompt and a top-k sampled continuation (KV-cache generation), as text."""
    ids = model.generate(tokenizer.encode(prompt), max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=top_k, seed=seed, eos_token_id=tokenizer.eot_token,
                         context_overflow="slide")
    if ids and ids[-1] == tokenizer.eot_token:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def _calibrate(model, cfg, data, steps: int = 3) -> float:
    """Seconds per training step of this model and batch on this machine (a throwaway copy)."""
    import copy

    from .train import Trainer, TrainConfig

    probe = TrainConfig(**{**cfg.to_dict(), "progress": False, "plot": False, "tensorboard": False,
                           "out_dir": str(Path(cfg.out_dir) / ".calibration")})
    t = Trainer(copy.deepcopy(model), probe, data)
    t.train_step(cfg.lr)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step(cfg.lr)
    return (time.perf_counter() - t0) / steps


def prepare_demo_data(data_dir, vocab_size: int = 2048, max_files: int | None = None, progress: bool = True,
                      verbose: bool = True) -> None:
    """The demo's data in ``data_dir``: the standard library's source (``max_files`` of it, or
    all), a ``vocab_size``-token byte-level BPE trained on its first 3 MB, 5% held out.
    ``bench/time_to_quality.py --corpus stdlib`` trains on the same."""
    from .data import prepare, stdlib_corpus

    prepare(None, data_dir, vocab_size=vocab_size, documents=stdlib_corpus(max_files=max_files), val_fraction=0.05,
            tokenizer_max_bytes=3_000_000, progress=progress, verbose=verbose)


def run_demo(out="fastlm-demo", minutes: float = 3.0, vocab_size: int = 2048, max_files: int | None = None,
             n_layer: int = 4, n_head: int = 4, n_embd: int = 128, block_size: int = 128, batch_size: int = 16,
             seed: int = 1337, max_new_tokens: int = 80, progress: bool = True, recipe: str = "fast") -> dict:
    """``recipe``: "fast" (``fastlm.train.RECIPES["fast"]``: Muon and the modded-nanogpt
    switches, linear decay) or "classic" (GPT-2's layers, AdamW 2e-3, cosine decay)."""
    from . import GPT, GPTConfig
    from .data import TokenData
    from .train import RECIPES, Trainer, TrainConfig

    if recipe not in ("fast", "classic"):
        raise ValueError(f"recipe must be 'fast' or 'classic', got {recipe!r}")
    out = Path(out)
    t_start = time.perf_counter()
    data_dir = out / "data"
    print(f"[1/4] preparing the corpus: the Python {sys.version_info.major}.{sys.version_info.minor} standard "
          f"library's source, and a {vocab_size}-token byte-level BPE tokenizer", file=sys.stderr)
    prepare_demo_data(data_dir, vocab_size=vocab_size, max_files=max_files, progress=progress)
    data = TokenData(data_dir)
    tokenizer = data.tokenizer()

    torch.manual_seed(seed)
    switches = RECIPES["fast"]["model"] if recipe == "fast" else {}
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, dropout=0.0, eos_token_id=data.eot_token, bos_token_id=data.eot_token,
                          **switches))
    budget = max(minutes * 60.0 - (time.perf_counter() - t_start), 5.0)
    common = dict(out_dir=str(out), batch_size=batch_size, seed=seed, grad_clip=1.0, eval_iters=10, log_interval=5,
                  keep_last=1, progress=progress)
    if recipe == "fast":
        cfg = TrainConfig.fast(**common)
    else:
        cfg = TrainConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup_iters=100, **common)
    sec = _calibrate(model, cfg, data)
    # evaluations and checkpoints take about 10% of the budget
    iters = max(int(0.88 * budget / sec), 10)
    cfg.max_iters = iters
    cfg.warmup_iters = min(cfg.warmup_iters, iters // 10)
    cfg.eval_interval = max(iters // 8, 1)
    cfg.max_minutes = budget / 60.0
    print(f"[2/4] training a {model.num_parameters() / 1e6:.2f}M-parameter GPT ({n_layer} layers, {n_head} heads, "
          f"{n_embd} wide, context {block_size}; the {recipe} recipe) for about {budget / 60:.1f} minutes: {iters} steps of "
          f"{batch_size * block_size} tokens ({sec * 1000:.0f} ms a step)", file=sys.stderr)
    trainer = Trainer(model, cfg, data, tokenizer=tokenizer)
    summary = trainer.train()

    print("[3/4] completions from the best checkpoint:", file=sys.stderr)
    best = Path(summary["best_dir"] or summary["last_checkpoint"])
    model = GPT.from_pretrained(best)
    completions = {}
    for i, prompt in enumerate(PROMPTS):
        text = sample(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed + i)
        completions[prompt] = text
        print("-" * 72)
        print(text)
    print("-" * 72)
    elapsed = time.perf_counter() - t_start
    print(f"[4/4] done in {elapsed / 60:.1f} minutes: best val loss {summary['best_val_loss']:.3f} at step "
          f"{summary['best_step']} ({summary['stop_reason']})", file=sys.stderr)
    print(f"""
Everything is in {out}/:
  data/            the prepared corpus (train.bin, val.bin, meta.json, tokenizer/)
  best/            the best model (Hugging Face layout, with its tokenizer)
  checkpoints/     the last checkpoint with optimizer state, for resuming
  metrics.jsonl    train/val loss, learning rate and tokens/s at each evaluation
  loss.svg         the loss curves

Continue training:  fastlm train --data {data_dir} --out {out} --resume --max-iters {2 * iters}{" --recipe fast" if recipe == "fast" else ""}
Generate:           fastlm generate --model {best} --prompt "def fibonacci(n):" --do-sample
Serve:              fastlm serve --model {best}""")
    return {"summary": summary, "completions": completions, "out": str(out), "best": str(best)}
