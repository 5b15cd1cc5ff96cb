"""Data augmentation for fine-tuning (fastlm.augment): each method does what it says, seeded runs
repeat, validation batches and targets are never touched, and on a small synthetic
classification task augmentation shrinks the gap between training and validation loss."""
import json
import random

import numpy as np
import pytest
import torch

from fastlm import GPTConfig
from fastlm.augment import Augmentation, AugmentedData, augment_ids, corrupt_inputs, parse_augmentation
from fastlm.cli import main
from fastlm.finetune import ExampleData, finetune

IDS = list(range(100, 140))


def test_each_method():
    rng = np.random.default_rng(0)
    assert augment_ids(IDS, Augmentation(), rng, 500) == IDS
    # deletion: a subsequence, about p of the tokens gone, never empty
    out = augment_ids(IDS, Augmentation(deletion=0.5), rng, 500)
    assert 5 < len(out) < 35 and out == [t for t in IDS if t in set(out)]
    assert len(augment_ids(IDS, Augmentation(deletion=1.0), rng, 500)) == 1
    # swap: the same tokens, in another order
    out = augment_ids(IDS, Augmentation(swap=0.3), rng, 500)
    assert sorted(out) == IDS and out != IDS
    # insertion: the text's tokens in order, plus copies of its own tokens
    out = augment_ids(IDS, Augmentation(insertion=0.5), rng, 500)
    assert len(out) > len(IDS) and set(out) == set(IDS)
    it = iter(out)
    assert all(t in it for t in IDS)  # IDS is a subsequence of out
    # token dropout: same length, about p replaced, by replace_with when given
    out = augment_ids(IDS, Augmentation(token_dropout=0.5, replace_with=7), rng, 500)
    assert len(out) == len(IDS) and 5 < out.count(7) < 35
    assert all(a == b for a, b in zip(out, IDS) if b != 7 and a != 7)
    # span masking: replaced tokens come in runs; about span_mask of them over many draws
    aug = Augmentation(span_mask=0.3, span_length=4, replace_with=7)
    masked = [augment_ids(IDS * 5, aug, rng, 500) for _ in range(50)]
    share = np.mean([m.count(7) / len(m) for m in masked])
    assert 0.15 < share < 0.45
    runs = [len(r) for m in masked for r in "".join("x" if t == 7 else "." for t in m).split(".") if r]
    assert np.mean(runs) > 2


def test_seeded_and_only_training_batches():
    rows = [(list(range(i, i + 12)), i % 2) for i in range(40)]
    aug = Augmentation(deletion=0.2, swap=0.2, insertion=0.1, token_dropout=0.1, seed=3)

    def batches(augment, split):
        data = ExampleData(rows, "classification", 300, val_fraction=0.25, augment=augment)
        rng = np.random.default_rng(0)
        return [data.batch(split, 8, 64, rng) for _ in range(3)]

    a, b, plain = batches(aug, "train"), batches(aug, "train"), batches(None, "train")
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert any(not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, plain))
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, plain))  # same examples, same labels
    for (x1, y1), (x2, y2) in zip(batches(aug, "val"), batches(None, "val")):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_inputs_corrupted_targets_kept():
    x = torch.arange(200).reshape(4, 50)
    protect = torch.zeros_like(x, dtype=torch.bool)
    protect[:, 40:] = True
    out = corrupt_inputs(x, Augmentation(token_dropout=0.3, span_mask=0.2), np.random.default_rng(1), 1000, protect)
    assert out.shape == x.shape and not torch.equal(out, x) and torch.equal(out[:, 40:], x[:, 40:])
    with pytest.raises(ValueError, match="token_dropout and span_mask"):
        corrupt_inputs(x, Augmentation(swap=0.1), np.random.default_rng(1), 1000)

    class Tokens:  # a language-modelling data source
        vocab_size = 1000

        def batch(self, split, batch_size, block_size, rng):
            x = torch.arange(batch_size * block_size).reshape(batch_size, block_size) % 1000
            return x, x + 1

    data = AugmentedData(Tokens(), {"token_dropout": 0.5})
    rng = np.random.default_rng(0)
    x, y = data.batch("train", 2, 30, rng)
    x0, y0 = Tokens().batch("train", 2, 30, rng)
    assert torch.equal(y, y0) and not torch.equal(x, x0)
    assert all(torch.equal(a, b) for a, b in zip(data.batch("val", 2, 30, rng), Tokens().batch("val", 2, 30, rng)))


