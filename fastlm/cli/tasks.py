"""The task pipelines' subcommands: ``finetune``, ``classify``, ``translate`` and ``qa``."""
from __future__ import annotations

import sys


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
    p.add_argument("--augment", nargs="+", metavar="NAME=VALUE",
                   help="augment the training examples: deletion, swap, insertion, token_dropout (classification), "
                        "token_dropout, span_mask (translation) =PROBABILITY; span_length, replace_with, seed "
                        "(e.g. --augment deletion=0.1 swap=0.1 seed=1)")
    p.add_argument("--src-lang", default="source", help="translation: source language name in the prompt")
    p.add_argument("--tgt-lang", default="target", help="translation: target language name in the prompt")
    for name, typ in (("seed", int), ("device", str), ("threads", int)):
        p.add_argument("--" + name, type=typ)
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_false", default=None,
                   help="no progress bar nor evaluation lines (the bar shows only on a terminal anyway)")


def _run_finetune(args):
    from pathlib import Path

    from fastlm import GPTConfig
    from fastlm.augment import parse_augmentation
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
                       val_fraction=args.val_fraction, augment=parse_augmentation(args.augment), **train)
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
