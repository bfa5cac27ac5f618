"""The sampling loop: every ``monitoring_interval``, one snapshot of every GPU into the engine.

A backend that blocks (NVML) runs in one dedicated worker thread, so the event loop keeps serving;
a call still stuck when the next tick comes is reported and that tick skipped, never piled up. A
backend that raises is counted and logged, and the loop goes on. Time and sleep are injectable so
that tests drive the loop in virtual time.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from optimizer.engine import Engine
from optimizer.gpu.types import GpuBackend, GpuSample
from optimizer.policy.types import Snapshot

log = structlog.get_logger(__name__)

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
HEALTHY_INTERVALS = 3


@dataclass
class SamplerStats:
    """The loop's own health, exported as ``vlm_optimizer_sample_*`` metrics."""

    attempts: int = 0  # ticks that tried to sample (monitoring not paused)
    samples: int = 0
    errors: int = 0  # ticks whose backend call raised or timed out
    gpu_errors: dict[int, int] = field(default_factory=dict)  # per GPU: samples that came back failed
    last_sample_at: float | None = None
    duration_sum: float = 0.0
    duration_buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))

    def observe_duration(self, seconds: float) -> None:
        self.duration_sum += seconds
        i = bisect.bisect_left(DURATION_BUCKETS, seconds)
        if i < len(self.duration_buckets):
            self.duration_buckets[i] += 1


class Sampler:
    def __init__(self, backend: GpuBackend, engine: Engine, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.backend = backend
        self.engine = engine
        self.clock = clock
        self.sleep = sleep
        self.stats = SamplerStats()
        self._running = True
        self.paused_since: float | None = None  # when an operator paused monitoring (the sampler's clock)
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[list[GpuSample]] | None = None
        self._ready = False
        self._not_ready = "no sample yet"  # why not ready, from the latest tick (see not_ready_reason)

    @property
    def running(self) -> bool:
        """False while monitoring is paused (the loop keeps ticking, sampling nothing)."""
        return self._running

    @running.setter
    def running(self, on: bool) -> None:
        if on != self._running:
            self.paused_since = None if on else self.clock()
        self._running = on

    @property
    def interval(self) -> float:
        return self.engine.settings.monitoring_interval

    @property
    def ready(self) -> bool:
        """After the first sample with a working GPU, or the first sample of a host without GPUs
        (``engine.has_gpus`` false: backend ``none``). An empty sample from a GPU backend is not ready."""
        return self._ready

    @property
    def not_ready_reason(self) -> str | None:
        """Why the sampler is not ready (the latest tick's failure), or ``None`` once it is."""
        return None if self._ready else self._not_ready

    def healthy(self, now: float) -> bool:
        last = self.stats.last_sample_at
        return last is not None and now - last < HEALTHY_INTERVALS * self.interval

    async def _read(self, now: float) -> list[GpuSample]:
        if not self.backend.blocking:
            return self.backend.sample(now)
        if self._inflight is not None and not self._inflight.done():
            raise TimeoutError("the previous sample is still running")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-sampler")
        self._inflight = self._executor.submit(self.backend.sample, now)
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._inflight)),
                                      timeout=max(1.0, 2 * self.interval))

    async def tick(self) -> Snapshot | None:
        """Take one snapshot and feed it to the engine. Never raises (except cancellation)."""
        now = self.clock()
        started = time.perf_counter()
        self.stats.attempts += 1
        try:
            samples = await self._read(now)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure must not stop the loop
            self.stats.errors += 1
            self._not_ready = f"the GPU backend failed: {str(exc) or repr(exc)}"
            log.error("sample_failed", backend=self.backend.name, error=repr(exc), errors=self.stats.errors)
            return None
        elapsed = time.perf_counter() - started
        snapshot = Snapshot(now, tuple(samples))
        try:
            self.engine.observe(snapshot)
        except Exception as exc:  # noqa: BLE001 - a policy bug must not stop sampling either
            self.stats.errors += 1
            log.exception("policy_failed", error=repr(exc))
            return None
        for g in samples:
            if g.failed:
                self.stats.gpu_errors[g.index] = self.stats.gpu_errors.get(g.index, 0) + 1
        self.stats.samples += 1
        self.stats.last_sample_at = now
        self.stats.observe_duration(elapsed)
        if not self._ready:
            self._note_readiness(samples)
        return snapshot

    def _note_readiness(self, samples: list[GpuSample]) -> None:
        if any(not g.failed for g in samples) or (not samples and not self.engine.has_gpus):
            self._ready = True
            log.info("sampler_ready", backend=self.backend.name, gpus=len(samples))
        elif not samples:
            self._not_ready = f"the GPU backend {self.backend.name} found no GPU"
        else:
            self._not_ready = "every GPU failed: " + "; ".join(f"GPU {g.index}: {g.error}" for g in samples)

    async def run(self) -> None:
        """Tick every interval until cancelled; the schedule does not drift with the tick's duration."""
        log.info("sampler_started", backend=self.backend.name, interval_s=self.interval)
        next_at = self.clock()
        while True:
            if self.running:
                await self.tick()
            next_at += self.interval
            delay = next_at - self.clock()
            if delay < 0:  # fell behind (slow backend, suspended process): start again from now
                next_at = self.clock()
                delay = 0.0
            await self.sleep(delay)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()
