"""What NVML would read of :class:`optimizer.simulation.world.World`: its GPUs as samples, in bytes, with the
scenario's health events (Xids, ECC) and a MIG instance's identity."""

from __future__ import annotations

from typing import Any

from optimizer.gpu.types import FATAL_XIDS, GpuProcess, GpuSample
from optimizer.simulation.scenario import HealthEvent, Scenario, SimGpu
from optimizer.simulation.world_types import ServiceRun

MIB = 1024 * 1024


class NvmlView:
    """A part of :class:`~optimizer.simulation.world.World`: its state as the NVML backend would sample it."""

    scenario: Scenario
    t: float
    runs: list[ServiceRun]
    used_mb: dict[int, float]
    util: dict[int, float]
    temperature: dict[int, float]
    clock: dict[int, float]

    def _health(self, gpu_index: int, timestamp: float) -> dict[str, Any]:
        """The GPU's health as NVML would read it: the scenario's health events up to now, no page
        retired, no row remapped (``timestamp`` is the sampler's clock at world time ``self.t``)."""
        xids: dict[int, int] = {}
        last: HealthEvent | None = None
        corrected = uncorrected = 0
        for h in self.scenario.health:
            if h.gpu != gpu_index or h.at_s > self.t:
                continue
            corrected += h.ecc_corrected
            uncorrected += h.ecc_uncorrected
            if h.xid is not None:
                xids[h.xid] = xids.get(h.xid, 0) + 1
                if last is None or h.at_s >= last.at_s:
                    last = h
        return {"xid_errors": tuple(sorted(xids.items())), "last_xid": None if last is None else last.xid,
                "last_xid_at": None if last is None else timestamp - self.t + last.at_s,
                "ecc_corrected_volatile": corrected, "ecc_uncorrected_volatile": uncorrected,
                "ecc_corrected_aggregate": corrected, "ecc_uncorrected_aggregate": uncorrected,
                "retired_pages_sbe": 0, "retired_pages_dbe": 0, "retired_pages_pending": False,
                "remapped_rows_correctable": 0, "remapped_rows_uncorrectable": 0, "remapped_rows_pending": False,
                "remapped_rows_failure": False}

    def _fatal_xid(self, gpu_index: int) -> int | None:
        for h in self.scenario.health:
            if h.gpu == gpu_index and h.at_s <= self.t and h.xid in FATAL_XIDS:
                return h.xid
        return None

    def sample(self, timestamp: float) -> list[GpuSample]:
        out = []
        for gpu in self.scenario.gpus:
            uuid = gpu.uuid or self._uuid(gpu)
            mig = gpu.parent_index is not None
            name = f"{gpu.name} MIG {gpu.mig_profile}" if mig else gpu.name
            identity: dict[str, Any] = {} if not mig else {
                "parent_index": gpu.parent_index,
                "parent_uuid": gpu.parent_uuid or f"GPU-sim-{self.scenario.seed:04d}-{gpu.parent_index:04d}",
                "gpu_instance_id": gpu.gpu_instance_id, "compute_instance_id": 0, "mig_profile": gpu.mig_profile}
            fatal = self._fatal_xid(gpu.index)
            if fatal is not None:  # as the NVML backend: failed, no readings, the Xid counts kept
                health = self._health(gpu.index, timestamp)
                out.append(GpuSample(index=gpu.index, uuid=uuid, name=name, timestamp=timestamp, failed=True,
                                     error=f"fatal Xid {fatal} (simulated): the GPU needs a reset",
                                     xid_errors=health["xid_errors"], last_xid=health["last_xid"],
                                     last_xid_at=health["last_xid_at"], **identity))
                continue
            total = int(gpu.total_mb * MIB)
            used = min(total, int(self.used_mb[gpu.index] * MIB))
            util = self.util[gpu.index]
            clock = self.clock[gpu.index]
            procs = tuple(
                GpuProcess(pid=10_000 + i, used_memory_bytes=int((r.held_base_mb + r.held_act_mb) * MIB))
                for i, r in enumerate(self.runs) if r.spec.gpu == gpu.index and r.alive
            )
            out.append(GpuSample(
                index=gpu.index,
                uuid=uuid,
                name=name,
                timestamp=timestamp,
                memory_total_bytes=total,
                memory_used_bytes=used,
                memory_free_bytes=total - used,
                memory_reserved_bytes=0,
                temperature_celsius=round(self.temperature[gpu.index], 1),
                power_usage_watts=round(gpu.power_limit_w * (0.2 + 0.8 * clock * util / 100), 1),
                power_limit_watts=gpu.power_limit_w,
                utilization_percent=round(util, 1),
                processes=procs,
                throttle_reasons=frozenset({"sw_thermal_slowdown"}) if clock < 1.0 else frozenset(),
                **self._health(gpu.index, timestamp),
                **identity,
            ))
        return out

    def _uuid(self, gpu: SimGpu) -> str:
        """A stable made-up UUID: ``GPU-sim-<seed>-<index>``, ``MIG-sim-<seed>-<parent>-<instance>`` on MIG."""
        if gpu.parent_index is not None:
            return f"MIG-sim-{self.scenario.seed:04d}-{gpu.parent_index:04d}-{gpu.gpu_instance_id:02d}"
        return f"GPU-sim-{self.scenario.seed:04d}-{gpu.index:04d}"
