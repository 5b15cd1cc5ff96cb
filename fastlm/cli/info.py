"""``fastlm info``: version, torch, built and usable backends, SIMD level, threads."""
from __future__ import annotations


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
        # the native ops that serve only from a size on at this level (smaller inputs: torch's op)
        "cpu_native_from_elements": {op: sizes[fastlm.ops.cpu_isa()] for op, sizes in _cpu_choice.MIN_NUMEL.items()
                                     if fastlm.ops.cpu_isa() in sizes},
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
