"""``fastlm serve``: an OpenAI-compatible HTTP server, its flags checked into a ServeConfig."""
from __future__ import annotations

from .common import _add_device_args, _add_kv_dtype_arg, _add_weights_arg, _device_dtype


# ----------------------------------------------------------------------------- serve
def _add_serve(sub):
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (needs fastlm[serve])")
    p.add_argument("--model", required=True,
                   help="checkpoint directory (Hugging Face layout, with its tokenizer) or Hugging Face repo id "
                        "(e.g. gpt2), looked up in the local Hugging Face cache, else downloaded unless "
                        "HF_HUB_OFFLINE=1")
    p.add_argument("--revision", help="branch, tag or commit of a repo id (default main)")
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
    p.add_argument("--no-playground", dest="playground", action="store_false",
                   help="do not serve the web playground at GET / (default: served)")
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
    _add_weights_arg(p)
    _add_kv_dtype_arg(p)
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
    from fastlm.hub import resolve_pretrained
    from fastlm.serve import serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _serve_config(args, api_key=args.api_key or os.environ.get("FASTLM_API_KEY") or None,
                        model_name=args.served_model_name or pathlib.Path(args.model).resolve().name)
    device, dtype = _device_dtype(args)
    serve(resolve_pretrained(args.model, args.revision), host=args.host, port=args.port, tokenizer=args.tokenizer,
          config=cfg, log_level=args.log_level, device=device, dtype=dtype, weights=args.weights)
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
                       allowed_hosts=hosts, cors_origins=tuple(args.cors_origin or ()), playground=args.playground,
                       kv_dtype=args.kv_dtype, **fields)
