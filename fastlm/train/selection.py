"""Model selection on top of the Trainer: k-fold cross-validation by document, and grid or
random sweeps over model and training settings, each trial a training run of its own."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .config import TrainConfig
from .trainer import Trainer


def model_for_data(data, seed: int = 1337, **model_kw):
    """A freshly initialised model for ``data`` (a ``TokenData``): its vocabulary and end-of-text
    token, the other ``GPTConfig`` fields from ``model_kw``, the weights drawn from ``seed``."""
    from ..models import GPTConfig, build_model

    torch.manual_seed(seed)
    return build_model(GPTConfig(vocab_size=data.vocab_size, eos_token_id=data.eot_token,
                                 bos_token_id=data.eot_token, **model_kw))


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def cross_validate(config: TrainConfig, data, folds: int = 5, model: dict | None = None) -> dict:
    """k-fold cross-validation by document: the documents of ``data`` (a prepared folder; its
    train and val splits together) are dealt into ``folds`` disjoint folds
    (``fastlm.data.assign_folds``); fold I trains a fresh model (``model``: ``GPTConfig``
    fields, the same initial weights for every fold) on the other folds and validates on
    fold I, in ``config.out_dir/fold-I`` (its data in ``config.out_dir/folds/fold-I``). Returns the per-fold
    best val losses and their mean and sample standard deviation; also written to
    ``config.out_dir/cross_validation.json``."""
    from ..data import TokenData, write_folds
    from ..report import write_json

    data_path = data.path if isinstance(data, TokenData) else Path(data)
    out = Path(config.out_dir)
    fold_dirs = write_folds(data_path, folds, out / "folds")
    rows = []
    for i, fold_dir in enumerate(fold_dirs):
        fd = TokenData(fold_dir)
        m = model_for_data(fd, config.seed, **(model or {}))
        block = config.block_size or m.config.block_size
        if fd.num_tokens("val") <= block + 1:  # else the Trainer would validate on train batches
            raise ValueError(f"fold {i} holds {fd.num_tokens('val')} val tokens, too few for windows of {block + 1}; "
                             f"use fewer folds, more data or a smaller block size")
        cfg = dataclasses.replace(config, out_dir=str(out / f"fold-{i}"))
        summary = Trainer(m, cfg, fd).train()
        rows.append({"fold": i, "val_loss": summary["best_val_loss"], "best_step": summary["best_step"],
                     "train_documents": fd.meta["counts"]["train"]["documents"],
                     "val_documents": fd.meta["counts"]["val"]["documents"],
                     "val_tokens": fd.num_tokens("val"), "out_dir": cfg.out_dir})
    mean, std = _mean_std([r["val_loss"] for r in rows])
    result = {"folds": rows, "val_loss_mean": mean, "val_loss_std": std, "k": folds}
    write_json(out / "cross_validation.json", result)
    return result


def sweep_trials(grid: dict, random: int | None = None, seed: int = 0) -> list[dict]:
    """The settings of each trial: every combination of the ``grid``'s values (``{name: [values]}``,
    in the grid's order), or ``random`` of them drawn without replacement (all when the grid
    has no more)."""
    import itertools
    import random as _random

    if not grid or any(not list(v) for v in grid.values()):
        raise ValueError("a sweep needs at least one setting with at least one value")
    combos = [dict(zip(grid, values)) for values in itertools.product(*(list(v) for v in grid.values()))]
    if random is not None:
        if random < 1:
            raise ValueError(f"random must be >= 1, got {random}")
        if random < len(combos):
            combos = [combos[i] for i in sorted(_random.Random(seed).sample(range(len(combos)), random))]
    return combos


SWEEP_NAME = "sweep"


def sweep(config: TrainConfig, data, grid: dict, model: dict | None = None, random: int | None = None,
          seed: int = 0) -> list[dict]:
    """A grid (or, with ``random=N``, random) search: one training a trial, each in
    ``config.out_dir/trial-NNN`` with its own checkpoints. Settings named in ``grid`` are
    ``GPTConfig`` fields (``n_layer``, ``n_embd``, ``block_size``, ...) or ``TrainConfig`` fields
    (``lr``, ``batch_size``, ``weight_decay``, ...) and override ``model`` and ``config``.
    Returns the trials ranked by best val loss; ``sweep.json``, ``sweep.csv`` and ``sweep.png``
    (best val loss per trial) are written into ``config.out_dir``."""
    from ..data import TokenData
    from ..models import GPTConfig
    from ..report import points_png, write_csv, write_json

    model_keys = {f.name for f in fields(GPTConfig)} - {"vocab_size", "eos_token_id", "bos_token_id"}
    train_keys = {f.name for f in fields(TrainConfig)} - {"out_dir", "resume"}
    unknown = [k for k in grid if k not in model_keys | train_keys]
    if unknown:
        raise ValueError(f"sweep: unknown settings {unknown}; use GPTConfig or TrainConfig field names")
    data = data if isinstance(data, TokenData) else TokenData(data)
    out = Path(config.out_dir)
    rows = []
    for i, params in enumerate(sweep_trials(grid, random, seed)):
        model_kw = {**(model or {}), **{k: v for k, v in params.items() if k in model_keys}}
        train_kw = {k: v for k, v in params.items() if k in train_keys and k not in model_keys}
        cfg = dataclasses.replace(config, out_dir=str(out / f"trial-{i:03d}"), **train_kw)
        if cfg.progress:
            print(f"trial {i}: {params}", file=sys.stderr)
        summary = Trainer(model_for_data(data, cfg.seed, **model_kw), cfg, data).train()
        rows.append({"trial": i, **params, "best_val_loss": summary["best_val_loss"], "best_step": summary["best_step"],
                     "steps": summary["step"], "train_seconds": round(summary["train_seconds"], 2),
                     "out_dir": cfg.out_dir})
    ranked = sorted(rows, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0.0, r["trial"]))
    ranked = [{"rank": n + 1, **r} for n, r in enumerate(ranked)]
    write_json(out / f"{SWEEP_NAME}.json", {"grid": {k: list(v) for k, v in grid.items()}, "random": random,
                                            "seed": seed, "trials": ranked})
    write_csv(out / f"{SWEEP_NAME}.csv", ranked)
    if config.plot:
        try:
            points_png(out / f"{SWEEP_NAME}.png",
                    [", ".join(f"{k}={r[k]}" for k in grid) for r in rows],
                    [r["best_val_loss"] if r["best_val_loss"] is not None else float("nan") for r in rows],
                    "best val loss (nats/token)", f"sweep: {len(rows)} trials")
        except ImportError as e:
            print(f"fastlm: {e}; no {SWEEP_NAME}.png", file=sys.stderr)
    return ranked
