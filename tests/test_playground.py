"""The web playground at `GET /` (fastlm/serve/playground.py, fastlm/serve/static/): its files and
headers over plain HTTP, then the page itself in a headless Chromium (tests/_browser.py) against a
real server on loopback with a small random-init model: chat and completion streamed through the
server's SSE routes, the Stop button, and a server that asks for an API key.

The browser tests skip, saying why, only where no Chromium is found (`apt-get install chromium`,
or FASTLM_CHROMIUM=/path/to/chrome); `.ci/run` installs it. Screenshots go to each test's
`tmp_path` and, when FASTLM_SCREENSHOT_DIR is set, there too."""
import json
import os
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import fastlm  # noqa: E402
from fastlm.serve.playground import CSP, ROUTES  # noqa: E402

from _browser import Browser, find_chromium  # noqa: E402
from _serve import NAME, TEXT, engine, make_model, start, wait_until  # noqa: E402

STATIC = os.path.join(os.path.dirname(fastlm.serve.playground.__file__), "static")
KEY = "sk-playground-test"


@pytest.fixture(scope="module")
def tok():
    return fastlm.Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok, block_size=2048)


@pytest.fixture(scope="module")
def server(model, tok):
    s = start(model, tok, max_batch=4, max_queue=8, max_tokens_cap=2000)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(model, tok):
    s = start(model, tok, max_batch=4, max_queue=8, api_key=KEY)
    yield s
    s.stop()


