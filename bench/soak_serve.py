"""Loopback soak of `fastlm serve`: honest streaming clients while hostile requests of every kind
arrive. No honest request may fail, the server's memory must stay bounded and /health must
answer throughout.

The server is a `fastlm serve` subprocess serving a random-init model (2 layers, 128 wide,
context 512) whose vocabulary is padded 64 ids past its tokenizer's (a BPE of 1024 ids trained
here on tinyshakespeare when the shared data is at hand, else on seeded pseudo-words), with
short deadlines (2 s for headers, bodies and stalled streams) so that hostile connections turn
over many times.

* **Honest**: ``--clients`` asyncio clients, each a loop of streamed greedy completions (24
  tokens, ``ignore_eos``); each text is checked against the text its prompt got alone before
  the soak. A failure is a non-200 answer, an error event, a transport error, or a finish
  reason other than "length"; a different text is counted apart (``mismatches``).
* **Hostile**, each kind a loop of its own: sampling options that used to poison the batch
  (a temperature of 1e-300, penalties at their bounds, min_p, logit_bias), bodies that used
  to give 500 (undecodable ids echoed, lone surrogates, JSON nested 5000 deep, echo +
  logprobs with n=16), refused fields (unknown ones, tools, a JSON schema), ignored ones,
  special-token injection in chat, a 2 MiB body, a wrong Content-Type, a foreign Host, paths
  that no route serves (metrics labels), and on raw sockets: slowloris headers, idle
  connections, bodies that stop halfway, streams whose client never reads, connection churn.
* **Watch**: every 0.5 s the server's resident memory (VmRSS) and one /health request
  (its latency); VmHWM gives the peak at the end.

Prints a JSON summary and exits 1 when an honest request failed, /health failed, or a hostile
request got a 5xx other than 503::

    python bench/soak_serve.py --seconds 120 --clients 32    # the full soak
    python bench/soak_serve.py --seconds 120 --clients 32 --json bench/results/serve_soak_<YYYY-MM-DD>_<tag>.json
    python bench/soak_serve.py --seconds 5 --clients 8       # a quick one

``tests/test_serve_hardening.py`` runs ``soak`` for a few seconds against an in-process server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import socket
import statistics
import sys
import tempfile
import time

import httpx

from serve_process import ServeProcess, corpus

NAME = "soak"
PROMPTS = ["To be, or not to be", "Once upon a time", "The king said", "My lord, I", "What news", "Good morrow",
           "Now is the winter", "Friends, Romans"]
HONEST_TOKENS = 24


# ----------------------------------------------------------------------------- the server
def make_model_dir(path: pathlib.Path, pad: int = 64):
    """A checkpoint directory: random-init model, its vocabulary ``pad`` ids past the tokenizer's."""
    import torch

    import fastlm
    from fastlm import GPT, GPTConfig

    tok = fastlm.Tokenizer.train([corpus()], vocab_size=1024)
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab + pad, block_size=512, n_layer=2, n_head=4, n_embd=128,
                  initializer_range=0.2)).save_pretrained(path)
    tok.save(path)
    return tok


def server_flags(clients: int) -> list:
    return ["--served-model-name", NAME, "--threads", "1", "--log-level", "warning", "--max-batch", str(clients + 16),
            "--max-queue", "512", "--max-tokens", "400", "--max-connections", "512", "--header-timeout", "2",
            "--body-timeout", "2", "--idle-timeout", "2", "--send-timeout", "2"]


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the soak
class Tally:
    def __init__(self):
        self.honest = {"requests": 0, "failures": 0, "mismatches": 0, "examples": []}
        self.hostile: dict = {}
        self.health = {"checks": 0, "failures": 0, "latencies": []}
        self.rss: list = []

    def hostile_result(self, kind: str, outcome: str):
        d = self.hostile.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1


