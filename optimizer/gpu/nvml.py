"""The production backend, on nvidia-ml-py (``import pynvml``). The only module that imports it.

Every NVML call goes through :meth:`NvmlBackend._query`, which turns "this board cannot tell"
(``NotSupported``, ``NoPermission``, ``FunctionNotFound``) into ``None`` so that one missing
field never fails a sample. A lost GPU (``GpuIsLost``) or a failing memory query marks that one
device failed; the other GPUs are still read. Calls block, so the sampler runs
:meth:`NvmlBackend.sample` in a worker thread.

Memory: NVML v2 memory info where the driver has it. v2 reports ``reserved`` (driver/firmware)
apart from ``used``; we publish ``memory_used_bytes = used + reserved`` so that it means the same
as v1's ``used`` (``total - free``: what no process can allocate), and ``memory_reserved_bytes``
alone. On a v1-only driver ``memory_reserved_bytes`` is unknown.

MIG (:mod:`optimizer.gpu.nvml_mig`): a GPU in MIG mode is read as its MIG devices, listed again on every sample.
Health (:mod:`optimizer.gpu.nvml_health`): Xid events, ECC, retired pages, row remapping and clock-throttle
reasons; a fatal Xid (:data:`FATAL_XIDS`) marks that GPU failed until the optimizer restarts.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import structlog

from optimizer.gpu.nvml_device import (
    _NO_V2_CODES,
    _UNKNOWN_FIELD_CODES,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    GpuLost,
    _Device,
    _MigDevice,
    _text,
)
from optimizer.gpu.nvml_health import (
    NVML_AGGREGATE_ECC,
    NVML_ERROR_TIMEOUT,
    NVML_EVENT_TYPE_XID_CRITICAL_ERROR,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    NVML_VOLATILE_ECC,
    THROTTLE_REASON_BITS,
    XID_DRAIN_LIMIT,
    XID_WAIT_MS,
    _address as _address,
    _Health,
)
from optimizer.gpu.nvml_mig import NVML_DEVICE_MIG_ENABLE, MigReader, mig_profile
from optimizer.gpu.types import BackendError, GpuProcess, GpuSample

__all__ = ["NVML_AGGREGATE_ECC", "NVML_DEVICE_MIG_ENABLE", "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
           "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_NOT_FOUND", "NVML_ERROR_NOT_SUPPORTED",
           "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_TIMEOUT", "NVML_EVENT_TYPE_XID_CRITICAL_ERROR",
           "NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
           "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR", "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS",
           "NVML_VOLATILE_ECC", "THROTTLE_REASON_BITS", "XID_DRAIN_LIMIT", "XID_WAIT_MS", "GpuLost", "NvmlBackend",
           "mig_profile"]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class NvmlBackend(MigReader):
    """Reads every GPU NVML sees. Raises :class:`BackendError` if NVML cannot start."""

    name = "nvml"
    blocking = True

    def __init__(self, nvml: ModuleType | None = None) -> None:
        try:
            self._nvml: Any = nvml if nvml is not None else importlib.import_module("pynvml")
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a core dependency
            raise BackendError("nvidia-ml-py (pynvml) is not installed") from exc
        self._lock = threading.Lock()
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            raise BackendError(f"NVML could not be initialised: {exc} (is the NVIDIA driver loaded?)") from exc
        self._devices: list[_Device] = []
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError as exc:
            self._nvml.nvmlShutdown()
            raise BackendError(f"NVML could not list the GPUs: {exc}") from exc
        self._health: dict[str, _Health] = {}
        self._event_set: Any = self._create_event_set()
        for index in range(count):
            try:
                self._devices.append(self._open(index))
            except self._nvml.NVMLError as exc:  # one bad GPU must not hide the healthy ones
                log.error("gpu_open_failed", gpu=index, error=str(exc))
                self._devices.append(_Device(index=index, uuid=f"unknown-{index}", name="unknown", handle=None))
        log.info("nvml_started", gpus=len(self._devices), names=[d.name for d in self._devices])

    def _open(self, index: int) -> _Device:
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(self._nvml.nvmlDeviceGetUUID(handle))
        name = _text(self._nvml.nvmlDeviceGetName(handle))
        dev = _Device(index=index, uuid=uuid, name=name, handle=handle)
        self._register_xid(dev)
        return dev

    @property
    def device_count(self) -> int:
        return len(self._devices)

    def _query(self, fn: Callable[[], T]) -> T | None:
        """Call NVML; ``None`` for an unsupported field; :class:`GpuLost` for a lost GPU."""
        try:
            return fn()
        except self._nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in _UNKNOWN_FIELD_CODES:
                return None
            if code == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(str(exc)) from exc
            raise

    def _memory(self, dev: _Device | _MigDevice) -> tuple[int, int, int, int | None]:
        """(total, used incl. reserved, free, reserved or None), in bytes."""
        nvml = self._nvml
        if dev.memory_v2 and hasattr(nvml, "nvmlMemory_v2"):
            try:
                m = nvml.nvmlDeviceGetMemoryInfo(dev.handle, version=nvml.nvmlMemory_v2)
                return int(m.total), int(m.used) + int(m.reserved), int(m.free), int(m.reserved)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) not in _NO_V2_CODES:
                    if getattr(exc, "value", None) == NVML_ERROR_GPU_IS_LOST:
                        raise GpuLost(str(exc)) from exc
                    raise
                dev.memory_v2 = False
                log.info("nvml_memory_v1_fallback", gpu=dev.index, reason=str(exc))
        try:
            m = nvml.nvmlDeviceGetMemoryInfo(dev.handle)
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) == NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(str(exc)) from exc
            raise
        return int(m.total), int(m.used), int(m.free), None

    def _processes(self, dev: _Device | _MigDevice) -> tuple[GpuProcess, ...]:
        mismatch = getattr(self._nvml, "NVMLLibraryMismatchError", None)
        try:
            procs = self._query(lambda: self._nvml.nvmlDeviceGetComputeRunningProcesses(dev.handle))
        except Exception as exc:
            # nvidia-ml-py newer than the driver: the _v3 call is missing and the library raises
            # NVMLLibraryMismatchError (not an NVMLError). The process list is optional.
            if mismatch is None or not isinstance(exc, mismatch):
                raise
            return ()
        if not procs:
            return ()
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append(GpuProcess(pid=int(p.pid), used_memory_bytes=None if used is None else int(used)))
        return tuple(out)

    def _read(self, dev: _Device, now: float) -> GpuSample:
        nvml = self._nvml
        h = dev.handle
        total, used, free, reserved = self._memory(dev)
        temp = self._query(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        power_mw = self._query(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        limit_mw = self._query(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        util = self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        return GpuSample(
            index=dev.index,
            uuid=dev.uuid,
            name=dev.name,
            timestamp=now,
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_free_bytes=free,
            memory_reserved_bytes=reserved,
            temperature_celsius=None if temp is None else float(temp),
            power_usage_watts=None if power_mw is None else power_mw / 1000.0,
            power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
            utilization_percent=None if util is None else float(util.gpu),
            processes=self._processes(dev),
            **self._health_fields(dev),
        )

    def sample(self, now: float) -> list[GpuSample]:
        """Read every GPU once. A GPU that fails is returned as a failed sample; never raises."""
        out: list[GpuSample] = []
        with self._lock:
            self._drain_xids(now)
            for i, dev in enumerate(self._devices):
                try:
                    if dev.handle is None:
                        dev = self._devices[i] = self._open(dev.index)
                        log.info("gpu_opened", gpu=dev.index, uuid=dev.uuid)
                    fatal = self._fatal(dev)
                    if fatal is not None:
                        out.extend(self._fatal_entries(dev, now, fatal))
                        continue
                    if self._mig_enabled(dev):
                        out.extend(self._mig_samples(dev, now))
                    else:
                        dev.mig = []
                        out.append(self._read(dev, now))
                except GpuLost as exc:
                    log.error("gpu_lost", gpu=dev.index, uuid=dev.uuid, error=str(exc))
                    out.extend(self._failed_entries(dev, now, f"GPU is lost: {exc}"))
                except self._nvml.NVMLError as exc:
                    log.warning("gpu_sample_failed", gpu=dev.index, uuid=dev.uuid, error=str(exc))
                    out.extend(self._failed_entries(dev, now, str(exc)))
                except Exception as exc:  # noqa: BLE001 - last resort: one device, never the sample
                    log.error("gpu_sample_error", gpu=dev.index, uuid=dev.uuid, error=repr(exc))
                    out.extend(self._failed_entries(dev, now, repr(exc)))
        return out

    def _failed_entries(self, dev: _Device, now: float, error: str) -> list[GpuSample]:
        """A failing GPU's entries: its MIG devices as last listed, else the GPU itself."""
        if dev.mig:
            return [self._failed_mig(dev, m, now, error) for m in dev.mig]
        return [self._failed(dev, now, error)]

    def _failed(self, dev: _Device, now: float, error: str) -> GpuSample:
        return GpuSample(index=dev.index, uuid=dev.uuid, name=dev.name, timestamp=now, failed=True, error=error,
                         **self._xid_fields(dev))

    def _fatal(self, dev: _Device) -> int | None:
        health = self._health.get(dev.uuid)
        return None if health is None else health.fatal_xid

    def _fatal_entries(self, dev: _Device, now: float, xid: int) -> list[GpuSample]:
        """A GPU that logged a fatal Xid: failed (no readings, nothing sized on it) until a restart; its MIG
        devices with it."""
        return self._failed_entries(dev, now, f"fatal Xid {xid} (see https://docs.nvidia.com/deploy/xid-errors/): "
                                      "the GPU needs a reset")

    def close(self) -> None:
        with self._lock:
            if self._event_set is not None:
                try:
                    self._nvml.nvmlEventSetFree(self._event_set)
                except self._nvml.NVMLError as exc:  # pragma: no cover - shutting down anyway
                    log.warning("nvml_event_set_free_failed", error=str(exc))
                self._event_set = None
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:  # pragma: no cover - nothing left to do
                log.warning("nvml_shutdown_failed", error=str(exc))
