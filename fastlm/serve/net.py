"""The server's connections: how many, how long each may take, which names the server answers
to, and streams that drop a client who stops reading.

uvicorn's HTTP/1.1 protocol (h11) is extended, not replaced (``protocol_class``):

- **Connection limit.** Past ``max_connections`` open connections a new one is answered
  ``503`` with ``Retry-After`` and closed before anything of it is read.
- **Header deadline.** A connection must deliver a request's headers within
  ``header_timeout`` seconds of opening, or of the end of its previous response; one that
  sends nothing, or dribbles its headers a byte at a time (slowloris), is closed. uvicorn's
  keep-alive timeout (``idle_timeout``) closes a connection idle between requests sooner.
- **Send buffer.** Each socket's send buffer is set to ``send_buffer_bytes``, so what waits in
  the kernel for a client that does not read is bounded and such a client is noticed soon.
- **Abort.** Each request's ASGI scope carries ``scope["extensions"]["fastlm.abort"]``, a
  function that drops its connection at once with a reset (what is buffered for it, here and
  in the kernel, is discarded): the application calls it for a client that stopped reading.

The body deadline is the application's (it reads the body against ``body_timeout``), and so
is the send deadline of a stream (``DeadlineStreamingResponse``). ``HostCheck`` refuses
requests whose ``Host`` header names a host not allowed (DNS rebinding: a web page whose
name resolves to 127.0.0.1 reaches a loopback server under its own name).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct

from starlette.responses import StreamingResponse

__all__ = ["LOOPBACK_NAMES", "is_loopback", "host_name", "HostCheck", "protocol_class", "DeadlineStreamingResponse"]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n")


def is_loopback(host: str) -> bool:
    """Whether the bind address ``host`` reaches only this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name of a ``Host`` header, lower case, without its port (``[::1]:8000`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _allows(allowed: tuple, name: str) -> bool:
    for a in allowed:
        if a == "*" or a == name or (a.startswith("*.") and name.endswith(a[1:])):
            return True
    return False


def _error_body(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


class HostCheck:
    """ASGI middleware: a request whose ``Host`` is not in ``allowed`` (names, ``*.suffix``
    patterns, or ``*`` for any) gets 400 ``invalid_host``; ``on_reject(status)`` is told."""

    def __init__(self, app, allowed: tuple, on_reject=None):
        self.app = app
        self.allowed = tuple(a.lower() for a in allowed)
        self.any = "*" in self.allowed
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.any:
            host = None
            for k, v in scope["headers"]:
                if k == b"host":
                    host = v.decode("latin-1")
                    break
            if host is None or not _allows(self.allowed, host_name(host)):
                body = _error_body(400, f"Host {host!r} is not allowed: this server answers to "
                                        f"{', '.join(self.allowed)} (widen with --allowed-hosts)", "invalid_host")
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                if self.on_reject is not None:
                    self.on_reject(400)
                return
        await self.app(scope, receive, send)


def protocol_class(max_connections: int, header_timeout: float, send_buffer_bytes: int | None = None):
    """uvicorn's h11 protocol with a connection limit, a header deadline and an abort hook;
    ``send_buffer_bytes`` sets each socket's send buffer (SO_SNDBUF), the kernel's copy of
    what a client has not read yet, which otherwise grows to megabytes a connection."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._header_timer = None
            self._waiting_cycle = None
            app = self.app

            async def app_with_abort(scope, receive, send):
                scope["extensions"] = {**(scope.get("extensions") or {}), "fastlm.abort": self.abort}
                await app(scope, receive, send)

            self.app = app_with_abort

        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if send_buffer_bytes and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
            if len(self.connections) > max_connections:
                body = _error_body(503, f"too many connections (at most {max_connections}); retry later",
                                   "too_many_connections")
                transport.write(_BUSY % len(body) + body)
                transport.close()
                return
            self._arm()

        def _arm(self):
            """Start the header deadline: the next request's headers must arrive in time."""
            self._disarm()
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self):
            self._header_timer = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self):
            super().handle_events()
            if self._header_timer is not None and self.cycle is not self._waiting_cycle:
                self._disarm()  # a request's headers arrived

        def on_response_complete(self):
            if not self.transport.is_closing():
                self._arm()  # before the base class starts a pipelined request, which disarms it
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def abort(self):
            """Drop the connection now, with a reset: what waits unsent for the client, in this
            process and in the kernel, is discarded at once. The request in progress sees a
            disconnect."""
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.flow.resume_writing()  # a send waiting for the client to read returns
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:  # linger 0: closing sends a reset instead of keeping the unsent bytes to deliver
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.transport.abort()

    return Protocol


class DeadlineStreamingResponse(StreamingResponse):
    """A streaming response whose every write must complete within ``send_timeout`` seconds:
    a client that stops reading fills the socket's buffers, the write waits, and past the
    deadline ``on_stall()`` is called (it frees the request's rows and drops the connection)
    and the response ends."""

    def __init__(self, content, send_timeout: float, on_stall, **kwargs):
        super().__init__(content, **kwargs)
        self.send_timeout, self.on_stall = send_timeout, on_stall

    async def stream_response(self, send):
        async def timed(message) -> bool:
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
                return True
            except asyncio.TimeoutError:
                self.on_stall()
                return False

        if not await timed({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}):
            return
        try:
            async for chunk in self.body_iterator:
                if not isinstance(chunk, (bytes, memoryview)):
                    chunk = chunk.encode(self.charset)
                if not await timed({"type": "http.response.body", "body": chunk, "more_body": True}):
                    return
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        await timed({"type": "http.response.body", "body": b"", "more_body": False})