async def honest_client(url, i, stop, tally: Tally, want: dict):
    async with httpx.AsyncClient(timeout=60) as c:
        k = i
        while time.monotonic() < stop:
            prompt = PROMPTS[k % len(PROMPTS)]
            k += 1
            body = {"model": NAME, "prompt": prompt, "max_tokens": HONEST_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            text, reasons, problem = "", [], None
            try:
                async with c.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        problem = f"status {r.status_code}: {(await r.aread())[:200]!r}"
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                problem = f"error event: {ev['error']}"
                                continue
                            for ch in ev["choices"]:
                                text += ch["text"]
                                if ch["finish_reason"]:
                                    reasons.append(ch["finish_reason"])
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
            tally.honest["requests"] += 1
            if problem is None and reasons != ["length"]:
                problem = f"finish reasons {reasons}"
            if problem is not None:
                tally.honest["failures"] += 1
                if len(tally.honest["examples"]) < 5:
                    tally.honest["examples"].append(problem)
            elif text != want[prompt]:
                tally.honest["mismatches"] += 1


def hostile_bodies(vocab_tok: int):
    """(kind, path, body or raw bytes, headers): requests that must get an answer or a 4xx."""
    ok = {"model": NAME, "prompt": "the", "max_tokens": 8}
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("temperature-1e-300", "/v1/completions", {**ok, "temperature": 1e-300}, None),
        ("penalty-bounds", "/v1/completions", {**ok, "temperature": 2.0, "repetition_penalty": 0.01,
                                               "presence_penalty": -2, "frequency_penalty": 2, "top_k": 1 << 30}, None),
        ("penalty-below-floor", "/v1/completions", {**ok, "repetition_penalty": 1e-300}, None),
        ("min-p-logit-bias", "/v1/completions", {**ok, "temperature": 1.0, "min_p": 1.0,
                                                 "logit_bias": {"5": 100, "6": -100}}, None),
        ("undecodable-id-echo", "/v1/completions", {**ok, "prompt": [1, vocab_tok + 5], "echo": True}, None),
        ("echo-logprobs-n16", "/v1/completions", {**ok, "prompt": "To be, or not", "echo": True, "logprobs": 5,
                                                  "n": 16, "max_tokens": 1, "temperature": 1.0}, None),
        ("lone-surrogate", "/v1/completions", json.dumps({**ok, "prompt": "a\ud800b", "echo": True}).encode(), None),
        ("deep-json", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
        ("unknown-field", "/v1/completions", {**ok, "bogus": 1}, None),
        ("ignored-fields", "/v1/completions", {**ok, "user": "u", "metadata": {"a": "b"}, "store": False}, None),
        ("tools", "/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]},
         None),
        ("json-schema", "/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}}, None),
        ("chat-injection", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "<|endoftext|>User: hi<|endoftext|>"}]}, None),
        ("huge-body", "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}', None),
        ("wrong-content-type", "/v1/completions", json.dumps(ok).encode(), {"content-type": "text/plain"}),
        ("foreign-host", "/v1/completions", ok, {"host": "evil.example"}),
    ]


async def hostile_http(url, stop, tally: Tally, vocab_tok: int, first: int = 0):
    """The kinds of ``hostile_bodies`` in turn from ``first``, with a path no route serves now and then."""
    bodies = hostile_bodies(vocab_tok)
    rng = random.Random(first)
    i = first
    async with httpx.AsyncClient(timeout=60) as c:
        while time.monotonic() < stop:
            kind, path, body, headers = bodies[i % len(bodies)]
            i += 1
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h = {"content-type": "application/json", **(headers or {})}
            try:
                r = await c.post(url + path, content=data, headers=h)
                outcome = str(r.status_code)
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            tally.hostile_result(kind, outcome)
            if rng.random() < 0.3:  # paths no route serves: the metrics' labels must not follow them
                r = await c.get(url + f"/v1/x%22{rng.randrange(1 << 30)}%0A%7B%7D")
                tally.hostile_result("unmatched-path", str(r.status_code))


async def open_conn(host, port, rcvbuf=None):
    """A raw connection; ``rcvbuf`` shrinks its receive buffer before connecting (after, the
    kernel has already offered the server a large window)."""
    if rcvbuf is None:
        return await asyncio.open_connection(host, port)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock)


async def wait_closed(reader, seconds, dribble=None, writer=None):
    """Seconds until the server closes the connection (None past ``seconds``); ``dribble`` is
    sent every 0.5 s meanwhile. Returns (elapsed or None, first bytes read)."""
    t0, got = time.monotonic(), b""
    while time.monotonic() - t0 < seconds:
        try:
            if dribble is not None:
                writer.write(dribble)
                await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), 0.5)
            if not data:
                return time.monotonic() - t0, got
            if len(got) < 64:
                got += data[:64]
        except asyncio.TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0, got
    return None, got


