"""Tests of :mod:`optimizer.gpu.nvml` against a fake ``pynvml`` built on the real library.

The fake module returns the real nvidia-ml-py structures (``c_nvmlMemory_t``,
``c_nvmlMemory_v2_t``, ``c_nvmlUtilization_t``, process info converted by the real
``nvmlStructToFriendlyObject``) and raises the real ``pynvml.NVMLError`` hierarchy the way the
library does (``raise NVMLError(ret)``, which ``NVMLError.__new__`` maps to the generated
subclass such as ``NVMLError_GpuIsLost``). Errors are injected per (device, NVML function).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml
import pytest

from optimizer.gpu.nvml import NvmlBackend
from optimizer.gpu.types import BackendError, GpuProcess, GpuSample, mig_index

GIB = 1024**3
MIB = 1024**2

# The names of the real C symbols; the fake uses them as the keys of injected errors.
MEM_V1 = "nvmlDeviceGetMemoryInfo"
MEM_V2 = "nvmlDeviceGetMemoryInfo_v2"
TEMPERATURE = "nvmlDeviceGetTemperature"
POWER = "nvmlDeviceGetPowerUsage"
POWER_LIMIT = "nvmlDeviceGetEnforcedPowerLimit"
UTILIZATION = "nvmlDeviceGetUtilizationRates"
PROCESSES = "nvmlDeviceGetComputeRunningProcesses"
INIT = "nvmlInit"
SHUTDOWN = "nvmlShutdown"
COUNT = "nvmlDeviceGetCount"
HANDLE = "nvmlDeviceGetHandleByIndex"
# MIG
MIG_MODE = "nvmlDeviceGetMigMode"
MIG_COUNT = "nvmlDeviceGetMaxMigDeviceCount"
MIG_HANDLE = "nvmlDeviceGetMigDeviceHandleByIndex"
MIG_ATTRIBUTES = "nvmlDeviceGetAttributes_v2"

# Per-device functions the backend calls on every sample, besides memory info.
FIELD_FUNCTIONS = (TEMPERATURE, POWER, POWER_LIMIT, UTILIZATION, PROCESSES)

# -- health: the real C symbols of the health functions (errors are injected by these names)
EVENT_SET_CREATE = "nvmlEventSetCreate"
REGISTER_EVENTS = "nvmlDeviceRegisterEvents"
EVENT_WAIT = "nvmlEventSetWait_v2"
EVENT_SET_FREE = "nvmlEventSetFree"
ECC_TOTAL = "nvmlDeviceGetTotalEccErrors"
RETIRED_PAGES = "nvmlDeviceGetRetiredPages"
RETIRED_PENDING = "nvmlDeviceGetRetiredPagesPendingStatus"
REMAPPED_ROWS = "nvmlDeviceGetRemappedRows"
CLOCK_EVENT_REASONS = "nvmlDeviceGetCurrentClocksEventReasons"
CLOCK_THROTTLE_REASONS = "nvmlDeviceGetCurrentClocksThrottleReasons"
HEALTH_FUNCTIONS = (ECC_TOTAL, RETIRED_PAGES, RETIRED_PENDING, REMAPPED_ROWS, CLOCK_EVENT_REASONS)


@dataclass
class FakeHealth:
    """One fake board's health state (``ecc[(error type, counter type)]``, ``retired[cause]`` page addresses)."""

    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    retired: dict[int, list[int]] = field(default_factory=dict)
    retired_pending: int = pynvml.NVML_FEATURE_DISABLED
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrected, uncorrected, pending, failure
    clock_reasons: int = pynvml.nvmlClocksEventReasonNone


@dataclass
class FakeGpu:
    """The state of one fake board. ``used`` is v2's ``used`` (allocated, without ``reserved``)."""

    uuid: str | bytes
    name: str | bytes
    total: int
    used: int
    reserved: int
    temperature_c: int = 45
    power_mw: int = 100_000
    power_limit_mw: int = 300_000
    utilization_gpu: int = 30
    utilization_memory: int = 10
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    # MIG (see the MIG block of FakeNvml): None = a board without MIG (nvmlDeviceGetMigMode: NotSupported)
    mig_mode: int | None = None
    mig_slots: list[FakeMig | None] = field(default_factory=list)  # None: an empty slot (NOT_FOUND)

    @property
    def free(self) -> int:
        return self.total - self.used - self.reserved


@dataclass
class FakeMig(FakeGpu):
    """One MIG device of a fake board: its own memory, UUID and processes; the attributes' counts."""

    gpu_instance_id: int = 1
    compute_instance_id: int = 0
    gi_slices: int = 1
    ci_slices: int = 1
    memory_mb: int = 9728  # what nvmlDeviceGetAttributes' memorySizeMB says of a 1g.10gb on an 80 GB A100


@dataclass(frozen=True)
class FakeMigHandle:
    """Stands for the ``c_nvmlDevice_t`` of a MIG device: its parent and slot."""

    parent: int
    slot: int


@dataclass(frozen=True)
class FakeHandle:
    """Stands for ``c_nvmlDevice_t``; the backend must pass it back, never the index."""

    index: int


