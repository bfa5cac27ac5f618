"""The standard library's keep-alive transport: one persistent HTTP/1.1 connection per client object.

Each :class:`~vlm_optimizer_client.follow.BatchSizeClient` and :class:`~vlm_optimizer_client.telemetry.Reporter`
(and the async faces without aiohttp, in a worker thread) holds one :class:`KeepAlive`, so its polls or
reports reuse one TCP connection instead of opening one per request. What it does, in order:

- **Before reusing an idle connection** it drops it (and opens a fresh one, which is no retry) when the
  connection has been idle for :data:`IDLE_MAX_S` (60 s: below the optimizer's 75 s ``keepalive_timeout``,
  so the client gives up an idle connection before the server does) or when the socket is readable while
  idle: the server closed it (a FIN or a reset) or sent something unasked.
- **A dropped reused connection** (the server closed it while the request went out:
  :class:`ConnectionError`, which covers ``RemoteDisconnected``, ``BrokenPipeError`` and
  ``ConnectionResetError``) is retried once on a fresh connection, under this rule: an idempotent request
  (``GET /batch-size``) always; a non-idempotent one (``POST /reports``) only when the failure came while
  sending it. A request whose send failed never reached the server whole (``http.client`` sends the line
  and headers, then the body, each with ``sendall``, which fails only before its last bytes left; the
  optimizer reads a report's whole ``Content-Length`` body before it acts on it), so it cannot have been
  processed. This is what a server's close shows as, when the headers went out and the close's reset came
  back before the body: ``BrokenPipeError`` on the body. A failure after the send (no answer, a reset
  while reading) is ambiguous: the optimizer may have taken the report and died before answering, and an
  OOM report taken twice would lower the batch twice. Such a report is a failed send, as any other: the
  reporter keeps it and sends it with the next cycle (what it did before, with a connection per request).
  This is aiohttp's client rule for idempotent methods, plus the one case where a POST is provably unsent.
- **A fresh connection is never retried**: a refused connection, a timeout or an error on it goes to the
  caller, whose fallback and backoff are unchanged.
- **After any other error** (a timeout, a bad status line, an answer over the size limit) the connection
  is closed, since its state is unknown; the next request opens a new one.

Thread-safe: one lock per connection serializes the requests of one object (a poll from the polling
thread and one from ``poll_once`` in another thread, a flush and the sending thread). Fork-safe: a child
process does not reuse its parent's socket. No proxy, as before (urllib ran with an empty ``ProxyHandler``).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Final

log = logging.getLogger("vlm_optimizer_client")

IDLE_MAX_S: Final = 60.0  # an idle connection older than this is not reused (the optimizer keeps one 75 s)

Clock = Callable[[], float]


class LoopSession:
    """One client object's aiohttp session (aiohttp is optional: typed ``Any``), bound to the loop it was
    made on. A service may use the object from one ``asyncio.run``, then another: a session left by a
    loop that has gone is dropped (detached: that loop can no longer close its socket) and a new one made
    on the running loop."""

    def __init__(self) -> None:
        self.session: Any = None  # aiohttp.ClientSession, made at the first request
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self, make: Callable[[], Any]) -> Any:
        """The session on the running loop, made by ``make`` when there is none (or none on this loop)."""
        loop = asyncio.get_running_loop()
        session = self.session
        if session is not None and (session.closed or self._loop is not loop):
            if not session.closed:
                session.detach()
            session = None
        if session is None:
            session = make()
            self.session, self._loop = session, loop
        return session

    async def close(self) -> None:
        """Close the session: on its own loop; detached on another (nothing can close its socket now)."""
        session, loop = self.session, self._loop
        self.session, self._loop = None, None
        if session is None or session.closed:
            return
        if loop is asyncio.get_running_loop():
            await session.close()
        else:
            session.detach()


class KeepAlive:
    """One persistent connection to the origin of ``base_url`` (``http`` or ``https``), reused by one object.

    ``timeout`` (seconds) bounds the connection and each socket operation, as urllib's did.
    ``opened`` counts the connections made (a test's and a benchmark's view of the reuse).
    """

    def __init__(self, base_url: str, timeout: float, *, clock: Clock = time.monotonic,
                 connection: Callable[..., http.client.HTTPConnection] | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._timeout = timeout
        self._clock = clock
        self._factory = connection or (http.client.HTTPSConnection if self._https else http.client.HTTPConnection)
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._idle_since = 0.0
        self._pid = os.getpid()
        self._close_after = False  # close() came while a request was in flight
        self.opened = 0

    def request(self, method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str],
                limit: int, idempotent: bool) -> tuple[int, dict[str, str], bytes, bool]:
        """Send one request to ``url`` (absolute, on this origin) and read its answer.

        Returns (status, headers, body, over): at most ``limit`` bytes of the body, ``over`` when there were
        more (the connection is then closed). Every HTTP status is an answer. Raises :class:`OSError`
        (refused, reset, timed out) or :class:`http.client.HTTPException` when no answer came.
        """
        parts = urllib.parse.urlsplit(url)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        with self._lock:
            try:
                return self._request(method, target, parts.path, body, headers, limit, idempotent)
            finally:
                if self._close_after:
                    self._close_after = False
                    self._drop()

    def _request(self, method: str, target: str, path: str, body: bytes | None, headers: Mapping[str, str],
                 limit: int, idempotent: bool) -> tuple[int, dict[str, str], bytes, bool]:
        """One exchange, and at most one retry on a fresh connection (the module's rule)."""
        conn, reused = self._take()
        try:
            return self._exchange(conn, method, target, body, headers, limit)
        except _Unsent as unsent:
            self._drop()
            if not (reused and isinstance(unsent.error, ConnectionError)):
                raise unsent.error from None
            log.debug("the kept connection to %s was closed before %s %s went out (%s); again on a new one",
                      self._host, method, path, unsent.error)
        except ConnectionError as exc:  # RemoteDisconnected, ConnectionResetError while reading
            self._drop()
            if not (reused and idempotent):
                raise
            log.debug("the kept connection to %s was closed during %s %s (%s); again on a new one",
                      self._host, method, path, exc)
        except BaseException:
            self._drop()
            raise
        conn, _ = self._take()
        try:
            return self._exchange(conn, method, target, body, headers, limit)
        except _Unsent as unsent:
            self._drop()
            raise unsent.error from None
        except BaseException:
            self._drop()
            raise

    def close(self) -> None:
        """Close the kept connection, if any; the next request opens a new one. Never waits: with a
        request in flight (a stop that did not wait for it), that request closes it when it ends."""
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()
        else:
            self._close_after = True

    def __del__(self) -> None:  # an object dropped without close(): no socket left to the garbage collector
        conn = self.__dict__.get("_conn")
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    # ------------------------------------------------------------------ internals (under the lock)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """The connection to use and whether it is a reused one (it carried a request before)."""
        conn = self._conn
        if conn is not None and os.getpid() != self._pid:  # a forked child: the socket is the parent's
            self._conn, conn, self._pid = None, None, os.getpid()
        if conn is not None and conn.sock is not None:
            idle = self._clock() - self._idle_since
            if idle < IDLE_MAX_S and not _readable(conn.sock):
                return conn, True
            log.debug("the kept connection to %s is %s; opening a new one", self._host,
                      "too old" if idle >= IDLE_MAX_S else "closed by the server")
            self._drop()
        if self._conn is None:
            self._conn = self._factory(self._host, self._port, timeout=self._timeout)
        return self._conn, False  # no socket: connects on the request

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str, body: bytes | None,
                  headers: Mapping[str, str], limit: int) -> tuple[int, dict[str, str], bytes, bool]:
        if conn.sock is None:
            self.opened += 1
        try:
            conn.request(method, target, body=body, headers=dict(headers))
        except Exception as exc:
            raise _Unsent(exc) from exc
        resp = conn.getresponse()
        data = resp.read(limit + 1)
        over = len(data) > limit
        if over or not resp.isclosed():  # more than we read: the connection's state is unknown
            self._drop()
        elif conn.sock is None:  # the server said Connection: close (http.client closed it)
            self._conn = None
        self._idle_since = self._clock()
        return int(resp.status), dict(resp.getheaders()), data[:limit], over

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


class _Unsent(Exception):
    """The request failed while it was being sent: it did not reach the server whole."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _readable(sock: socket.socket) -> bool:
    """Whether an idle socket has something to read (the server closed it, or sent unasked). Never blocks."""
    try:
        if hasattr(select, "poll"):  # select.select fails for descriptors past 1023
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # a socket that cannot be polled is not one to reuse
