"""Supervised background tasks: a death is logged at once with its traceback, counted, restarted with
back-off; a task that keeps dying fails ``/health``; shutdown cancels every task and reports a stuck one.

The back-off's sleep is a :class:`Gate` the test opens, and the clock a :class:`FakeClock`: no real
waiting, no sleep standing in for synchronisation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.kube.discovery import Discovery
from optimizer.pods import PodInfo
from optimizer.persistence import Persister, StateFile
from optimizer.sampler import Sampler
from optimizer.tasks import Policy, Supervisor
from tests.fake_kube import FakeKube, make_pod
from tests.fakes import FakeClock, ScriptedBackend, no_sleep
from tests.kube_helpers import kube_settings
from tests.logcapture import LogList, events_named

Client = TestClient[web.Request, web.Application]


class Gate:
    """The supervisor's sleep: records each back-off and holds it until the test lets one through."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._opened = 0
        self._cond = asyncio.Condition()

    async def __call__(self, delay: float) -> None:
        async with self._cond:
            self.waits.append(delay)
            n = len(self.waits)
            self._cond.notify_all()
            await self._cond.wait_for(lambda: self._opened >= n)

    async def waiting(self, n: int) -> None:
        """Until the ``n``-th back-off has begun (the ``n``-th death has been handled)."""
        async with asyncio.timeout(5), self._cond:
            await self._cond.wait_for(lambda: len(self.waits) >= n)

    async def open(self) -> None:
        async with self._cond:
            self._opened += 1
            self._cond.notify_all()


