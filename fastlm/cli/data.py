"""``fastlm tokenizer`` (train, encode, decode) and ``fastlm prepare`` (clean, split, tokenize), with
the data flags that ``train`` and ``sweep`` share."""
from __future__ import annotations

import sys


# ----------------------------------------------------------------------------- tokenizer
def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, encode and decode text")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="learn a vocabulary from text files")
    t.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in all: the 256 bytes, merges, special tokens")
    t.add_argument("--out", required=True, help="directory for tokenizer.json, vocab.json, merges.txt")
    t.add_argument("--pattern", default="gpt2", help="pre-tokenization pattern: gpt2 (r50k/p50k), cl100k or o200k")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")


def _run_prepare(args):
    from fastlm.data import prepare

    opts = vars(args)
    if args.tokenizer is None and args.vocab_size is None:
        raise ValueError("give --tokenizer DIR or --vocab-size N (a tokenizer is then trained on the data)")
    prepare(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            num_threads=args.threads, progress=not args.quiet, **_data_options(opts))
    return 0
