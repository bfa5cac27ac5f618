"""The client's keep-alive connections (``vlm_optimizer_client._http`` and the aiohttp sessions), against a fake
optimizer that counts the connections its requests come on (the peer's address and port).

What is proved: N polls and N reports of one object travel on one connection (both faces); a connection the
server closed while idle is replaced without a failure; a dropped reused connection is retried once for a poll,
and for a report only when the send itself failed; an unreachable optimizer still gives the safe batch size and
the same backoff. The same against the real optimizer: the server's tests/test_client_keepalive.py.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import random
import select
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from client_fakes import HOUR, FakeClock, closed_port, decision
from pytest_aiohttp import AiohttpServer

from vlm_optimizer_client import AsyncBatchSizeClient, AsyncReporter, BatchSizeClient, Reporter, telemetry
from vlm_optimizer_client._http import IDLE_MAX_S, KeepAlive
from vlm_optimizer_client.follow import _fetch_sync

N = 5


class MaxRandom(random.Random):
    """Full jitter at its upper bound, so that the bound itself shows."""

    def random(self) -> float:
        return 1.0


@dataclass
class Counting:
    """A fake optimizer: ``GET /batch-size`` and ``POST /reports``, each request recorded with the peer it
    came from. ``drop`` requests (counted from 1) are read and then left unanswered: the connection closes."""

    server: TestServer | None = None
    peers: list[tuple[str, tuple[str, int]]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    drop: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.server.host}:{self.server.port}"

    def connections(self, path: str | None = None) -> int:
        return len({peer for p, peer in self.peers if path is None or p == path})

    async def _record(self, request: web.Request) -> bool:
        assert request.transport is not None
        self.peers.append((request.path, request.transport.get_extra_info("peername")[:2]))
        if len(self.peers) in self.drop:
            request.transport.close()  # read, maybe processed, never answered
            return False
        return True

    async def poll(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if request.headers.get("If-None-Match") == 'W/"d4"':
            return web.Response(status=304, headers={"ETag": 'W/"d4"'})
        return web.json_response(decision(4), headers={"ETag": 'W/"d4"'})

    async def report(self, request: web.Request) -> web.StreamResponse:
        self.reports.append(await request.json())
        await self._record(request)
        return web.json_response(decision(4))


MakeCounting = Callable[..., Awaitable[Counting]]


@pytest.fixture
def make_counting(aiohttp_server: AiohttpServer) -> MakeCounting:
    async def make(**server_kwargs: Any) -> Counting:
        up = Counting()
        app = web.Application()
        app.router.add_get("/batch-size", up.poll)
        app.router.add_post("/reports", up.report)
        up.server = await aiohttp_server(app, **server_kwargs)
        return up

    return make


@pytest.fixture
async def counting(make_counting: MakeCounting) -> Counting:
    return await make_counting()


def kept_socket(http: KeepAlive) -> socket.socket:
    conn = http._conn
    assert conn is not None and conn.sock is not None
    sock: socket.socket = conn.sock
    return sock


async def server_closed(sock: socket.socket) -> None:
    """Until the server's close of an idle connection reaches the client's socket (it turns readable)."""
    readable, _, _ = await asyncio.to_thread(select.select, [sock], [], [], 10.0)
    assert readable, "the server did not close the idle connection"


# --------------------------------------------------------------------------- one connection per object


async def test_sync_polls_and_reports_each_reuse_one_connection(counting: Counting) -> None:
    client = BatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    reporter = Reporter("svc", url=counting.url, interval=HOUR, sink=client)
    for i in range(N):
        assert await asyncio.to_thread(client.poll_once) == 5.0
        reporter.report(4, peak_bytes=i)
        await asyncio.to_thread(reporter.flush)
    assert client.healthy and reporter.stats.sent == N
    assert len(counting.peers) == 2 * N
    assert counting.connections("/batch-size") == 1 and counting.connections("/reports") == 1
    assert client._http.opened == 1 and reporter._core.http.opened == 1

    await asyncio.to_thread(client.stop)
    await asyncio.to_thread(reporter.stop)
    assert client._http._conn is None and reporter._core.http._conn is None  # closed, not left to the GC
    await asyncio.to_thread(client.poll_once)  # a later poll opens a new one
    assert counting.connections("/batch-size") == 2
    client.close()


async def test_async_polls_and_reports_reuse_one_session_and_connection(counting: Counting) -> None:
    client = AsyncBatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    reporter = AsyncReporter("svc", url=counting.url, interval=HOUR, sink=client)
    sessions = set()
    for i in range(N):
        assert await client.poll_once() == 5.0
        reporter.report(4, peak_bytes=i)
        await reporter.flush()
        sessions |= {id(client._session), id(reporter._session)}
    assert client.healthy and reporter.stats.sent == N
    assert len(sessions) == 2  # one each, made at the first request
    assert counting.connections("/batch-size") == 1 and counting.connections("/reports") == 1

    session, rsession = client._session, reporter._session
    async with client:  # the context's exit closes the session
        pass
    await reporter.aclose()
    assert session.closed and rsession.closed and client._session is None and reporter._session is None


async def test_the_async_faces_without_aiohttp_keep_one_connection(counting: Counting,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm_optimizer_client import follow
    monkeypatch.setattr(follow, "_load_aiohttp", lambda: None)
    monkeypatch.setattr(telemetry, "_load_aiohttp", lambda: None)
    client = AsyncBatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    reporter = AsyncReporter("svc", url=counting.url, interval=HOUR)
    for _ in range(N):
        await client.poll_once()
        reporter.report(4)
        await reporter.flush()
    assert client.healthy and reporter.stats.sent == N
    assert counting.connections("/batch-size") == 1 and counting.connections("/reports") == 1
    await client.aclose()
    await reporter.aclose()
    assert client._http._conn is None and reporter._core.http._conn is None


# --------------------------------------------------------------------------- the server closes idle connections


async def test_a_connection_the_server_closed_is_replaced_without_a_failure(make_counting: MakeCounting,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    counting = await make_counting(keepalive_timeout=0.05)
    caplog.set_level(logging.DEBUG, "vlm_optimizer_client")
    client = BatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    reporter = Reporter("svc", url=counting.url, interval=HOUR)
    for round_ in range(1, 4):
        await asyncio.to_thread(client.poll_once)
        reporter.report(4)
        await asyncio.to_thread(reporter.flush)
        await server_closed(kept_socket(client._http))
        await server_closed(kept_socket(reporter._core.http))
        assert counting.connections("/batch-size") == round_ and counting.connections("/reports") == round_
    await asyncio.to_thread(client.poll_once)
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert client.healthy and client.consecutive_failures == 0
    assert reporter.stats.sent == 4 and reporter.stats.failed == 0 and reporter.stats.outages == 0
    assert counting.connections() == 8 and len(counting.peers) == 8  # each request once, none retried
    seen = [r.getMessage() for r in caplog.records if r.name == "vlm_optimizer_client"]
    assert sum("closed by the server; opening a new one" in m for m in seen) == 6  # seen before sending
    assert not any("again on a new one" in m for m in seen)  # so nothing had to be sent twice
    client.close()
    reporter.close()


async def both_closed(counting: Counting, *sessions: Any) -> None:
    """Until the server has closed its idle connections and each session's connector has seen it (the
    client's end got the close): the state each side keeps, checked, not a guess at a delay."""
    assert counting.server is not None and counting.server.runner is not None
    server = counting.server.runner.server
    assert server is not None

    def settled() -> bool:
        idle = [proto for s in sessions for conns in s.connector._conns.values() for proto, _ in conns]
        return not server.connections and not any(proto.is_connected() for proto in idle)

    async with asyncio.timeout(10):
        while not settled():
            await asyncio.sleep(0.01)


