"""GPU health on NVML, a part of :class:`optimizer.gpu.nvml.NvmlBackend`.

Health: Xid critical errors come through one NVML event set (every GPU registered for
``nvmlEventTypeXidCriticalError``), drained at the start of each sample with a short wait, in the
same worker thread as every other NVML call (no thread of its own, nothing on the event loop). ECC
counts, retired pages, row remapping and clock-throttle reasons are read per sample; each is
``None`` where the board does not support it. A fatal Xid (:data:`FATAL_XIDS`) marks that GPU
failed until the optimizer restarts: the board needs a reset, which restarts its clients anyway.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from optimizer.gpu.nvml_device import (
    _UNKNOWN_FIELD_CODES,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    GpuLost,
    _Device,
    _text,
)
from optimizer.gpu.types import FATAL_XIDS, THROTTLE_REASONS

log = structlog.get_logger("optimizer.gpu.nvml")  # the NVML backend's events, whichever part logs them

T = TypeVar("T")

# -- health: constants of nvidia-ml-py (pynvml.py), checked against it in tests/test_gpu_health.py.
NVML_ERROR_TIMEOUT = 10  # nvmlEventSetWait: no event within the timeout
NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x0000000000000008  # nvmlEventTypeXidCriticalError
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
#: nvmlClocksEventReason* (= nvmlClocksThrottleReason*) bits, by our name (THROTTLE_REASONS).
THROTTLE_REASON_BITS = {
    "gpu_idle": 0x1, "applications_clocks_setting": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
    "sync_boost": 0x10, "sw_thermal_slowdown": 0x20, "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
assert tuple(THROTTLE_REASON_BITS) == THROTTLE_REASONS
XID_WAIT_MS = 1  # the first wait of a sample; the rest of the queue is drained without waiting
XID_DRAIN_LIMIT = 256  # events read per sample at most (an Xid storm must not hold the sampler)


@dataclass
class _Health:
    """What one GPU's Xid events said since the optimizer started (kept by UUID, across reopenings)."""

    xids: dict[int, int]
    last_xid: int | None = None
    last_xid_at: float | None = None
    fatal_xid: int | None = None


def _address(handle: Any) -> int | None:
    """The address a ctypes device handle points to (two pointer objects to one device compare unequal)."""
    try:
        value = ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None
    return None if value is None else int(value)