class FakeNvml(ModuleType):
    """A stand-in for the ``pynvml`` module with the same function names and signatures.

    ``errors[(index, function)]`` (``index`` is ``None`` for the library-wide functions) holds an
    NVML return code; the function then raises ``pynvml.NVMLError(code)`` until the entry is
    removed, as the real wrappers do through ``_nvmlCheckReturn``.
    """

    def __init__(self, gpus: list[FakeGpu]) -> None:
        super().__init__("fake_pynvml")
        self.gpus = gpus
        self.errors: dict[tuple[int | None, str], int] = {}
        self.calls: list[tuple[str, int | None]] = []
        self.memory_versions: list[tuple[int, int | None]] = []
        # The real module's public names the backend may use.
        self.NVMLError = pynvml.NVMLError
        self.NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
        self.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
        self.nvmlMemory_v2 = pynvml.nvmlMemory_v2
        self.NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
        self.NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
        self._init_health()

    # -- test helpers --------------------------------------------------------------------------

    def fail(self, index: int | None, function: str, code: int) -> None:
        self.errors[(index, function)] = code

    def heal(self, index: int | None, function: str) -> None:
        del self.errors[(index, function)]

    def count(self, function: str, index: int | None = None) -> int:
        return sum(1 for name, i in self.calls if name == function and (index is None or i == index))

    def _call(self, function: str, index: int | None) -> None:
        self.calls.append((function, index))
        code = self.errors.get((index, function))
        if code is not None:
            raise pynvml.NVMLError(code)

    def _gpu(self, handle: object) -> tuple[int, FakeGpu]:
        if isinstance(handle, FakeMigHandle):  # MIG: errors keyed by the MIG device's entry index
            return self._mig(handle)
        if not isinstance(handle, FakeHandle):
            raise TypeError(f"expected a device handle, got {handle!r}")
        return handle.index, self.gpus[handle.index]

    # -- library ---------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._call(INIT, None)

    def nvmlShutdown(self) -> None:
        self._call(SHUTDOWN, None)

    def nvmlDeviceGetCount(self) -> int:
        self._call(COUNT, None)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._call(HANDLE, index)
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    # -- device ----------------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        i, gpu = self._gpu(handle)
        self._call("nvmlDeviceGetUUID", i)
        return gpu.uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        i, gpu = self._gpu(handle)
        self._call("nvmlDeviceGetName", i)
        return gpu.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        i, gpu = self._gpu(handle)
        self.memory_versions.append((i, version))
        if not version:  # exactly like the real wrapper
            self._call(MEM_V1, i)
            return pynvml.c_nvmlMemory_t(total=gpu.total, free=gpu.free, used=gpu.used + gpu.reserved)
        self._call(MEM_V2, i)
        if version != pynvml.nvmlMemory_v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return pynvml.c_nvmlMemory_v2_t(version=version, total=gpu.total, reserved=gpu.reserved,
                                         free=gpu.free, used=gpu.used)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        i, gpu = self._gpu(handle)
        self._call(TEMPERATURE, i)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        i, gpu = self._gpu(handle)
        self._call(POWER, i)
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        i, gpu = self._gpu(handle)
        self._call(POWER_LIMIT, i)
        return gpu.power_limit_mw

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        i, gpu = self._gpu(handle)
        self._call(UTILIZATION, i)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        # The real unversioned function is wrapped in ``throwOnVersionMismatch``, which turns
        # ``NVMLError_FunctionNotFound`` into ``NVMLLibraryMismatchError``; reuse that decorator.
        wrapped: Callable[[], list[Any]] = pynvml.throwOnVersionMismatch(lambda: self._processes(handle))
        return wrapped()

    def _processes(self, handle: FakeHandle) -> list[Any]:
        i, gpu = self._gpu(handle)
        self._call(PROCESSES, i)
        not_available = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value
        out = []
        for pid, used in gpu.processes:
            struct = pynvml.c_nvmlProcessInfo_v3_t(pid=pid, usedGpuMemory=not_available if used is None else used,
                                                   gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
            obj = pynvml.nvmlStructToFriendlyObject(struct)
            if obj.usedGpuMemory == not_available:  # as the real library does (WDDM, MIG, ...)
                obj.usedGpuMemory = None
            out.append(obj)
        return out

    # -- health (Xid events, ECC, retired pages, row remapping, clock reasons) ---------------------

    def _init_health(self) -> None:
        self.health = [FakeHealth() for _ in self.gpus]
        self.xid_queue: list[tuple[int, int]] = []  # (device index, Xid code), delivered in order
        self.registered: list[tuple[int, int]] = []  # (device index, event types)
        self.wait_timeouts: list[int] = []
        self.event_sets_freed = 0
        self.nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def xid(self, index: int, code: int) -> None:
        """The driver reports Xid ``code`` on device ``index``."""
        self.xid_queue.append((index, code))

    def nvmlEventSetCreate(self) -> object:
        self._call(EVENT_SET_CREATE, None)
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: object) -> None:
        i, _ = self._gpu(handle)
        self._call(REGISTER_EVENTS, i)
        assert eventSet == "event-set"
        self.registered.append((i, eventTypes))

    def nvmlEventSetWait_v2(self, eventSet: object, timeoutms: int) -> Any:
        assert eventSet == "event-set"
        self._call(EVENT_WAIT, None)
        self.wait_timeouts.append(timeoutms)
        if not self.xid_queue:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)  # as the real wrapper on timeout
        index, code = self.xid_queue.pop(0)
        # The real c_nvmlEventData_t, but its device field holds our handle (not a C pointer).
        data = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlEventData_t(
            eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=code,
            gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF))
        data.device = FakeHandle(index)
        return data

    def nvmlEventSetWait(self, eventSet: object, timeoutms: int) -> Any:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(self, eventSet: object) -> None:
        self._call(EVENT_SET_FREE, None)
        self.event_sets_freed += 1

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        i, _ = self._gpu(handle)
        self._call(ECC_TOTAL, i)
        return self.health[i].ecc.get((errorType, counterType), 0)

    def nvmlDeviceGetRetiredPages(self, device: FakeHandle, sourceFilter: int) -> list[int]:
        i, _ = self._gpu(device)
        self._call(RETIRED_PAGES, i)
        return list(self.health[i].retired.get(sourceFilter, []))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: FakeHandle) -> int:
        i, _ = self._gpu(device)
        self._call(RETIRED_PENDING, i)
        return self.health[i].retired_pending

    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        i, _ = self._gpu(device)
        self._call(REMAPPED_ROWS, i)
        return self.health[i].remapped

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        i, _ = self._gpu(handle)
        self._call(CLOCK_EVENT_REASONS, i)
        return self.health[i].clock_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        i, _ = self._gpu(handle)
        self._call(CLOCK_THROTTLE_REASONS, i)
        return self.health[i].clock_reasons


    # -- MIG (the real names: nvmlDeviceGetMigMode, ...; kept apart from the other blocks) ----------

    def _mig(self, handle: FakeMigHandle) -> tuple[int, FakeGpu]:
        parent = self.gpus[handle.parent]
        m = parent.mig_slots[handle.slot]
        assert m is not None, "a handle of an empty slot is never handed out"
        return mig_index(handle.parent, m.gpu_instance_id, m.compute_instance_id), m

    def _parent(self, handle: object, function: str) -> tuple[int, FakeGpu]:
        if isinstance(handle, FakeMigHandle):  # the real library answers INVALID_ARGUMENT on a MIG handle
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        i, gpu = self._gpu(handle)
        self._call(function, i)
        return i, gpu

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        i, gpu = self._parent(handle, MIG_MODE)
        if gpu.mig_mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode]  # [current, pending], as the real wrapper returns

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        i, gpu = self._parent(handle, MIG_COUNT)
        if gpu.mig_mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return len(gpu.mig_slots)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeMigHandle:
        i, gpu = self._parent(handle, MIG_HANDLE)
        if not 0 <= index < len(gpu.mig_slots):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.mig_slots[index] is None or gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeMigHandle(i, index)

    def _mig_only(self, handle: object, function: str) -> FakeMig:
        if not isinstance(handle, FakeMigHandle):  # the real library: INVALID_ARGUMENT on a whole GPU
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        key, m = self._mig(handle)
        self._call(function, key)
        assert isinstance(m, FakeMig)
        return m

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeMigHandle) -> int:
        return self._mig_only(handle, "nvmlDeviceGetGpuInstanceId").gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeMigHandle) -> int:
        return self._mig_only(handle, "nvmlDeviceGetComputeInstanceId").compute_instance_id

    def nvmlDeviceGetAttributes(self, handle: FakeMigHandle) -> Any:
        m = self._mig_only(handle, MIG_ATTRIBUTES)
        return pynvml.c_nvmlDeviceAttributes(multiprocessorCount=14 * m.gi_slices, gpuInstanceSliceCount=m.gi_slices,
                                             computeInstanceSliceCount=m.ci_slices, memorySizeMB=m.memory_mb)