# ----------------------------------------------------------------------------- over plain HTTP
def _assets(html: str) -> list:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_page_and_assets_are_served_with_their_headers(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    html = r.text
    assert html == open(os.path.join(STATIC, "index.html"), encoding="utf-8").read()
    assets = _assets(html)
    assert sorted(assets) == ["favicon.svg", "playground.css", "playground.js"]
    for path in ["/", *("/" + a for a in assets)]:
        r = httpx.get(server.url + path)
        name, ctype = ROUTES[path]
        assert r.status_code == 200 and r.headers["content-type"] == ctype, path
        assert r.headers["content-security-policy"] == CSP and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"
        assert r.content == open(os.path.join(STATIC, name), "rb").read()
        # self-contained: nothing fetched from another origin (no CDN, no web fonts)
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", r.content.replace(b"http://www.w3.org/", b"")), \
            path
    # the policy allows this origin only, and nothing inline (so the page carries nothing inline)
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    for d in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[d] == "'self'", d
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html
    assert not re.search(r"\sstyle=|\son[a-z]+=", html)
    head = httpx.head(server.url + "/")  # the headers alone
    assert head.status_code == 200 and head.content == b"" and head.headers["content-security-policy"] == CSP
    assert int(head.headers["content-length"]) == len(html.encode())
    metrics = httpx.get(server.url + "/metrics").text  # counted under their own paths
    assert 'fastlm_requests_total{route="/",status="200"}' in metrics
    assert 'fastlm_requests_total{route="/playground.js",status="200"}' in metrics


def test_only_the_listed_files_are_served(server, model, tok):
    for path in ("/index.html", "/static/playground.js", "/../setup.py", "/%2e%2e/setup.py", "/playground.py",
                 "/favicon.ico"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    assert httpx.post(server.url + "/", json={}).status_code == 405
    off = start(model, tok, max_batch=2, playground=False)
    try:
        assert httpx.get(off.url + "/").status_code == 404
        assert httpx.get(off.url + "/playground.js").status_code == 404
        assert httpx.get(off.url + "/health").status_code == 200
    finally:
        off.stop()


def test_page_keeps_the_host_and_cors_rules(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"):
        r = httpx.get(server.url + "/", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        assert "<html" not in r.text
    assert httpx.get(server.url + "/", headers={"host": f"localhost:{server.port}"}).status_code == 200
    r = httpx.get(server.url + "/", headers={"origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"origin": "http://evil.example", "access-control-request-method": "POST",
                               "access-control-request-headers": "authorization, content-type"})
    assert "access-control-allow-origin" not in r.headers


def test_page_is_open_where_the_api_needs_a_key(keyed):
    assert httpx.get(keyed.url + "/").status_code == 200
    assert httpx.get(keyed.url + "/playground.js").status_code == 200
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


# ----------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set FASTLM_CHROMIUM): the browser tests need one")
    with Browser(exe, tmp_path_factory.mktemp("chromium"), width=1200, height=800) as b:
        yield b


@pytest.fixture
def page(browser):
    p = browser.new_page()
    yield p
    # no script error and no CSP violation (the refusals a test provokes on purpose, 401 and 400,
    # are logged as network errors and are not counted)
    errors = [e["entry"] for e in p.events("Log.entryAdded")
              if e["entry"]["level"] == "error" and e["entry"]["source"] != "network"]
    errors += p.events("Runtime.exceptionThrown")
    errors += [e["args"] for e in p.events("Runtime.consoleAPICalled") if e["type"] == "error"]
    p.close()
    assert not errors, errors


def screenshot(page, tmp_path, name):
    paths = [tmp_path / name]
    if os.environ.get("FASTLM_SCREENSHOT_DIR"):
        paths.append(os.path.join(os.environ["FASTLM_SCREENSHOT_DIR"], name))
    png = page.screenshot(*paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and (tmp_path / name).stat().st_size == len(png)


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait(f"document.querySelector('#model').textContent.startsWith({json.dumps(NAME)})")


def settings(page, **fields):
    for name, value in fields.items():
        page.type("#" + name, str(value))


def wait_done(page, timeout=60):
    """The finish reason, once the page shows it."""
    page.wait("document.body.dataset.state === 'idle' && document.querySelector('#finish').dataset.reason",
              timeout)
    return page.eval("document.querySelector('#finish').dataset.reason")


def posts(page, route):
    """(request body, response) of each POST the page sent to ``route``."""
    responses = {e["requestId"]: e["response"] for e in page.events("Network.responseReceived")}
    return [(json.loads(e["request"]["postData"]), responses.get(e["requestId"]), e["request"]["headers"])
            for e in page.events("Network.requestWillBeSent")
            if e["request"]["method"] == "POST" and e["request"]["url"].endswith(route)]


def api(server, route, body, key=None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.url + route, json={"model": NAME, **body}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


SPEED = re.compile(r"^(\d+) tokens? in \d+\.\d\d s · \d+(\.\d)? tokens/s · first token after \d+ ms$")


def test_chat_streams_in_the_browser(page, server, tmp_path):
    open_page(page, server)
    page.click("#mode-chat")
    assert page.visible("#chat-panel") and not page.visible("#completion-panel")
    page.type("#system", "Be brief.")
    settings(page, temperature=0, max_tokens=12)
    page.type("#prompt", "To be, or not to be?")
    page.click("#send")
    assert wait_done(page) == "length"
    reply = page.text(".bubble.assistant")
    assert page.text(".bubble.user") == "To be, or not to be?" and reply.strip()
    # the same request without streaming gives the same text and finish reason (greedy)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not to be?"}]
    want = api(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "temperature": 0})
    assert reply == want["choices"][0]["message"]["content"].strip()  # shown without white space around it
    assert page.text("#finish") == "finish: " + want["choices"][0]["finish_reason"]
    m = SPEED.match(page.text("#speed"))
    assert m and int(m.group(1)) == want["usage"]["completion_tokens"] == 12, page.text("#speed")
    # it went through the streaming route: a POST with stream: true answered as server-sent events
    [(body, resp, _)] = posts(page, "/v1/chat/completions")
    assert body["stream"] is True and body["model"] == NAME and body["messages"] == msgs
    assert body["temperature"] == 0 and body["max_tokens"] == 12
    assert resp["status"] == 200 and resp["mimeType"] == "text/event-stream"
    screenshot(page, tmp_path, "playground-chat.png")

    # a second turn carries the first one in its history; Enter sends
    page.type("#prompt", "And then?")
    page.command("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    page.command("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
    page.wait("document.querySelectorAll('.bubble.assistant').length === 2")
    wait_done(page)
    second = posts(page, "/v1/chat/completions")[1][0]
    assert second["messages"] == msgs + [{"role": "assistant", "content": reply},
                                         {"role": "user", "content": "And then?"}]
    assert page.eval("document.querySelector('#prompt').value") == ""
    page.click("#clear")
    assert page.eval("document.querySelectorAll('.bubble').length") == 0 and page.text("#finish") == ""


def test_completion_streams_in_the_browser(page, server, tmp_path):
    open_page(page, server)
    page.click("#mode-completion")
    assert page.visible("#completion-panel") and not page.visible("#chat-panel")
    settings(page, temperature=0, max_tokens=10, stop_sequences="zzz\\n", seed=7)
    page.type("#prompt", "whether 'tis nobler")
    page.click("#send")
    reason = wait_done(page)
    want = api(server, "/v1/completions", {"prompt": "whether 'tis nobler", "max_tokens": 10, "temperature": 0,
                                           "stop": ["zzz\n"]})
    assert page.text("#completion-prompt") == "whether 'tis nobler"
    assert page.text("#completion-text") == want["choices"][0]["text"] != ""
    assert reason == want["choices"][0]["finish_reason"]
    [(body, resp, _)] = posts(page, "/v1/completions")
    assert body["prompt"] == "whether 'tis nobler" and body["stream"] is True and body["seed"] == 7
    assert body["stop"] == ["zzz\n"]  # "\n" typed as backslash-n is a newline
    assert resp["mimeType"] == "text/event-stream"
    # a value the server refuses: its message is shown, nothing breaks
    settings(page, temperature=5)
    page.click("#send")
    page.wait("!document.querySelector('#error').hidden")
    assert "temperature" in page.text("#error") and page.eval("document.body.dataset.state") == "idle"
    screenshot(page, tmp_path, "playground-completion.png")


def test_stop_button_aborts_the_stream(page, server):
    open_page(page, server)
    settings(page, temperature=1, max_tokens=2000, seed=1)
    page.type("#prompt", "To be")
    page.click("#send")
    page.wait("document.querySelector('.bubble.assistant').textContent.length > 0")
    page.click("#stop")
    assert wait_done(page) == "stopped"
    n = int(SPEED.match(page.text("#speed")).group(1))
    assert 0 < n < 2000
    assert wait_until(lambda: engine(server).n_running == 0 and engine(server).queue_depth == 0)
    # what was shown stays in the conversation, and the page sends again
    settings(page, temperature=0, max_tokens=3)
    page.type("#prompt", "more")
    page.click("#send")
    page.wait("document.querySelectorAll('.bubble.assistant').length === 2")
    reason = wait_done(page)
    # the stopped reply is sent back as the assistant's turn; what follows it was cut at random,
    # so the finish reason the page shows is checked against the server's own for that body
    body = posts(page, "/v1/chat/completions")[-1][0]
    assert [m["role"] for m in body["messages"]][-3:] == ["user", "assistant", "user"]
    assert body["messages"][-2]["content"] != "" and body["messages"][-1]["content"] == "more"
    body.pop("stream")
    body.pop("stream_options", None)
    want = api(server, "/v1/chat/completions", body)["choices"][0]
    assert reason == want["finish_reason"] in ("length", "stop")
    # shown without white space around it, as JavaScript's trim() defines it (Python's strip() differs)
    shown = page.eval("document.querySelectorAll('.bubble.assistant')[1].textContent")
    assert shown == page.eval(f"{json.dumps(want['message']['content'])}.trim()")


def test_api_key_is_asked_for_once(page, keyed, tmp_path):
    page.goto(keyed.url + "/")
    page.wait("!document.querySelector('#key-form').hidden")
    assert page.text("#model") == "API key needed" and "needs an API key" in page.text("#key-message")
    # a message sent before the key waits for it
    settings(page, temperature=0, max_tokens=5)
    page.type("#prompt", "To be?")
    page.click("#send")
    page.wait("document.querySelector('#key-message').textContent.includes('sent once a key is accepted')")
    page.type("#api-key", "wrong-key")
    page.click("#key-save")
    page.wait("document.querySelector('#key-message').textContent.includes('refused')")
    assert page.visible("#key-form") and page.eval("sessionStorage.getItem('fastlm.apiKey')") is None
    screenshot(page, tmp_path, "playground-key.png")
    page.type("#api-key", KEY)
    page.click("#key-save")
    page.wait(f"document.querySelector('#model').textContent.startsWith({json.dumps(NAME)})")
    assert not page.visible("#key-form")
    assert page.eval("sessionStorage.getItem('fastlm.apiKey')") == KEY
    assert wait_done(page) == "length" and page.text(".bubble.user") == "To be?" and page.text(".bubble.assistant")
    [(body, resp, headers)] = posts(page, "/v1/chat/completions")  # sent once, with the key
    assert headers["Authorization"] == f"Bearer {KEY}" and resp["status"] == 200
    assert body["messages"] == [{"role": "user", "content": "To be?"}] and body["max_tokens"] == 5
    # the key outlives a reload of the tab: no second prompt
    page.goto(keyed.url + "/")
    page.wait(f"document.querySelector('#model').textContent.startsWith({json.dumps(NAME)})")
    assert not page.visible("#key-form")
