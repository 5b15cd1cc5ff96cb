"""``fastlm chat``: an interactive chat with a model in the terminal (``fastlm.generation.ChatSession``):
lines from stdin, replies streamed token by token, the conversation kept within the context."""
from __future__ import annotations

import sys

from .common import _add_device_args, _add_kv_dtype_arg, _add_sampling_args, _add_weights_arg, _device_dtype

_HELP = """commands:
  /system TEXT   set the system message (/system alone removes it)
  /reset         forget the conversation (the system message stays)
  /save PATH     write the conversation as JSON
  /exit          quit (also /quit, end of input, or Ctrl-C at the prompt)
Ctrl-C during a reply stops the reply."""


def _add_chat(sub):
    p = sub.add_parser("chat", help="chat with a model in the terminal, replies streamed as they are generated")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Hugging Face layout) or Hugging Face repo id, as for generate")
    p.add_argument("--revision", help="branch, tag or commit of a repo id (default main)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's directory)")
    p.add_argument("--system", default=None, help="the system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens a reply may have (default 256)")
    _add_sampling_args(p)
    p.add_argument("--seed", type=int, default=None, help="the n-th reply is drawn with seed + n")
    _add_device_args(p)
    _add_weights_arg(p)
    _add_kv_dtype_arg(p)


def _run_chat(args):
    from fastlm.generation.chat import ChatSession
    from fastlm.hub import resolve_pretrained
    from fastlm.pipelines import TextGenerationPipeline

    device, dtype = _device_dtype(args)
    model = resolve_pretrained(args.model, args.revision)
    pipe = TextGenerationPipeline(model, tokenizer=args.tokenizer, device=device, dtype=dtype, weights=args.weights)
    opts = {k: v for k, v in dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty).items() if v is not None}
    unused = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None]
    if unused and not args.do_sample:  # transformers' rule, as fastlm generate says it
        print(f"fastlm chat: note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} used only with "
              "--do-sample; decoding greedily", file=sys.stderr)
        for k in ("temperature", "top_k", "top_p"):
            opts.pop(k, None)
    defaults = {k: v for k, v in pipe.defaults.items() if k not in ("max_new_tokens", "max_length")}
    opts = {**defaults, **opts}
    if args.do_sample:
        opts["do_sample"] = True
    if args.kv_dtype is not None:
        opts["kv_dtype"] = args.kv_dtype
        from fastlm.generation.cache import kv_cache_dtype

        kv_cache_dtype(args.kv_dtype, pipe.model)  # refused before the first message, not after it
    session = ChatSession(pipe.model, pipe.tokenizer, pipe.chat_template, system=args.system,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, **opts)
    return chat_loop(session, sys.stdin, sys.stdout, sys.stderr)


def chat_loop(session, stdin, stdout, stderr) -> int:
    """Read lines from ``stdin`` until /exit, end of input or Ctrl-C at the prompt; each line is a
    command or a message whose reply is written to ``stdout`` as it is generated. Notes go to
    ``stderr``. The prompt ``>>> `` is shown when stdin is a terminal."""
    from fastlm.generation.chat import ContextFull

    tty = stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        which = "the model's chat template" if session.template.source is not None else "the plain chat template"
        print(f"fastlm chat: {which}; /help for commands", file=stderr)
    while True:
        try:
            line = _read_line(stdin, stdout, tty)
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits
            stdout.write("\n")
            return 0
        if line is None:
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            name, _, rest = line.partition(" ")
            if name in ("/exit", "/quit"):
                return 0
            if name == "/reset":
                session.reset()
                print("(conversation cleared)", file=stderr)
            elif name == "/system":
                session.set_system(rest.strip() or None)
                print("(system message set)" if rest.strip() else "(system message removed)", file=stderr)
            elif name == "/save":
                if not rest.strip():
                    print("/save needs a path", file=stderr)
                    continue
                try:
                    path = session.save(rest.strip())
                except OSError as e:
                    print(f"could not save: {e}", file=stderr)
                    continue
                print(f"(saved {len(session.messages)} messages to {path})", file=stderr)
            elif name == "/help":
                print(_HELP, file=stderr)
            else:
                print(f"unknown command {name}; /help lists them", file=stderr)
            continue
        reply = session.send(line)
        try:
            for delta in reply:
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C during a reply stops the reply only
            reply.close()
            stdout.write("\n")
            print("(reply stopped)", file=stderr)
            continue
        except ContextFull as e:
            print(f"fastlm chat: {e}", file=stderr)
            continue
        stdout.write("\n")
        stdout.flush()


def _read_line(stdin, stdout, tty):
    """One line of input, None at its end; the prompt on a terminal."""
    if tty and stdin is sys.stdin:
        try:
            return input(">>> ")
        except EOFError:
            stdout.write("\n")
            return None
    line = stdin.readline()
    return line if line else None
