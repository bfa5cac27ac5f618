"""Pick and build the GPU backend named in the configuration."""

from __future__ import annotations

import structlog

from optimizer.config import BackendName
from optimizer.gpu.none import NoGpuBackend
from optimizer.gpu.types import BackendError, GpuBackend

log = structlog.get_logger(__name__)


def make_hardware_backend(name: BackendName) -> GpuBackend:
    """``nvml``, ``none``, or ``auto`` (NVML when it initialises, else none). Raises :class:`BackendError`.

    The simulated backend needs a scenario and is built by the caller.
    """
    if name is BackendName.NONE:
        return NoGpuBackend()
    from optimizer.gpu.nvml import NvmlBackend

    if name is BackendName.NVML:
        return NvmlBackend()
    if name is BackendName.AUTO:
        try:
            return NvmlBackend()
        except BackendError as exc:
            log.info("nvml_unavailable_using_none", reason=str(exc))
            return NoGpuBackend()
    raise BackendError(f"backend {name.value!r} cannot be built here")
