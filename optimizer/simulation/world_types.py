"""The records of :class:`optimizer.simulation.world.World`: a service's and a co-tenant's run, a GPU's measures,
the trace, the limits the oracle measures use, and how simulated services reach the optimizer (:class:`ServiceLink`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from optimizer.simulation.physics import BACKOFF_RESET_S, backoff_s
from optimizer.simulation.scenario import Background, SimService, ramped


@dataclass(frozen=True)
class Start:
    """What a starting service process does besides polling (a baseline's behaviour; the optimizer's need none).

    ``pool_mb``: memory it reserves at start and holds for good, running as many items as fit in it
    (a vLLM-style static reservation). ``failed``: its start-up check failed; it exits and is
    restarted after the back-off.
    """

    pool_mb: float | None = None
    failed: bool = False


class ServiceLink(Protocol):
    """How simulated services reach the optimizer (in process; an HTTP client would do the same)."""

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        """Return (batch size, cleanup epoch) for the service at scenario time ``t``."""
        ...

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool,
               inactive_split_bytes: int | None = None) -> int:
        """Send telemetry; return the batch size the reply carries."""
        ...

    def started(self, service: str, gpu: int, t: float, *, free_mb: float, total_mb: float) -> Start | None:
        """The service's process (re)starts at ``t`` with ``free_mb`` of the GPU's ``total_mb`` free.

        What the process kept in memory is gone. ``None``: nothing besides polling.
        """
        ...


@dataclass
class ServiceRun:
    """One service in the world: its process, its measures, and what it last reported."""

    spec: SimService
    batch: int
    epoch: int = 0
    fragmentation: float = 0.0
    next_poll: float = 0.0
    items: float = 0.0
    oracle_items: float = 0.0
    safe_oracle_items: float = 0.0
    ooms: int = 0
    restarts: int = 0  # process restarts (crash mode, or a start-up that failed)
    cleanups: int = 0  # cleanups acted on
    seconds_down: float = 0.0  # time without items: OOM recovery, cleanup stalls, restarts
    seconds_above_critical: float = 0.0
    # What the service reports, as a PyTorch service measures it (torch.cuda.*): the weights still
    # allocated after a batch, the memory its allocator holds, the part of it lost to fragmentation
    # (inactive split blocks), and the highest allocation during the batches since the last report.
    allocated_mb: float = 0.0
    reserved_mb: float = 0.0
    waste_mb: float = 0.0
    peak_mb: float = 0.0
    batches: list[tuple[float, int]] = field(default_factory=list)  # (t, batch) at every change
    # The process.
    alive: bool = False
    start_at: float | None = 0.0  # when the process (re)starts; None while it runs
    loaded_at: float = 0.0  # its weights are in from then on (they load over load_s from the start)
    busy_until: float = float("-inf")  # no items before this (OOM recovery, a cleanup stall)
    failures: int = 0  # consecutive failures, for the back-off
    up_since: float = 0.0
    leak_mb: float = 0.0
    pool_mb: float | None = None
    held_base_mb: float = 0.0  # memory held in the step before: weights (or the static pool) ...
    held_act_mb: float = 0.0  # ... and batch


@dataclass
class BackgroundRun:
    """A co-tenant in the world: its arrivals, the ones that failed, and the memory it holds."""

    spec: Background
    held_mb: float = 0.0
    attempt_at: float | None = None  # the start of the current attempt to arrive (its ramp starts there)
    blocked_until: float = float("-inf")  # after a failure: back off until then
    failures: int = 0
    stay: float | None = None  # start of the stay the attempt belongs to
    up_since: float = 0.0

    def wants(self, t: float) -> float:
        """The memory it asks for at ``t`` (MiB): 0 outside its stays and while it backs off."""
        occurrence = self.spec.occurrence(t)
        if occurrence is None:
            return 0.0
        start, end = occurrence
        if self.stay != start:  # a new stay: a fresh arrival
            self.stay, self.attempt_at, self.blocked_until, self.failures = start, start, float("-inf"), 0
        if t < self.blocked_until:
            return 0.0
        origin = self.attempt_at if self.attempt_at is not None else start
        return ramped(t, origin, None if end is None else end - origin, self.spec.ramp_s, self.spec.mb)

    def failed(self, t: float, dt: float) -> None:
        if self.held_mb > 0 and t - self.up_since >= BACKOFF_RESET_S:
            self.failures = 0
        self.failures += 1
        self.blocked_until = t + dt + backoff_s(self.failures)
        self.attempt_at = self.blocked_until


@dataclass
class Trace:
    """What a run looked like over time, for plots (recorded only when asked: ``World.record()``).

    ``used_mb`` holds, per GPU index, ``(t, used)`` after every step: scenario seconds and MiB.
    ``ooms`` holds ``(t, gpu, service)`` for every batch lost to an OOM, ``cotenant_failures``
    ``(t, gpu)`` for every co-tenant arrival that did not fit.
    """

    used_mb: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    ooms: list[tuple[float, int, str]] = field(default_factory=list)
    cotenant_failures: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class GpuRun:
    """Per GPU measures: co-tenant arrivals that failed, time throttled by heat and above the safety bound (s)."""

    cotenant_failures: int = 0
    seconds_throttled: float = 0.0
    seconds_above_bound: float = 0.0


@dataclass(frozen=True)
class Limits:
    """What the oracle measures need from the settings.

    ``service_max`` holds the services' own ``max_batch_size`` where their profile sets one.
    """

    max_batch_size: int = 16
    safe_fraction: float = 0.95
    reserve_mb: float = 1024.0
    critical_fraction: float = 0.9
    service_max: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def max_batch(self, service: str) -> int:
        return self.service_max.get(service, self.max_batch_size)

    def safe_bound_mb(self, total_mb: float) -> float:
        """The safety bound of a GPU of ``total_mb`` (MiB): ``total * memory_threshold_oom - memory_reserve_mb``."""
        return total_mb * self.safe_fraction - self.reserve_mb
