"""A `fastlm serve` subprocess on a free loopback port, for the serving benchmark and the soak:
started, waited for until /health answers, stopped; and the text their tokenizers train on."""
from __future__ import annotations

import os
import pathlib
import random
import socket
import subprocess
import sys
import time

import httpx

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus() -> str:
    """tinyshakespeare when the shared data folder is beside the checkout, else seeded pseudo-words
    (varied enough that a tokenizer reaches 2048 ids either way)."""
    if SHARED.is_file():
        return SHARED.read_text(encoding="utf-8")[:300_000]
    rng = random.Random(0)
    syll = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiouy"] + ["th", "sh", "ing", "er", "an"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    return " ".join(rng.choice(words) for _ in range(60_000))


class ServeProcess:
    """``with ServeProcess(model_dir, "--max-batch", "16") as s:`` serves at ``s.url`` (process
    ``s.process``) until the block ends; no API key, whatever the environment says."""

    def __init__(self, model_dir, *flags: str, start_timeout: float = 120.0, quiet: bool = False):
        self.model_dir, self.flags, self.start_timeout, self.quiet = model_dir, flags, start_timeout, quiet

    def __enter__(self) -> "ServeProcess":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fastlm", "serve", "--model", str(self.model_dir), "--port", str(self.port),
               *self.flags]
        out = subprocess.DEVNULL if self.quiet else None
        self.process = subprocess.Popen(cmd, env={**os.environ, "FASTLM_API_KEY": ""}, stdout=out, stderr=out)
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() - t0 > self.start_timeout:
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