def mig_device(uuid: str, profile: str, gi: int, used: int, *, ci: int = 0) -> FakeMig:
    """A MIG device of an 80 GB A100 as NVML reports it (memory sizes of the real profiles)."""
    slices, memory_mb = {"1g.10gb": (1, 9728), "3g.40gb": (3, 40192), "7g.80gb": (7, 81152)}[profile]
    return FakeMig(uuid=uuid, name=f"NVIDIA A100-SXM4-80GB MIG {profile}", total=memory_mb * MIB, used=used,
                   reserved=0, processes=[(3000 + gi, used)] if used else [], gpu_instance_id=gi,
                   compute_instance_id=ci, gi_slices=slices, ci_slices=slices, memory_mb=memory_mb)


def mig_gpu() -> FakeGpu:
    """The done-when board: an 80 GB A100 in MIG mode with 2 x 1g.10gb and 1 x 3g.40gb (and empty slots)."""
    return FakeGpu(uuid="GPU-mmmm", name="NVIDIA A100-SXM4-80GB", total=80 * GIB, used=0, reserved=0,
                   temperature_c=52, power_mw=210_000, power_limit_mw=400_000, utilization_gpu=0,
                   mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE,
                   mig_slots=[mig_device("MIG-1111", "3g.40gb", 2, 20 * GIB), None,
                              mig_device("MIG-2222", "1g.10gb", 7, 3 * GIB),
                              mig_device("MIG-3333", "1g.10gb", 8, 0), None, None, None])


def three_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid="GPU-aaaa", name="NVIDIA A100-SXM4-80GB", total=80 * GIB, used=10 * GIB, reserved=512 * MIB,
                temperature_c=41, power_mw=123_456, power_limit_mw=400_000, utilization_gpu=17,
                processes=[(1001, 9 * GIB)]),
        FakeGpu(uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3", total=80 * GIB, used=60 * GIB, reserved=600 * MIB,
                temperature_c=67, power_mw=650_500, power_limit_mw=700_000, utilization_gpu=93,
                processes=[(2001, 30 * GIB), (2002, 29 * GIB)]),
        FakeGpu(uuid="GPU-cccc", name="NVIDIA L4", total=24 * GIB, used=1 * GIB, reserved=300 * MIB,
                temperature_c=35, power_mw=16_001, power_limit_mw=72_000, utilization_gpu=0, processes=[]),
    ]


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(three_gpus())


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    b = NvmlBackend(nvml=fake)
    yield b
    b.close()


def err(code: int) -> Any:
    """An error as the real library raises it (``_nvmlCheckReturn``: ``raise NVMLError(ret)``)."""
    return pynvml.NVMLError(code)


def assert_reads(sample: GpuSample, gpu: FakeGpu, *, index: int, now: float, v2: bool = True) -> None:
    """``sample`` is a full, healthy reading of ``gpu``."""
    assert sample.failed is False
    assert sample.error is None
    assert sample.index == index
    assert sample.timestamp == now
    assert sample.memory_total_bytes == gpu.total
    assert sample.memory_free_bytes == gpu.free
    assert sample.memory_used_bytes == gpu.used + gpu.reserved == gpu.total - gpu.free
    assert sample.memory_reserved_bytes == (gpu.reserved if v2 else None)
    assert sample.temperature_celsius == float(gpu.temperature_c)
    assert sample.power_usage_watts == pytest.approx(gpu.power_mw / 1000.0)
    assert sample.power_limit_watts == pytest.approx(gpu.power_limit_mw / 1000.0)
    assert sample.utilization_percent == float(gpu.utilization_gpu)
    assert sample.processes == tuple(GpuProcess(pid=p, used_memory_bytes=m) for p, m in gpu.processes)


