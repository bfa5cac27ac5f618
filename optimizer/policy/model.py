"""The policy's model: the memory arithmetic and the small steps every decision is made of.

For the services on one GPU, with ``peak`` the highest memory used since the batches in force were
adopted, ``cur`` a service's batch in force and ``p`` its per-item memory, the batch memory of the
services holding a share is ``pool = sum(cur_j * p_j)``; the rest of ``peak`` is theirs and everyone
else's fixed memory (weights, context, other tenants). A service with weight share ``w`` has the
continuous optimum::

    x = (total * target_memory_utilization - reserve - reserved - peak + pool) * w / p

so the memory for batches is divided by weight (with one service: ``cur + (target - peak) / p``).
``reserved`` is memory that starting pods will take (see :mod:`optimizer.coordination`).

The held optimum ``O`` moves only when ``x`` leaves ``[O - 0.5, O + 1.5)`` (hysteresis against
noise); the strategy publishes a fraction of ``O`` (70 / 100 / 120 %), capped by the safety bound
``total * memory_threshold_oom - reserve``: the service's weighted part of it, and no more than its
share of the memory free now, ``cur + (bound - reserved - used) * w / p``, so that no order in
which the services adopt their batches can overrun the bound. ``min_batch_size`` is exempt.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

from optimizer.config import Settings
from optimizer.policy.strategies import per_item_bytes
from optimizer.policy.types import (
    MIB,
    Event,
    GpuState,
    Pending,
    PolicyState,
    Pressure,
    Roster,
    ServiceState,
)


GROW_HYSTERESIS = 0.5  # items of headroom beyond one more item before the optimum grows
SHRINK_HYSTERESIS = 0.5  # items over the target tolerated before the optimum shrinks
OOM_BACKOFF = 0.9  # after an OOM report: at most 90 % of the batch that failed (accelerate's factor)
EMERGENCY_CUT = 0.25  # at the oom threshold: at least a quarter off every batch on the GPU
CEILING_INTERVALS = 10  # an OOM bars its batch size for 10 optimization intervals, doubling per strike
MAX_CEILING_DOUBLINGS = 3
SAME_INCIDENT_INTERVALS = 2  # OOM reports at or above the bar this close together are one incident (one strike)
OOM_REPORT_INTERVALS = 0.5  # OOM reports of one service on one GPU this close to its last: acknowledged, no effect
CONTRADICTED_FRACTION = 0.5  # an OOM report with the GPU's latest sample at most this part of the bound: contradicted
SUCCESS_SAMPLES = 3  # an optimization succeeds if its trigger clears within this many samples
FRESH_INTERVALS = 3  # a report counts for fragmentation and batch-in-force this many intervals
WINDOW_INTERVALS = 3  # the peak window spans at most this many optimization intervals
ADOPTION_INTERVALS = 1.5  # samples this soon after a change predate its adoption by the services


# --------------------------------------------------------------------------- small pure helpers


def classify(usage: float, s: Settings) -> Pressure:
    if usage >= s.memory_threshold_oom:
        return Pressure.OOM
    if usage >= s.memory_threshold_critical:
        return Pressure.CRITICAL
    if usage >= s.memory_threshold_warning:
        return Pressure.WARNING
    return Pressure.NORMAL


def target_bytes(total: int, s: Settings) -> float:
    return total * s.target_memory_utilization - s.memory_reserve_mb * MIB


def safety_bytes(total: int, s: Settings) -> float:
    """Property 1's bound: no published batch may be predicted to need more (bytes)."""
    return total * s.memory_threshold_oom - s.memory_reserve_mb * MIB


def is_fresh(at: float | None, now: float, s: Settings) -> bool:
    return at is not None and now - at <= FRESH_INTERVALS * s.monitoring_interval


def fragmentation(services: list[ServiceState], now: float, s: Settings) -> float | None:
    """Allocator fragmentation of one GPU from fresh reports, weighted by reserved bytes.

    ``inactive_split / reserved`` summed over the services (``(reserved - allocated) / reserved`` for a
    report without ``inactive_split_bytes``); ``None`` (unknown) when no service on the GPU reported
    the figures within the last 3 monitoring intervals.
    """
    reserved = wasted = 0
    for svc in services:
        if not is_fresh(svc.reported_at, now, s) or not svc.reserved_bytes:
            continue
        if svc.inactive_split_bytes is not None:  # the allocator's own figure: free blocks inside split segments
            waste = min(svc.inactive_split_bytes, svc.reserved_bytes)
        elif svc.allocated_bytes is not None:
            waste = max(0, svc.reserved_bytes - svc.allocated_bytes)
        else:
            continue
        reserved += svc.reserved_bytes
        wasted += waste
    return wasted / reserved if reserved > 0 else None


def batch_in_force(svc: ServiceState, now: float, s: Settings) -> int:
    """The batch the service runs: what it last reported, if fresh; else what we published."""
    if svc.reported_batch is not None and is_fresh(svc.reported_at, now, s):
        return svc.reported_batch
    return svc.batch_size


def clamp(b: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, b))


def gib(n: float) -> str:
    return f"{n / (1024 ** 3):.1f} GiB"


