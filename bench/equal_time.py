"""GPT against the LSTM and GRU baselines on character-level tiny Shakespeare, each trained
for the same wall time with the same recipe (fastlm's Trainer, AdamW, lr 1e-3 with warm-up
and cosine decay over the time budget's expected steps, batch 12 x 64 bytes, 4 layers,
width 128, dropout 0), then scored on the same 200 validation batches.

    python bench/equal_time.py [--minutes 2] [--threads 2] [--json out.json]

Keep the JSON as bench/results/equal_time_<YYYY-MM-DD>_<tag>.json.

Prints a markdown table: architecture, parameters, steps done, val loss (nats per byte).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastlm import GPTConfig, Tokenizer, build_model
from fastlm.data import TokenData, prepare
from fastlm.train import Trainer, TrainConfig

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def run(arch: str, data: Path, out: Path, minutes: float, seed: int = 1337) -> dict:
    torch.manual_seed(seed)
    model = build_model(GPTConfig(arch=arch, vocab_size=257, block_size=64, n_layer=4, n_head=4, n_embd=128,
                                  dropout=0.0))
    cfg = TrainConfig(out_dir=str(out / arch), batch_size=12, block_size=64, max_iters=10**9, max_minutes=minutes,
                      lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000, eval_interval=10**9,
                      eval_iters=200, progress=False, plot=False, tensorboard=False, seed=seed, device="cpu")
    trainer = Trainer(model, cfg, TokenData(data))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    val = trainer.evaluate("val", iters=200)
    return {"arch": arch, "parameters": sum(p.numel() for p in model.parameters()), "steps": trainer.step,
            "train_seconds": round(wall, 1), "val_loss": round(float(val), 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="fastlm-equal-time-"))
    prepare([SHAKESPEARE], root / "data", tokenizer=Tokenizer.train([""], 256), val_fraction=0.1, progress=False,
            verbose=False)
    rows = [run(arch, root / "data", root / "runs", args.minutes) for arch in ("gpt", "lstm", "gru")]
    print(f"| architecture | parameters | steps in {args.minutes:g} min | val loss |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['arch']} | {r['parameters']:,} | {r['steps']} | {r['val_loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"minutes": args.minutes, "threads": args.threads, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
