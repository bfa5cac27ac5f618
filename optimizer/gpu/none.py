"""The backend for a CPU-only host: no GPUs, always ready."""

from __future__ import annotations

from optimizer.gpu.types import GpuSample


class NoGpuBackend:
    name = "none"
    blocking = False

    def sample(self, now: float) -> list[GpuSample]:
        return []

    def close(self) -> None:
        return None
