"""The playground: a web page at ``GET /`` that talks to the server's own ``/v1`` API.

The page (``static/``: ``index.html``, ``playground.js``, ``playground.css``, ``favicon.svg``) ships
inside the package and needs no build step and nothing from another origin. It streams a
chat or a completion through ``POST /v1/chat/completions`` or ``/v1/completions`` with
``"stream": true`` (fetch reading the server-sent events), from the same origin as the page,
so neither the ``Host`` allow-list nor the absence of CORS stands in its way. The files are
read once, when the application is built, and served with a Content-Security-Policy that
allows scripts, styles and connections to this origin only (no inline script or style, no
frames, no form posts), ``X-Content-Type-Options: nosniff`` and no referrer.
"""
from __future__ import annotations

from importlib import resources

__all__ = ["ROUTES", "HEADERS", "load_files"]

# URL path -> (file in static/, Content-Type). A fixed table: no path from a request ever
# names a file.
ROUTES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground.css": ("playground.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def load_files() -> dict:
    """{URL path: (bytes, Content-Type)} of the playground's files, read from the package."""
    static = resources.files(__package__) / "static"
    return {path: ((static / name).read_bytes(), ctype) for path, (name, ctype) in ROUTES.items()}
