"""The ``fastlm`` command line. Each subcommand is a pair of functions: ``_add_NAME(sub)``
declares its arguments and ``_run_NAME(args)`` calls the library. Front end only: the work
is done by the library modules."""
from __future__ import annotations

import argparse
import sys


# ----------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="version, torch, built and usable backends, SIMD level, threads")
    p.add_argument("--json", action="store_true", help="print as JSON")


def _run_info(args):
    import json
    import platform

    import torch

    import fastlm
    from fastlm.ops import _cpu_choice, _native

    info = {
        "fastlm": fastlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backends_usable": fastlm.ops.backends(),
        "backends_unavailable": {n: s.why_unavailable for n, s in fastlm.ops.backends_status().items()
                                 if not s.available},
        "extension_cpu": _native.build_info() or f"not loaded ({_native.cpu_error})",
        "cpu_isa": fastlm.ops.cpu_isa() or "-",
        "cpu_isas_supported": fastlm.ops.cpu_isas(),
        "cpu_native_ops": sorted(op for op in _cpu_choice.NATIVE_WINS if fastlm.ops.cpu_isa() in _cpu_choice.NATIVE_WINS[op]),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "requested_backend": fastlm.ops.requested_backend() or "auto",
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(v)
        print(f"{k:<{width}}  {v}")
    return 0


# ----------------------------------------------------------------------------- generate
def _add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a model, streaming the text to the terminal")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 50)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--context-overflow", choices=["stop", "slide"], default="stop")
    _add_device_args(p)


def _add_device_args(p):
    p.add_argument("--device", default=None, help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="weights' type (default: float32; bfloat16/float16 halve the memory, mostly for GPUs)")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
           "fp16": "float16"}


def _device_dtype(args):
    """(device, dtype) from --device/--dtype, checked: a device torch cannot use is an error."""
    import torch

    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    device = None
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this torch sees no CUDA device")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    return device, dtype


def _run_generate(args):
    import fastlm
    from fastlm.pipelines import TextGenerationPipeline

    device, dtype = _device_dtype(args)
    pipe = TextGenerationPipeline(args.model, tokenizer=args.tokenizer, device=device, dtype=dtype)
    opts = {k: v for k, v in dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed).items() if v is not None}
    unused = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None]
    if unused and not args.do_sample:  # transformers' rule, said once here instead of as a library warning
        print(f"fastlm generate: note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} used only with "
              "--do-sample; decoding greedily", file=sys.stderr)
        for k in ("temperature", "top_k", "top_p"):
            opts.pop(k, None)
    opts = {**pipe.defaults, **opts, "context_overflow": args.context_overflow}
    if args.do_sample:
        opts["do_sample"] = True
    if opts.get("max_new_tokens") is None and opts.get("max_length") is None:
        opts["max_new_tokens"] = 50
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for delta in fastlm.stream(pipe.model, pipe.tokenizer, args.prompt, **opts):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ----------------------------------------------------------------------------- tokenizer
def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, encode and decode text")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="learn a vocabulary from text files")
    t.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all: the 256 bytes, merges, special tokens")
    t.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    t.add_argument("--pattern", default="gpt2", help="pre-tokenization pattern: gpt2 (r50k/p50k) or cl100k")
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"], help="special tokens (default <|endoftext|>)")
    t.add_argument("--threads", type=int, default=None, help="counting threads (default: all cores)")
    e = tsub.add_parser("encode", help="print the token ids of --text or of stdin")
    e.add_argument("--tokenizer", required=True, help="directory or file (tokenizer.json, vocab.json, *.tiktoken)")
    e.add_argument("--text", default=None, help="text to encode (default: read stdin)")
    e.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    d = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin, whitespace-separated)")
    d.add_argument("--tokenizer", required=True, help="directory or file")
    d.add_argument("ids", nargs="*", type=int, help="token ids (default: read stdin)")


