"""Options that several subcommands share: where the model runs and in what type."""
from __future__ import annotations


def _add_sampling_args(p):
    """The decoding flags ``generate`` and ``chat`` share."""
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)


def _add_device_args(p):
    p.add_argument("--device", default=None, help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="weights' type (default: float32; bfloat16/float16 halve the memory, mostly for GPUs)")


def _add_weights_arg(p):
    p.add_argument("--weights", choices=["fp32", "bf16", "fp16", "int8", "int4"], default=None,
                   help="linear layers' weights for inference: a float checkpoint is quantized on load "
                        "(int8/int4: llama.cpp's q8_0/q4_0); default: as the checkpoint holds them")


def _add_kv_dtype_arg(p):
    p.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the KV cache's storage type (default: the model's); bf16/fp16 halve the bytes a decode "
                        "step reads from the cache, weights and activations keep their type")


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