async def test_the_async_faces_reconnect_after_the_server_closed_idle(make_counting: MakeCounting) -> None:
    counting = await make_counting(keepalive_timeout=0.05)
    client = AsyncBatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    reporter = AsyncReporter("svc", url=counting.url, interval=HOUR)
    for round_ in range(1, 4):
        await client.poll_once()
        reporter.report(4)
        await reporter.flush()
        assert client.healthy and reporter.stats.failed == 0
        await both_closed(counting, client._session, reporter._session)
        assert counting.connections() == 2 * round_
    assert reporter.stats.sent == 3 and len(counting.peers) == 6
    await client.aclose()
    await reporter.aclose()


def http_conn(conn: object) -> object:
    return conn


def test_an_idle_connection_past_the_limit_is_not_reused() -> None:
    clock = FakeClock(0.0)
    http = KeepAlive("http://127.0.0.1:1", 1.0, clock=clock)

    class Conn:
        sock = socket.socket()

        def close(self) -> None:
            self.sock.close()

    conn = Conn()
    http._conn = conn  # type: ignore[assignment]
    http._idle_since = 0.0
    clock.advance(IDLE_MAX_S)
    fresh, reused = http._take()
    assert fresh is not http_conn(conn) and not reused and conn.sock.fileno() == -1  # the old one closed


# --------------------------------------------------------------------------- dropped reused connections


async def test_a_poll_on_a_dropped_connection_is_retried_once(counting: Counting) -> None:
    counting.drop = {2}  # the second poll is read, then the connection closes without an answer
    client = BatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0))
    for _ in range(3):
        assert await asyncio.to_thread(client.poll_once) == 5.0
    assert client.healthy and client.consecutive_failures == 0
    assert len(counting.peers) == 4 and counting.connections() == 2  # the dropped one again, on a new one
    client.close()


async def test_a_poll_dropped_twice_is_one_failure(counting: Counting) -> None:
    counting.drop = {2, 3}
    client = BatchSizeClient("svc", url=counting.url, clock=FakeClock(0.0), rng=MaxRandom())
    await asyncio.to_thread(client.poll_once)
    assert await asyncio.to_thread(client.poll_once) == 1.0  # the backoff's first step
    assert client.consecutive_failures == 1 and client.batch_size == 4  # the fresh value kept
    assert len(counting.peers) == 3  # retried once, not more
    client.close()


