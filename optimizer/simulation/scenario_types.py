"""The scenario's value types: the GPUs, services, other tenants, thermal and health events a simulated run
replays (see docs/scenarios.md); :mod:`optimizer.simulation.scenario` reads them from files."""

from __future__ import annotations

import math
from dataclasses import dataclass

from optimizer.config import ServiceProfile


OOM_MODES = ("recover", "crash")


@dataclass(frozen=True)
class SimGpu:
    index: int
    name: str
    total_mb: float
    idle_temperature_c: float = 35.0
    power_limit_w: float = 700.0
    load_temperature_rise_c: float = 30.0  # added at 100 % utilisation
    uuid: str | None = None
    slowdown_temperature_c: float = 90.0  # above it the clocks drop (thermal throttling)
    min_clock_fraction: float = 0.5  # the lowest clock throttling goes to, as a fraction of the full clock
    # MIG: a scenario GPU with ``mig:`` becomes one SimGpu per instance (index: mig_index(parent, gi, 0),
    # total_mb: the instance's memory); these say which parent it is on. None on a whole GPU.
    parent_index: int | None = None
    parent_uuid: str | None = None
    parent_total_mb: float | None = None
    gpu_instance_id: int | None = None
    mig_profile: str | None = None


@dataclass(frozen=True)
class SimService:
    name: str
    gpu: int
    base_mb: float
    per_item_mb: float
    item_ms: float
    overhead_ms: float
    noise: float = 0.0  # per-item memory jitter, uniform in [-noise, +noise]
    fragmentation_growth_per_min: float = 0.0
    declared_per_item_mb: float | None = None  # what the service tells the optimizer; default: the truth
    start_s: float = 0.0
    weight: float = 1.0
    max_batch_size: int | None = None  # declared to the optimizer (its profile); default: the settings'
    load_s: float = 10.0  # at every start its weights take this long to load (memory rising), then it runs
    leak_mb_per_min: float = 0.0  # fixed memory that grows while the process runs (a slow leak)
    per_item_changes: tuple[tuple[float, float], ...] = ()  # (at_s, per_item_mb): the real per-item memory from then

    @property
    def declared(self) -> float:
        return self.per_item_mb if self.declared_per_item_mb is None else self.declared_per_item_mb

    def per_item_at(self, t: float) -> float:
        """The real per-item memory at scenario time ``t`` (MiB): ``per_item_mb``, or the latest change."""
        p = self.per_item_mb
        for at, mb in self.per_item_changes:
            if t >= at:
                p = mb
        return p


@dataclass(frozen=True)
class Background:
    """Another tenant's memory on a GPU: ``mb`` from ``at_s`` (ramping over ``ramp_s``) for ``for_s``.

    With ``every_s`` it comes back: an arrival every ``every_s`` seconds from ``at_s``, each staying
    ``for_s`` (a bursting tenant). :meth:`level` is what it asks for when nothing stops it; in the world
    an arrival that does not fit in the free memory fails and retries later.
    """

    gpu: int
    at_s: float
    mb: float
    for_s: float | None = None
    ramp_s: float = 0.0
    every_s: float | None = None

    def occurrence(self, t: float) -> tuple[float, float | None] | None:
        """The (start, end) of the stay that covers ``t`` (end ``None``: for good), or ``None``."""
        if t < self.at_s:
            return None
        start = self.at_s
        if self.every_s is not None:
            start += math.floor((t - self.at_s) / self.every_s) * self.every_s
        end = None if self.for_s is None else start + self.for_s
        if end is not None and t >= end:
            return None
        return start, end

    def level(self, t: float) -> float:
        stay = self.occurrence(t)
        if stay is None:
            return 0.0
        return ramped(t, stay[0], self.for_s, self.ramp_s, self.mb)


@dataclass(frozen=True)
class Thermal:
    """Extra heat on a GPU (a failing fan, a hot aisle): ``celsius`` added from ``at_s``."""

    gpu: int
    at_s: float
    celsius: float
    for_s: float | None = None
    ramp_s: float = 0.0

    def level(self, t: float) -> float:
        return ramped(t, self.at_s, self.for_s, self.ramp_s, self.celsius)


@dataclass(frozen=True)
class HealthEvent:
    """A GPU health event at ``at_s``: an Xid the driver reports, and/or ECC errors it counts.

    A fatal Xid (``optimizer.gpu.types.FATAL_XIDS``: 48, 64, 74, 79, 95) fails the GPU's samples
    from then on, as on real hardware until a reset.
    """

    gpu: int
    at_s: float
    xid: int | None = None
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0


def ramped(t: float, at_s: float, for_s: float | None, ramp_s: float, amount: float) -> float:
    """``amount`` from ``at_s`` for ``for_s`` (``None``: for good), rising linearly over ``ramp_s``."""
    if t < at_s or (for_s is not None and t >= at_s + for_s):
        return 0.0
    if ramp_s > 0 and t < at_s + ramp_s:
        return amount * (t - at_s) / ramp_s
    return amount


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    duration_s: float
    step_s: float
    gpus: tuple[SimGpu, ...]
    services: tuple[SimService, ...]
    background: tuple[Background, ...] = ()
    thermal: tuple[Thermal, ...] = ()
    health: tuple[HealthEvent, ...] = ()
    oom_mode: str = "recover"  # recover: the service goes on after an OOM; crash: the process dies and restarts
    oom_recovery_s: float = 3.0  # recover mode: seconds without items after the lost batch
    restart_s: float = 60.0  # crash mode: seconds before a restarted process loads its weights again (after the back-off)
    cleanup_stall_s: float = 1.0  # seconds without items while a service empties its allocator cache

    def profiles(self) -> tuple[ServiceProfile, ...]:
        """What the simulated services declare to the optimizer (their declared per-item memory)."""
        seen: dict[str, ServiceProfile] = {}
        for s in self.services:  # one profile per name: a name on two GPUs declares what its first entry says
            seen.setdefault(s.name, ServiceProfile(name=s.name, per_item_mb=s.declared, weight=s.weight,
                                                   max_batch_size=s.max_batch_size))
        return tuple(seen.values())

    def gpu(self, index: int) -> SimGpu:
        for g in self.gpus:
            if g.index == index:
                return g
        raise KeyError(index)


#: The SimGpu fields a MIG instance gets from its parent (a file gives them as ``mig:`` entries, not one by one).
_MIG_INTERNAL = frozenset({"parent_index", "parent_uuid", "parent_total_mb", "gpu_instance_id", "mig_profile"})