def _run_tokenizer(args):
    import pathlib

    from fastlm.tokenizer import Tokenizer

    if args.tokenizer_command == "train":
        import time

        files = [pathlib.Path(f) for f in args.data]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"no such file: {f}")
        t0 = time.perf_counter()
        tok = Tokenizer.train(files, args.vocab_size, special_tokens=args.special, pattern=args.pattern,
                              num_threads=args.threads)
        out = tok.save(args.out)
        print(f"trained {tok.n_vocab} ids ({tok.train_stats['merges']} merges, {tok.train_stats['words']} distinct "
              f"pre-tokens) in {time.perf_counter() - t0:.2f} s; wrote {out}")
        return 0
    tok = Tokenizer.load(args.tokenizer)
    if args.tokenizer_command == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset(),
                         disallowed_special="all" if not args.allow_special else ())
        print(" ".join(map(str, ids)))
        return 0
    ids = args.ids if args.ids else [int(x) for x in sys.stdin.read().split()]
    sys.stdout.write(tok.decode(ids))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- prepare
def _add_data_args(p, required=True):
    p.add_argument("--data", nargs="+", required=required, metavar="PATH",
                   help="text files, folders, glob patterns, JSONL files, 'stdlib' (the Python standard library's "
                        "source), a datasets save_to_disk folder or hf:NAME")
    p.add_argument("--tokenizer", metavar="DIR", help="a saved fastlm tokenizer (default: train one)")
    p.add_argument("--vocab-size", type=int, help="train a byte-level BPE tokenizer of this size (256: plain bytes)")
    p.add_argument("--val-fraction", type=float, help="share of documents held out for validation (default 0.05)")
    p.add_argument("--text-field", help="JSONL/dataset field holding the text (default 'text')")
    p.add_argument("--extensions", nargs="+", help="file extensions read from folders")
    p.add_argument("--min-chars", type=int, help="drop documents shorter than this (default 1)")
    p.add_argument("--max-chars", type=int, help="drop documents longer than this")
    p.add_argument("--scrub-pii", action="store_true", default=None,
                   help="replace e-mail addresses, phone numbers, IP addresses, card-like numbers by placeholders")
    for step in ("nfc", "newlines", "control-chars", "dedup"):
        p.add_argument(f"--no-{step}", dest=f"no_{step.replace('-', '_')}", action="store_true", default=None,
                       help=f"skip the {step} cleaning step")


def _data_options(opts: dict) -> dict:
    from fastlm.data import DEFAULT_EXTENSIONS, CleanConfig

    clean = CleanConfig()
    for step in ("nfc", "newlines", "control_chars", "dedup"):
        if opts.get(f"no_{step}"):
            setattr(clean, step, False)
    if opts.get("scrub_pii"):
        clean.scrub_pii = True
    if opts.get("min_chars") is not None:
        clean.min_chars = opts["min_chars"]
    if opts.get("max_chars") is not None:
        clean.max_chars = opts["max_chars"]
    return dict(clean=clean, val_fraction=opts.get("val_fraction") if opts.get("val_fraction") is not None else 0.05,
                text_field=opts.get("text_field") or "text",
                extensions=tuple(opts.get("extensions") or DEFAULT_EXTENSIONS))


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="clean, split and tokenize text into train.bin/val.bin/meta.json")
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--threads", type=int, help="tokenizer threads (default: all cores)")


def _run_prepare(args):
    from fastlm.data import prepare

    opts = vars(args)
    if args.tokenizer is None and args.vocab_size is None:
        raise ValueError("give --tokenizer DIR or --vocab-size N (a tokenizer is then trained on the data)")
    prepare(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            num_threads=args.threads, **_data_options(opts))
    return 0


# ----------------------------------------------------------------------------- train
_MODEL_FLAGS = {"arch": (str, "gpt"), "n_layer": (int, 6), "n_head": (int, 6), "n_embd": (int, 384),
                "block_size": (int, 256), "dropout": (float, 0.0)}