async def test_a_report_that_may_have_been_taken_is_not_sent_again_at_once(counting: Counting) -> None:
    counting.drop = {2}  # the second report reaches the optimizer, which closes without answering
    reporter = Reporter("svc", url=counting.url, interval=HOUR)
    reporter.report(4, peak_bytes=1)
    await asyncio.to_thread(reporter.flush)
    reporter.report(4, peak_bytes=2)
    await asyncio.to_thread(reporter.flush)
    assert [r["peak_bytes"] for r in counting.reports] == [1, 2]  # not twice
    assert reporter.stats.failed == 1 and reporter.stats.pending == 1  # kept for the next cycle, as before
    await asyncio.to_thread(reporter.flush)
    assert [r["peak_bytes"] for r in counting.reports] == [1, 2, 2] and reporter.stats.sent == 2
    reporter.close()


async def test_the_async_reporter_does_not_resend_at_once_either(counting: Counting) -> None:
    counting.drop = {2}
    reporter = AsyncReporter("svc", url=counting.url, interval=HOUR)
    for peak in (1, 2):
        reporter.report(4, peak_bytes=peak)
        await reporter.flush()
    assert [r["peak_bytes"] for r in counting.reports] == [1, 2]
    assert reporter.stats.failed == 1 and reporter.stats.pending == 1
    await reporter.flush()
    assert reporter.stats.sent == 2
    await reporter.aclose()


class FailingSend(http.client.HTTPConnection):
    """A real connection whose next send fails (``fail``): a server that closed it while the request went out."""

    fail: list[BaseException] = []

    def send(self, data: Any) -> None:
        if FailingSend.fail:
            raise FailingSend.fail.pop(0)
        super().send(data)


@pytest.mark.parametrize("error", [BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")])
async def test_a_report_whose_send_failed_is_sent_again_on_a_new_connection(counting: Counting,
                                                                            error: OSError) -> None:
    reporter = Reporter("svc", url=counting.url, interval=HOUR)
    reporter._core.http._factory = FailingSend
    reporter.report(4, peak_bytes=1)
    await asyncio.to_thread(reporter.flush)
    FailingSend.fail = [error]  # on the reused connection: the report never left
    reporter.report(4, peak_bytes=2)
    await asyncio.to_thread(reporter.flush)
    assert [r["peak_bytes"] for r in counting.reports] == [1, 2]
    assert reporter.stats.sent == 2 and reporter.stats.failed == 0
    assert counting.connections() == 2
    reporter.close()


async def test_a_failed_send_on_a_new_connection_is_not_retried(counting: Counting) -> None:
    reporter = Reporter("svc", url=counting.url, interval=HOUR)
    reporter._core.http._factory = FailingSend
    FailingSend.fail = [BrokenPipeError(32, "Broken pipe")]  # the very first send: nothing to blame on reuse
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.failed == 1 and counting.reports == []
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.sent == 1
    reporter.close()


# --------------------------------------------------------------------------- unreachable: fallback and backoff


async def test_a_kept_connection_to_an_optimizer_that_went_away_falls_back_and_backs_off(
        counting: Counting) -> None:
    clock = FakeClock(0.0)
    client = BatchSizeClient("svc", url=counting.url, clock=clock, rng=MaxRandom(), max_staleness=60.0)
    reporter = Reporter("svc", url=counting.url, interval=HOUR)
    await asyncio.to_thread(client.poll_once)
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert counting.server is not None
    await counting.server.close()  # the optimizer goes away; both connections were kept
    delays = [await asyncio.to_thread(client.poll_once) for _ in range(4)]
    assert delays == [1.0, 2.0, 4.0, 8.0]  # the same backoff as with a connection per poll
    assert client.batch_size == 4 and client.consecutive_failures == 4
    clock.advance(60)
    assert client.batch_size == 1  # the safe batch size
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.failed == 1 and reporter.stats.pending == 1 and reporter.stats.outages == 1
    assert client.last_error is not None and "Connection refused" in client.last_error
    client.close()
    reporter.close()


async def test_an_unreachable_optimizer_async(counting: Counting) -> None:
    client = AsyncBatchSizeClient("svc", url=f"http://127.0.0.1:{closed_port()}", clock=FakeClock(0.0),
                                  rng=MaxRandom())
    assert [await client.poll_once() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert client.batch_size == 1
    await client.aclose()


async def test_close_during_a_request_in_flight_does_not_wait_for_it(aiohttp_server: AiohttpServer) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def stalled(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response(decision(4))

    app = web.Application()
    app.router.add_get("/batch-size", stalled)
    server = await aiohttp_server(app)
    client = AsyncBatchSizeClient("svc", url=f"http://{server.host}:{server.port}", clock=FakeClock(0.0))
    http = client._http
    in_flight = asyncio.ensure_future(asyncio.to_thread(_fetch_sync, http, client.url, None))
    await asyncio.wait_for(arrived.wait(), 10)
    http.close()  # on the event loop, while the worker thread holds the connection: returns at once
    assert http._conn is not None  # still the request's
    release.set()
    status, _, _ = await asyncio.wait_for(in_flight, 10)
    assert status == 200 and http._conn is None  # closed by the request as it ended