def assert_failed(sample: GpuSample, gpu: FakeGpu, *, index: int, now: float) -> None:
    """``sample`` is a failed sample of ``gpu``: identity and an error, no readings."""
    assert sample.failed is True
    assert sample.error
    assert sample.index == index
    assert sample.uuid == gpu.uuid
    assert sample.name == gpu.name
    assert sample.timestamp == now
    assert sample.memory_total_bytes is None
    assert sample.memory_used_bytes is None
    assert sample.memory_free_bytes is None
    assert sample.memory_reserved_bytes is None
    assert sample.temperature_celsius is None
    assert sample.power_usage_watts is None
    assert sample.utilization_percent is None
    assert sample.processes == ()
    assert sample.usage_fraction is None


# -- the fake's assumptions about the real library --------------------------------------------------


def test_real_library_maps_codes_to_the_generated_subclasses() -> None:
    lost = err(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert type(lost) is pynvml.NVMLError_GpuIsLost
    assert isinstance(lost, pynvml.NVMLError)
    assert lost.value == pynvml.NVML_ERROR_GPU_IS_LOST == 15
    assert str(lost) == "GPU is lost"
    assert type(pynvml.NVMLError_NotSupported()) is pynvml.NVMLError_NotSupported
    assert pynvml.NVMLError_NotSupported().value == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert type(err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)) is pynvml.NVMLError_FunctionNotFound
    assert type(err(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)) is pynvml.NVMLError_ArgumentVersionMismatch
    assert type(err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) is pynvml.NVMLError_LibraryNotFound
    # nvmlLibraryMismatchError (from throwOnVersionMismatch) is *not* an NVMLError.
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)


def test_backend_codes_match_the_real_library() -> None:
    from optimizer.gpu import nvml as mod

    assert mod.NVML_ERROR_NOT_SUPPORTED == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert mod.NVML_ERROR_NO_PERMISSION == pynvml.NVML_ERROR_NO_PERMISSION
    assert mod.NVML_ERROR_FUNCTION_NOT_FOUND == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    assert mod.NVML_ERROR_GPU_IS_LOST == pynvml.NVML_ERROR_GPU_IS_LOST
    assert mod.NVML_ERROR_ARGUMENT_VERSION_MISMATCH == pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH


# -- start up and shut down -------------------------------------------------------------------------


def test_start_opens_every_device(fake: FakeNvml) -> None:
    backend = NvmlBackend(nvml=fake)
    assert backend.name == "nvml"
    assert backend.blocking is True
    assert backend.device_count == 3
    assert fake.count(INIT) == 1
    assert [i for name, i in fake.calls if name == HANDLE] == [0, 1, 2]
    assert fake.count(SHUTDOWN) == 0


def test_close_calls_nvml_shutdown_once(fake: FakeNvml) -> None:
    backend = NvmlBackend(nvml=fake)
    backend.close()
    assert fake.count(SHUTDOWN) == 1
    assert fake.count(INIT) == 1


def test_close_swallows_a_failing_shutdown(fake: FakeNvml) -> None:
    backend = NvmlBackend(nvml=fake)
    fake.fail(None, SHUTDOWN, pynvml.NVML_ERROR_UNINITIALIZED)
    backend.close()  # does not raise
    assert fake.count(SHUTDOWN) == 1


@pytest.mark.parametrize("code", [
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_NO_PERMISSION,
])
def test_init_failure_is_a_backend_error_from_the_nvml_error(fake: FakeNvml, code: int) -> None:
    fake.fail(None, INIT, code)
    with pytest.raises(BackendError) as info:
        NvmlBackend(nvml=fake)
    cause = info.value.__cause__
    assert isinstance(cause, pynvml.NVMLError)
    assert type(cause) is pynvml.NVMLError._valClassMapping[code]
    assert cause.value == code
    message = str(info.value)
    assert "NVML could not be initialised" in message
    assert str(cause) in message
    assert "driver" in message
    # Nothing else was attempted, and there is nothing to shut down.
    assert fake.calls == [(INIT, None)]


