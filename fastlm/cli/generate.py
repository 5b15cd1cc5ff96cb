"""``fastlm generate`` (continue a prompt, streaming) and ``fastlm demo`` (prepare, train and
sample a small GPT in one go)."""
from __future__ import annotations

import sys

from .common import _add_device_args, _add_kv_dtype_arg, _add_sampling_args, _add_weights_arg, _device_dtype


# ----------------------------------------------------------------------------- generate
def _add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a model, streaming the text to the terminal")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Hugging Face layout) or Hugging Face repo id (e.g. gpt2), "
                        "looked up in the local Hugging Face cache, else downloaded unless HF_HUB_OFFLINE=1")
    p.add_argument("--revision", help="branch, tag or commit of a repo id (default main)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 50)")
    _add_sampling_args(p)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--context-overflow", choices=["stop", "slide"], default="stop")
    _add_device_args(p)
    _add_weights_arg(p)
    _add_kv_dtype_arg(p)


def _run_generate(args):
    import fastlm
    from fastlm.pipelines import TextGenerationPipeline

    device, dtype = _device_dtype(args)
    from fastlm.hub import resolve_pretrained

    model = resolve_pretrained(args.model, args.revision)
    pipe = TextGenerationPipeline(model, tokenizer=args.tokenizer, device=device, dtype=dtype, weights=args.weights)
    opts = {k: v for k, v in dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed).items() if v is not None}
    unused = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None]
    if unused and not args.do_sample:  # transformers' rule, said once here instead of as a library warning
        print(f"fastlm generate: note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} used only with "
              "--do-sample; decoding greedily", file=sys.stderr)
        for k in ("temperature", "top_k", "top_p"):
            opts.pop(k, None)
    opts = {**pipe.defaults, **opts, "context_overflow": args.context_overflow, "kv_dtype": args.kv_dtype}
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
    p.add_argument("--recipe", choices=("fast", "classic"), default="fast",
                   help="fast (default): Muon and the modded-nanogpt switches; classic: GPT-2's layers and AdamW")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _run_demo(args):
    from pathlib import Path

    from fastlm.demo import run_demo
    from fastlm.train import find_checkpoints

    if find_checkpoints(args.out):
        raise ValueError(f"{args.out} already holds a run; remove it or choose another --out")
    run_demo(out=Path(args.out), minutes=args.minutes, vocab_size=args.vocab_size, max_files=args.max_files,
             n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
             batch_size=args.batch_size, seed=args.seed, progress=args.progress, recipe=args.recipe)
    return 0
