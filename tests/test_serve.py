"""`fastlm serve`: a real server on loopback, driven by real clients (the official `openai`
package and raw httpx), with a small random-init model and a tokenizer trained in the test."""
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import fastlm  # noqa: E402
import fastlm.generate  # noqa: E402  (the submodule the checks below call, whatever ran before)
from fastlm.serve import ChatTemplate  # noqa: E402

from _serve import NAME, TEXT, engine, make_model, start, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return fastlm.Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def server(model, tok):
    s = start(model, tok, max_batch=16, max_queue=64, max_tokens_cap=200)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(model, tok, prompt, n):
    ids = tok.encode(prompt)
    out = fastlm.generate.generate(model, ids, max_new_tokens=n, tokenizer=tok, return_dict_in_generate=True)
    return out.texts[0], out.finish_reasons[0]


# ----------------------------------------------------------------------------- the openai client
def test_completion_equals_generate(client, model, tok):
    r = client.completions.create(model=NAME, prompt="To be, or", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    text, reason = greedy_text(model, tok, "To be, or", 12)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("To be, or")) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # token-id prompts, lists of prompts
    r2 = client.completions.create(model=NAME, prompt=[tok.encode("To be, or"), tok.encode("sea")], max_tokens=12,
                                   temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and r2.choices[0].text == text
    assert r2.choices[1].text == greedy_text(model, tok, "sea", 12)[0]
    r3 = client.completions.create(model=NAME, prompt=["To be, or", "sea"], max_tokens=12, temperature=0)
    assert [c.text for c in r3.choices] == [c.text for c in r2.choices]


def test_completion_stream_and_usage(client):
    full = client.completions.create(model=NAME, prompt="whether", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="whether", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model=NAME, prompt="whether", max_tokens=5, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


def test_chat(client, model, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    prompt = ChatTemplate(None).render(msgs)
    assert prompt == "Be brief.\n\nUser: To be?\n\nAssistant:"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    ids = tok.encode(prompt)
    out = fastlm.generate.generate(model, ids, max_new_tokens=10, tokenizer=tok, stop=["\nUser:"],
                                   return_dict_in_generate=True)
    assert r.choices[0].message.content == out.texts[0] and r.choices[0].finish_reason == out.finish_reasons[0]
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.texts[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [out.finish_reasons[0]]
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # log-probabilities of the chosen tokens, with the top alternatives
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the top
        assert e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_chat_template_from_directory(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>"
        "{% endif %}")
    t = ChatTemplate.from_dir(tmp_path)
    assert t.render([{"role": "user", "content": "hi"}]) == "<user>hi<a>" and t.stop == []
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"
    assert ChatTemplate.from_dir(tmp_path / "nowhere").source is None


def test_n_seed_and_sampling(client):
    kw = dict(model=NAME, prompt="the sea", max_tokens=16, temperature=1.0, top_p=0.95, n=3, seed=123)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the choices differ from one another
    c = client.completions.create(**{**kw, "seed": 124})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]
    # extra fields: top_k and repetition_penalty
    d = client.completions.create(**kw, extra_body={"top_k": 5, "repetition_penalty": 1.3})
    assert d.choices[0].text == client.completions.create(**kw, extra_body={"top_k": 5, "repetition_penalty": 1.3}
                                                          ).choices[0].text
    # streamed choices reassemble to the same texts
    parts = ["", "", ""]
    for ch in client.completions.create(**kw, stream=True):
        for x in ch.choices:
            parts[x.index] += x.text
    assert parts == [x.text for x in a.choices]


def test_sampling_laws(client, model, tok):
    # top_k=1 samples the argmax: greedy text whatever the seed
    text, _ = greedy_text(model, tok, "the sea", 16)
    for seed in (1, 2):
        r = client.completions.create(model=NAME, prompt="the sea", max_tokens=16, temperature=1.0, seed=seed,
                                      extra_body={"top_k": 1})
        assert r.choices[0].text == text
    # the first token's frequencies over many seeded draws follow softmax(logits / T) (the engine alone)
    from fastlm.batching import Engine, Request
    from fastlm.generate import _options

    ids = tok.encode("the sea")
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([ids]))[0, -1].double() / 0.7, -1)
    N = 800
    eng = Engine(model, tok, max_batch=64, max_queue=N)
    drawn, done = [], threading.Semaphore(0)

    def emit(ev):
        if ev[0] == "token":
            drawn.append(ev[2])
        elif ev[0] == "finish":
            done.release()

    opts = _options(model, [len(ids)], 1, None, True, 0.7, None, None, 1.0, None, [], tok, False, 0, "stop")
    try:
        eng.submit(Request([ids], opts, emit, n=N, seed=7))
        for _ in range(N):
            assert done.acquire(timeout=60)
    finally:
        eng.stop()
    freq = torch.bincount(torch.tensor(drawn), minlength=p.numel()).double() / N
    top = torch.topk(p, 8).indices
    pairs = list(zip(p[top].tolist(), freq[top].tolist())) + [(1 - p[top].sum().item(), 1 - freq[top].sum().item())]
    for q, f in pairs:
        assert abs(f - q) <= 5 * (q * (1 - q) / N) ** 0.5 + 2 / N, (f, q)


def test_stop_sequences(client, model, tok):
    text, _ = greedy_text(model, tok, "question", 40)
    stop = text[5:8]
    assert stop and text.find(stop) >= 0
    r = client.completions.create(model=NAME, prompt="question", max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="question", max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_echo_logprobs_score_the_prompt(client, model, tok):
    prompt = "To be, or not to be"
    ids = tok.encode(prompt)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    assert "".join(lp.tokens[:len(ids)]) == prompt and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # the continuation's log-likelihood, as lm-evaluation-harness computes it from this response
    ll, greedy = fastlm.generate.loglikelihood(model, ids[:3], ids[3:])
    assert sum(lp.token_logprobs[3:len(ids)]) == pytest.approx(ll, abs=1e-3)
    # max_tokens=0 with echo: only the prompt
    r0 = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].text == prompt and len(r0.choices[0].logprobs.tokens) == len(ids)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_batched_equals_unbatched(client, server):
    prompts = ["To be", "or not", "whether 'tis", "nobler in the mind", "to suffer", "the slings", "arrows", "sea"]
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]
    out = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def go(i):
        barrier.wait()
        out[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=24, temperature=0).choices[0].text

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    steps = engine(server).steps
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert out == alone
    assert engine(server).steps - steps < len(prompts) * 24  # they shared steps: decoded in batches


