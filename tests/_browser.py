"""A headless Chromium driven over the DevTools protocol, for the tests of web pages.

Chromium runs with ``--remote-debugging-pipe``: it reads protocol messages (JSON, each ended by
a NUL byte) from its file descriptor 3 and writes its answers and events to descriptor 4, so
no port is opened and nothing beyond the standard library is needed. Every read waits with a
deadline (``select``), so a browser that hangs fails the test instead of hanging it.

    with Browser(find_chromium(), tmp_path) as b:
        page = b.new_page()
        page.goto(url)
        page.click("#send")
        page.wait("document.querySelector('#finish').textContent")
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time

from fastlm._io import atomic_write_bytes

__all__ = ["find_chromium", "Browser", "Page", "BrowserError"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The Chromium executable: $FASTLM_CHROMIUM, else the first of NAMES on the PATH."""
    exe = os.environ.get("FASTLM_CHROMIUM")
    if exe:
        return exe
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with a fresh profile in ``workdir``."""

    def __init__(self, exe: str, workdir, width: int = 1200, height: int = 800, timeout: float = 30.0):
        self.timeout = timeout
        self.width, self.height = width, height
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--mute-audio", "--remote-debugging-pipe",
                 f"--user-data-dir={os.fspath(workdir)}", f"--window-size={width},{height}", "about:blank"]
        # a Python trampoline moves the pipe ends to descriptors 3 and 4, where Chromium looks
        # for them, then becomes Chromium (no preexec_fn: the tests run servers in threads)
        trampoline = (f"import os, sys; os.dup2({to_browser_r}, 3); os.dup2({from_browser_w}, 4); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
        self.log = open(os.path.join(os.fspath(workdir), "chromium.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", trampoline, exe, *flags], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     pass_fds=(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[tuple[str | None, str, dict]] = []  # (session, method, params), in arrival order
        try:
            self.version = self.command("Browser.getVersion")["product"]
        except Exception:
            self.close()
            raise

    # -- the protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                data = os.read(self._from_browser, 1 << 16)
                if not data:
                    raise BrowserError(f"Chromium closed its pipe (exit status {self.proc.poll()}); "
                                       f"see {self.log.name}")
                self._buffer += data
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def command(self, method: str, session: str | None = None, timeout: float | None = None, **params) -> dict:
        """Send one command and return its result; the events that arrive meanwhile are kept."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error'].get('message')}")
                return m.get("result", {})
            if "method" in m:
                self.events.append((m.get("sessionId"), m["method"], m.get("params", {})))

    def new_page(self) -> "Page":
        return Page(self)

    def close(self):
        if self.proc.poll() is None:
            try:
                os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    """A tab: navigation, script evaluation, real mouse clicks and typing, screenshots, and the
    network and console events seen in it."""

    def __init__(self, browser: Browser):
        self.b = browser
        target = browser.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.command(f"{domain}.enable")
        self.command("Emulation.setDeviceMetricsOverride", width=browser.width, height=browser.height,
                     deviceScaleFactor=1, mobile=False)

    def command(self, method: str, **params) -> dict:
        return self.b.command(method, self.session, **params)

    def events(self, method: str) -> list[dict]:
        """The params of every event ``method`` seen in this tab so far."""
        return [p for s, m, p in self.b.events if s == self.session and m == method]

    def goto(self, url: str):
        self.command("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def eval(self, expression: str):
        """The value of a JavaScript expression (promises awaited)."""
        r = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0):
        """Poll ``expression`` until its value is truthy; return it."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.eval(expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def text(self, selector: str) -> str:
        return self.eval(f"document.querySelector({json.dumps(selector)}).textContent")

    def visible(self, selector: str) -> bool:
        return self.eval(f"(e => !!e && e.getClientRects().length > 0)(document.querySelector({json.dumps(selector)}))")

    def click(self, selector: str):
        """A real left click (mouse pressed and released) at the middle of the element."""
        box = self.eval(f"""(e => {{ if (!e) return null; e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})
            (document.querySelector({json.dumps(selector)}))""")
        if box is None:
            raise BrowserError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.command("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type(self, selector: str, text: str, clear: bool = True):
        """Focus the field with a click, empty it, and type ``text`` into it as keyboard input
        (``Input.insertText``: the input events a keyboard's typing fires)."""
        self.click(selector)
        if clear:
            self.eval(f"document.querySelector({json.dumps(selector)}).value = ''")
        self.command("Input.insertText", text=text)

    def screenshot(self, *paths):
        """The page as PNG, written to each of ``paths``; returns its bytes."""
        data = base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"])
        for p in paths:
            os.makedirs(os.path.dirname(os.fspath(p)) or ".", exist_ok=True)
            atomic_write_bytes(p, data)
        return data

    def close(self):
        self.b.command("Target.closeTarget", targetId=self.command("Target.getTargetInfo")["targetInfo"]["targetId"])
