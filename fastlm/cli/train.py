"""``fastlm train`` and ``fastlm sweep``: the model and training flags, and the prepared folder
they train on."""
from __future__ import annotations

import sys

from .data import _add_data_args, _data_options


# ----------------------------------------------------------------------------- train
_MODEL_FLAGS = {"arch": (str, "gpt"), "n_layer": (int, 6), "n_head": (int, 6), "n_embd": (int, 384),
                "block_size": (int, 256), "dropout": (float, 0.0)}
_TRAIN_FLAGS = {"batch_size": int, "grad_accum": int, "max_iters": int, "max_minutes": float, "lr": float,
                "min_lr": float, "warmup_iters": int, "lr_decay_iters": int, "weight_decay": float, "grad_clip": float,
                "eval_interval": int, "eval_iters": int, "log_interval": int, "patience": int, "keep_last": int,
                "seed": int, "backend": str, "device": str, "dtype": str, "threads": int,
                "optimizer": str, "muon_lr": float, "muon_momentum": float, "muon_ns_steps": int, "muon_ns_dtype": str,
                "lr_schedule": str,
                "target_val_loss": float, "license": str}
# GPTConfig's architecture switches: flags for the valued ones; all of them in a config file or a recipe
_SWITCH_FLAGS = {"norm": str, "pos": str, "mlp": str, "logit_softcap": float}
_SWITCHES = set(_SWITCH_FLAGS) | {"bias", "qk_norm", "tie_word_embeddings", "zero_init_proj", "n_kv_head",
                                  "rope_theta"}


def _add_train(sub):
    p = sub.add_parser("train", help="train a GPT on text or on a prepared folder")
    _add_data_args(p, required=False)
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, loss.svg")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with the same keys as the flags; flags win")
    from fastlm.train.config import RECIPES

    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named set of model switches and training settings (fast: Muon, RMSNorm, rotary, "
                        "QK-norm, ReLU^2, untied zero-init head, linear decay); the config file and flags win")
    for name, (typ, default) in _MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=f"model: default {default}")
    for name, typ in _SWITCH_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help="model switch (see GPTConfig)")
    for name, typ in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model's loss")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _prepared_data(opts: dict, out):
    """The prepared folder to train on: --data itself when it is one, else OUT/data, prepared
    from the raw sources (kept when resuming). Under torchrun rank 0 prepares it while the
    other ranks wait, then they read what it wrote (OUT must be on a file system all of
    them share, as for checkpoints)."""
    from pathlib import Path

    from fastlm.train import distributed
    from fastlm.data import is_prepared, prepare
    from fastlm.train import resolve_device

    sources = [opts["data"]] if isinstance(opts["data"], str) else list(opts["data"])
    if len(sources) == 1 and is_prepared(sources[0]):
        return Path(sources[0])
    data_dir = Path(out) / "data"
    reuse = bool(opts.get("resume")) and is_prepared(data_dir)
    if not reuse and opts.get("tokenizer") is None and opts.get("vocab_size") is None:
        raise ValueError("give --tokenizer DIR or --vocab-size N to tokenize raw text")
    # Join the process group now (the Trainer finds it joined), so that ranks can wait.
    info = distributed.init_from_env(resolve_device(opts.get("device") or "auto").type)
    with distributed.main_process_first(info):
        if info.is_main and not reuse:
            prepare(sources, data_dir, tokenizer=opts.get("tokenizer"), vocab_size=opts.get("vocab_size"),
                    **_data_options(opts))
    if not is_prepared(data_dir):
        raise FileNotFoundError(f"rank {info.rank} finds no prepared folder at {data_dir} after rank 0 prepared it: "
                                "--out must be on a file system every node shares (or run `fastlm prepare` "
                                "once and pass the prepared folder as --data)")
    return data_dir