def test_32_concurrent_streaming_clients(server, model, tok):
    prompts = [f"{w} {i}" for i, w in enumerate(["To be", "sea", "arms", "mind"] * 8)]
    want = [greedy_text(model, tok, p, 16) for p in prompts]

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(p):
            text, reasons = "", []
            async for ch in await c.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0,
                                                       stream=True):
                text += ch.choices[0].text
                if ch.choices[0].finish_reason:
                    reasons.append(ch.choices[0].finish_reason)
            return text, reasons

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await c.close()

    got = asyncio.run(main())
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(g[1] == ["length"] for g in got)


# ----------------------------------------------------------------------------- routes
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model=NAME, prompt="a", max_tokens=3)
    m = httpx.get(server.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for name in ("fastlm_requests_total", "fastlm_prompt_tokens_total", "fastlm_generation_tokens_total",
                 "fastlm_queue_depth", "fastlm_running_sequences", "fastlm_time_to_first_token_seconds_bucket",
                 "fastlm_time_per_output_token_seconds_count"):
        assert name in text
    assert 'fastlm_requests_total{route="/v1/completions",status="200"}' in text
    gen = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("fastlm_generation_tokens_total ")]
    assert gen and gen[0] >= 3
    for line in text.splitlines():  # the text format: comments or "name{labels} value"
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0


