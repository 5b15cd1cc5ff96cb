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
    from fastlm.ops import _dispatch, _native

    info = {
        "fastlm": fastlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "backends_usable": fastlm.ops.backends(),
        "backends_unavailable": {
            n: b.why_unavailable for n, b in _dispatch._BACKENDS.items() if not b.available
        },
        "extension_cpu": _native.build_info() or f"not loaded ({_native.cpu_error})",
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


# ----------------------------------------------------------------------------- main
COMMANDS = ["info"]


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
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"fastlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
