"""Running the server: loading a checkpoint and serving it with uvicorn (``serve``), or from a
background thread on a loopback port (``ServerThread``)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from ..hub import resolve_pretrained
from ..models import GPT
from ..tokenizer import load_tokenizer
from ..tokenizer.chat_template import ChatTemplate
from .app import create_app
from .config import ServeConfig

log = logging.getLogger("fastlm.serve")

__all__ = ["load", "serve", "ServerThread"]


def load(model_dir, tokenizer=None, dtype=None, device=None, weights=None):
    """(model, tokenizer, chat template) from a checkpoint directory or a Hugging Face repo id."""
    model_dir = resolve_pretrained(model_dir)
    model = GPT.from_pretrained(model_dir, dtype=dtype, device=device, weights=weights)
    tok = load_tokenizer(tokenizer or model_dir)
    return model, tok, ChatTemplate.for_tokenizer(tok, model_dir)


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, tokenizer=None, config: ServeConfig | None = None,
          log_level: str = "info", dtype=None, device=None, weights=None):
    """Load a checkpoint directory (onto ``device``, in ``dtype``; ``weights``: as
    ``GPT.from_pretrained``'s, e.g. "int8" to quantize a float checkpoint) and serve it until
    interrupted.
    Bound to loopback, the server answers only to the loopback names unless
    ``config.allowed_hosts`` widens them; bound elsewhere, to any name unless it narrows them."""
    import uvicorn

    from .net import is_loopback

    model, tok, chat = load(model_dir, tokenizer, dtype=dtype, device=device, weights=weights)
    cfg = config or ServeConfig(model_name=Path(model_dir).resolve().name)
    if cfg.allowed_hosts is None and not is_loopback(host):
        cfg.allowed_hosts = ("*",)
    if not is_loopback(host) and not (cfg.api_key or os.environ.get("FASTLM_API_KEY")):
        log.warning("serving on %s without an API key: anyone who reaches this address can use the model", host)
    app = create_app(model, tok, cfg, chat)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5, **_uvicorn_options(cfg))


def _uvicorn_options(cfg: ServeConfig) -> dict:
    """uvicorn's settings for the connection limits and deadlines of ``cfg`` (``fastlm.serve.net``)."""
    from .net import protocol_class

    return dict(http=protocol_class(cfg.max_connections, cfg.header_timeout, cfg.send_buffer_bytes),
                limit_concurrency=cfg.max_connections + 1, timeout_keep_alive=cfg.idle_timeout)


class ServerThread:
    """Serve an app from a background thread on a loopback port (tests, benchmarks, notebooks):
    ``with ServerThread(app) as s: openai.OpenAI(base_url=s.url + "/v1", ...)``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        st = getattr(app.state, "fastlm", None)
        options = _uvicorn_options(st.cfg if st is not None else ServeConfig())
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
