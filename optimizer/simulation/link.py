"""Connects simulated services to an :class:`~optimizer.engine.Engine`, in process."""

from __future__ import annotations

from optimizer.engine import Engine
from optimizer.simulation.world import Start


class EngineLink:
    """A :class:`~optimizer.simulation.world.ServiceLink` on an engine; ``origin`` maps scenario time to clock time."""

    def __init__(self, engine: Engine, origin: float = 0.0) -> None:
        self.engine = engine
        self.origin = origin

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        d = self.engine.poll(service, gpu, self.origin + t)
        return d.batch_size, d.cleanup_epoch

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool,
               inactive_split_bytes: int | None = None) -> int:
        d = self.engine.report(service, gpu, self.origin + t, batch_size=batch_size, peak_bytes=peak_bytes,
                               allocated_bytes=allocated_bytes, reserved_bytes=reserved_bytes, oom=oom,
                               inactive_split_bytes=inactive_split_bytes)
        return d.batch_size

    def started(self, service: str, gpu: int, t: float, *, free_mb: float, total_mb: float) -> Start | None:
        """A service's process (re)started: the optimizer keeps what it knows of it (its state is the server's)."""
        return None