def _run_train(args):
    from pathlib import Path

    import torch

    from fastlm import GPTConfig, build_model
    from fastlm.train import distributed
    from fastlm._io import read_json
    from fastlm.data import TokenData
    from fastlm.train import RECIPES, Trainer, TrainConfig, find_checkpoints, load_config_file

    opts = {}
    if args.recipe:
        opts.update({**RECIPES[args.recipe]["model"], **RECIPES[args.recipe]["train"]})
    opts.update(load_config_file(args.config) if args.config else {})
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config", "recipe")})
    known = set(_MODEL_FLAGS) | _SWITCHES | set(_TRAIN_FLAGS) | {"data", "tokenizer", "vocab_size", "val_fraction", "text_field",
                                                     "extensions", "min_chars", "max_chars", "scrub_pii", "no_nfc",
                                                     "no_newlines", "no_control_chars", "no_dedup", "out", "out_dir",
                                                     "compile", "resume", "progress"} | {
        f.name for f in __import__("dataclasses").fields(TrainConfig)}
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    out = opts.pop("out", None) or opts.pop("out_dir", None)
    if not out:
        raise ValueError("give --out DIR (or out = ... in the config file)")
    if not opts.get("data"):
        raise ValueError("give --data PATH... (text, folders, JSONL, 'stdlib', or a prepared folder)")
    data_dir = _prepared_data(opts, out)
    data = TokenData(data_dir)

    model_keys = set(_MODEL_FLAGS) | _SWITCHES
    model_kw = {k: opts[k] for k in model_keys if k in opts}
    if opts.get("resume"):
        ckpts = find_checkpoints(out)
        if ckpts:  # the model is the checkpoint's; given flags must agree (Trainer checks)
            saved = read_json(ckpts[-1] / "trainer_state.json").get("model_config", {})
            model_kw = {**{k: saved[k] for k in model_keys if k in saved}, **model_kw}
    for k, (_, default) in _MODEL_FLAGS.items():
        model_kw.setdefault(k, default)
    torch.manual_seed(opts.get("seed", 1337))  # the initial weights are part of a reproducible run
    model = build_model(GPTConfig(vocab_size=data.vocab_size, eos_token_id=data.eot_token,
                                  bos_token_id=data.eot_token, **model_kw))
    train_kw = {k: v for k, v in opts.items() if k in {f.name for f in __import__("dataclasses").fields(TrainConfig)}}
    train_kw.pop("block_size", None)
    train_kw["out_dir"] = str(out)
    cfg = TrainConfig(**train_kw)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {model_kw}; data: {data_dir} "
          f"({data.num_tokens('train'):,} train tokens, vocabulary {data.vocab_size})", file=sys.stderr)
    trainer = Trainer(model, cfg, data)
    try:
        summary = trainer.train()
        # every rank is through before the group is torn down (not after an error: a rank
        # that failed must exit, and torchrun then stops the others)
        distributed.barrier(trainer.dist)
    finally:
        distributed.shutdown(trainer.dist)
    if not trainer.dist.is_main:
        return 0
    print(f"stopped at step {summary['step']} ({summary['stop_reason']}); best val loss "
          f"{summary['best_val_loss']} at step {summary['best_step']}; best model: {summary['best_dir']}")
    return 0


# ----------------------------------------------------------------------------- sweep
def _add_sweep(sub):
    p = sub.add_parser("sweep", help="grid or random search over hyper-parameters; ranked table, JSON, CSV, PNG")
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="sweep folder: one trial-NNN run folder a trial")
    p.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="settings and their values, e.g. lr=1e-3,3e-3 n_layer=2,4 (model or training names)")
    p.add_argument("--random", type=int, metavar="N", help="train N combinations drawn from the grid, not all")
    p.add_argument("--steps", type=int, default=200, help="optimisation steps a trial (default 200)")
    for name, (typ, default) in _MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=f"model: default {default}")
    for name, typ in _TRAIN_FLAGS.items():
        if name != "max_iters":
            p.add_argument("--" + name.replace("_", "-"), type=typ)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _parse_grid(items) -> dict:
    types = {**{k: t for k, (t, _) in _MODEL_FLAGS.items()}, **_TRAIN_FLAGS}
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not values:
            raise ValueError(f"--grid takes NAME=V1,V2,..., got {item!r}")
        typ = types.get(name)
        parsed = []
        for v in values.split(","):
            v = v.strip()
            if typ is None:  # a setting without a flag: a number when it reads as one
                for t in (int, float, str):
                    try:
                        parsed.append(t(v))
                        break
                    except ValueError:
                        continue
            else:
                try:
                    parsed.append(typ(v))
                except ValueError:
                    raise ValueError(f"--grid {name}: {v!r} is not a valid {typ.__name__}") from None
        grid[name] = parsed
    return grid


def _run_sweep(args):
    import dataclasses

    from fastlm.data import TokenData
    from fastlm.report import format_table
    from fastlm.train import TrainConfig, sweep

    opts = {k: v for k, v in vars(args).items() if v is not None}
    grid = _parse_grid(args.grid)
    data = TokenData(_prepared_data(opts, args.out))
    model = {k: opts[k] for k in _MODEL_FLAGS if k in opts}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_kw = {k: v for k, v in opts.items() if k in train_names and k not in _MODEL_FLAGS}
    cfg = TrainConfig(**{**train_kw, "out_dir": args.out, "max_iters": args.steps})
    ranked = sweep(cfg, data, grid, model=model, random=args.random, seed=cfg.seed)
    print(format_table(ranked, ["rank", "trial", *grid, "best_val_loss", "best_step", "train_seconds", "out_dir"]))
    print(f"wrote {args.out}/sweep.json, sweep.csv and sweep.png; best: {ranked[0]['out_dir']}")
    return 0
