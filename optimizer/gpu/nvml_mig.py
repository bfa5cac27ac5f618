"""MIG on NVML, a part of :class:`optimizer.gpu.nvml.NvmlBackend`.

MIG: a GPU whose current MIG mode is ``NVML_DEVICE_MIG_ENABLE`` is not an entry of its own (its
memory is its instances'); each of its MIG devices (``nvmlDeviceGetMaxMigDeviceCount`` slots,
``nvmlDeviceGetMigDeviceHandleByIndex``; ``NVML_ERROR_NOT_FOUND`` for an empty slot) is, with its
own memory and UUID and the parent's temperature, power and utilisation (see :meth:`_mig_samples`).
The devices are listed again on every sample, so a re-partitioned GPU is followed without a restart.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import structlog

from optimizer.gpu.nvml_device import NVML_ERROR_GPU_IS_LOST, NVML_ERROR_NOT_FOUND, GpuLost, _Device, _MigDevice, _text
from optimizer.gpu.nvml_health import HealthReader
from optimizer.gpu.types import GpuProcess, GpuSample, mig_index

log = structlog.get_logger("optimizer.gpu.nvml")  # the NVML backend's events, whichever part logs them

NVML_DEVICE_MIG_ENABLE = 1  # nvmlDeviceGetMigMode's current mode when MIG is on


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


class MigReader(HealthReader):
    """A GPU in MIG mode read as its MIG devices, listed again on every sample."""

    if TYPE_CHECKING:
        def _memory(self, dev: _Device | _MigDevice) -> tuple[int, int, int, int | None]: ...
        def _processes(self, dev: _Device | _MigDevice) -> tuple[GpuProcess, ...]: ...

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
