"""Read timeouts on both listeners: a request's line and headers, and its body, arrive in bounded time.

aiohttp's server closes idle keep-alive connections (``keepalive_timeout``) but has no bound on a
request that arrives slowly: a client sending its headers (or its body) a byte at a time holds a
connection, and a handler, for as long as it likes (slowloris). Two bounds close that:

- **headers**: a request's line and headers must arrive within ``header_s`` of its first byte (of
  the connection's opening, for its first request). :class:`ConnectionTracker` wraps each
  connection's protocol (aiohttp's ``RequestHandler``) to see the bytes arrive, and wraps the
  listener's request handler (:meth:`ConnectionTracker.track`, below the application: no middleware)
  to know when a request's headers are in (its handling starts) and when its answer is made. On
  expiry the connection is answered ``408`` (when part of a request came) and closed. A connection
  idle between requests is left to ``keepalive_timeout`` (:data:`KEEPALIVE_S`), so the client
  library's pooled connections keep working.
- **body**: :func:`optimizer.api.schemas.read_limited` reads a body within ``body_s``
  (:data:`~optimizer.api.keys.BODY_TIMEOUT` of the application), else raises
  :class:`~optimizer.api.schemas.BodyTimeout`, which the error middleware answers ``408`` and then
  closes the connection (see :func:`close_after`).

A body that no handler reads (a GET with a body) is read and dropped by aiohttp for at most its
``lingering_time`` (10 s). A partial request pipelined behind a complete one on the same
connection is bounded by ``keepalive_timeout`` rather than ``header_s``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from optimizer.api.keys import BODY_TIMEOUT
from optimizer.api.schemas import DEFAULT_BODY_TIMEOUT_S

log = structlog.get_logger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
KEEPALIVE_S = 75.0  # an idle keep-alive connection (longer than aiohttp's client keeps one: 15 s)


@dataclass(frozen=True)
class ReadTimeouts:
    """Seconds within which a request's line and headers (``header_s``) and its body (``body_s``) must arrive."""

    header_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_s: float = DEFAULT_BODY_TIMEOUT_S


class _State(Enum):
    AWAITING = "awaiting a request"  # the header clock runs
    IN_REQUEST = "in a request"  # headers in; the body is the handler's (read_limited)
    IDLE = "idle"  # between requests: keepalive_timeout's


def _timeout_answer(header_s: float) -> bytes:
    body = json.dumps({"error": f"request line and headers not received within {header_s:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Connection(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, the header clock around it."""

    def __init__(self, inner: RequestHandler, tracker: ConnectionTracker) -> None:
        self._inner = inner
        self._tracker = tracker
        self._transport: asyncio.Transport | None = None
        self._state = _State.AWAITING
        self._received = False  # bytes of the awaited request have come
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # the awaited request's line and headers are due by then (loop time)

    def _await_request(self, *, received: bool) -> None:
        # One timer per connection, not one per request: a keep-alive connection's requests only move the
        # deadline; the timer, when it fires early, sleeps on to the deadline in force.
        self._state = _State.AWAITING
        self._received = received
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._tracker.header_s
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if self._state is not _State.AWAITING or transport is None or transport.is_closing():
            return  # the next awaited request arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:  # a later request moved the deadline
            self._timer = loop.call_at(self._deadline, self._expired)
            return
        peer = transport.get_extra_info("peername")
        log.info("request_header_timeout", peer=str(peer), timeout_s=self._tracker.header_s,
                 partial=self._received)
        if self._received and transport.get_write_buffer_size() == 0:
            transport.write(_timeout_answer(self._tracker.header_s))
        transport.close()

    # -- the tracked request handler's calls -----------------------------------------------------------------

    def request_started(self) -> None:
        self._state = _State.IN_REQUEST  # the timer, if it fires meanwhile, does nothing

    def request_finished(self) -> None:
        self._state = _State.IDLE

    # -- asyncio.Protocol, passed on to aiohttp -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tracker.connections[self._inner] = self
        self._await_request(received=False)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.IDLE:
            self._await_request(received=True)
        elif self._state is _State.AWAITING:
            self._received = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # aiohttp's answer: the transport closes itself on end of file

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None
        self._tracker.connections.pop(self._inner, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionTracker:
    """The header clock of every connection of the listeners it serves (one per ``serve``)."""

    def __init__(self, header_s: float) -> None:
        self.header_s = header_s
        self.connections: dict[RequestHandler, _Connection] = {}

    def protocol_factory(self, runner: web.BaseRunner) -> Callable[[], asyncio.Protocol]:
        """The factory for ``loop.create_server``. ``runner.setup()`` must have run before the first connection."""

        def factory() -> asyncio.Protocol:
            server = runner.server
            assert server is not None, "serving starts after runner.setup()"
            return _Connection(server(), self)

        return factory

    def track(self, server: web.Server) -> None:
        """Wrap ``server``'s request handler (the runner's, after ``runner.setup()``, before it serves) to tell a
        request's connection when its headers are in and when its answer is made.

        Below the application rather than a middleware: the read API's hot routes run no middleware
        (aiohttp runs an application's middlewares on every route), yet keep the header clock.
        """
        inner = server.request_handler
        connections = self.connections

        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            conn = connections.get(request.protocol)
            if conn is None:  # not a connection of ours
                return await inner(request)
            conn.request_started()
            try:
                return await inner(request)
            finally:
                conn.request_finished()

        server.request_handler = tracked


def body_timeout(app: web.Application) -> float:
    """The seconds a request body has to arrive in, on this application (serve sets it from the config)."""
    return app.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT_S)


async def close_after(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send ``response`` now and close the connection: the rest of a timed-out body is not waited for."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response
