"""The server's settings: its limits, timeouts and security defaults (``fastlm.serve``'s doc)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    model_name: str = "fastlm"
    max_batch: int = 32  # sequences decoded together (cache rows)
    max_queue: int = 256  # sequences allowed to wait for a row
    max_model_len: int | None = None  # tokens per row (prompt + completion); default the model's context
    max_prompt_tokens: int | None = None  # default max_model_len - 1
    max_tokens_cap: int = 4096  # largest max_tokens accepted
    max_n: int = 16  # largest n (choices per prompt)
    max_prompts: int = 64  # prompts in one completions request
    max_body_bytes: int = 1 << 20  # request body size
    max_json_depth: int = 32  # nesting of arrays and objects in a request body
    request_timeout: float = 600.0  # seconds from arrival to the last token
    api_key: str | None = None
    prefill_tokens: int = 2048
    kv_dtype: str | None = None  # the KV cache's storage type: None (the model's), "fp32", "bf16", "fp16"
    latency_buckets: tuple = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    # connections (fastlm.serve.net)
    max_connections: int = 512  # open connections; past it 503 and closed
    header_timeout: float = 10.0  # seconds to deliver a request's headers (from connecting or the last response)
    body_timeout: float = 30.0  # seconds from the request's arrival to the end of its body (408)
    idle_timeout: float = 5.0  # seconds a keep-alive connection may wait idle for its next request
    send_timeout: float = 30.0  # seconds one write of a stream may wait for the client to read
    send_buffer_bytes: int = 1 << 17  # each socket's send buffer (the kernel doubles it)
    max_stream_events: int = 4096  # events waiting for one request's client before it counts as not reading
    allowed_hosts: tuple | None = None  # Host names answered to; None: the loopback names; ("*",): any
    cors_origins: tuple = ()  # origins allowed by CORS (browsers); empty: no CORS headers at all
    playground: bool = True  # the web page at GET / (fastlm.serve.playground)