_TRAIN_FLAGS = {"batch_size": int, "grad_accum": int, "max_iters": int, "max_minutes": float, "lr": float,
                "min_lr": float, "warmup_iters": int, "lr_decay_iters": int, "weight_decay": float, "grad_clip": float,
                "eval_interval": int, "eval_iters": int, "log_interval": int, "patience": int, "keep_last": int,
                "seed": int, "backend": str, "device": str, "dtype": str, "threads": int}


def _add_train(sub):
    p = sub.add_parser("train", help="train a GPT on text or on a prepared folder")
    _add_data_args(p, required=False)
    p.add_argument("--out", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with the same keys as the flags; flags win")
    for name, (typ, default) in _MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, help=f"model: default {default}")
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
    from fastlm.train import Trainer, TrainConfig, find_checkpoints, load_config_file

    opts = load_config_file(args.config) if args.config else {}
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")})
    known = set(_MODEL_FLAGS) | set(_TRAIN_FLAGS) | {"data", "tokenizer", "vocab_size", "val_fraction", "text_field",
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

    model_kw = {k: opts[k] for k in _MODEL_FLAGS if k in opts}
    if opts.get("resume"):
        ckpts = find_checkpoints(out)
        if ckpts:  # the model is the checkpoint's; given flags must agree (Trainer checks)
            saved = read_json(ckpts[-1] / "trainer_state.json").get("model_config", {})
            model_kw = {**{k: saved[k] for k in _MODEL_FLAGS if k in saved}, **model_kw}
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


# ----------------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="evaluate checkpoints side by side (perplexity, or a task's metrics)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint directories")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="text file, folder of texts, or prepared folder (its val documents); task data for other tasks")
    p.add_argument("--task", choices=["lm", "classification", "translation"], default="lm",
                   help="lm (default): perplexity, nll, bits per byte; the others need fastlm.metrics")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--png", metavar="OUT", help="write a chart of the results (needs matplotlib)")
    p.add_argument("--stride", type=int, help="lm: tokens between window starts (default max-length / 2)")
    p.add_argument("--max-length", type=int, help="lm: window length (default: each model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="lm: windows per forward pass (default 8)")


def _run_eval(args):
    if args.task != "lm":
        from fastlm.metrics import evaluate_task

        evaluate_task(args.task, args.checkpoints, args.data, json_out=args.json, png_out=args.png)
        return 0
    from pathlib import Path

    from fastlm.evaluate import LM_COLUMNS, compare_checkpoints
    from fastlm.report import bar_png, format_table, write_json

    rows = compare_checkpoints(args.checkpoints, args.data, stride=args.stride, max_length=args.max_length,
                               batch_size=args.batch_size)
    print(format_table(rows, LM_COLUMNS))
    if args.json:
        write_json(args.json, {"task": "lm", "data": str(args.data), "stride": args.stride,
                               "max_length": args.max_length, "results": rows})
    if args.png:
        names = [Path(r["model"]).name for r in rows]
        if len(set(names)) < len(names):  # e.g. run1/best and run2/best
            names = ["/".join(Path(r["model"]).parts[-2:]) for r in rows]
        bar_png(args.png, names, [r["perplexity"] for r in rows],
                "perplexity", f"perplexity on {Path(args.data).name}")
    return 0


# ----------------------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="prepare the Python stdlib corpus, train a tokenizer and a small GPT, and sample")
    p.add_argument("--out", default="fastlm-demo", metavar="DIR", help="run folder (default fastlm-demo)")
    p.add_argument("--minutes", type=float, default=3.0, help="time budget in minutes (default 3)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--max-files", type=int, help="use only the first N stdlib files (quick checks)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_demo(args):
    from pathlib import Path

    from fastlm.demo import run_demo
    from fastlm.train import find_checkpoints

    if find_checkpoints(args.out):
        raise ValueError(f"{args.out} already holds a run; remove it or choose another --out")
    run_demo(out=Path(args.out), minutes=args.minutes, vocab_size=args.vocab_size, max_files=args.max_files,
             n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
             batch_size=args.batch_size, seed=args.seed, progress=args.progress)
    return 0


# ----------------------------------------------------------------------------- serve
def _add_serve(sub):
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (needs fastlm[serve])")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout, with its tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set FASTLM_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences allowed to wait (default 256; then 503)")
    p.add_argument("--max-model-len", type=int, help="tokens per sequence, prompt + completion (default: the context)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: max-model-len - 1)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens accepted (default 4096)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size limit (default 1 MiB)")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: torch's)")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated Host names answered to (default: the loopback names when bound to "
                        "loopback, any otherwise; '*' for any, '*.example.com' for a domain's names)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browsers at ORIGIN (e.g. http://localhost:3000) to call the API (repeatable; default: "
                        "no CORS)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections (default 512; then 503)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's headers to arrive (default 10; then the connection is closed)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's body to arrive (default 30; then 408)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="seconds a keep-alive connection may stay idle (default 5)")
    p.add_argument("--send-timeout", type=float, default=30.0,
                   help="seconds a stream may wait for its client to read (default 30; then it is dropped)")
    _add_device_args(p)
    p.add_argument("--log-level", default="info")


def _run_serve(args):
    import os
    import pathlib

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RuntimeError("fastlm serve needs FastAPI, uvicorn and prometheus_client: pip install 'fastlm[serve]'"
                           ) from None
    from fastlm.serve import serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _serve_config(args, api_key=args.api_key or os.environ.get("FASTLM_API_KEY") or None,
                        model_name=args.served_model_name or pathlib.Path(args.model).resolve().name)
    device, dtype = _device_dtype(args)
    serve(args.model, host=args.host, port=args.port, tokenizer=args.tokenizer, config=cfg, log_level=args.log_level,
          device=device, dtype=dtype)
    return 0


def _serve_config(args, **fields):
    """The ServeConfig of ``fastlm serve``'s flags, checked."""
    from fastlm.serve import ServeConfig

    for name in ("max_batch", "max_queue", "max_tokens", "max_body_bytes", "max_connections"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("request_timeout", "header_timeout", "body_timeout", "idle_timeout", "send_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    hosts = None
    if args.allowed_hosts is not None:
        hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
        if not hosts:
            raise ValueError("--allowed-hosts names no host")
    return ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                       max_prompt_tokens=args.max_prompt_tokens, max_tokens_cap=args.max_tokens,
                       max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                       max_connections=args.max_connections, header_timeout=args.header_timeout,
                       body_timeout=args.body_timeout, idle_timeout=args.idle_timeout, send_timeout=args.send_timeout,
                       allowed_hosts=hosts, cors_origins=tuple(args.cors_origin or ()), **fields)


# ----------------------------------------------------------------------------- task pipelines
def _add_finetune(sub):
    p = sub.add_parser("finetune", help="fine-tune a GPT for classification or translation on a JSONL file")
    p.add_argument("--task", required=True, choices=["classification", "translation"])
    p.add_argument("--model", required=True, metavar="DIR_OR_FILE",
                   help="a checkpoint directory, or a TOML/JSON file of GPTConfig fields (a fresh model)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="JSONL: fields text and label (classification) or source and target (translation)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder; OUT/best is the pipeline directory")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer (default: the model's, or trained on the data)")
    p.add_argument("--vocab-size", type=int, help="size of the tokenizer trained for a fresh model (default 512)")
    p.add_argument("--steps", type=int, help="optimisation steps (default 300)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of examples held out (default 0.1)")
    p.add_argument("--eval-interval", type=int, help="steps between evaluations and checkpoints (default 50)")
    p.add_argument("--patience", type=int, help="stop after this many evaluations without improvement")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="classification: how tokens are pooled")
    p.add_argument("--labels", nargs="+", help="classification: the labels in order (default: those of the data)")
    p.add_argument("--src-lang", default="source", help="translation: source language name in the prompt")
    p.add_argument("--tgt-lang", default="target", help="translation: target language name in the prompt")
    for name, typ in (("seed", int), ("device", str), ("threads", int)):
        p.add_argument("--" + name, type=typ)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _run_finetune(args):
    from pathlib import Path

    from fastlm import GPTConfig
    from fastlm.finetune import finetune
    from fastlm.train import load_config_file

    model = args.model
    if Path(model).is_file():
        model = GPTConfig.from_dict(load_config_file(model))
    train = {k: v for k, v in dict(max_iters=args.steps, lr=args.lr, batch_size=args.batch_size,
                                   eval_interval=args.eval_interval, patience=args.patience, seed=args.seed,
                                   device=args.device, threads=args.threads, progress=args.progress).items()
             if v is not None}
    summary = finetune(args.task, model, args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                       labels=args.labels, pooling=args.pooling, src_lang=args.src_lang, tgt_lang=args.tgt_lang,
                       val_fraction=args.val_fraction, **train)
    print(f"stopped at step {summary['step']} ({summary['stop_reason']}); best val loss "
          f"{summary['best_val_loss']} at step {summary['best_step']}; pipeline: {summary['pipeline_dir']}")
    return 0


def _texts(args) -> list:
    texts = args.text if args.text else [ln for ln in sys.stdin.read().splitlines() if ln.strip()]
    if not texts:
        raise ValueError("no text: give --text (repeatable) or lines on stdin")
    return texts


def _add_classify(sub):
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier; one JSON line per text")
    p.add_argument("--model", required=True, help="a text-classification pipeline directory")
    p.add_argument("--text", action="append", help="a text to label (repeatable; default: stdin, one per line)")
    p.add_argument("--top-k", type=int, default=1, help="labels per text, best first (default 1)")


def _run_classify(args):
    import json

    from fastlm.pipelines import pipeline

    pipe = pipeline("text-classification", model=args.model)
    for result in pipe(_texts(args), top_k=args.top_k):
        print(json.dumps(result))
    return 0


def _add_translate(sub):
    p = sub.add_parser("translate", help="translate texts with a fine-tuned model; one line per text")
    p.add_argument("--model", required=True, help="a translation pipeline directory")
    p.add_argument("--text", action="append", help="a text to translate (repeatable; default: stdin, one per line)")
    p.add_argument("--max-new-tokens", type=int, default=None)


def _run_translate(args):
    from fastlm.pipelines import pipeline

    pipe = pipeline("translation", model=args.model)
    for result in pipe(_texts(args), max_new_tokens=args.max_new_tokens):
        print(result["translation_text"])
    return 0


def _add_qa(sub):
    p = sub.add_parser("qa", help="answer a question from documents (TF-IDF retrieval, then generation)")
    p.add_argument("--model", required=True, help="checkpoint or question-answering pipeline directory")
    p.add_argument("--documents", nargs="+", metavar="PATH",
                   help="files, folders or patterns to answer from (default: the pipeline's saved index, else none)")
    p.add_argument("--question", required=True)
    p.add_argument("--top-k", type=int, default=None, help="passages retrieved (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default 64)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")


def _run_qa(args):
    import json

    from fastlm.data import read_documents
    from fastlm.pipelines import pipeline

    documents = None
    if args.documents:
        docs, _ = read_documents(args.documents)
        documents = [(d.source, d.text) for d in docs]
    pipe = pipeline("question-answering", model=args.model, documents=documents, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens)
    result = pipe(args.question)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["answer"])
    if result["note"]:
        print(f"({result['note']})", file=sys.stderr)
    for s in result["sources"]:
        print(f"  source: {s['document']} (score {s['score']:.3f})", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- main
COMMANDS = ["info", "tokenizer", "prepare", "train", "sweep", "eval", "generate", "serve", "demo", "finetune",
            "classify", "translate", "qa"]


def build_parser() -> argparse.ArgumentParser:
    from fastlm import __version__

    parser = argparse.ArgumentParser(prog="fastlm", description="Build, train, run and serve GPT-style language models fast.")
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        globals()[f"_add_{name.replace('-', '_')}"](sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return globals()[f"_run_{args.command.replace('-', '_')}"](args) or 0
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"fastlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
