"""Data augmentation against overfitting: the train/validation loss gap of a small classifier.

The task of tests/test_augment.py: 96 texts of ten filler words and one keyword that gives the
label (pos: good/great/fine, neg: bad/awful/poor), half held out. A fresh one-layer GPT (n_embd
32) is fine-tuned for 120 steps (batch 16, lr 3e-3, seed 0, one thread) without augmentation
and with each method at probability 0.1; the losses are measured on the whole train and val
splits, unaugmented.

    PYTHONPATH=. python bench/augment_gap.py
"""
import json
import random
import tempfile
from pathlib import Path

import torch

import fastlm.finetune as ft
from fastlm import GPTConfig
from fastlm.finetune import finetune

FILLER = "river stone market winter garden lamp copper harbor violin meadow signal ledger orbit canyon tulip anchor"
RUNS = {"none": None, "deletion 0.1": {"deletion": 0.1}, "swap 0.1": {"swap": 0.1},
        "insertion 0.1": {"insertion": 0.1}, "token_dropout 0.1": {"token_dropout": 0.1},
        "all four at 0.1": {"deletion": 0.1, "swap": 0.1, "insertion": 0.1, "token_dropout": 0.1}}


def write_task(path, n=96, seed=0):
    rng = random.Random(seed)
    words, pos, neg = FILLER.split(), ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = []
    for i in range(n):
        text = [rng.choice(words) for _ in range(10)]
        text.insert(rng.randrange(11), rng.choice(pos if i % 2 else neg))
        rows.append({"text": " ".join(text), "label": "pos" if i % 2 else "neg"})
    path.write_text("\n".join(json.dumps(r) for r in rows))


def split_scores(model, data, split):
    rows = data.splits[split]
    x = torch.full((len(rows), max(len(ids) for ids, _ in rows)), -1, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
    y = torch.tensor([label for _, label in rows])
    with torch.no_grad():
        logits = model.eval()(x)
    return torch.nn.functional.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def main():
    torch.set_num_threads(1)
    seen = {}

    class Trainer(ft.Trainer):  # keeps the data the run trained on, to score its splits
        def __init__(self, model, config, data, **kw):
            seen["data"] = data
            super().__init__(model, config, data, **kw)

    ft.Trainer = Trainer
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "task.jsonl"
        write_task(data)
        print("| augmentation | train loss | val loss | gap | train acc | val acc |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, aug in RUNS.items():
            summary = finetune("classification", GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), data,
                               Path(tmp) / name.replace(" ", "_"), vocab_size=300, val_fraction=0.5, augment=aug,
                               max_iters=120, eval_interval=1000, lr=3e-3, warmup_iters=5, batch_size=16,
                               progress=False, seed=0)
            (tl, ta), (vl, va) = (split_scores(summary["task_model"], seen["data"], s) for s in ("train", "val"))
            print(f"| {name} | {tl:.3f} | {vl:.3f} | {vl - tl:.3f} | {ta:.3f} | {va:.3f} |")


if __name__ == "__main__":
    main()
