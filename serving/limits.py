"""Bounds on every client, enforced in the HTTP protocol: head size and time, body time, idle time, connections.

Why in the protocol rather than in the app or uvicorn's options: uvicorn 0.54 with httptools has no
header size limit (a 16 MB header got 200), no header or body timeout, no idle timeout before the
first request (150 silent connections stayed open 70 s+), and its `limit_concurrency` answers 503 to
*every* request once the count is reached, `/health` on an old keep-alive connection included. So
`bounded_protocol` subclasses uvicorn's httptools protocol (the fast one; h11's 16 KB head limit
would cost ~30 % of a single-row request) and adds, per connection:

- **idle**: `keep_alive_s` before the first request as well as between requests (uvicorn arms it
  only after a response);
- **head**: from a request's first byte, `header_timeout_s` until its last header (408) and at most
  `max_header_bytes` (431), counted on the bytes received, so an unfinished 25 MB head costs one
  read buffer, not 25 MB;
- **body**: `body_timeout_s` from the last header to the end of the body (408, then closed);
- **connections**: a connection accepted while `max_connections` are open is answered 503 on its
  first request and closed. Connections opened earlier are untouched, so `/health` on them answers.
- **h2c**: an `Upgrade: h2c` offer (`curl --http2`) made httptools stop at the head, so the POST
  body was lost (400) and a warning was logged per request; the offer is ignored and the request is
  answered in HTTP/1.1, which RFC 9110 §7.8 allows.

The refusals are `{"error_code", "message"}` JSON like the app's, with `Connection: close`, and are
never logged per request (a flood must not fill the log).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.config import ClientLimits

_H2C = re.compile(rb"(?im)^upgrade:(?=[ \t]*h2c)")
CODES = {408: "REQUEST_TIMEOUT", 431: "REQUEST_HEADER_FIELDS_TOO_LARGE", 503: "SERVICE_UNAVAILABLE"}


def refusal(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response that ends the connection."""
    body = orjson.dumps({"error_code": CODES.get(status, "ERROR"), "message": message})
    return b"".join([STATUS_LINE[status], b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body])


def refusing_app(status: int, message: str) -> Any:
    """An ASGI app that answers `status` and closes, for a request whose head is already parsed."""
    body = orjson.dumps({"error_code": CODES.get(status, "ERROR"), "message": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"connection", b"close")]

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of `limits` (set on the subclass `bounded_protocol` makes)."""

    limits = ClientLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over = len(self.connections) > self.limits.max_connections
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if b"h2c" in data:  # an HTTP/2 upgrade offer: answered in HTTP/1.1, as RFC 9110 allows
                data = _H2C.sub(b"x-ignored-upgrade:", data)
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._refuse_raw(431, f"request head larger than {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        head = self._head_bytes
        self._in_head, self._head_bytes = False, 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        refuse = None
        if self._over:
            refuse = refusing_app(503, f"server is at its connection limit ({self.limits.max_connections}); retry")
        elif head > self.limits.max_header_bytes and self._head_size() > self.limits.max_header_bytes:
            refuse = refusing_app(431, f"request head larger than {self.limits.max_header_bytes} bytes")
        if refuse is None:
            super().on_headers_complete()
        else:
            app, self.app = self.app, refuse
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True
        super().on_message_complete()

    def _idle(self) -> bool:
        """No response of this connection is under way (a refusal may be written raw)."""
        return self.cycle is None or self.cycle.response_complete

    def _refuse_raw(self, status: int, message: str) -> None:
        if self._idle():
            self.transport.write(refusal(status, message))
        self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse_raw(408, f"request head not complete within {self.limits.header_timeout_s:g} s")

    def _body_timeout(self) -> None:
        """The app is waiting for the rest of the body: it sees a disconnect; the client gets 408."""
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_complete:
            return
        started = cycle.response_started
        cycle.disconnected = True  # the app's receive() answers http.disconnect, its send() is dropped
        cycle.message_event.set()
        if not started:
            self.transport.write(refusal(408, f"request body not complete within {self.limits.body_timeout_s:g} s"))
        self.transport.close()


def bounded_protocol(limits: ClientLimits) -> type[BoundedProtocol]:
    """The protocol class (uvicorn `Config(http=…)`) for these limits."""
    return type("BoundedProtocol", (BoundedProtocol,), {"limits": limits})
