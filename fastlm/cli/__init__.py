"""The ``fastlm`` command line. Each subcommand is a pair of functions: ``_add_NAME(sub)``
declares its arguments and ``_run_NAME(args)`` calls the library. Front end only: the work
is done by the library modules. The subcommands live in modules by subject (``info``,
``data``, ``train``, ``evaluate``, ``generate``, ``chat``, ``serve``, ``tasks``); none of them imports
torch or fastlm's subpackages until a command runs, so ``fastlm --help`` stays quick."""
from __future__ import annotations

import argparse
import sys

from .chat import _add_chat, _run_chat  # noqa: F401
from .common import _DTYPES, _add_device_args, _device_dtype  # noqa: F401
from .data import _add_data_args, _add_prepare, _add_tokenizer, _data_options, _run_prepare, _run_tokenizer  # noqa: F401
from .evaluate import _add_eval, _run_eval  # noqa: F401
from .generate import _add_demo, _add_generate, _run_demo, _run_generate  # noqa: F401
from .info import _add_info, _run_info  # noqa: F401
from .serve import _add_serve, _run_serve, _serve_config  # noqa: F401
from .tasks import (_add_classify, _add_finetune, _add_qa, _add_translate, _run_classify, _run_finetune,  # noqa: F401
                    _run_qa, _run_translate, _texts)
from .train import (_MODEL_FLAGS, _TRAIN_FLAGS, _add_sweep, _add_train, _parse_grid, _prepared_data,  # noqa: F401
                    _run_sweep, _run_train)

COMMANDS = ["info", "tokenizer", "prepare", "train", "sweep", "eval", "generate", "chat", "serve", "demo",
            "finetune", "classify", "translate", "qa"]


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

