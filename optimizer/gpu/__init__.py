"""GPU backends: one interface (:class:`~optimizer.gpu.types.GpuBackend`), three implementations."""

from optimizer.gpu.types import BackendError, GpuBackend, GpuProcess, GpuSample

__all__ = ["BackendError", "GpuBackend", "GpuProcess", "GpuSample"]
