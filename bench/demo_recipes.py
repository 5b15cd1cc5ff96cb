"""The demo's model and data trained with each recipe for the same number of steps.

    python bench/demo_recipes.py DATA --steps 300 [--recipes fast classic]

DATA: the demo's prepared folder (``fastlm demo`` writes it to ``fastlm-demo/data``). The
model is the demo's (4 layers, 4 heads, 128 wide, context 128, batch 16, seed 1337); "fast" is
``RECIPES["fast"]`` and ``TrainConfig.fast()``, "classic" the demo's former settings (GPT-2's
layers, AdamW 2e-3, cosine to 2e-4); warmup at most a tenth of the steps, as the demo does.
Prints one JSON line a recipe: the validation loss at each third of the run and the wall time.
"""
import argparse
import json
import tempfile
import time

import torch

from fastlm import GPT, GPTConfig
from fastlm.data import TokenData
from fastlm.train import RECIPES, Trainer, TrainConfig


def run(data, recipe: str, steps: int, out: str, threads: int) -> dict:
    torch.manual_seed(1337)
    switches = RECIPES["fast"]["model"] if recipe == "fast" else {}
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                          eos_token_id=data.eot_token, bos_token_id=data.eot_token, **switches))
    common = dict(out_dir=out, batch_size=16, seed=1337, grad_clip=1.0, eval_iters=10, log_interval=5, keep_last=1,
                  progress=False, plot=False, tensorboard=False, threads=threads, max_iters=steps,
                  eval_interval=max(steps // 3, 1))
    if recipe == "fast":
        cfg = TrainConfig.fast(**common)
    else:
        cfg = TrainConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup_iters=100, **common)
    cfg.warmup_iters = min(cfg.warmup_iters, steps // 10)
    t0 = time.perf_counter()
    trainer = Trainer(model, cfg, data)
    trainer.train()
    return {"recipe": recipe, "steps": steps, "val_loss": {r["step"]: r["val_loss"] for r in trainer.history},
            "wall_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--recipes", nargs="+", default=["fast", "classic"], choices=["fast", "classic"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    data = TokenData(args.data)
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(run(data, recipe, args.steps, out, args.threads)), flush=True)


if __name__ == "__main__":
    main()