# ----------------------------------------------------------------------------- errors and limits
_HTTP = httpx.Client(timeout=30)  # one pool: a new client per call costs tens of milliseconds


def post(server, path, body, raw=False, headers=None):
    data = body if raw else json.dumps(body)
    return _HTTP.post(server.url + path, content=data, headers={"content-type": "application/json", **(headers or {})},
                      timeout=30)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


BAD = [
    (b"{not json", 400, "invalid_json", None),
    (b"\xff\xfe", 400, "invalid_json", None),
    ([1, 2], 400, "invalid_json", None),
    ({"model": NAME}, 400, "missing", "prompt"),
    ({"prompt": "a"}, 400, "missing", "model"),
    ({"model": "other", "prompt": "a"}, 404, "model_not_found", "model"),
    ({"model": NAME, "prompt": "a", "bogus": 1}, 400, "unknown_parameter", "bogus"),
    ({"model": NAME, "prompt": 5}, 400, "invalid_type", "prompt"),
    ({"model": NAME, "prompt": []}, 400, "invalid_type", "prompt"),
    ({"model": NAME, "prompt": [[1, 2], []]}, 400, "invalid_type", "prompt"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ({"model": NAME, "prompt": [-1]}, 400, "invalid_value", "prompt"),
    ({"model": NAME, "prompt": "a", "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ({"model": NAME, "prompt": "a", "max_tokens": 1.5}, 400, "invalid_type", "max_tokens"),
    ({"model": NAME, "prompt": "a", "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
    ({"model": NAME, "prompt": "a", "max_tokens": 201}, 400, "invalid_value", "max_tokens"),
    ({"model": NAME, "prompt": "a", "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"model": NAME, "prompt": "a", "temperature": True}, 400, "invalid_type", "temperature"),
    ({"model": NAME, "prompt": "a", "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"model": NAME, "prompt": "a", "n": 0}, 400, "invalid_value", "n"),
    ({"model": NAME, "prompt": "a", "n": 17}, 400, "invalid_value", "n"),
    ({"model": NAME, "prompt": "a", "stop": [1]}, 400, "invalid_type", "stop"),
    ({"model": NAME, "prompt": "a", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ({"model": NAME, "prompt": "a", "echo": "yes"}, 400, "invalid_type", "echo"),
    ({"model": NAME, "prompt": "a", "stream": 1}, 400, "invalid_type", "stream"),
    ({"model": NAME, "prompt": "a", "stream_options": {"include_usage": True}}, 400, "invalid_value", "stream_options"),
    ({"model": NAME, "prompt": "a", "repetition_penalty": 0}, 400, "invalid_value", "repetition_penalty"),
    ({"model": NAME, "prompt": "a", "top_k": "3"}, 400, "invalid_type", "top_k"),
    ({"model": NAME, "prompt": "a", "frequency_penalty": 2.5}, 400, "invalid_value", "frequency_penalty"),
    ({"model": NAME, "prompt": "a", "presence_penalty": "1"}, 400, "invalid_type", "presence_penalty"),
    ({"model": NAME, "prompt": "a", "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ({"model": NAME, "prompt": "a", "logit_bias": {"x": 1}}, 400, "invalid_value", "logit_bias"),
    ({"model": NAME, "prompt": "a", "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    ({"model": NAME, "prompt": "a", "logit_bias": {"99999": 1}}, 400, "invalid_value", "logit_bias"),
    ({"model": NAME, "prompt": "a", "logit_bias": [1]}, 400, "invalid_type", "logit_bias"),
    ({"model": NAME, "prompt": "a", "repetition_penalty": 0.001}, 400, "invalid_value", "repetition_penalty"),
    ({"model": NAME, "prompt": "a", "user": 5}, 400, "invalid_type", "user"),
    ({"model": NAME, "prompt": "a", "seed": 1.5}, 400, "invalid_type", "seed"),
    ({"model": NAME, "prompt": "a", "ignore_eos": "no"}, 400, "invalid_type", "ignore_eos"),
    ({"model": NAME, "prompt": "a", "best_of": 3}, 400, "unsupported_parameter", "best_of"),
    ({"model": NAME, "prompt": "a", "suffix": "b"}, 400, "unsupported_parameter", "suffix"),
    ({"model": NAME, "prompt": "a " * 300}, 400, "context_length_exceeded", "prompt"),
    ({"model": NAME, "prompt": "a", "max_tokens": 200, "stop": "x" * 300}, 400, "invalid_value", "stop"),
]

BAD_CHAT = [
    ({"model": NAME}, 400, "missing", "messages"),
    ({"model": NAME, "messages": []}, 400, "invalid_type", "messages"),
    ({"model": NAME, "messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400, "invalid_type", "messages[0].content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x", "extra": 1}]}, 400, "unknown_parameter", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2}, 400,
     "invalid_value", "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter", "tools"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "invalid_value",
     "top_logprobs"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "unsupported_parameter", "tool_choice"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, 400,
     "unsupported_parameter", "response_format"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400,
     "unknown_parameter", "functions"),
]


@pytest.mark.parametrize("body,status,code,param", BAD)
def test_bad_completion_requests(server, body, status, code, param):
    assert_error(post(server, "/v1/completions", body, raw=isinstance(body, bytes)), status, code, param)


@pytest.mark.parametrize("body,status,code,param", BAD_CHAT)
def test_bad_chat_requests(server, body, status, code, param):
    assert_error(post(server, "/v1/chat/completions", body), status, code, param)


def test_other_http_errors(server, client):
    r = post(server, "/v1/completions", b"{" + b" " * (2 << 20) + b"}", raw=True)
    assert_error(r, 413, "request_too_large")
    assert_error(httpx.get(server.url + "/v1/nowhere"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="a", max_tokens=250)
    assert e.value.status_code == 400 and e.value.code == "invalid_value"
    assert httpx.get(server.url + "/health").status_code == 200


def test_fuzz_random_bodies(server):
    rng = random.Random(0)
    values = [None, True, 0, -1, 1.5, 1e308, "", "a", "\x00\ud800", [], [1], [[1]], {}, {"a": 1}, [None], 2 ** 70]
    keys = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo", "top_k",
            "repetition_penalty", "messages", "stream_options", "best_of", "suffix", "x"]
    deadline = time.monotonic() + 20
    for i in range(300):
        if time.monotonic() > deadline:
            break
        kind = rng.random()
        if kind < 0.2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            body = {"model": NAME, "prompt": "a", "max_tokens": 2} if kind < 0.6 else {}
            for _ in range(rng.randrange(1, 4)):
                body[rng.choice(keys)] = rng.choice(values)
            data = json.dumps(body).encode("utf-8", "surrogatepass")
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        r = _HTTP.post(server.url + path, content=data, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 404), (data, r.status_code, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)
    assert httpx.get(server.url + "/health").status_code == 200
    assert engine(server).n_running == 0


# ----------------------------------------------------------------------------- slots, queue, timeout, disconnect
@pytest.fixture(scope="module")
def one_slot(tok):
    s = start(make_model(tok, block_size=1024, seed=1), tok, max_batch=1, max_queue=1, max_tokens_cap=1000,
              request_timeout=2.0)
    yield s
    s.stop()


def long_stream(server):
    """A streamed request that would run for ~1000 tokens; returns (client, response, lines) once it has
    output (the line iterator is returned too: dropping it would close the connection)."""
    c = httpx.Client(timeout=30)
    req = c.build_request("POST", server.url + "/v1/completions",
                          json={"model": NAME, "prompt": "a", "max_tokens": 1000, "temperature": 0, "stream": True,
                                "ignore_eos": True})
    r = c.send(req, stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    while not next(lines).startswith("data: {"):
        pass
    return c, r, lines


def test_disconnect_frees_the_slot(one_slot):
    eng = engine(one_slot)
    c, r, lines = long_stream(one_slot)
    assert eng.n_running == 1
    steps = eng.steps
    r.close()
    c.close()
    assert wait_until(lambda: eng.n_running == 0, 5.0)
    assert eng.steps - steps < 900  # freed long before its 1000 tokens were made
    out = post(one_slot, "/v1/completions", {"model": NAME, "prompt": "b", "max_tokens": 3})
    assert out.status_code == 200 and out.json()["choices"][0]["finish_reason"] == "length"
    # a plain (not streamed) request whose client gives up
    steps = eng.steps
    with pytest.raises(httpx.TimeoutException):
        httpx.post(one_slot.url + "/v1/completions", timeout=0.1,
                   json={"model": NAME, "prompt": "a", "max_tokens": 1000, "ignore_eos": True})
    assert wait_until(lambda: eng.n_running == 0, 5.0)
    assert eng.steps - steps < 900
    assert post(one_slot, "/v1/completions", {"model": NAME, "prompt": "b", "max_tokens": 3}).status_code == 200


def test_queue_full_and_timeout(one_slot):
    eng = engine(one_slot)
    c, r, lines = long_stream(one_slot)  # holds the one row
    gate = threading.Event()
    eng.on_step = lambda *_: gate.wait(10)  # and the engine holds still until the gate opens
    try:
        results = {}

        def waiter():  # waits in the one-place queue, past its 5 s timeout
            results["w"] = post(one_slot, "/v1/completions", {"model": NAME, "prompt": "b", "max_tokens": 3})

        t = threading.Thread(target=waiter)
        t.start()
        assert wait_until(lambda: eng.queue_depth == 1, 5.0)
        full = post(one_slot, "/v1/completions", {"model": NAME, "prompt": "c", "max_tokens": 3})
        assert_error(full, 503, "server_overloaded")
        assert full.headers["retry-after"] == "1"
        t.join(30)
        assert_error(results["w"], 504, "timeout")
        gate.set()
        tail = [x for x in lines if x.startswith("data: ")]  # the stream past its time: an error event, then [DONE]
        assert tail[-1] == "data: [DONE]" and json.loads(tail[-2][6:])["error"]["code"] == "timeout"
    finally:
        eng.on_step = None
        gate.set()
        r.close()
        c.close()
    assert wait_until(lambda: eng.n_running == 0 and eng.queue_depth == 0, 5.0)
    assert post(one_slot, "/v1/completions", {"model": NAME, "prompt": "b", "max_tokens": 3}).status_code == 200


# ----------------------------------------------------------------------------- API key
def test_api_key(model, tok, monkeypatch):
    monkeypatch.setenv("FASTLM_API_KEY", "sk-test-123")
    s = start(model, tok, max_batch=2)
    try:
        body = {"model": NAME, "prompt": "a", "max_tokens": 2}
        assert_error(post(s, "/v1/completions", body), 401, "invalid_api_key")
        assert_error(post(s, "/v1/completions", body, headers={"authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        assert post(s, "/v1/completions", body, headers={"authorization": "Bearer sk-test-123"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test-123", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        s.stop()


# ----------------------------------------------------------------------------- the command line
def test_cli_serve_subprocess(model, tok, tmp_path):
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save(d)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "FASTLM_API_KEY": ""}
    p = subprocess.Popen([sys.executable, "-m", "fastlm", "serve", "--model", str(d), "--port", str(port),
                          "--max-batch", "4", "--threads", "1", "--log-level", "warning"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return p.poll() is None and False

        assert wait_until(up, 60.0), p.stdout.read1().decode() if p.poll() is not None else "server did not start"
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert c.models.list().data[0].id == "tiny"
        r = c.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0)
        assert r.choices[0].text == greedy_text(model, tok, "To be", 5)[0]
    finally:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
