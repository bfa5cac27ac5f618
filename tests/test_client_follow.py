"""The batch-size follower (``vlm_optimizer_client.follow``) against a real optimizer on an ephemeral port.
(The follower on its own, against fakes or nothing: client/tests/test_client_follow.py.)

The optimizer is the real application (``build_app``) over a scripted backend; the tests drive its
sampler by hand (``await opt.tick()``) and change its decisions through the engine. The client's
clock is a second fake clock, so staleness and outage durations move only when a test says so.
The sync client blocks in urllib, so its polls run in a worker thread (``asyncio.to_thread``) while
the server answers on the test's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from client_fakes import Calls, MaxRandom, poll, records, sync_client
from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, no_sleep, uuid_of
from vlm_optimizer_client import AsyncBatchSizeClient, BatchSizeClient, follow
from vlm_optimizer_client import _follower

GIB = 1024**3
INTERVAL = Settings().monitoring_interval  # 5 s
DEFAULT_BATCH = 4  # the default profile's batch before any optimization
LOGGER = "vlm_optimizer_client"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the optimizer under test


@dataclass
class Seen:
    """One request the optimizer answered: its path, status, and the headers of interest it carried."""

    path: str
    status: int
    if_none_match: str | None
    user_agent: str | None


@dataclass
class Optimizer:
    server: TestServer
    engine: Engine
    sampler: Sampler
    backend: ScriptedBackend
    clock: FakeClock
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    async def tick(self, advance: float = INTERVAL) -> None:
        if self.sampler.stats.samples:
            self.clock.advance(advance)
        assert await self.sampler.tick() is not None

    def polls(self) -> list[Seen]:
        return [s for s in self.seen if s.path == "/batch-size"]


class MakeOptimizer(Protocol):
    def __call__(self, *, port: int | None = None, engine: Engine | None = None,
                 backend: ScriptedBackend | None = None) -> Awaitable[Optimizer]: ...


def recorded_app(engine: Engine, sampler: Sampler, seen: list[Seen]) -> web.Application:
    app = build_app(engine, sampler, run_sampler=False)

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(Seen(request.path, response.status, request.headers.get("If-None-Match"),
                         request.headers.get("User-Agent")))

    app.on_response_prepare.append(record)
    return app


@pytest.fixture
def make_optimizer(aiohttp_server: AiohttpServer) -> MakeOptimizer:
    async def make(*, port: int | None = None, engine: Engine | None = None,
                   backend: ScriptedBackend | None = None) -> Optimizer:
        clock = FakeClock()
        backend = backend or ScriptedBackend(1)
        engine = engine or Engine(Settings())
        sampler = Sampler(backend, engine, clock=clock, sleep=no_sleep)
        seen: list[Seen] = []
        server = await aiohttp_server(recorded_app(engine, sampler, seen), port=port)
        opt = Optimizer(server, engine, sampler, backend, clock, seen)
        await opt.tick()
        return opt

    return make


@pytest.fixture
async def opt(make_optimizer: MakeOptimizer) -> Optimizer:
    return await make_optimizer()


# --------------------------------------------------------------------------- following the value


async def test_value_changes_propagate(opt: Optimizer) -> None:
    calls = Calls()
    client = sync_client(opt.url, calls)
    assert client.batch_size == 1 and client.decision is None and client.cleanup_epoch is None
    assert client.healthy

    delay = await poll(client)
    assert delay == 5.0  # the interval
    assert client.batch_size == DEFAULT_BATCH
    assert calls.values == [DEFAULT_BATCH]  # from the safe size to the optimizer's
    decision = client.decision
    assert decision is not None and decision["service"] == "svc-a" and decision["gpu"]["uuid"] == uuid_of(0)
    assert calls.changes[0][1] == decision
    assert client.cleanup_epoch == 0 and client.last_status == 200 and client.healthy

    opt.engine.set_override("svc-a", None, 9, None, opt.clock())
    await poll(client)
    assert client.batch_size == 9
    assert calls.values == [DEFAULT_BATCH, 9]  # once per change
    assert calls.changes[-1][1]["batch_size"] == 9
    assert [s.status for s in opt.polls()] == [200, 200]


async def test_unchanged_decision_answers_304(opt: Optimizer) -> None:
    calls = Calls()
    clock = FakeClock(0.0)
    client = sync_client(opt.url, calls, clock=clock, max_staleness=60.0)
    await poll(client)
    etag = client.etag
    assert etag is not None and etag.startswith('W/"')

    clock.advance(50)
    opt.backend.used[0] = 21 * GIB  # the memory figures move; the decision does not
    await opt.tick()
    await poll(client)
    first, second = opt.polls()
    assert (first.status, first.if_none_match) == (200, None)
    assert (second.status, second.if_none_match) == (304, etag)  # seen by the server
    assert client.last_status == 304 and client.batch_size == DEFAULT_BATCH
    assert calls.values == [DEFAULT_BATCH]  # no change, no call

    clock.advance(50)  # 100 s after the body, 50 s after the 304: the 304 refreshed it
    assert client.batch_size == DEFAULT_BATCH and client.healthy


async def test_a_400_of_the_optimizer_is_a_failure(opt: Optimizer, caplog: pytest.LogCaptureFixture) -> None:
    client = sync_client(opt.url, gpu=5)  # the host has one GPU
    caplog.set_level(logging.DEBUG, LOGGER)
    await poll(client)
    assert opt.polls()[0].status == 400
    assert client.last_status == 400 and not client.healthy and client.consecutive_failures == 1
    assert client.batch_size == 1
    assert client.last_error is not None and "HTTP 400" in client.last_error and "no GPU 5" in client.last_error
    [warning] = records(caplog, logging.WARNING)
    assert "no GPU 5" in warning.getMessage()


# --------------------------------------------------------------------------- outages


async def test_outage_keeps_the_value_while_fresh_then_falls_back_and_recovers(
        make_optimizer: MakeOptimizer, caplog: pytest.LogCaptureFixture) -> None:
    opt = await make_optimizer()
    calls = Calls()
    clock = FakeClock(0.0)
    client = sync_client(opt.url, calls, clock=clock, max_staleness=60.0, rng=MaxRandom())
    caplog.set_level(logging.DEBUG, LOGGER)
    await poll(client)
    assert client.batch_size == DEFAULT_BATCH
    url, port = opt.url, opt.server.port
    await opt.server.close()  # the optimizer goes away

    delays = []
    for _ in range(3):
        clock.advance(10)
        delays.append(await poll(client))
    assert delays == [1.0, 2.0, 4.0]
    assert client.last_status is None and client.last_error is not None
    assert not client.healthy and client.consecutive_failures == 3
    assert client.batch_size == DEFAULT_BATCH  # 30 s old: still fresh
    assert calls.values == [DEFAULT_BATCH]
    [warning] = records(caplog, logging.WARNING)
    assert url in warning.getMessage() and "keeping batch size 4 for 50 s more" in warning.getMessage()
    assert "Connection refused" in warning.getMessage()

    clock.advance(25)  # 55 s old
    assert await poll(client) == pytest.approx(5.0)  # backoff says 8; the value expires in 5
    assert client.batch_size == DEFAULT_BATCH
    clock.advance(5)  # 60 s old
    assert client.batch_size == 1  # reading needs no poll
    await poll(client)
    assert calls.values == [DEFAULT_BATCH, 1]  # told once, at the expiry
    assert calls.changes[-1][1]["batch_size"] == DEFAULT_BATCH  # with the last (stale) decision
    clock.advance(30)
    for _ in range(4):
        await poll(client)
    assert calls.values == [DEFAULT_BATCH, 1]
    assert len(records(caplog, logging.WARNING)) == 1  # once per outage, not per poll
    assert len(records(caplog, logging.INFO, "falling back")) == 1

    # The optimizer comes back on the same address, with the same state.
    back = await make_optimizer(port=port, engine=opt.engine)
    assert back.url == url
    assert await poll(client) == 5.0
    assert client.healthy and client.consecutive_failures == 0 and client.last_error is None
    assert client.batch_size == DEFAULT_BATCH
    assert calls.values == [DEFAULT_BATCH, 1, DEFAULT_BATCH]
    [recovered] = records(caplog, logging.INFO, "answers again")
    assert "after 80.0 s" in recovered.getMessage() and "9 failed polls" in recovered.getMessage()
    assert len(records(caplog, logging.WARNING)) == 1

    # A second outage is a second warning.
    await back.server.close()
    await poll(client)
    assert len(records(caplog, logging.WARNING)) == 2


# --------------------------------------------------------------------------- cleanup epochs


async def test_cleanup_epoch_rises_call_on_cleanup(make_optimizer: MakeOptimizer) -> None:
    opt = await make_optimizer()
    calls = Calls()
    client = sync_client(opt.url, calls)
    await poll(client)
    assert client.cleanup_epoch == 0 and calls.cleanups == []  # the first value is a baseline

    opt.backend.used[0] = 70 * GIB  # 87.5 %: over gc_threshold, a cleanup is raised
    await opt.tick()
    await poll(client)
    assert client.cleanup_epoch == 1 and calls.cleanups == [1]
    await poll(client)
    assert calls.cleanups == [1]  # once per rise

    await opt.tick(advance=Settings().cleanup_interval + 1)  # still over: the next cleanup
    await poll(client)
    assert client.cleanup_epoch == 2 and calls.cleanups == [1, 2]

    # A second service joining now takes epoch 2 as its baseline.
    late = Calls()
    await poll(sync_client(opt.url, late))
    assert late.cleanups == []

    # The optimizer restarts (new state: epochs back to 0) on the same address.
    port = opt.server.port
    await opt.server.close()
    back = await make_optimizer(port=port)
    await poll(client)
    assert client.cleanup_epoch == 0 and calls.cleanups == [1, 2]  # a new baseline, no cleanup
    back.backend.used[0] = 70 * GIB
    await back.tick()
    await poll(client)
    assert client.cleanup_epoch == 1 and calls.cleanups == [1, 2, 1]


async def test_without_on_cleanup_the_default_cleanup_runs(opt: Optimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(_follower, "default_cleanup", lambda: ran.append("cleanup"))  # where the state machine calls it
    client = BatchSizeClient("svc-a", url=opt.url)
    await poll(client)
    opt.backend.used[0] = 70 * GIB
    await opt.tick()
    await poll(client)
    assert ran == ["cleanup"]


# --------------------------------------------------------------------------- callbacks that raise


async def test_a_raising_callback_is_logged_and_polling_goes_on(opt: Optimizer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def bad_change(batch: int, decision: dict[str, Any]) -> None:
        raise RuntimeError("on_change broke")

    def bad_cleanup(epoch: int) -> None:
        raise RuntimeError("on_cleanup broke")

    client = BatchSizeClient("svc-a", url=opt.url, on_change=bad_change, on_cleanup=bad_cleanup)
    caplog.set_level(logging.DEBUG, LOGGER)
    assert await poll(client) == 5.0
    assert client.batch_size == DEFAULT_BATCH and client.healthy
    opt.backend.used[0] = 70 * GIB
    await opt.tick()
    opt.engine.set_override("svc-a", None, 7, None, opt.clock())
    assert await poll(client) == 5.0
    assert client.batch_size == 7 and client.cleanup_epoch == 1 and client.healthy
    errors = records(caplog, logging.ERROR)
    assert [r.exc_info[1].args[0] for r in errors if r.exc_info and r.exc_info[1]] == [
        "on_change broke", "on_cleanup broke", "on_change broke"]


async def test_a_raising_callback_does_not_end_the_thread(opt: Optimizer) -> None:
    seen = threading.Event()

    def bad_change(batch: int, decision: dict[str, Any]) -> None:
        seen.set()
        raise RuntimeError("boom")

    client = BatchSizeClient("svc-a", url=opt.url, interval=3600.0, on_change=bad_change)
    client.start()
    try:
        assert await asyncio.to_thread(seen.wait, 10.0)
        assert client.running
    finally:
        await asyncio.to_thread(client.stop)
    assert not client.running


# --------------------------------------------------------------------------- apply_decision (telemetry replies)


async def test_apply_decision_from_a_report_reply(opt: Optimizer, caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    client = sync_client(opt.url, calls)
    await poll(client)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{opt.url}/reports",
                                json={"service": "svc-a", "batch_size": DEFAULT_BATCH, "oom": True}) as resp:
            assert resp.status == 200
            body, etag = await resp.json(), resp.headers["ETag"]
    assert body["batch_size"] < DEFAULT_BATCH

    assert client.apply_decision(body, etag)
    assert client.batch_size == body["batch_size"]  # at once, no poll
    assert calls.values == [DEFAULT_BATCH, body["batch_size"]]
    await poll(client)
    assert opt.polls()[-1].status == 304  # the reply's ETag is the current decision's

    caplog.set_level(logging.DEBUG, LOGGER)
    assert not client.apply_decision({"batch_size": "lots"})
    assert client.batch_size == body["batch_size"] and len(calls.changes) == 2
    assert len(records(caplog, logging.WARNING, "not one")) == 1


# --------------------------------------------------------------------------- the async face


async def test_async_client_with_aiohttp(opt: Optimizer) -> None:
    calls = Calls()
    client = AsyncBatchSizeClient("svc-a", url=opt.url, on_change=calls.on_change, on_cleanup=calls.on_cleanup,
                                  clock=FakeClock(0.0))
    assert await client.poll_once() == 5.0
    assert client.batch_size == DEFAULT_BATCH and calls.values == [DEFAULT_BATCH]
    await client.poll_once()
    assert [(s.status, s.if_none_match) for s in opt.polls()] == [(200, None), (304, client.etag)]
    assert calls.values == [DEFAULT_BATCH]
    opt.engine.set_override("svc-a", None, 11, None, opt.clock())
    opt.backend.used[0] = 70 * GIB
    await opt.tick()
    await client.poll_once()
    assert client.batch_size == 11 and calls.values == [DEFAULT_BATCH, 11] and calls.cleanups == [1]
    assert {s.user_agent for s in opt.polls()} == {"vlm-gpu-optimizer-client (aiohttp)"}


async def test_async_client_without_aiohttp(opt: Optimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # `import aiohttp` raises ImportError
    assert follow._load_aiohttp() is None
    calls = Calls()
    client = AsyncBatchSizeClient("svc-a", url=opt.url, on_change=calls.on_change, clock=FakeClock(0.0))
    assert await client.poll_once() == 5.0
    assert client.batch_size == DEFAULT_BATCH and calls.values == [DEFAULT_BATCH]
    await client.poll_once()
    assert [s.status for s in opt.polls()] == [200, 304]
    assert {s.user_agent for s in opt.polls()} == {"vlm-gpu-optimizer-client (urllib)"}  # in a worker thread
    await opt.server.close()
    await client.poll_once()  # a refused connection is a failure here too
    assert not client.healthy and client.batch_size == DEFAULT_BATCH


async def test_async_client_across_event_loops(opt: Optimizer) -> None:
    """A service may poll from one asyncio.run, then another: nothing is left bound to the first loop."""
    client = AsyncBatchSizeClient("svc-a", url=opt.url, clock=FakeClock(0.0))

    async def once() -> float:
        return await client.poll_once()

    for _ in range(2):
        assert await asyncio.to_thread(asyncio.run, once()) == 5.0
        assert client.healthy and client.batch_size == DEFAULT_BATCH
    assert [s.status for s in opt.polls()] == [200, 304]


async def test_async_client_outage(make_optimizer: MakeOptimizer, caplog: pytest.LogCaptureFixture) -> None:
    opt = await make_optimizer()
    clock = FakeClock(0.0)
    client = AsyncBatchSizeClient("svc-a", url=opt.url, clock=clock, rng=MaxRandom(), max_staleness=60.0)
    caplog.set_level(logging.DEBUG, LOGGER)
    await client.poll_once()
    port = opt.server.port
    await opt.server.close()
    assert [await client.poll_once() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert not client.healthy and client.batch_size == DEFAULT_BATCH
    clock.advance(60)
    assert client.batch_size == 1
    await make_optimizer(port=port, engine=opt.engine)
    await client.poll_once()
    assert client.healthy and client.batch_size == DEFAULT_BATCH
    assert len(records(caplog, logging.WARNING)) == 1 and len(records(caplog, logging.INFO, "answers again")) == 1


# --------------------------------------------------------------------------- start and stop


async def test_thread_starts_and_stops_promptly(opt: Optimizer) -> None:
    first = threading.Event()
    client = BatchSizeClient("svc-a", url=opt.url, interval=3600.0, on_change=lambda b, d: first.set())
    client.start()
    thread = client._thread
    assert thread is not None and thread.daemon
    client.start()  # already running: nothing new
    assert client._thread is thread
    assert await asyncio.to_thread(first.wait, 10.0)  # the first poll comes at once
    assert client.batch_size == DEFAULT_BATCH

    t0 = time.monotonic()
    await asyncio.to_thread(client.stop)  # the thread waits 3600 s on an Event: stop wakes it
    assert time.monotonic() - t0 < 2.0
    assert not thread.is_alive() and not client.running
    assert len(opt.polls()) == 1


async def test_task_starts_and_stops_promptly(opt: Optimizer) -> None:
    first = asyncio.Event()
    client = AsyncBatchSizeClient("svc-a", url=opt.url, interval=3600.0, on_change=lambda b, d: first.set())
    async with client:
        task = client._task
        assert task is not None and client.running
        await asyncio.wait_for(first.wait(), 10.0)
        assert client.batch_size == DEFAULT_BATCH
    assert task.done() and not client.running
    assert len(opt.polls()) == 1
