"""Records the backends produce. Units are in the field names; ``None`` means unknown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BackendError(RuntimeError):
    """A backend cannot start (for NVML: ``nvmlInit`` failed) or sample at all."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU. A field the board does not support is ``None``.

    ``failed`` is set when the device could not be read at all (for NVML: the GPU is lost);
    such a sample carries ``error`` and no readings, and the policy ignores it.
    """

    index: int
    uuid: str
    name: str
    timestamp: float  # seconds, the sampler's clock
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    temperature_celsius: float | None = None
    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    utilization_percent: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    failed: bool = False
    error: str | None = None

    @property
    def usage_fraction(self) -> float | None:
        if self.failed or not self.memory_total_bytes or self.memory_used_bytes is None:
            return None
        return self.memory_used_bytes / self.memory_total_bytes


class GpuBackend(Protocol):
    """A source of GPU samples.

    ``blocking`` says whether :meth:`sample` may block (NVML does): the sampler then runs it
    in a worker thread so that the event loop keeps serving.
    """

    name: str
    blocking: bool

    def sample(self, now: float) -> list[GpuSample]:
        """Read every GPU once. Per-GPU failures are reported in the samples, not raised."""
        ...

    def close(self) -> None: ...