def test_init_with_the_real_library_and_no_driver_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``pynvml.nvmlInit`` (the default module) when ``libnvidia-ml.so.1`` cannot be loaded."""

    def no_library(*args: object, **kwargs: object) -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)
    with pytest.raises(BackendError, match="NVML could not be initialised: NVML Shared Library Not Found") as info:
        NvmlBackend()
    assert isinstance(info.value.__cause__, pynvml.NVMLError_LibraryNotFound)


def test_device_count_failure_is_a_backend_error_and_shuts_nvml_down(fake: FakeNvml) -> None:
    fake.fail(None, COUNT, pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(BackendError, match="NVML could not list the GPUs: Unknown Error") as info:
        NvmlBackend(nvml=fake)
    assert isinstance(info.value.__cause__, pynvml.NVMLError_Unknown)
    assert fake.count(SHUTDOWN) == 1


def test_a_gpu_that_cannot_be_opened_is_failed_and_the_others_are_read(fake: FakeNvml) -> None:
    fake.fail(2, HANDLE, pynvml.NVML_ERROR_GPU_IS_LOST)
    backend = NvmlBackend(nvml=fake)
    assert backend.device_count == 3
    samples = backend.sample(1.0)
    assert [s.failed for s in samples] == [False, False, True]
    assert samples[2].index == 2 and samples[2].error
    assert_reads(samples[0], fake.gpus[0], index=0, now=1.0)
    assert fake.count(SHUTDOWN) == 0
    fake.heal(2, HANDLE)  # the device answers again: it is opened and read on the next sample
    again = backend.sample(2.0)
    assert_reads(again[2], fake.gpus[2], index=2, now=2.0)


def test_no_gpus_gives_an_empty_sample() -> None:
    fake = FakeNvml([])
    backend = NvmlBackend(nvml=fake)
    assert backend.device_count == 0
    assert backend.sample(1.0) == []


# -- a healthy sample -------------------------------------------------------------------------------


def test_every_gpu_is_sampled_with_the_right_units(fake: FakeNvml, backend: NvmlBackend) -> None:
    samples = backend.sample(12.5)
    assert [s.index for s in samples] == [0, 1, 2]
    for index, (sample, gpu) in enumerate(zip(samples, fake.gpus, strict=True)):
        assert sample.uuid == gpu.uuid
        assert sample.name == gpu.name
        assert_reads(sample, gpu, index=index, now=12.5)
    # Spot-check the conversions on concrete numbers.
    a100, h100, l4 = samples
    assert a100.power_usage_watts == pytest.approx(123.456)
    assert a100.power_limit_watts == pytest.approx(400.0)
    assert h100.power_usage_watts == pytest.approx(650.5)
    assert l4.power_usage_watts == pytest.approx(16.001)
    assert a100.memory_used_bytes == 10 * GIB + 512 * MIB
    assert a100.memory_reserved_bytes == 512 * MIB
    assert a100.memory_free_bytes == 80 * GIB - 10 * GIB - 512 * MIB
    assert a100.usage_fraction == pytest.approx((10 * GIB + 512 * MIB) / (80 * GIB))
    assert h100.processes == (GpuProcess(2001, 30 * GIB), GpuProcess(2002, 29 * GIB))
    assert l4.processes == ()
    assert l4.utilization_percent == 0.0
    # Every device was read through its own handle, with the v2 memory struct.
    assert fake.memory_versions == [(0, pynvml.nvmlMemory_v2), (1, pynvml.nvmlMemory_v2), (2, pynvml.nvmlMemory_v2)]
    for function in FIELD_FUNCTIONS:
        assert [i for name, i in fake.calls if name == function] == [0, 1, 2]


def test_samples_follow_the_devices_changing_state(fake: FakeNvml, backend: NvmlBackend) -> None:
    first = backend.sample(1.0)
    fake.gpus[1].used = 70 * GIB
    fake.gpus[1].power_mw = 699_999
    fake.gpus[1].processes = [(2001, 70 * GIB)]
    second = backend.sample(2.0)
    assert first[1].memory_used_bytes == 60 * GIB + 600 * MIB
    assert second[1].memory_used_bytes == 70 * GIB + 600 * MIB
    assert second[1].power_usage_watts == pytest.approx(699.999)
    assert second[1].processes == (GpuProcess(2001, 70 * GIB),)
    assert_reads(second[1], fake.gpus[1], index=1, now=2.0)


def test_bytes_uuid_and_name_are_decoded() -> None:
    gpus = three_gpus()
    gpus[0].uuid = b"GPU-0123-bytes"
    gpus[0].name = b"Tesla T4"
    gpus[2].name = b"NVIDIA L4"
    backend = NvmlBackend(nvml=FakeNvml(gpus))
    samples = backend.sample(3.0)
    assert samples[0].uuid == "GPU-0123-bytes"
    assert samples[0].name == "Tesla T4"
    assert samples[2].name == "NVIDIA L4"
    assert samples[1].uuid == "GPU-bbbb"
    assert all(isinstance(s.uuid, str) and isinstance(s.name, str) for s in samples)


def test_process_without_memory_figure_keeps_none(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.gpus[0].processes = [(1001, None), (1002, 123 * MIB), (1003, 0)]
    sample = backend.sample(1.0)[0]
    assert sample.processes == (
        GpuProcess(pid=1001, used_memory_bytes=None),
        GpuProcess(pid=1002, used_memory_bytes=123 * MIB),
        GpuProcess(pid=1003, used_memory_bytes=0),
    )
    assert sample.failed is False


# -- v2 memory info and the v1 fallback -------------------------------------------------------------


@pytest.mark.parametrize("code", [
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,  # pynvml's _nvmlGetFunctionPointer on a driver without _v2
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,  # the driver does not know the struct version
    pynvml.NVML_ERROR_NOT_SUPPORTED,
])
def test_v2_memory_unavailable_falls_back_to_v1_for_good(fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    fake.fail(1, MEM_V2, code)
    first = backend.sample(1.0)
    # The fallback happens in the same sample: GPU 1 is read, with v1 semantics.
    assert_reads(first[1], fake.gpus[1], index=1, now=1.0, v2=False)
    assert first[1].memory_reserved_bytes is None
    assert first[1].memory_used_bytes == fake.gpus[1].total - fake.gpus[1].free
    assert fake.memory_versions[1:3] == [(1, pynvml.nvmlMemory_v2), (1, None)]
    # The other GPUs stay on v2.
    assert_reads(first[0], fake.gpus[0], index=0, now=1.0)
    assert_reads(first[2], fake.gpus[2], index=2, now=1.0)

    fake.memory_versions.clear()
    second = backend.sample(2.0)
    third = backend.sample(3.0)
    # v2 is not tried again on GPU 1, even though every sample would fail it.
    assert fake.memory_versions == [(0, pynvml.nvmlMemory_v2), (1, None), (2, pynvml.nvmlMemory_v2)] * 2
    assert fake.count(MEM_V2, 1) == 1
    for s in (second, third):
        assert_reads(s[1], fake.gpus[1], index=1, now=s[1].timestamp, v2=False)
        assert s[0].memory_reserved_bytes == fake.gpus[0].reserved


def test_v2_memory_unavailable_on_every_gpu(fake: FakeNvml, backend: NvmlBackend) -> None:
    for i in range(3):
        fake.fail(i, MEM_V2, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    for now in (1.0, 2.0):
        samples = backend.sample(now)
        for i, (sample, gpu) in enumerate(zip(samples, fake.gpus, strict=True)):
            assert_reads(sample, gpu, index=i, now=now, v2=False)
    assert fake.count(MEM_V2) == 3
    assert fake.count(MEM_V1) == 6


def test_pynvml_without_memory_v2_uses_v1_only(fake: FakeNvml) -> None:
    del fake.nvmlMemory_v2  # an nvidia-ml-py older than the v2 struct
    backend = NvmlBackend(nvml=fake)
    samples = backend.sample(1.0)
    for i, (sample, gpu) in enumerate(zip(samples, fake.gpus, strict=True)):
        assert_reads(sample, gpu, index=i, now=1.0, v2=False)
    assert fake.memory_versions == [(0, None), (1, None), (2, None)]


def test_v1_failure_after_the_fallback_marks_the_gpu_failed(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(0, MEM_V2, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    fake.fail(0, MEM_V1, pynvml.NVML_ERROR_GPU_IS_LOST)
    samples = backend.sample(1.0)
    assert_failed(samples[0], fake.gpus[0], index=0, now=1.0)
    assert samples[0].error is not None and "GPU is lost" in samples[0].error
    assert_reads(samples[1], fake.gpus[1], index=1, now=1.0)
    fake.heal(0, MEM_V1)
    again = backend.sample(2.0)
    assert_reads(again[0], fake.gpus[0], index=0, now=2.0, v2=False)
    assert fake.count(MEM_V2, 0) == 1


# -- fields a board cannot report -------------------------------------------------------------------


UNKNOWN_FIELD_CODES = [
    pytest.param(pynvml.NVML_ERROR_NOT_SUPPORTED, id="NotSupported"),
    pytest.param(pynvml.NVML_ERROR_NO_PERMISSION, id="NoPermission"),
    pytest.param(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, id="FunctionNotFound"),
]

FIELD_OF: dict[str, Callable[[GpuSample], object]] = {
    TEMPERATURE: lambda s: s.temperature_celsius,
    POWER: lambda s: s.power_usage_watts,
    POWER_LIMIT: lambda s: s.power_limit_watts,
    UTILIZATION: lambda s: s.utilization_percent,
}


@pytest.mark.parametrize("code", UNKNOWN_FIELD_CODES)
@pytest.mark.parametrize("function", list(FIELD_OF))
def test_unsupported_field_is_none(fake: FakeNvml, backend: NvmlBackend, function: str, code: int) -> None:
    fake.fail(1, function, code)
    samples = backend.sample(5.0)
    sample = samples[1]
    assert sample.failed is False
    assert sample.error is None
    assert FIELD_OF[function](sample) is None
    # Everything else on that GPU is still read.
    gpu = fake.gpus[1]
    assert sample.memory_total_bytes == gpu.total
    assert sample.memory_used_bytes == gpu.used + gpu.reserved
    assert sample.memory_reserved_bytes == gpu.reserved
    assert sample.processes == tuple(GpuProcess(p, m) for p, m in gpu.processes)
    for other, read in FIELD_OF.items():
        if other != function:
            assert read(sample) is not None
    # The other GPUs are untouched.
    assert_reads(samples[0], fake.gpus[0], index=0, now=5.0)
    assert_reads(samples[2], fake.gpus[2], index=2, now=5.0)
    # Once the field is back, it is read again (nothing is remembered as "unsupported").
    fake.heal(1, function)
    assert_reads(backend.sample(6.0)[1], gpu, index=1, now=6.0)


@pytest.mark.parametrize("code", [
    pytest.param(pynvml.NVML_ERROR_NOT_SUPPORTED, id="NotSupported"),
    pytest.param(pynvml.NVML_ERROR_NO_PERMISSION, id="NoPermission"),
])
def test_unsupported_processes_are_empty(fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    fake.fail(0, PROCESSES, code)
    samples = backend.sample(1.0)
    assert samples[0].processes == ()
    assert samples[0].failed is False
    assert samples[0].memory_used_bytes == fake.gpus[0].used + fake.gpus[0].reserved
    assert samples[0].temperature_celsius == 41.0
    assert_reads(samples[1], fake.gpus[1], index=1, now=1.0)


def test_processes_function_missing_in_the_driver_does_not_break_the_sample(
        fake: FakeNvml, backend: NvmlBackend) -> None:
    # An nvidia-ml-py newer than the driver: nvmlDeviceGetComputeRunningProcesses_v3 is absent.
    fake.fail(0, PROCESSES, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    samples = backend.sample(1.0)
    assert samples[0].failed is False
    assert samples[0].processes == ()
    assert_reads(samples[1], fake.gpus[1], index=1, now=1.0)


def test_every_optional_field_unsupported_still_gives_memory(fake: FakeNvml, backend: NvmlBackend) -> None:
    for function in FIELD_FUNCTIONS:
        fake.fail(2, function, pynvml.NVML_ERROR_NOT_SUPPORTED)
    sample = backend.sample(1.0)[2]
    gpu = fake.gpus[2]
    assert sample.failed is False
    assert sample.error is None
    assert (sample.memory_total_bytes, sample.memory_used_bytes, sample.memory_free_bytes,
            sample.memory_reserved_bytes) == (gpu.total, gpu.used + gpu.reserved, gpu.free, gpu.reserved)
    assert sample.temperature_celsius is None
    assert sample.power_usage_watts is None
    assert sample.power_limit_watts is None
    assert sample.utilization_percent is None
    assert sample.processes == ()
    assert sample.usage_fraction == pytest.approx((gpu.used + gpu.reserved) / gpu.total)


# -- lost GPUs and unexpected errors ----------------------------------------------------------------


@pytest.mark.parametrize("function", [MEM_V2, *FIELD_FUNCTIONS])
def test_lost_gpu_fails_only_that_device_and_recovers(fake: FakeNvml, backend: NvmlBackend, function: str) -> None:
    fake.fail(1, function, pynvml.NVML_ERROR_GPU_IS_LOST)
    samples = backend.sample(7.0)
    assert [s.index for s in samples] == [0, 1, 2]
    assert_failed(samples[1], fake.gpus[1], index=1, now=7.0)
    assert samples[1].error is not None and "GPU is lost" in samples[1].error
    assert_reads(samples[0], fake.gpus[0], index=0, now=7.0)
    assert_reads(samples[2], fake.gpus[2], index=2, now=7.0)
    # Still lost: still failed, and the others still read.
    samples = backend.sample(8.0)
    assert samples[1].failed is True
    assert not samples[0].failed and not samples[2].failed
    # Back: read again, still on v2 memory (a lost GPU is no reason to give up v2).
    fake.heal(1, function)
    assert_reads(backend.sample(9.0)[1], fake.gpus[1], index=1, now=9.0)
    assert fake.count(MEM_V1) == 0


def test_every_gpu_lost(fake: FakeNvml, backend: NvmlBackend) -> None:
    for i in range(3):
        fake.fail(i, MEM_V2, pynvml.NVML_ERROR_GPU_IS_LOST)
    samples = backend.sample(1.0)
    for i, (sample, gpu) in enumerate(zip(samples, fake.gpus, strict=True)):
        assert_failed(sample, gpu, index=i, now=1.0)


@pytest.mark.parametrize("code", [
    pytest.param(pynvml.NVML_ERROR_UNKNOWN, id="Unknown"),
    pytest.param(pynvml.NVML_ERROR_TIMEOUT, id="Timeout"),
    pytest.param(pynvml.NVML_ERROR_RESET_REQUIRED, id="ResetRequired"),
    pytest.param(pynvml.NVML_ERROR_NO_PERMISSION, id="NoPermission"),
    pytest.param(pynvml.NVML_ERROR_UNINITIALIZED, id="Uninitialized"),
])
def test_unexpected_error_on_memory_fails_that_device_without_raising(
        fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    fake.fail(0, MEM_V2, code)
    samples = backend.sample(4.0)
    assert_failed(samples[0], fake.gpus[0], index=0, now=4.0)
    assert samples[0].error == str(err(code))
    assert_reads(samples[1], fake.gpus[1], index=1, now=4.0)
    assert_reads(samples[2], fake.gpus[2], index=2, now=4.0)
    # Not a reason to drop to v1: the next sample tries v2 again, and reads once the error is gone.
    assert fake.count(MEM_V1) == 0
    fake.heal(0, MEM_V2)
    assert_reads(backend.sample(5.0)[0], fake.gpus[0], index=0, now=5.0)


@pytest.mark.parametrize("function", [MEM_V1, *FIELD_FUNCTIONS])
def test_unknown_error_anywhere_fails_that_device_without_raising(
        fake: FakeNvml, backend: NvmlBackend, function: str) -> None:
    if function == MEM_V1:
        fake.fail(2, MEM_V2, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    fake.fail(2, function, pynvml.NVML_ERROR_UNKNOWN)
    samples = backend.sample(1.0)
    assert_failed(samples[2], fake.gpus[2], index=2, now=1.0)
    assert samples[2].error == "Unknown Error"
    assert_reads(samples[0], fake.gpus[0], index=0, now=1.0)
    assert_reads(samples[1], fake.gpus[1], index=1, now=1.0)


def test_mixed_failures_in_one_sample(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(0, MEM_V2, pynvml.NVML_ERROR_GPU_IS_LOST)
    fake.fail(1, POWER, pynvml.NVML_ERROR_NOT_SUPPORTED)
    fake.fail(1, MEM_V2, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    fake.fail(2, TEMPERATURE, pynvml.NVML_ERROR_UNKNOWN)
    lost, partial, broken = backend.sample(1.0)
    assert lost.failed and lost.error is not None and "GPU is lost" in lost.error
    assert not partial.failed
    assert partial.power_usage_watts is None
    assert partial.memory_reserved_bytes is None
    assert partial.memory_used_bytes == fake.gpus[1].used + fake.gpus[1].reserved
    assert partial.temperature_celsius == 67.0
    assert broken.failed and broken.error == "Unknown Error"


# -- MIG ---------------------------------------------------------------------------------------------


def test_mig_names_match_the_real_library() -> None:
    from optimizer.gpu import nvml as mod

    assert mod.NVML_ERROR_NOT_FOUND == pynvml.NVML_ERROR_NOT_FOUND
    assert mod.NVML_DEVICE_MIG_ENABLE == pynvml.NVML_DEVICE_MIG_ENABLE
    for name in (MIG_MODE, MIG_COUNT, MIG_HANDLE, "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId",
                 "nvmlDeviceGetAttributes"):
        assert callable(getattr(pynvml, name)) and callable(getattr(FakeNvml, name))
    assert {"gpuInstanceSliceCount", "computeInstanceSliceCount", "memorySizeMB"} <= {
        f[0] for f in pynvml.c_nvmlDeviceAttributes._fields_}


@pytest.mark.parametrize(("gi", "ci", "memory_mb", "parent_gib", "expected"), [
    (1, 1, 9728, 80, "1g.10gb"), (2, 2, 19968, 80, "2g.20gb"), (3, 3, 40192, 80, "3g.40gb"),
    (4, 4, 40192, 80, "4g.40gb"), (7, 7, 81152, 80, "7g.80gb"), (1, 1, 4864, 40, "1g.5gb"),
    (3, 1, 40192, 80, "1c.3g.40gb"),
])
def test_mig_profile_names(gi: int, ci: int, memory_mb: int, parent_gib: int, expected: str) -> None:
    from optimizer.gpu.nvml import mig_profile

    assert mig_profile(gi, ci, memory_mb, parent_gib * GIB) == expected


def test_mig_devices_are_entries_of_their_own() -> None:
    fake = FakeNvml([three_gpus()[2], mig_gpu()])
    backend = NvmlBackend(nvml=fake)
    samples = backend.sample(now=10.0)
    assert [s.uuid for s in samples] == ["GPU-cccc", "MIG-1111", "MIG-2222", "MIG-3333"]  # no parent entry
    whole, big, small, idle = samples
    assert not whole.is_mig and whole.index == 0 and whole.mig_profile is None and whole.parent_uuid is None
    parent = fake.gpus[1]
    for s, slot in ((big, 0), (small, 2), (idle, 3)):
        m = parent.mig_slots[slot]
        assert isinstance(m, FakeMig)
        assert s.failed is False and s.is_mig
        assert s.index == mig_index(1, m.gpu_instance_id, m.compute_instance_id)
        assert (s.parent_index, s.parent_uuid) == (1, "GPU-mmmm")
        assert (s.gpu_instance_id, s.compute_instance_id) == (m.gpu_instance_id, 0)
        assert s.memory_total_bytes == m.total and s.memory_used_bytes == m.used
        assert s.temperature_celsius == 52.0 and s.power_usage_watts == pytest.approx(210.0)  # the parent's
        assert s.processes == tuple(GpuProcess(pid=p, used_memory_bytes=u) for p, u in m.processes)
    assert (big.mig_profile, small.mig_profile, idle.mig_profile) == ("3g.40gb", "1g.10gb", "1g.10gb")
    assert small.memory_total_bytes == 9728 * MIB and big.memory_total_bytes == 40192 * MIB
    assert (small.mig_selector, big.mig_selector) == ("1:7", "1:2")
    # identity is read once per MIG device, not on every sample
    backend.sample(now=15.0)
    assert fake.count("nvmlDeviceGetGpuInstanceId") == 3
    assert len({s.index for s in samples}) == 4


def test_mig_indexes_are_stable_across_restarts_and_never_whole_gpu_indexes() -> None:
    first = [s.index for s in NvmlBackend(nvml=FakeNvml([mig_gpu()])).sample(now=1.0)]
    again = [s.index for s in NvmlBackend(nvml=FakeNvml([mig_gpu()])).sample(now=2.0)]
    assert first == again == [mig_index(0, 2, 0), mig_index(0, 7, 0), mig_index(0, 8, 0)]
    assert all(i > 1023 for i in first)


def test_mig_profile_from_the_name_when_attributes_are_unsupported() -> None:
    fake = FakeNvml([mig_gpu()])
    for key in (mig_index(0, 2, 0), mig_index(0, 7, 0), mig_index(0, 8, 0)):
        fake.fail(key, MIG_ATTRIBUTES, pynvml.NVML_ERROR_NOT_SUPPORTED)
    samples = NvmlBackend(nvml=fake).sample(now=1.0)
    assert [s.mig_profile for s in samples] == ["3g.40gb", "1g.10gb", "1g.10gb"]


def test_mig_utilisation_unsupported_is_none() -> None:
    fake = FakeNvml([mig_gpu()])
    fake.fail(0, UTILIZATION, pynvml.NVML_ERROR_NOT_SUPPORTED)
    samples = NvmlBackend(nvml=fake).sample(now=1.0)
    assert len(samples) == 3 and all(s.utilization_percent is None and not s.failed for s in samples)


def test_mig_mode_off_on_a_mig_board_is_one_whole_gpu() -> None:
    gpu = mig_gpu()
    gpu.mig_mode = pynvml.NVML_DEVICE_MIG_DISABLE
    samples = NvmlBackend(nvml=FakeNvml([gpu])).sample(now=1.0)
    assert [(s.index, s.uuid, s.memory_total_bytes, s.is_mig) for s in samples] == [(0, "GPU-mmmm", 80 * GIB, False)]


def test_mig_repartitioned_at_run_time_is_followed() -> None:
    fake = FakeNvml([mig_gpu()])
    backend = NvmlBackend(nvml=fake)
    assert len(backend.sample(now=1.0)) == 3
    fake.gpus[0].mig_slots[2] = None  # an operator destroyed one 1g.10gb instance
    assert [s.uuid for s in backend.sample(now=2.0)] == ["MIG-1111", "MIG-3333"]
    fake.gpus[0].mig_slots = [None] * 7  # ... then all of them: nothing to size on
    assert backend.sample(now=3.0) == []


def test_a_mig_device_whose_memory_fails_is_failed_alone() -> None:
    fake = FakeNvml([mig_gpu()])
    backend = NvmlBackend(nvml=fake)
    backend.sample(now=1.0)
    fake.fail(mig_index(0, 7, 0), MEM_V2, pynvml.NVML_ERROR_UNKNOWN)
    samples = backend.sample(now=2.0)
    assert [(s.uuid, s.failed) for s in samples] == [("MIG-1111", False), ("MIG-2222", True), ("MIG-3333", False)]
    failed = samples[1]
    assert failed.error and failed.mig_profile == "1g.10gb" and failed.parent_uuid == "GPU-mmmm"


def test_a_lost_mig_parent_fails_every_instance_and_recovers() -> None:
    fake = FakeNvml([mig_gpu(), three_gpus()[2]])
    backend = NvmlBackend(nvml=fake)
    healthy = backend.sample(now=1.0)
    fake.fail(0, MIG_MODE, pynvml.NVML_ERROR_GPU_IS_LOST)
    lost = backend.sample(now=2.0)
    assert [(s.index, s.failed) for s in lost] == [(s.index, s.index != 1) for s in healthy]
    assert all("lost" in (s.error or "") for s in lost[:3]) and lost[3].uuid == "GPU-cccc"
    fake.heal(0, MIG_MODE)
    assert [s.failed for s in backend.sample(now=3.0)] == [False] * 4


def test_an_empty_slot_error_other_than_not_found_fails_the_parent() -> None:
    fake = FakeNvml([mig_gpu()])
    fake.fail(0, MIG_HANDLE, pynvml.NVML_ERROR_UNKNOWN)
    samples = NvmlBackend(nvml=fake).sample(now=1.0)
    assert [(s.index, s.uuid, s.failed) for s in samples] == [(0, "GPU-mmmm", True)]


def test_a_pynvml_without_the_mig_functions_reads_whole_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(FakeNvml, MIG_MODE)  # as a library older than MIG: no such name
    samples = NvmlBackend(nvml=FakeNvml(three_gpus())).sample(now=1.0)
    assert [(s.uuid, s.failed) for s in samples] == [("GPU-aaaa", False), ("GPU-bbbb", False), ("GPU-cccc", False)]