class HealthReader:
    """Xid events (one event set, drained at each sample), ECC, retired pages, row remapping, clock throttling."""

    _nvml: Any
    _devices: list[_Device]
    _health: dict[str, _Health]
    _event_set: Any

    if TYPE_CHECKING:
        def _query(self, fn: Callable[[], T]) -> T | None: ...

    # -- health: Xid events ------------------------------------------------------------------------

    def _create_event_set(self) -> Any:
        """One event set for every GPU; ``None`` where the driver has none (Xids are then unknown)."""
        try:
            return self._nvml.nvmlEventSetCreate()
        except self._nvml.NVMLError as exc:
            log.warning("nvml_xid_events_unavailable", error=str(exc))
            return None

    def _register_xid(self, dev: _Device) -> None:
        self._health.setdefault(dev.uuid, _Health(xids={}))
        if self._event_set is None:
            return
        try:
            self._nvml.nvmlDeviceRegisterEvents(dev.handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR, self._event_set)
            dev.xid_registered = True
        except self._nvml.NVMLError as exc:  # NotSupported on some boards: that GPU's Xids are unknown
            log.warning("nvml_xid_events_not_registered", gpu=dev.index, uuid=dev.uuid, error=str(exc))

    def _drain_xids(self, now: float) -> None:
        """Read the Xid events that came since the last sample (worker thread; a short first wait)."""
        if self._event_set is None:
            return
        nvml = self._nvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        timeout = XID_WAIT_MS
        for _ in range(XID_DRAIN_LIMIT):
            try:
                data = wait(self._event_set, timeout)
            except nvml.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == NVML_ERROR_FUNCTION_NOT_FOUND:  # a driver without the wait: Xids are unknown
                    log.warning("nvml_xid_events_unavailable", error=str(exc))
                    self._stop_xid_events()
                elif code != NVML_ERROR_TIMEOUT:
                    log.warning("nvml_xid_wait_failed", error=str(exc))
                return
            timeout = 0
            if int(data.eventType) & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                self._note_xid(data, now)

    def _stop_xid_events(self) -> None:
        for dev in self._devices:
            dev.xid_registered = False
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except self._nvml.NVMLError as exc:  # pragma: no cover - nothing more to do
            log.warning("nvml_event_set_free_failed", error=str(exc))
        self._event_set = None

    def _note_xid(self, data: Any, now: float) -> None:
        xid = int(data.eventData)
        try:
            uuid: str | None = _text(self._nvml.nvmlDeviceGetUUID(data.device))
        except self._nvml.NVMLError as exc:  # a GPU fallen off the bus may not even say its UUID
            uuid = self._uuid_of_handle(data.device)
            if uuid is None:
                log.error("gpu_xid_unattributed", xid=xid, error=str(exc))
                return
        assert uuid is not None
        health = self._health.setdefault(uuid, _Health(xids={}))
        health.xids[xid] = health.xids.get(xid, 0) + 1
        health.last_xid, health.last_xid_at = xid, now
        fatal = xid in FATAL_XIDS
        if fatal and health.fatal_xid is None:
            health.fatal_xid = xid
        (log.error if fatal else log.warning)("gpu_xid", uuid=uuid, xid=xid, fatal=fatal)

    def _uuid_of_handle(self, handle: Any) -> str | None:
        """The UUID of the opened device behind ``handle`` (an event's ``c_nvmlDevice_t``), by address."""
        want = _address(handle)
        for dev in self._devices:
            if dev.handle is not None and (dev.handle == handle or (want is not None and _address(dev.handle) == want)):
                return dev.uuid
        return None

    def _xid_fields(self, dev: _Device) -> dict[str, Any]:
        health = self._health.get(dev.uuid)
        if health is None or not (dev.xid_registered or health.xids):
            return {}
        return {"xid_errors": tuple(sorted(health.xids.items())), "last_xid": health.last_xid,
                "last_xid_at": health.last_xid_at}

    # -- health: ECC, retired pages, row remapping, clock throttling -----------------------------------

    def _health_fields(self, dev: _Device) -> dict[str, Any]:
        nvml, h = self._nvml, dev.handle
        fields = self._xid_fields(dev)

        def ecc(kind: int, counter: int) -> int | None:
            value = self._query(lambda: nvml.nvmlDeviceGetTotalEccErrors(h, kind, counter))
            return None if value is None else int(value)

        fields["ecc_corrected_volatile"] = ecc(NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)
        fields["ecc_uncorrected_volatile"] = ecc(NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)
        fields["ecc_corrected_aggregate"] = ecc(NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_AGGREGATE_ECC)
        fields["ecc_uncorrected_aggregate"] = ecc(NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_AGGREGATE_ECC)
        sbe = self._query(lambda: nvml.nvmlDeviceGetRetiredPages(
            h, NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS))
        dbe = self._query(lambda: nvml.nvmlDeviceGetRetiredPages(h, NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))
        pending = self._query(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(h))
        fields["retired_pages_sbe"] = None if sbe is None else len(sbe)
        fields["retired_pages_dbe"] = None if dbe is None else len(dbe)
        fields["retired_pages_pending"] = None if pending is None else bool(pending)
        rows = self._query(lambda: nvml.nvmlDeviceGetRemappedRows(h))
        if rows is not None:
            corr, unc, row_pending, row_failure = rows
            fields.update(remapped_rows_correctable=int(corr), remapped_rows_uncorrectable=int(unc),
                          remapped_rows_pending=bool(row_pending), remapped_rows_failure=bool(row_failure))
        fields["throttle_reasons"] = self._throttle_reasons(dev)
        return fields

    def _throttle_reasons(self, dev: _Device) -> frozenset[str] | None:
        """The active reasons, by name; the newer ``...ClocksEventReasons`` first, then the older name."""
        nvml, h = self._nvml, dev.handle
        bits: int | None = None
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(nvml, name, None)
            if fn is None:
                continue
            try:
                bits = int(fn(h))
                break
            except nvml.NVMLError as exc:  # FunctionNotFound: a driver older than the name; try the next
                code = getattr(exc, "value", None)
                if code == NVML_ERROR_GPU_IS_LOST:
                    raise GpuLost(str(exc)) from exc
                if code not in _UNKNOWN_FIELD_CODES:
                    raise
        if bits is None:
            return None
        return frozenset(name for name, bit in THROTTLE_REASON_BITS.items() if bits & bit)