def test_bad_options():
    for kw in ({"deletion": 1.5}, {"swap": -0.1}, {"token_dropout": "0.1"}, {"span_mask": 1.0},
               {"span_length": 0.5}, {"replace_with": -1}, {"seed": 1.5}):
        with pytest.raises(ValueError):
            Augmentation(**kw)
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augmentation.coerce({"dropout": 0.1})
    with pytest.raises(TypeError):
        Augmentation.coerce([0.1])
    assert parse_augmentation(["deletion=0.1", "span-length=2", "seed=4"]) == Augmentation(deletion=0.1,
                                                                                            span_length=2, seed=4)
    for items in (["deletion"], ["deletion=a"]):
        with pytest.raises(ValueError, match="--augment"):
            parse_augmentation(items)
    with pytest.raises(ValueError, match="classification"):
        AugmentedData(object(), Augmentation(deletion=0.1))


# ----------------------------------------------------------------------------- fine-tuning
FILLER = "river stone market winter garden lamp copper harbor violin meadow signal ledger orbit canyon tulip anchor"


def _task(path, n=96, seed=0):
    """Label by one keyword hidden among ten filler words: few examples, many ways to memorise."""
    rng = random.Random(seed)
    words, pos, neg = FILLER.split(), ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = []
    for i in range(n):
        text = [rng.choice(words) for _ in range(10)]
        text.insert(rng.randrange(11), rng.choice(pos if i % 2 else neg))
        rows.append({"text": " ".join(text), "label": "pos" if i % 2 else "neg"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _split_losses(summary, data):
    model = summary["task_model"].eval()
    out = {}
    for split in ("train", "val"):
        rows = data.splits[split]
        x = torch.full((len(rows), max(len(ids) for ids, _ in rows)), -1, dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            x[i, :len(ids)] = torch.tensor(ids)
        with torch.no_grad():
            out[split] = torch.nn.functional.cross_entropy(model(x), torch.tensor([y for _, y in rows])).item()
    return out


def test_augmentation_shrinks_the_train_val_gap(tmp_path, monkeypatch):
    import fastlm.finetune as ft

    seen = {}

    class Trainer(ft.Trainer):  # keeps the data the run trained on, to score its splits
        def __init__(self, model, config, data, **kw):
            seen["data"] = data
            super().__init__(model, config, data, **kw)

    monkeypatch.setattr(ft, "Trainer", Trainer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same arithmetic on every machine
    data = _task(tmp_path / "task.jsonl")
    gaps = {}
    try:
        runs = [("none", None), ("augmented", {"deletion": 0.1, "swap": 0.1, "insertion": 0.1, "token_dropout": 0.1})]
        for name, aug in runs:
            summary = finetune("classification", GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), data,
                               tmp_path / name, vocab_size=300, val_fraction=0.5, augment=aug, max_iters=120,
                               eval_interval=1000, lr=3e-3, warmup_iters=5, batch_size=16, progress=False, seed=0)
            losses = _split_losses(summary, seen["data"])
            gaps[name] = losses["val"] - losses["train"]
    finally:
        torch.set_num_threads(threads)
    assert gaps["none"] > 0.5  # the plain run memorises its 48 training examples
    assert gaps["augmented"] < 0.75 * gaps["none"], gaps


def test_translation_takes_dropout_and_span_masking(tmp_path):
    pairs = [{"source": f"the {w}", "target": f"le {w}"} for w in FILLER.split()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs))
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    with pytest.raises(ValueError, match="token_dropout and span_mask"):
        finetune("translation", cfg, data, tmp_path / "a", augment={"deletion": 0.1}, max_iters=2)
    summary = finetune("translation", cfg, data, tmp_path / "b", augment={"token_dropout": 0.1, "span_mask": 0.1},
                       max_iters=4, eval_interval=2, batch_size=4, progress=False)
    assert summary["step"] == 4
    assert main(["finetune", "--task", "classification", "--model", str(tmp_path / "b" / "best"), "--data",
                 str(_task(tmp_path / "c.jsonl", n=8)), "--out", str(tmp_path / "c"), "--steps", "2",
                 "--augment", "deletion=0.1", "swap=0.1", "--no-progress"]) == 0
