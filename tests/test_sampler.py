"""The sampling loop: ticks that survive failures, the worker thread of blocking backends, the schedule.

Time is virtual: a :class:`FakeClock` the tests advance and a ``sleep`` that only advances it. The
one real wait is the hung-backend test, whose timeout is the sampler's floor of 1 s.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.gpu.none import NoGpuBackend
from optimizer.gpu.types import GpuBackend, GpuSample
from optimizer.policy.types import Snapshot
from optimizer.sampler import HEALTHY_INTERVALS, Sampler
from tests.fakes import FakeClock, ScriptedBackend, no_sleep

GIB = 1024**3
INTERVAL = Settings().monitoring_interval  # 5 s


class HangingBackend:
    """A blocking backend whose sample() waits until the test releases it."""

    name = "hanging"
    blocking = True

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.closed = False

    def sample(self, now: float) -> list[GpuSample]:
        self.calls += 1
        self.release.wait(timeout=30)  # a bound so that a broken test cannot hang the run forever
        return [GpuSample(index=0, uuid="GPU-hang", name="Test GPU", timestamp=now, memory_total_bytes=80 * GIB,
                          memory_used_bytes=10 * GIB, memory_free_bytes=70 * GIB)]

    def close(self) -> None:
        self.closed = True


class VirtualSleep:
    """``sleep`` for Sampler.run: advances the fake clock by the delay; cancels the loop after ``stop_after`` calls."""

    def __init__(self, clock: FakeClock, stop_after: int, on_call: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.stop_after = stop_after
        self.on_call = on_call
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.on_call is not None:
            self.on_call(len(self.delays))
        if len(self.delays) >= self.stop_after:
            raise asyncio.CancelledError
        self.clock.advance(delay)


def make(backend: GpuBackend, settings: Settings | None = None,
         clock: FakeClock | None = None) -> tuple[Sampler, Engine, FakeClock]:
    clock = clock or FakeClock()
    engine = Engine(settings or Settings(), has_gpus=backend.name != "none")  # as serve makes it
    sampler = Sampler(backend, engine, clock=clock, sleep=no_sleep)
    return sampler, engine, clock


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def rig(backend: ScriptedBackend) -> Iterator[tuple[Sampler, Engine, FakeClock]]:
    sampler, engine, clock = make(backend)
    yield sampler, engine, clock
    sampler.close()


# --------------------------------------------------------------------------- tick


async def test_tick_feeds_the_engine_and_counts(rig: tuple[Sampler, Engine, FakeClock],
                                                backend: ScriptedBackend) -> None:
    sampler, engine, clock = rig
    snap = await sampler.tick()
    assert snap is not None
    assert snap.timestamp == clock.t
    assert [g.index for g in snap.gpus] == [0]
    assert engine.snapshot is snap
    assert sampler.stats.samples == 1
    assert sampler.stats.errors == 0
    assert sampler.stats.last_sample_at == clock.t
    assert sum(sampler.stats.duration_buckets) == 1
    assert backend.calls == 1


async def test_backend_error_is_counted_and_the_previous_snapshot_kept(
        rig: tuple[Sampler, Engine, FakeClock], backend: ScriptedBackend) -> None:
    sampler, engine, clock = rig
    good = await sampler.tick()
    assert good is not None
    first_at = clock.t

    clock.advance(INTERVAL)
    backend.error = RuntimeError("driver went away")
    with capture_logs() as logs:
        assert await sampler.tick() is None
    assert sampler.stats.errors == 1
    assert sampler.stats.samples == 1
    assert sampler.stats.last_sample_at == first_at
    assert engine.snapshot is good
    assert any(e["event"] == "sample_failed" and "driver went away" in e["error"] for e in logs)

    clock.advance(INTERVAL)
    backend.error = None
    backend.used[0] = 30 * GIB
    snap = await sampler.tick()
    assert snap is not None
    assert engine.snapshot is snap
    assert snap.gpus[0].memory_used_bytes == 30 * GIB
    assert sampler.stats.samples == 2
    assert sampler.stats.errors == 1
    assert sampler.stats.last_sample_at == clock.t


async def test_policy_exception_in_observe_is_caught(rig: tuple[Sampler, Engine, FakeClock],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sampler, engine, clock = rig
    real_observe = engine.observe
    calls: list[Snapshot] = []

    def broken_once(snapshot: Snapshot) -> object:
        calls.append(snapshot)
        if len(calls) == 1:
            raise ZeroDivisionError("policy bug")
        return real_observe(snapshot)

    monkeypatch.setattr(engine, "observe", broken_once)
    with capture_logs() as logs:
        assert await sampler.tick() is None
    assert sampler.stats.errors == 1
    assert sampler.stats.samples == 0
    assert sampler.stats.last_sample_at is None
    assert not sampler.ready
    assert any(e["event"] == "policy_failed" for e in logs)

    clock.advance(INTERVAL)
    snap = await sampler.tick()
    assert snap is not None
    assert len(calls) == 2
    assert sampler.stats.samples == 1
    assert sampler.stats.errors == 1
    assert sampler.ready
    assert 0 in engine.state.gpus


async def test_failed_gpu_samples_are_counted_per_gpu(backend: ScriptedBackend) -> None:
    backend.used[1] = 10 * GIB
    backend.failed = {1}
    sampler, engine, _ = make(backend)
    await sampler.tick()
    await sampler.tick()
    assert sampler.stats.gpu_errors == {1: 2}
    assert sampler.stats.errors == 0
    assert sampler.stats.samples == 2


async def test_non_blocking_backend_runs_on_the_event_loop_thread(rig: tuple[Sampler, Engine, FakeClock],
                                                                  backend: ScriptedBackend) -> None:
    sampler, _, _ = rig
    await sampler.tick()
    assert backend.threads == [threading.current_thread().name]


async def test_blocking_backend_runs_in_a_worker_thread() -> None:
    backend = ScriptedBackend(blocking=True)
    sampler, engine, _ = make(backend)
    try:
        loop_thread = threading.current_thread().name
        for _ in range(2):
            snap = await sampler.tick()
            assert snap is not None
        assert len(backend.threads) == 2
        assert all(name != loop_thread for name in backend.threads)
        assert all(name.startswith("gpu-sampler") for name in backend.threads)
        assert backend.threads[0] == backend.threads[1]  # one dedicated worker, not one thread per tick
        assert engine.snapshot is snap
    finally:
        sampler.close()
    assert backend.closed


async def test_hung_blocking_backend_times_out_and_is_not_piled_up() -> None:
    backend = HangingBackend()
    settings = Settings(monitoring_interval=0.1)  # timeout = max(1.0, 2 * interval) = 1 s
    sampler, engine, clock = make(backend, settings)
    try:
        with capture_logs() as logs:
            assert await sampler.tick() is None  # waits the 1 s timeout
        assert sampler.stats.errors == 1
        assert backend.calls == 1
        assert engine.snapshot is None
        assert any(e["event"] == "sample_failed" and "TimeoutError" in e["error"] for e in logs)

        clock.advance(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with capture_logs() as logs:
            assert await sampler.tick() is None
        assert loop.time() - started < 0.5  # skipped at once, not another timeout
        assert sampler.stats.errors == 2
        assert backend.calls == 1  # no second call while the first is stuck
        assert any(e["event"] == "sample_failed" and "still running" in e["error"] for e in logs)

        backend.release.set()
        assert sampler._inflight is not None
        sampler._inflight.result(timeout=10)  # the stuck call has returned

        clock.advance(0.1)
        snap = await sampler.tick()
        assert snap is not None
        assert snap.timestamp == clock.t
        assert backend.calls == 2
        assert sampler.stats.samples == 1
        assert sampler.stats.errors == 2
        assert engine.snapshot is snap
    finally:
        backend.release.set()
        sampler.close()
    assert backend.closed


# --------------------------------------------------------------------------- ready / healthy


async def test_ready_after_the_first_tick_with_a_working_gpu(rig: tuple[Sampler, Engine, FakeClock]) -> None:
    sampler, _, _ = rig
    assert not sampler.ready
    await sampler.tick()
    assert sampler.ready


async def test_not_ready_while_every_gpu_failed(backend: ScriptedBackend) -> None:
    backend.used[1] = 0
    backend.failed = {0, 1}
    sampler, _, clock = make(backend)
    await sampler.tick()
    assert sampler.stats.samples == 1
    assert not sampler.ready
    clock.advance(INTERVAL)
    await sampler.tick()
    assert not sampler.ready
    backend.failed = {0}
    clock.advance(INTERVAL)
    await sampler.tick()
    assert sampler.ready


async def test_not_ready_after_a_backend_error() -> None:
    backend = ScriptedBackend()
    backend.error = RuntimeError("no driver")
    sampler, _, _ = make(backend)
    assert sampler.not_ready_reason == "no sample yet"
    await sampler.tick()
    assert not sampler.ready
    assert sampler.not_ready_reason == "the GPU backend failed: no driver"
    backend.error = TimeoutError()  # an exception without a message is named by its type
    await sampler.tick()
    assert sampler.not_ready_reason == "the GPU backend failed: TimeoutError()"
    backend.error = None
    await sampler.tick()
    assert sampler.ready and sampler.not_ready_reason is None


async def test_ready_after_a_tick_with_no_gpus() -> None:
    sampler, engine, _ = make(NoGpuBackend())
    assert not engine.has_gpus  # as serve makes it for backend none
    assert not sampler.ready
    snap = await sampler.tick()
    assert snap is not None and snap.gpus == ()
    assert sampler.ready
    assert engine.snapshot is snap


async def test_healthy_within_three_intervals_of_the_last_sample(rig: tuple[Sampler, Engine, FakeClock]) -> None:
    sampler, _, clock = rig
    assert not sampler.healthy(clock.t)
    await sampler.tick()
    last = clock.t
    assert sampler.healthy(last)
    assert sampler.healthy(last + HEALTHY_INTERVALS * INTERVAL - 0.01)
    assert not sampler.healthy(last + HEALTHY_INTERVALS * INTERVAL)
    assert not sampler.healthy(last + 100 * INTERVAL)
    clock.advance(4 * INTERVAL)
    await sampler.tick()
    assert sampler.healthy(clock.t + INTERVAL)


async def test_healthy_follows_the_monitoring_interval() -> None:
    sampler, _, clock = make(ScriptedBackend(), Settings(monitoring_interval=2.0))
    await sampler.tick()
    assert sampler.interval == 2.0
    assert sampler.healthy(clock.t + 5.9)
    assert not sampler.healthy(clock.t + 6.1)


# --------------------------------------------------------------------------- run()


async def test_run_ticks_every_interval_until_cancelled() -> None:
    clock = FakeClock(1_000.0)
    backend = ScriptedBackend()
    sampler, _, _ = make(backend, clock=clock)
    sleep = VirtualSleep(clock, stop_after=5)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    assert sampler.stats.samples == 5
    assert backend.calls == 5
    assert sleep.delays == [INTERVAL] * 5
    assert backend.sampled_at == [1_000.0 + i * INTERVAL for i in range(5)]


async def test_run_schedule_does_not_drift_with_tick_duration() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend(clock=clock, takes=2.0)  # every sample takes 2 virtual seconds
    sampler, _, _ = make(backend, clock=clock)
    sleep = VirtualSleep(clock, stop_after=4)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    assert sleep.delays == [INTERVAL - 2.0] * 4
    assert backend.sampled_at == [0.0, 5.0, 10.0, 15.0]


async def test_run_restarts_the_schedule_after_a_slow_tick_instead_of_bursting() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend(clock=clock, takes=12.0)  # the first sample overruns two intervals

    def fast_from_now_on(n: int) -> None:
        backend.takes = 0.0

    sampler, _, _ = make(backend, clock=clock)
    sleep = VirtualSleep(clock, stop_after=4, on_call=fast_from_now_on)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    assert sleep.delays == [0.0, INTERVAL, INTERVAL, INTERVAL]
    # no catch-up ticks at 5 and 10: the schedule restarts at 12
    assert backend.sampled_at == [0.0, 12.0, 17.0, 22.0]
    assert sampler.stats.samples == 4


async def test_run_survives_backend_errors() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend()
    backend.error = RuntimeError("flaky")

    def heal(n: int) -> None:
        if n == 2:
            backend.error = None

    sampler, _, _ = make(backend, clock=clock)
    sleep = VirtualSleep(clock, stop_after=4, on_call=heal)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    assert backend.calls == 4
    assert sampler.stats.errors == 2
    assert sampler.stats.samples == 2
    assert sleep.delays == [INTERVAL] * 4
    assert sampler.stats.last_sample_at == 15.0


async def test_run_samples_nothing_while_paused() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend()
    sampler, engine, _ = make(backend, clock=clock)
    sampler.running = False

    def resume(n: int) -> None:
        if n == 3:
            sampler.running = True

    sleep = VirtualSleep(clock, stop_after=5, on_call=resume)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    # paused for the first three iterations: no sample, but the loop keeps its schedule
    assert sleep.delays == [INTERVAL] * 5
    assert backend.sampled_at == [15.0, 20.0]
    assert sampler.stats.samples == 2
    assert engine.snapshot is not None and engine.snapshot.timestamp == 20.0


async def test_run_while_paused_throughout_never_samples() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend()
    sampler, engine, _ = make(backend, clock=clock)
    sampler.running = False
    sleep = VirtualSleep(clock, stop_after=3)
    sampler.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await sampler.run()
    assert backend.calls == 0
    assert sampler.stats.samples == 0
    assert engine.snapshot is None
    assert not sampler.ready
    assert len(sleep.delays) == 3


async def test_run_as_a_task_stops_on_cancel() -> None:
    clock = FakeClock(0.0)
    backend = ScriptedBackend()
    sampler, _, _ = make(backend, clock=clock)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    slept = asyncio.Event()

    async def parked(delay: float) -> None:
        slept.set()
        await gate  # never resolved: the loop parks here until cancelled

    sampler.sleep = parked
    task = asyncio.create_task(sampler.run())
    await asyncio.wait_for(slept.wait(), timeout=5)
    assert sampler.stats.samples == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    sampler.close()
    assert backend.closed
