"""Records the backends produce. Units are in the field names; ``None`` means unknown."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

# -- MIG identity -------------------------------------------------------------------------------
# A whole GPU's entry has index = its NVML index (0-1023). A MIG device (one compute instance of
# one GPU instance) has index = MIG_INDEX_BASE * (parent + 1) + 32 * gpu_instance_id + compute_instance_id:
# it depends only on the parent's NVML index and the instance IDs NVML assigns (stable until an
# operator re-partitions the GPU), so state persisted under it survives restarts, and it can never
# equal a whole GPU's index. GPU instance and compute instance IDs are below 32 on every MIG GPU.
MIG_INDEX_BASE = 1024
MIG_MAX_PARENTS = 64
MIG_ID_LIMIT = 32
#: The largest entry index: the last MIG slot of parent 63.
MAX_GPU_INDEX = MIG_INDEX_BASE * (MIG_MAX_PARENTS + 1) - 1
#: ``parent:gpu_instance`` or ``parent:gpu_instance:compute_instance``, e.g. ``0:1``.
MIG_SELECTOR_RE = re.compile(r"([0-9]{1,2}):([0-9]{1,2})(?::([0-9]{1,2}))?")


def mig_index(parent_index: int, gpu_instance_id: int, compute_instance_id: int) -> int:
    """The stable entry index of a MIG device (see above). Raises ValueError out of range."""
    if not 0 <= parent_index < MIG_MAX_PARENTS:
        raise ValueError(f"MIG parent index must be in [0, {MIG_MAX_PARENTS - 1}], got {parent_index}")
    if not (0 <= gpu_instance_id < MIG_ID_LIMIT and 0 <= compute_instance_id < MIG_ID_LIMIT):
        raise ValueError(f"MIG instance IDs must be in [0, {MIG_ID_LIMIT - 1}], "
                         f"got {gpu_instance_id}/{compute_instance_id}")
    return MIG_INDEX_BASE * (parent_index + 1) + MIG_ID_LIMIT * gpu_instance_id + compute_instance_id


class BackendError(RuntimeError):
    """A backend cannot start (for NVML: ``nvmlInit`` failed) or sample at all."""


#: Clock-throttle reasons by name (NVML ``nvmlClocksEventReason*`` / ``nvmlClocksThrottleReason*`` bits).
THROTTLE_REASONS = ("gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
                    "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting")
#: The reasons that mean the GPU is slowed by heat or by the hardware protecting itself (the heat rule).
HEAT_THROTTLE_REASONS = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                   "hw_power_brake_slowdown"})


#: Xids after which the GPU cannot be trusted until it is reset, from NVIDIA's Xid catalog
#: (https://docs.nvidia.com/deploy/xid-errors/): 48 double-bit ECC error, 64 ECC page retirement or
#: row remapper recording failure, 74 NVLink error, 79 GPU has fallen off the bus, 95 uncontained
#: ECC error. Xid 63 (a page retirement / row remap was recorded) is counted but not fatal: the GPU
#: keeps working and the remap applies at the next reset (``remapped_rows_pending``).
FATAL_XIDS = frozenset({48, 64, 74, 79, 95})


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU. A field the board does not support is ``None``.

    ``failed`` is set when the device could not be read at all (for NVML: the GPU is lost);
    such a sample carries ``error`` and no readings, and the policy ignores it.
    """

    index: int
    uuid: str
    name: str
    timestamp: float  # seconds, the sampler's clock
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    temperature_celsius: float | None = None
    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    utilization_percent: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    failed: bool = False
    error: str | None = None
    # -- MIG (all None on a whole GPU) ---------------------------------------------------------
    # A MIG device is its own entry: its own memory and ``uuid`` (MIG-...); the parent's NVML index
    # and UUID; the GPU-instance and compute-instance IDs; the profile (e.g. "1g.10gb").
    # Temperature, power and utilisation on such an entry are the parent's.
    parent_index: int | None = None
    parent_uuid: str | None = None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    mig_profile: str | None = None

    # -- health: Xid events, ECC, retired pages / row remapping, clock throttling (see docs/api.md).
    # ``None`` where the board or the backend cannot tell; kept on a failed sample too.
    xid_errors: tuple[tuple[int, int], ...] | None = None  # (Xid code, events since the optimizer started), by code
    last_xid: int | None = None  # the latest Xid code seen
    last_xid_at: float | None = None  # when it was seen (the sampler's clock)
    ecc_corrected_volatile: int | None = None  # since the driver loaded
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None  # over the board's lifetime
    ecc_uncorrected_aggregate: int | None = None
    retired_pages_sbe: int | None = None  # pages retired for multiple single-bit errors
    retired_pages_dbe: int | None = None  # pages retired for a double-bit error
    retired_pages_pending: bool | None = None  # a retirement waits for the next reset
    remapped_rows_correctable: int | None = None  # Ampere and newer
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None  # a remap waits for the next reset
    remapped_rows_failure: bool | None = None  # a remap failed: the board needs service
    throttle_reasons: frozenset[str] | None = None  # active clock-throttle reasons (names in THROTTLE_REASONS)
    # -- end of health

    @property
    def is_mig(self) -> bool:
        return self.parent_uuid is not None

    @property
    def mig_selector(self) -> str | None:
        """``parent:gpu_instance`` (``parent:gi:ci`` past the first compute instance), or None."""
        if self.parent_index is None or self.gpu_instance_id is None:
            return None
        base = f"{self.parent_index}:{self.gpu_instance_id}"
        return base if not self.compute_instance_id else f"{base}:{self.compute_instance_id}"

    @property
    def usage_fraction(self) -> float | None:
        if self.failed or not self.memory_total_bytes or self.memory_used_bytes is None:
            return None
        return self.memory_used_bytes / self.memory_total_bytes


class GpuBackend(Protocol):
    """A source of GPU samples.

    ``blocking`` says whether :meth:`sample` may block (NVML does): the sampler then runs it
    in a worker thread so that the event loop keeps serving.
    """

    name: str
    blocking: bool

    def sample(self, now: float) -> list[GpuSample]:
        """Read every GPU once. Per-GPU failures are reported in the samples, not raised."""
        ...

    def close(self) -> None: ...
