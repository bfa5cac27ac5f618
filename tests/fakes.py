"""Test doubles shared by the API, metrics and sampler tests: a virtual clock and a scripted backend.

The clock, the GPU UUIDs and the decision sink are the client's test doubles (client/tests/client_fakes.py,
on the path by pyproject's pytest ``pythonpath``), re-exported here."""

from __future__ import annotations

import threading

from client_fakes import FakeClock, Sink, uuid_of
from optimizer.gpu.types import GpuSample

__all__ = ["GIB", "FakeClock", "ScriptedBackend", "Sink", "no_sleep", "uuid_of"]

GIB = 1024**3


class ScriptedBackend:
    """A GpuBackend whose GPUs report the figures the test sets between ticks.

    GPU ``i`` reads 50+i C, 200.5+i W and 60+i % busy, so that a value shows which GPU it came from.
    ``failed`` GPUs come back failed; ``error`` makes the whole call raise; ``takes`` advances
    ``clock`` by that many virtual seconds per call (a slow backend).
    """

    name = "scripted"

    def __init__(self, gpus: int = 1, *, used: int = 20 * GIB, total: int = 80 * GIB, blocking: bool = False,
                 clock: FakeClock | None = None, takes: float = 0.0) -> None:
        self.blocking = blocking
        self.total = total
        self.used = {i: used for i in range(gpus)}
        self.failed: set[int] = set()
        self.error: Exception | None = None
        self.clock = clock
        self.takes = takes
        self.calls = 0
        self.sampled_at: list[float] = []
        self.threads: list[str] = []
        self.closed = False

    def sample(self, now: float) -> list[GpuSample]:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        self.sampled_at.append(now)
        if self.clock is not None:
            self.clock.advance(self.takes)
        out = []
        for i, used in sorted(self.used.items()):
            if i in self.failed:
                out.append(GpuSample(index=i, uuid=uuid_of(i), name="Test GPU", timestamp=now, failed=True,
                                     error="GPU is lost"))
            else:
                out.append(GpuSample(index=i, uuid=uuid_of(i), name="Test GPU", timestamp=now,
                                     memory_total_bytes=self.total, memory_used_bytes=used,
                                     memory_free_bytes=self.total - used, temperature_celsius=50.0 + i,
                                     power_usage_watts=200.5 + i, utilization_percent=60.0 + i))
        return out

    def close(self) -> None:
        self.closed = True


async def no_sleep(delay: float) -> None:
    raise AssertionError("the tests drive ticks explicitly")
