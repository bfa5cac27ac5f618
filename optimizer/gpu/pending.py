"""NVML that failed to start on a host with an NVIDIA driver: not ready, and retried, never "no GPU".

``--backend auto`` builds this instead of the GPU-less backend when NVML fails but the driver is
there (:mod:`optimizer.gpu.driver`): a driver that is still loading (the GPU Operator installs it
after the node boots), a container started without the NVIDIA runtime, a driver/library mismatch.
Publishing the maximum batch size there, as on a CPU-only host, would be failing open.

Every sample tries to start NVML again (in the sampler's worker thread: ``nvmlInit`` blocks).
Until it starts, :meth:`PendingNvmlBackend.sample` raises :class:`BackendError` saying why: the
sampler counts the error and stays not ready (``/ready`` 503 with the reason), and the engine,
which knows the host has GPUs, answers polls with the default batch, not the maximum. Once NVML
starts, the samples are NVML's and the service becomes ready.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from optimizer.gpu.types import BackendError, GpuBackend, GpuSample

log = structlog.get_logger(__name__)


class PendingNvmlBackend:
    """NVML, started on the first sample that can start it."""

    name = "nvml"
    blocking = True

    def __init__(self, start: Callable[[], GpuBackend], *, error: str, driver: str) -> None:
        self._start = start
        self._driver = driver
        self._lock = threading.Lock()
        self._backend: GpuBackend | None = None
        self.reason = self._why(error)
        self.attempts = 1  # the failed start that made this backend

    def _why(self, error: str) -> str:
        return f"{error}; an NVIDIA driver is present ({self._driver}), so NVML is retried every sample"

    @property
    def started(self) -> bool:
        return self._backend is not None

    def sample(self, now: float) -> list[GpuSample]:
        with self._lock:
            if self._backend is None:
                self.attempts += 1
                try:
                    self._backend = self._start()
                except BackendError as exc:
                    self.reason = self._why(str(exc))
                    raise BackendError(self.reason) from exc
                log.warning("nvml_started_after_retry", attempts=self.attempts, driver=self._driver)
            backend = self._backend
        return backend.sample(now)

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
