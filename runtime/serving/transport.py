"""uvicorn's HTTP protocol with the limits it lacks: header timeout, header size, and health
answered under connection pressure.

uvicorn bounds connections with ``limit_concurrency`` (past it every request gets 503),
closes idle keep-alive connections after ``timeout_keep_alive``, and bounds bodies through
flow control. It has no timeout for a connection that never finishes its request line and
headers (a fresh connection that sends nothing is held forever: 1,100 such connections
made every request, health included, answer 503), and the httptools parser accepts URLs and
header blocks of any size. ``GuardedHttpToolsProtocol`` adds:

- a header timeout: from connect (or from the end of the previous response) the request
  line and headers must arrive within ``header_timeout_s``, else the connection is closed;
- a bound on URL plus header bytes (``MAX_HEADER_BYTES``): past it, uvicorn's own
  invalid-request path answers 400 and closes;
- ``limit_concurrency`` is not applied to the health and metrics paths, so a probe is
  answered while the server is at its connection limit (the probe itself is cheap).

Everything else is uvicorn's own code path; the body timeout is in ``intake.py`` (ASGI).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)
EXEMPT_PATHS = frozenset({b"/v2/health/live", b"/v2/health/ready", b"/metrics"})
MAX_HEADER_BYTES = 64 << 10


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"header_timeout_s": header_timeout_s})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus a header timeout, a header size bound and probe exemption."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_header_bytes(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        if self.url.split(b"?", 1)[0] not in EXEMPT_PATHS:
            return super().on_headers_complete()
        limit, self.limit_concurrency = self.limit_concurrency, None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = limit

    def on_response_complete(self) -> None:
        waiting = not self.pipeline  # no queued request: the next one's headers are still to come
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._arm_header_timer()

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:  # httptools turns this into a parser error:
            raise ValueError("request line and headers too large")  # uvicorn answers 400, closes

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("closing %s: no complete request headers within %g s", self.client, self.header_timeout_s)
            self.transport.close()
