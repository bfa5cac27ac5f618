"""The client library's keep-alive connections against the real optimizer (``build_app``) on an ephemeral port.
(The same rules against a fake that drops connections on cue: client/tests/test_client_keepalive.py.)

Every answered request is recorded with the peer (address, port) it came from, so the number of TCP
connections a client used is the number of distinct peers. The sync faces block in ``http.client``, so
their calls run in a worker thread while the server answers on the test's event loop.
"""

from __future__ import annotations

import asyncio
import select
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, no_sleep
from vlm_optimizer_client import AsyncBatchSizeClient, AsyncReporter, BatchSizeClient, Reporter

N = 8
HOUR = 3600.0


@dataclass
class Optimizer:
    server: TestServer
    seen: list[tuple[str, int, tuple[str, int]]] = field(default_factory=list)  # (path, status, peer)

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def connections(self, path: str) -> int:
        return len({peer for p, _, peer in self.seen if p == path})

    def statuses(self, path: str) -> list[int]:
        return [status for p, status, _ in self.seen if p == path]


async def start(aiohttp_server: AiohttpServer, **server_kwargs: Any) -> Optimizer:
    engine = Engine(Settings())
    sampler = Sampler(ScriptedBackend(1), engine, clock=FakeClock(), sleep=no_sleep)
    app = build_app(engine, sampler, run_sampler=False)
    seen: list[tuple[str, int, tuple[str, int]]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        assert request.transport is not None
        seen.append((request.path, response.status, request.transport.get_extra_info("peername")[:2]))

    app.on_response_prepare.append(record)
    server = await aiohttp_server(app, **server_kwargs)
    await sampler.tick()
    return Optimizer(server, seen)


@pytest.fixture
async def optimizer(aiohttp_server: AiohttpServer) -> Optimizer:
    return await start(aiohttp_server)


async def test_the_sync_faces_poll_and_report_over_one_connection_each(optimizer: Optimizer) -> None:
    client = BatchSizeClient("svc-a", url=optimizer.url, clock=FakeClock(0.0))
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    for _ in range(N):
        assert await asyncio.to_thread(client.poll_once) == 5.0
        reporter.report(4, peak_bytes=1 << 30)
        await asyncio.to_thread(reporter.flush)
    assert optimizer.statuses("/batch-size") == [200] + [304] * (N - 1)  # If-None-Match on a kept connection
    assert optimizer.statuses("/reports") == [200] * N and reporter.stats.sent == N
    assert optimizer.connections("/batch-size") == 1 and optimizer.connections("/reports") == 1
    await asyncio.to_thread(client.close)
    await asyncio.to_thread(reporter.close)


async def test_the_threads_keep_one_connection_while_they_run(optimizer: Optimizer) -> None:
    polled = asyncio.Event()
    loop = asyncio.get_running_loop()
    changes: list[int] = []

    def on_change(batch: int, decision: dict[str, Any]) -> None:
        changes.append(batch)
        loop.call_soon_threadsafe(polled.set)

    client = BatchSizeClient("svc-a", url=optimizer.url, interval=HOUR, on_change=on_change)
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR, sink=client)
    with client:
        await asyncio.wait_for(polled.wait(), 10)
        for _ in range(N):
            reporter.report(4, oom=False)
            await asyncio.to_thread(reporter.flush)
            await asyncio.to_thread(client.poll_once)  # from another thread than the poller's: the lock's
    await asyncio.to_thread(reporter.stop)
    assert len(optimizer.statuses("/batch-size")) == N + 1
    assert optimizer.connections("/batch-size") == 1 and optimizer.connections("/reports") == 1


async def test_the_async_faces_poll_and_report_over_one_session_each(optimizer: Optimizer) -> None:
    client = AsyncBatchSizeClient("svc-a", url=optimizer.url, clock=FakeClock(0.0))
    reporter = AsyncReporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    for _ in range(N):
        assert await client.poll_once() == 5.0
        reporter.report(4, peak_bytes=1 << 30)
        await reporter.flush()
    session = client._session
    assert optimizer.statuses("/batch-size") == [200] + [304] * (N - 1)
    assert reporter.stats.sent == N
    assert optimizer.connections("/batch-size") == 1 and optimizer.connections("/reports") == 1
    await client.aclose()
    await reporter.aclose()
    assert session is not None and session.closed


async def test_an_optimizer_closing_idle_connections_costs_no_failure(aiohttp_server: AiohttpServer) -> None:
    optimizer = await start(aiohttp_server, keepalive_timeout=0.05)
    client = BatchSizeClient("svc-a", url=optimizer.url, clock=FakeClock(0.0))
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    for _ in range(3):
        await asyncio.to_thread(client.poll_once)
        reporter.report(4)
        await asyncio.to_thread(reporter.flush)
        for http in (client._http, reporter._core.http):  # until the optimizer's close reached the client
            assert http._conn is not None
            sock: socket.socket | None = http._conn.sock
            assert sock is not None
            readable, _, _ = await asyncio.to_thread(select.select, [sock], [], [], 10.0)
            assert readable
    assert client.healthy and client.consecutive_failures == 0
    assert reporter.stats.sent == 3 and reporter.stats.failed == 0
    assert optimizer.connections("/batch-size") == 3 and optimizer.connections("/reports") == 3
    assert len(optimizer.seen) == 6  # nothing sent twice
    client.close()
    reporter.close()