def dying(calls: list[int]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        calls.append(len(calls) + 1)
        raise RuntimeError(f"boom {len(calls)}")
    return run


def node(tmp_path: Path | None = None) -> tuple[Engine, Sampler, FakeClock, Persister | None]:
    clock = FakeClock()
    engine = Engine(Settings())
    sampler = Sampler(ScriptedBackend(1), engine, clock=clock, sleep=no_sleep)
    persister = Persister(engine, StateFile(tmp_path / "state.json")) if tmp_path is not None else None
    return engine, sampler, clock, persister


async def health(client: Client, status: int) -> Any:
    resp = await client.get("/health")
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_a_dying_task_is_logged_at_once_counted_restarted_with_backoff_and_fails_health(
        aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch, logs: LogList) -> None:
    engine, sampler, clock, _ = node()
    calls: list[int] = []
    monkeypatch.setattr(sampler, "run", dying(calls))  # the sampler task itself dies; ticks are the test's
    gate = Gate()
    client = await aiohttp_client(build_app(engine, sampler, supervisor=Supervisor(clock=clock, sleep=gate)))
    assert await sampler.tick() is not None  # a fresh sample: /health is not stale

    await gate.waiting(1)  # the first death, handled while the application serves
    [failed] = events_named(logs, "task_failed")
    assert failed["task"] == "sampler" and failed["error"] == "RuntimeError('boom 1')"
    assert failed["exc_info"] is True and failed["log_level"] == "error"  # logged with its traceback, now
    text = await (await client.get("/metrics")).text()
    assert 'vlm_optimizer_task_failures_total{task="sampler"} 1.0' in text
    assert 'vlm_optimizer_task_restarts_total{task="sampler"} 0.0' in text
    assert 'vlm_optimizer_task_failing{task="sampler"} 0.0' in text
    assert (await health(client, 200))["status"] == "ok"  # one death is not failing

    await gate.open()
    await gate.waiting(2)
    assert calls == [1, 2]
    assert (await health(client, 200))["status"] == "ok"
    await gate.open()
    await gate.waiting(3)  # the sampler's third death within its window: failing
    assert gate.waits == [1.0, 2.0, 4.0]  # capped exponential back-off, doubling per death in a row
    body = await health(client, 503)
    assert body["status"] == "failing"
    assert body["failing_tasks"]["sampler"] == {
        "failures_in_window": 3, "window_s": 600.0, "fail_after": 3, "failures": 3, "restarts": 2,
        "last_error": "RuntimeError('boom 3')", "last_failed_at": clock()}
    text = await (await client.get("/metrics")).text()
    assert 'vlm_optimizer_task_failures_total{task="sampler"} 3.0' in text
    assert 'vlm_optimizer_task_restarts_total{task="sampler"} 2.0' in text
    assert 'vlm_optimizer_task_failing{task="sampler"} 1.0' in text
    assert len(events_named(logs, "task_failed")) == 3 and len(events_named(logs, "task_restarting")) == 3

    clock.advance(601)  # a window without a death: no longer failing
    assert await sampler.tick() is not None
    assert (await health(client, 200))["status"] == "ok"


async def test_backoff_is_capped_and_starts_over_after_a_long_good_run() -> None:
    clock = FakeClock()
    gate = Gate()
    sup = Supervisor(clock=clock, sleep=gate)
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 5:
            clock.advance(11)  # this run lasted longer than backoff_max before it died
        raise RuntimeError("boom")

    sup.start("worker", run, Policy(backoff_initial=1.0, backoff_max=10.0, fail_after=100))
    for n in range(1, 6):
        await gate.waiting(n)
        await gate.open()
    await gate.waiting(6)
    assert gate.waits == [1.0, 2.0, 4.0, 8.0, 1.0, 2.0]
    assert await sup.stop_all() == []


async def test_a_task_that_returns_is_a_death_too(logs: LogList) -> None:
    gate = Gate()
    sup = Supervisor(clock=FakeClock(), sleep=gate)

    async def run() -> None:
        return None

    st = sup.start("worker", run)
    await gate.waiting(1)
    assert [e["task"] for e in events_named(logs, "task_exited")] == ["worker"]
    assert st.failures == 1 and st.last_error == "returned"
    with pytest.raises(ValueError, match="'worker' is already running"):
        sup.start("worker", run)
    assert await sup.stop_all() == []


async def test_shutdown_cancels_every_task_and_saves_the_state_at_exit(
        aiohttp_client: AiohttpClient, tmp_path: Path, logs: LogList) -> None:
    engine, sampler, clock, persister = node(tmp_path)
    ran = asyncio.Event()

    async def run() -> None:
        ran.set()
        await asyncio.Event().wait()

    sampler.run = run  # type: ignore[method-assign]
    sup = Supervisor(clock=clock, sleep=Gate())
    client = await aiohttp_client(build_app(engine, sampler, persister=persister, supervisor=sup))
    await ran.wait()
    tasks = {name: st.task for name, st in sup.tasks.items()}
    assert set(tasks) == {"sampler", "persister"}
    await client.close()
    assert all(t is not None and t.cancelled() for t in tasks.values())
    names = [e["event"] for e in logs if e["event"] in ("state_saved_at_exit", "sampler_stopped",
                                                          "task_stuck_on_shutdown", "state_not_saved_at_exit")]
    assert names == ["state_saved_at_exit", "sampler_stopped"]  # the persister stops first, then the sampler
    assert (tmp_path / "state.json").exists()


async def test_a_task_stuck_on_shutdown_is_reported_and_shutdown_goes_on(
        aiohttp_client: AiohttpClient, logs: LogList) -> None:
    engine, sampler, clock, _ = node()
    cancelled = asyncio.Event()
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await release.wait()  # ignores the cancellation until the test lets it go

    sampler.run = stubborn  # type: ignore[method-assign]
    sup = Supervisor(clock=clock, sleep=Gate(), stop_timeout=0.05)
    client = await aiohttp_client(build_app(engine, sampler, supervisor=sup))
    await client.close()
    assert cancelled.is_set()
    [stuck] = events_named(logs, "task_stuck_on_shutdown")
    assert stuck["task"] == "sampler" and stuck["timeout_s"] == 0.05
    assert events_named(logs, "sampler_stopped")  # the rest of shutdown went on
    task = sup.tasks["sampler"].task
    assert task is not None and not task.done()
    release.set()
    await task  # it ends once let go, and a return while stopping is no death
    assert sup.tasks["sampler"].failures == 0 and not events_named(logs, "task_exited")


async def test_discovery_that_dies_is_restarted_and_lists_the_pods_again(
        aiohttp_client: AiohttpClient, tmp_path: Path, logs: LogList) -> None:
    """Against the fake Kubernetes API: the watcher's first run dies; the restart lists the pod."""
    engine, sampler, clock, _ = node()
    listed = asyncio.Event()
    set_pods = engine.set_pods

    def recording(pods: dict[str, PodInfo], now: float | None = None) -> Any:
        if pods:
            listed.set()
        return set_pods(pods, now)

    engine.set_pods = recording  # type: ignore[method-assign]
    async with FakeKube() as kube:
        kube.add_pod(make_pod("cap-1", labels={"vlm-gpu-optimizer/client": "true",
                                                "app.kubernetes.io/name": "captioner"}))
        discovery = Discovery(engine, kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig"))),
                              clock=clock)
        watch = discovery.watcher.run
        runs = 0

        async def first_dies() -> None:
            nonlocal runs
            runs += 1
            if runs == 1:
                raise ConnectionError("watcher bug")
            await watch()

        discovery.watcher.run = first_dies  # type: ignore[method-assign]
        gate = Gate()
        client = await aiohttp_client(build_app(engine, sampler, run_sampler=False, discovery=discovery,
                                                supervisor=Supervisor(clock=clock, sleep=gate)))
        await gate.waiting(1)
        assert [e["task"] for e in events_named(logs, "task_failed")] == ["discovery"]
        assert not listed.is_set()
        await gate.open()
        async with asyncio.timeout(5):
            await listed.wait()
        assert "default/cap-1" in engine.pods
        text = await (await client.get("/metrics")).text()
        assert 'vlm_optimizer_task_restarts_total{task="discovery"} 1.0' in text
        await client.close()
    assert events_named(logs, "discovery_stopped")
