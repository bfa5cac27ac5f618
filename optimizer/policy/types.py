"""Inputs, state and outputs of the policy. All immutable; the shells swap whole values."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from optimizer.gpu.types import GpuSample
from optimizer.policy.adaptive.memory import MemoryModel
from optimizer.policy.adaptive.tenants import Tenants

MIB = 1024 * 1024


class Pressure(str, enum.Enum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"
    OOM = "oom"

    @property
    def level(self) -> int:
        return _LEVELS[self]


_LEVELS = {Pressure.NORMAL: 0, Pressure.WARNING: 1, Pressure.CRITICAL: 2, Pressure.OOM: 3}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every GPU, read once at ``timestamp`` (seconds on the sampler's clock)."""

    timestamp: float
    gpus: tuple[GpuSample, ...]


@dataclass(frozen=True, slots=True)
class ServiceReport:
    """Telemetry a VLM service sends (``POST /reports``), already validated; ``gpu`` is an index."""

    service: str
    gpu: int
    timestamp: float
    batch_size: int | None = None
    peak_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    oom: bool = False
    inactive_split_bytes: int | None = None  # the allocator's fragmentation: free blocks inside split segments


@dataclass(frozen=True, slots=True)
class Pending:
    """An optimization that waits for the next samples to tell whether it worked.

    ``measure`` is what must fall below ``threshold``: ``usage`` (fraction of total memory),
    ``fragmentation``, or ``oom`` (no new OOM report).
    """

    trigger: str
    measure: str
    threshold: float
    started_at: float
    used_at_start: int
    cleanup: bool
    service: str | None = None
    samples_seen: int = 0
    min_used: int | None = None


@dataclass(frozen=True, slots=True)
class GpuState:
    index: int
    uuid: str
    name: str
    cleanup_epoch: int = 0
    last_cleanup_at: float | None = None
    pressure: Pressure = Pressure.NORMAL
    fragmentation: float | None = None
    hot: bool = False
    window: tuple[int, ...] = ()  # used bytes of the samples since the batches in force were adopted
    adopt_after: float = float("-inf")  # samples before this time predate a batch change
    optimized_at: float | None = None
    # An operator asked for an optimization (optimize, enable) while the samples did not show the last
    # batch change yet: it runs at the first settled sample, not an optimization interval later.
    requested_at: float | None = None
    heat_step_at: float | None = None
    pending: tuple[Pending, ...] = ()
    tenants: Tenants = field(default_factory=Tenants)  # adaptive: the other tenants' memory


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What the policy knows and has decided for one service on one GPU."""

    service: str
    gpu: int
    batch_size: int
    optimal: int
    reason: str
    changed_at: float
    updated_at: float
    last_seen: float
    registered_at: float = float("-inf")  # its first contact (a restored service: the restart)
    reported_batch: int | None = None
    reported_at: float | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    inactive_split_bytes: int | None = None
    ceiling: int | None = None  # batches >= ceiling are not published before ceiling_until
    ceiling_until: float = float("-inf")
    strikes: int = 0
    last_oom_at: float | None = None
    contradicted_at: float | None = None  # its last OOM report that the GPU's samples contradicted (not persisted)
    memory: MemoryModel = field(default_factory=MemoryModel)  # what its reports taught (adaptive sizes from it)
    oom_pending: tuple[float, int] | None = None  # adaptive: (time, batch) of an OOM not yet explained
    lowered: tuple[float, int] | None = None  # adaptive: (time, batch before) of its last plan-made drop
    override: int | None = None  # an operator's manual batch size
    override_until: float | None = None  # when it expires (None: until cleared)

    def override_active(self, now: float) -> int | None:
        if self.override is None or (self.override_until is not None and now >= self.override_until):
            return None
        return self.override


def _frozen(d: Mapping[object, object] | None = None) -> Mapping[object, object]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True, slots=True)
class Roster:
    """Who shares each GPU, as Kubernetes discovery sees it. Empty (the default): no discovery.

    ``managed`` are the services that have pods in discovery: their weight on a GPU counts once per
    pod counted there in ``pods`` (a service with none there gets no share of that GPU's headroom).
    Services not managed (they only poll and report) count once on each GPU they are registered on.
    ``pods`` also holds managed services that have not polled yet: they count against the others.
    ``reserved_bytes`` is memory that starting pods are expected to take (their declared
    ``gpu_mem_typ``) and that the samples do not show yet.
    """

    managed: frozenset[str] = frozenset()
    pods: Mapping[int, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    reserved_bytes: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PolicyState:
    gpus: Mapping[int, GpuState] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[tuple[int, str], ServiceState] = field(default_factory=lambda: MappingProxyType({}))
    roster: Roster = field(default_factory=Roster)  # an input from discovery, kept here so every path sees it

    def with_(self, gpus: Mapping[int, GpuState] | None = None,
              services: Mapping[tuple[int, str], ServiceState] | None = None) -> "PolicyState":
        """A copy with ``gpus`` and/or ``services`` replaced (frozen), the roster kept."""
        return PolicyState(
            self.gpus if gpus is None else MappingProxyType(dict(gpus)),
            self.services if services is None else MappingProxyType(dict(services)),
            self.roster,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """Something the policy did. ``kind`` is one of :data:`EVENT_KINDS`."""

    kind: str
    gpu: int
    timestamp: float
    service: str | None = None
    trigger: str | None = None
    old: int | None = None
    new: int | None = None
    freed_bytes: int | None = None
    detail: str | None = None


EVENT_KINDS = (
    "batch_changed",
    "cleanup_raised",
    "optimization_started",
    "optimization_succeeded",
    "optimization_failed",
    "pressure_changed",
    "override_set",
    "override_cleared",
)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: PolicyState
    events: tuple[Event, ...]
