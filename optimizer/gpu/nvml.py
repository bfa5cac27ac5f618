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

MIG: a GPU whose current MIG mode is ``NVML_DEVICE_MIG_ENABLE`` is not an entry of its own (its
memory is its instances'); each of its MIG devices (``nvmlDeviceGetMaxMigDeviceCount`` slots,
``nvmlDeviceGetMigDeviceHandleByIndex``; ``NVML_ERROR_NOT_FOUND`` for an empty slot) is, with its
own memory and UUID and the parent's temperature, power and utilisation (see :meth:`_mig_samples`).
The devices are listed again on every sample, so a re-partitioned GPU is followed without a restart.

Health: Xid critical errors come through one NVML event set (every GPU registered for
``nvmlEventTypeXidCriticalError``), drained at the start of each sample with a short wait, in the
same worker thread as every other NVML call (no thread of its own, nothing on the event loop). ECC
counts, retired pages, row remapping and clock-throttle reasons are read per sample; each is
``None`` where the board does not support it. A fatal Xid (:data:`FATAL_XIDS`) marks that GPU
failed until the optimizer restarts: the board needs a reset, which restarts its clients anyway.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import structlog

from optimizer.gpu.types import FATAL_XIDS, THROTTLE_REASONS, BackendError, GpuProcess, GpuSample, mig_index

log = structlog.get_logger(__name__)

T = TypeVar("T")

# NVML return codes (from nvml.h); compared by value so that fakes need only NVMLError.value.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_DEVICE_MIG_ENABLE = 1  # nvmlDeviceGetMigMode's current mode when MIG is on

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

_UNKNOWN_FIELD_CODES = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_NO_PERMISSION, NVML_ERROR_FUNCTION_NOT_FOUND})
_NO_V2_CODES = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH})


class GpuLost(Exception):
    """Internal: the device stopped answering; the sample of this GPU is marked failed."""


@dataclass
class _Device:
    index: int
    uuid: str
    name: str
    handle: Any  # None while the device could not be opened; retried every sample
    memory_v2: bool = True
    # -- health
    xid_registered: bool = False  # registered on the event set for Xid critical errors
    # MIG devices seen at the last listing (empty off MIG): failed in its place if the parent fails
    mig: list[_MigDevice] = field(default_factory=list)


@dataclass
class _MigDevice:
    """One MIG device (a compute instance of a GPU instance) of a parent GPU."""

    index: int  # mig_index(parent, gpu instance, compute instance)
    uuid: str
    name: str
    handle: Any
    gpu_instance_id: int
    compute_instance_id: int
    profile: str | None
    memory_v2: bool = True


_PROFILE_IN_NAME = re.compile(r"(?:[0-9]+c\.)?[0-9]+g\.[0-9]+gb")


