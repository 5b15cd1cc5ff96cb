"""Serving throughput: continuous batching against the same requests one at a time.

A `fastlm serve` subprocess on loopback serves a random-init model of the small config (4 layers,
256 wide, 4 heads, context 256, a 2048-id BPE tokenizer trained here on tinyshakespeare when the
shared data is at hand, else on seeded pseudo-words). Clients (httpx, async,
streaming SSE, in this process) each ask 64 tokens (``ignore_eos``, so every request makes
exactly 64) from a short prompt. Per round:

* **one at a time**: the 16 requests sent sequentially (each waits for the previous);
* **16 concurrent**: the 16 requests sent at once, decoded together in one batch.

Aggregate generated tokens/s is total tokens / wall time; the ratio concurrent / sequential is
taken per round (the two halves of a round run back to back) and the median over rounds
reported. Time to first token (TTFT, request sent to first text chunk) and per-token latency
(between consecutive chunks of a stream) are measured at the client; p50 and p99 over all
requests of the concurrent runs (and of the sequential runs, for reference).

    pytest bench/test_serve.py --benchmark-only -s     # FASTLM_BENCH_THREADS=1 for one thread
"""
import asyncio
import json
import os
import statistics
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import fastlm  # noqa: E402
from fastlm import GPT, GPTConfig  # noqa: E402
from serve_process import ServeProcess, corpus  # noqa: E402  (pytest puts bench/ on sys.path)

CLIENTS, TOKENS, ROUNDS = 16, 64, 5
PROMPTS = ["To be, or not to be", "Once upon a time", "The king said", "My lord, I", "What news", "Good morrow",
           "Now is the winter", "Friends, Romans", "If music be", "All the world", "Shall I compare", "O Romeo",
           "The quality of mercy", "Double, double", "Out, damned spot", "Is this a dagger"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    tok = fastlm.Tokenizer.train([corpus()], vocab_size=2048)
    assert tok.n_vocab == 2048
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=4, n_head=4, n_embd=256))
    model.save_pretrained(d)
    tok.save(d)
    flags = ["--max-batch", str(CLIENTS), "--log-level", "warning"]
    threads = os.environ.get("FASTLM_BENCH_THREADS")
    if threads:
        flags += ["--threads", threads]
    with ServeProcess(d, *flags) as s:
        yield s.url, d.name


async def one(client, url, model, prompt):
    """Stream one request; returns (tokens, ttft, inter-chunk gaps)."""
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 1.0, "seed": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert tokens == TOKENS
    return tokens, first, gaps


async def sequential(url, model):
    async with httpx.AsyncClient(timeout=120) as c:
        t0 = time.perf_counter()
        out = [await one(c, url, model, p) for p in PROMPTS[:CLIENTS]]
        return time.perf_counter() - t0, out


async def concurrent(url, model):
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await one(c, url, model, "warm")  # open the pool
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(c, url, model, p) for p in PROMPTS[:CLIENTS]))
        return time.perf_counter() - t0, out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def test_serve_batching_throughput(benchmark, server):
    url, model = server
    asyncio.run(sequential(url, model))  # warm-up: both paths once
    asyncio.run(concurrent(url, model))
    ratios, seq_tps, con_tps = [], [], []
    lat = {"seq": ([], []), "con": ([], [])}
    for _ in range(ROUNDS):
        ts, outs = asyncio.run(sequential(url, model))
        tc, outc = asyncio.run(concurrent(url, model))
        n = CLIENTS * TOKENS
        seq_tps.append(n / ts)
        con_tps.append(n / tc)
        ratios.append((n / tc) / (n / ts))
        for key, res in (("seq", outs), ("con", outc)):
            for _, first, gaps in res:
                lat[key][0].append(first)
                lat[key][1].extend(gaps)
    benchmark.pedantic(lambda: asyncio.run(concurrent(url, model)), rounds=1, iterations=1)
    info = {
        "clients": CLIENTS, "tokens_per_request": TOKENS, "rounds": ROUNDS,
        "threads": os.environ.get("FASTLM_BENCH_THREADS") or torch.get_num_threads(),
        "sequential_tokens_per_s_median": statistics.median(seq_tps),
        "concurrent_tokens_per_s_median": statistics.median(con_tps),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
    }
    for key in ("seq", "con"):
        ttft, gaps = lat[key]
        info[f"{key}_ttft_p50_ms"] = 1e3 * pct(ttft, 50)
        info[f"{key}_ttft_p99_ms"] = 1e3 * pct(ttft, 99)
        info[f"{key}_token_p50_ms"] = 1e3 * pct(gaps, 50)
        info[f"{key}_token_p99_ms"] = 1e3 * pct(gaps, 99)
    benchmark.extra_info.update(info)
    print("\n" + json.dumps(info, indent=1))