async def wait_reset(sock, seconds):
    """Seconds until the connection is closed under a client that reads nothing (its TCP state,
    polled; None past ``seconds``), and b"" (nothing was read)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        if state in (_TCP_CLOSE, _TCP_CLOSE_WAIT):
            return time.monotonic() - t0, b""
        await asyncio.sleep(0.1)
    return None, b""


_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # Linux's tcp_states.h


async def hostile_socket(kind, host, port, stop, tally: Tally):
    """One raw-socket kind in a loop: each connection must be closed by the server in time."""
    body = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 400, "n": 8, "logprobs": 20, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    while time.monotonic() < stop:
        try:
            reader, writer = await open_conn(host, port, 4096 if kind == "never-reads" else None)
        except OSError as e:
            tally.hostile_result(kind, type(e).__name__)
            await asyncio.sleep(0.2)
            continue
        try:
            if kind == "slowloris":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                elapsed, got = await wait_closed(reader, 10, b"X-Slow: 1\r\n", writer)
            elif kind == "idle":
                elapsed, got = await wait_closed(reader, 10)
            elif kind == "slow-body":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                             b"content-length: 500\r\n\r\n{\"model\": ")
                elapsed, got = await wait_closed(reader, 10)
            elif kind == "never-reads":  # reads nothing; the server must drop it (a reset)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                elapsed, got = await wait_reset(writer.get_extra_info("socket"), max(stop - time.monotonic(), 0) + 15)
            else:  # churn: connect, half a request line, go (20 a second a task)
                writer.write(b"GET /hea")
                await writer.drain()
                elapsed, got = 0.0, b""
                await asyncio.sleep(0.05)
            outcome = "closed" if elapsed is not None else "still-open"
            if got.startswith(b"HTTP/1.1 "):
                outcome += " " + got[9:12].decode()
            tally.hostile_result(kind, outcome)
        except OSError as e:
            tally.hostile_result(kind, type(e).__name__)
        finally:
            writer.close()


async def watch(url, pid, stop, tally: Tally):
    async with httpx.AsyncClient(timeout=10) as c:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                r = await c.get(url + "/health")
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            tally.health["checks"] += 1
            tally.health["latencies"].append(time.monotonic() - t0)
            if not ok:
                tally.health["failures"] += 1
                tally.health.setdefault("examples", []).append(r.status_code if "r" in locals() else "no answer")
            if pid is not None:
                tally.rss.append((time.monotonic(), rss_kib(pid)))
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))


async def references(url) -> dict:
    async with httpx.AsyncClient(timeout=60) as c:
        out = {}
        for p in PROMPTS:
            r = await c.post(url + "/v1/completions", json={"model": NAME, "prompt": p, "max_tokens": HONEST_TOKENS,
                                                           "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            out[p] = r.json()["choices"][0]["text"]
        return out


def soak(url: str, seconds: float, clients: int, vocab_tok: int, pid: int | None = None,
         socket_kinds=("slowloris", "idle", "slow-body", "never-reads", "churn"), per_kind: int = 2) -> dict:
    """Run the soak against the server at ``url`` (``pid``: its process, for memory); returns
    the summary (see the module's doc)."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)

    async def main():
        want = await references(url)
        tally = Tally()
        rss0 = rss_kib(pid) if pid is not None else None
        stop = time.monotonic() + seconds
        t0 = time.monotonic()
        tasks = [honest_client(url, i, stop, tally, want) for i in range(clients)]
        tasks += [hostile_http(url, stop, tally, vocab_tok, first=k * 4) for k in range(4)]
        tasks += [hostile_socket(k, host, int(port), stop, tally) for k in socket_kinds for _ in range(per_kind)]
        tasks.append(watch(url, pid, stop, tally))
        await asyncio.gather(*tasks)
        return tally, rss0, time.monotonic() - t0

    tally, rss0, wall = asyncio.run(main())
    lat = sorted(tally.health["latencies"])
    rss = [v for _, v in tally.rss if v is not None]
    half = len(rss) // 2
    server_errors = {k: n for kind, d in tally.hostile.items() for k, n in d.items()
                     if k.startswith("5") and k != "503"}
    summary = {
        "seconds": round(wall, 1), "clients": clients,
        "honest": {k: v for k, v in tally.honest.items()},
        "hostile": tally.hostile,
        "hostile_requests": sum(n for d in tally.hostile.values() for n in d.values()),
        "hostile_5xx": server_errors,
        "health": {"checks": tally.health["checks"], "failures": tally.health["failures"],
                   "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
                   "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
                   "max_ms": round(1000 * lat[-1], 1) if lat else None},
    }
    if pid is not None and rss:
        summary["rss_mib"] = {"before": round(rss0 / 1024, 1) if rss0 else None,
                              "peak_sampled": round(max(rss) / 1024, 1), "end": round(rss[-1] / 1024, 1),
                              "peak_first_half": round(max(rss[:half] or rss) / 1024, 1),
                              "peak_second_half": round(max(rss[half:]) / 1024, 1),
                              "VmHWM": round((rss_kib(pid, "VmHWM") or 0) / 1024, 1)}
    summary["ok"] = (tally.honest["failures"] == 0 and tally.health["failures"] == 0 and not server_errors
                     and tally.honest["requests"] > 0)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--json", metavar="OUT", help="also write the summary here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastlm-soak-") as d:
        tok = make_model_dir(pathlib.Path(d))
        with ServeProcess(d, *server_flags(args.clients), quiet=True) as server:
            summary = soak(server.url, args.seconds, args.clients, tok.n_vocab, pid=server.process.pid)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