@dataclasses.dataclass
class GpuView:
    """Per-sample working values of one GPU, shared by the per-service computations.

    ``weights`` holds, per service registered on the GPU, the weight of ONE of its instances (0 for a
    managed service with no pod counted here); ``total_weight`` sums every instance counted on the
    GPU, registered or not. ``pool`` is the batch memory of the registered services holding a share,
    ``reserved`` memory expected from starting pods (bytes).
    """

    total: int
    used: int
    peak: int
    weights: dict[str, float]
    total_weight: float
    pool: float = 0.0
    reserved: int = 0

    def share(self, service: str) -> float:
        return self.weights[service] / self.total_weight if self.total_weight > 0 else 0.0


def gpu_view(index: int, total: int, used: int, peak: int, services: list[ServiceState], s: Settings,
             roster: Roster, now: float, newcomer: str | None = None) -> GpuView:
    """The shares of a GPU: by weight, per instance (see :class:`Roster`).

    ``newcomer`` is a service about to register (it counts, with no batch in force yet).
    """
    pods = roster.pods.get(index, {})
    weights: dict[str, float] = {}
    total_weight = 0.0
    pool = 0.0
    names = [x.service for x in services] + ([newcomer] if newcomer is not None else [])
    for name in names:
        w = s.profile(name).weight
        n = pods.get(name, 0) if name in roster.managed else 1
        weights[name] = w if n > 0 else 0.0
        total_weight += w * n
    for name, n in pods.items():
        if name not in weights:
            total_weight += s.profile(name).weight * n
    for x in services:
        if weights[x.service] > 0:
            pool += batch_in_force(x, now, s) * per_item_bytes(s.profile(x.service))
    return GpuView(total=total, used=used, peak=peak, weights=weights, total_weight=total_weight, pool=pool,
                   reserved=roster.reserved_bytes.get(index, 0))


def continuous_optimum(svc: ServiceState, g: GpuView, used: int, now: float, s: Settings) -> tuple[float, float, float]:
    """(x, safe_max_continuous, per-item bytes) for a service given the GPU's used bytes (see the module doc)."""
    profile = s.profile(svc.service)
    p = per_item_bytes(profile)
    cur = batch_in_force(svc, now, s)
    share = g.share(svc.service)
    if share <= 0:
        return float(cur), float(cur), p  # no share here (its pods are not ready): neither grows nor takes
    x = (target_bytes(g.total, s) - used - g.reserved + g.pool) * share / p
    bound = safety_bytes(g.total, s) - g.reserved
    safe = min((bound - used + g.pool) * share / p, cur + (bound - used) * share / p)
    return x, safe, p


def hold_optimum(prev: int, x: float) -> int:
    """The held optimum after observing the continuous optimum ``x`` (hysteresis band)."""
    if x < prev - SHRINK_HYSTERESIS or x >= prev + 1 + GROW_HYSTERESIS:
        return math.floor(x)
    return prev


def active_ceiling(svc: ServiceState, now: float) -> int | None:
    return svc.ceiling if svc.ceiling is not None and now < svc.ceiling_until else None


def publish(
    svc: ServiceState, batch: int, optimal: int, reason: str, now: float, events: list[Event], trigger: str
) -> ServiceState:
    changed = batch != svc.batch_size
    if changed:
        events.append(
            Event("batch_changed", svc.gpu, now, service=svc.service, trigger=trigger, old=svc.batch_size, new=batch,
                  detail=reason)
        )
    if not changed and optimal == svc.optimal and reason == svc.reason:
        return svc
    return dataclasses.replace(
        svc,
        batch_size=batch,
        optimal=optimal,
        reason=reason,
        changed_at=now if changed else svc.changed_at,
        updated_at=now,
    )


def start_pending(gs: GpuState, p: Pending, events: list[Event]) -> GpuState:
    if any(x.trigger == p.trigger and x.service == p.service for x in gs.pending):
        return gs
    events.append(Event("optimization_started", gs.index, p.started_at, service=p.service, trigger=p.trigger))
    return dataclasses.replace(gs, pending=gs.pending + (p,))


def raise_cleanup(gs: GpuState, trigger: str, now: float, events: list[Event]) -> GpuState:
    events.append(Event("cleanup_raised", gs.index, now, trigger=trigger, new=gs.cleanup_epoch + 1))
    return dataclasses.replace(gs, cleanup_epoch=gs.cleanup_epoch + 1, last_cleanup_at=now)



# --------------------------------------------------------------------------- steps shared with the operator actions

def disabled_decision(svc: ServiceState, s: Settings, now: float, events: list[Event]) -> ServiceState:
    """With optimization disabled: the operator's override if any, else the configured default batch."""
    manual = svc.override_active(now)
    if manual is not None:
        return publish(svc, manual, svc.optimal, "manual override by an operator (optimization disabled)", now,
                        events, "manual")
    d = s.default_batch(s.profile(svc.service))
    return publish(svc, d, svc.optimal, "optimization disabled: configured default batch", now, events, "disabled")


def drop_override(svc: ServiceState, now: float, events: list[Event], why: str) -> ServiceState:
    if svc.override is None:
        return svc
    events.append(Event("override_cleared", svc.gpu, now, service=svc.service, old=svc.override, detail=why))
    return dataclasses.replace(svc, override=None, override_until=None)


def expire_override(svc: ServiceState, now: float, events: list[Event]) -> ServiceState:
    if svc.override is not None and svc.override_active(now) is None:
        return drop_override(svc, now, events, "expired")
    return svc


def with_service(state: PolicyState, svc: ServiceState) -> PolicyState:
    services = dict(state.services)
    services[(svc.gpu, svc.service)] = svc
    # One copy, not two (``with_`` copies again): every poll passes here.
    return PolicyState(state.gpus, MappingProxyType(services), state.roster)
