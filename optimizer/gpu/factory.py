"""Pick and build the GPU backend named in the configuration."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from optimizer.config import BackendName
from optimizer.gpu.driver import Probe, nvidia_driver
from optimizer.gpu.none import NoGpuBackend
from optimizer.gpu.pending import PendingNvmlBackend
from optimizer.gpu.types import BackendError, GpuBackend

log = structlog.get_logger(__name__)


def _nvml() -> GpuBackend:
    from optimizer.gpu.nvml import NvmlBackend

    return NvmlBackend()


def make_hardware_backend(name: BackendName, *, nvml: Callable[[], GpuBackend] = _nvml,
                          driver: Probe = nvidia_driver) -> GpuBackend:
    """``nvml``, ``none``, or ``auto``. Raises :class:`BackendError` (``nvml`` that cannot start).

    ``auto`` fails closed: NVML when it starts; else ``none`` only on a host with no NVIDIA driver
    (``driver()`` finds none); else NVML retried on every sample, not ready until it starts
    (:class:`PendingNvmlBackend`). ``nvml`` and ``driver`` are injectable for tests. The simulated
    backend needs a scenario and is built by the caller.
    """
    if name is BackendName.NONE:
        return NoGpuBackend()
    if name is BackendName.NVML:
        return nvml()
    if name is BackendName.AUTO:
        try:
            return nvml()
        except BackendError as exc:
            evidence = driver()
            if evidence is None:
                log.info("nvml_unavailable_using_none", reason=str(exc),
                         detail="no NVIDIA driver on this host (no /dev/nvidiactl, no libnvidia-ml)")
                return NoGpuBackend()
            pending = PendingNvmlBackend(nvml, error=str(exc), driver=evidence)
            log.error("nvml_failed_on_a_gpu_host", reason=str(exc), driver=evidence,
                      effect="not ready, the default batch size is published until NVML starts; "
                             "NVML is retried every monitoring interval")
            return pending
    raise BackendError(f"backend {name.value!r} cannot be built here")