def mig_profile(gi_slices: int, ci_slices: int, memory_mb: int, parent_total_bytes: int) -> str:
    """The MIG profile name ("1g.10gb", "1c.3g.40gb") from ``nvmlDeviceGetAttributes``' counts.

    As NVIDIA's go-nvlib names profiles (what the device plugin's ``nvidia.com/mig-<profile>`` resources
    use): the memory is the instance's fraction of the parent, rounded up to eighths, times the parent's
    memory in whole GiB; a compute instance smaller than its GPU instance is prefixed ``<n>c.``.
    """
    gib = 1024**3
    fraction = math.ceil(memory_mb * 1024**2 / parent_total_bytes * 8) / 8
    memory_gb = round(fraction * ((parent_total_bytes + gib - 1) // gib))
    base = f"{gi_slices}g.{memory_gb}gb"
    return base if ci_slices == gi_slices else f"{ci_slices}c.{base}"


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
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

    # -- MIG ---------------------------------------------------------------------------------------

    def _mig_enabled(self, dev: _Device) -> bool:
        """MIG mode is on now (the current mode, not a pending one). Unsupported (no MIG board): off."""
        nvml = self._nvml
        if not hasattr(nvml, "nvmlDeviceGetMigMode"):  # a pynvml older than MIG: no MIG to see
            return False
        mode = self._query(lambda: nvml.nvmlDeviceGetMigMode(dev.handle))
        return mode is not None and int(mode[0]) == NVML_DEVICE_MIG_ENABLE

    def _list_mig(self, dev: _Device) -> list[_MigDevice]:
        """The parent's MIG devices; the ones already known (by UUID) keep their identity and profile."""
        nvml = self._nvml
        h = dev.handle
        known = {m.uuid: m for m in dev.mig}
        slots = self._query(lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(h)) or 0
        parent_total: int | None = None
        found: list[_MigDevice] = []
        for slot in range(int(slots)):
            try:
                mh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, slot)
            except nvml.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == NVML_ERROR_NOT_FOUND:  # an empty slot
                    continue
                if code == NVML_ERROR_GPU_IS_LOST:
                    raise GpuLost(str(exc)) from exc
                raise
            uuid = _text(nvml.nvmlDeviceGetUUID(mh))
            m = known.get(uuid)
            if m is not None:
                m.handle = mh
                found.append(m)
                continue
            gi = int(nvml.nvmlDeviceGetGpuInstanceId(mh))
            ci = int(nvml.nvmlDeviceGetComputeInstanceId(mh))
            name = _text(nvml.nvmlDeviceGetName(mh))
            if parent_total is None:
                parent_total = self._memory(dev)[0]
            m = _MigDevice(index=mig_index(dev.index, gi, ci), uuid=uuid, name=name, handle=mh,
                           gpu_instance_id=gi, compute_instance_id=ci, profile=self._profile(mh, name, parent_total))
            log.info("mig_device_found", gpu=m.index, parent=dev.index, uuid=uuid, gpu_instance_id=gi,
                     compute_instance_id=ci, profile=m.profile)
            found.append(m)
        found.sort(key=lambda m: m.index)
        return found

    def _profile(self, handle: Any, name: str, parent_total: int) -> str | None:
        """The profile from the device's attributes (slice counts, memory); else from its name; else None."""
        nvml = self._nvml
        attrs = self._query(lambda: nvml.nvmlDeviceGetAttributes(handle))
        if attrs is not None and parent_total > 0 and int(attrs.gpuInstanceSliceCount) > 0:
            return mig_profile(int(attrs.gpuInstanceSliceCount), int(attrs.computeInstanceSliceCount),
                               int(attrs.memorySizeMB), parent_total)
        match = _PROFILE_IN_NAME.search(name)
        return match.group(0) if match else None

    def _mig_samples(self, dev: _Device, now: float) -> list[GpuSample]:
        """One sample per MIG device: its own memory and processes, the parent's sensors.

        A MIG device whose memory cannot be read is failed alone; a lost parent fails them all.
        NVML does not report utilisation per MIG device (nor, on most boards, for a parent in MIG
        mode: ``NotSupported``, so ``None``).
        """
        nvml = self._nvml
        h = dev.handle
        dev.mig = self._list_mig(dev)
        if not dev.mig:
            log.warning("mig_enabled_without_instances", gpu=dev.index, uuid=dev.uuid,
                        detail="MIG mode is on but no GPU instance exists: nothing to size on this GPU")
            return []
        temp = self._query(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
        power_mw = self._query(lambda: nvml.nvmlDeviceGetPowerUsage(h))
        limit_mw = self._query(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
        util = self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        health = self._health_fields(dev)  # Xid events, ECC, remapping and throttling are the parent's
        out = []
        for m in dev.mig:
            try:
                total, used, free, reserved = self._memory(m)
                processes = self._processes(m)
            except nvml.NVMLError as exc:
                log.warning("mig_sample_failed", gpu=m.index, uuid=m.uuid, parent=dev.index, error=str(exc))
                out.append(self._failed_mig(dev, m, now, str(exc)))
                continue
            out.append(GpuSample(
                index=m.index, uuid=m.uuid, name=m.name, timestamp=now,
                memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=free,
                memory_reserved_bytes=reserved,
                temperature_celsius=None if temp is None else float(temp),
                power_usage_watts=None if power_mw is None else power_mw / 1000.0,
                power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
                utilization_percent=None if util is None else float(util.gpu),
                processes=processes,
                parent_index=dev.index, parent_uuid=dev.uuid, gpu_instance_id=m.gpu_instance_id,
                compute_instance_id=m.compute_instance_id, mig_profile=m.profile, **health,
            ))
        return out

    def _failed_mig(self, dev: _Device, m: _MigDevice, now: float, error: str) -> GpuSample:
        return GpuSample(index=m.index, uuid=m.uuid, name=m.name, timestamp=now, failed=True, error=error,
                         parent_index=dev.index, parent_uuid=dev.uuid, gpu_instance_id=m.gpu_instance_id,
                         compute_instance_id=m.compute_instance_id, mig_profile=m.profile, **self._xid_fields(dev))

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
