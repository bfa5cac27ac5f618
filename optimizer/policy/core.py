"""The policy's functional core: ``decide(snapshot, state, settings) -> Outcome``.

No I/O and no clock: time is the snapshot's or the report's timestamp. The sampler loop, the HTTP
handlers and the virtual-time simulator all call these functions, so the math exists once.

Model. For the services on one GPU, with ``peak`` the highest memory used since the batches in
force were adopted and ``cur`` a service's batch in force, a service with weight share ``w`` and
per-item memory ``p`` has the continuous optimum::

    x = cur + (total * target_memory_utilization - reserve - peak) * w / p

The held optimum ``O`` moves only when ``x`` leaves ``[O - 0.5, O + 1.5)`` (hysteresis against
noise); the strategy publishes a fraction of ``O`` (70 / 100 / 120 %), capped so that the
predicted peak ``peak + (b - cur) * p`` stays within ``total * memory_threshold_oom - reserve``
for the service's share (the safety bound), except ``min_batch_size``.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

from optimizer.config import Settings, Strategy
from optimizer.gpu.types import GpuSample
from optimizer.policy.strategies import apply_strategy, per_item_bytes
from optimizer.policy.types import (
    MIB,
    Event,
    GpuState,
    Outcome,
    Pending,
    PolicyState,
    Pressure,
    ServiceReport,
    ServiceState,
    Snapshot,
)

GROW_HYSTERESIS = 0.5  # items of headroom beyond one more item before the optimum grows
SHRINK_HYSTERESIS = 0.5  # items over the target tolerated before the optimum shrinks
OOM_BACKOFF = 0.9  # after an OOM report: at most 90 % of the batch that failed (accelerate's factor)
EMERGENCY_CUT = 0.25  # at the oom threshold: at least a quarter off every batch on the GPU
CEILING_INTERVALS = 10  # an OOM bars its batch size for 10 optimization intervals, doubling per strike
MAX_CEILING_DOUBLINGS = 3
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

    ``(reserved - allocated) / reserved`` summed over the services; ``None`` (unknown) when no
    service on the GPU reported both figures within the last 3 monitoring intervals.
    """
    reserved = wasted = 0
    for svc in services:
        if not is_fresh(svc.reported_at, now, s) or not svc.reserved_bytes or svc.allocated_bytes is None:
            continue
        reserved += svc.reserved_bytes
        wasted += max(0, svc.reserved_bytes - svc.allocated_bytes)
    return wasted / reserved if reserved > 0 else None


def batch_in_force(svc: ServiceState, now: float, s: Settings) -> int:
    """The batch the service runs: what it last reported, if fresh; else what we published."""
    if svc.reported_batch is not None and is_fresh(svc.reported_at, now, s):
        return svc.reported_batch
    return svc.batch_size


def _clamp(b: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, b))


def _gib(n: float) -> str:
    return f"{n / (1024 ** 3):.1f} GiB"


@dataclasses.dataclass
class _Gpu:
    """Per-sample working values of one GPU, shared by the per-service computations."""

    total: int
    used: int
    peak: int
    weights: dict[str, float]

    def share(self, service: str) -> float:
        return self.weights[service] / sum(self.weights.values())


def _optimum(svc: ServiceState, g: _Gpu, used: int, now: float, s: Settings) -> tuple[float, float, float]:
    """(x, safe_max_continuous, per-item bytes) for a service given the GPU's used bytes."""
    profile = s.profile(svc.service)
    p = per_item_bytes(s.strategy, profile, svc)
    cur = batch_in_force(svc, now, s)
    share = g.share(svc.service)
    x = cur + (target_bytes(g.total, s) - used) * share / p
    safe = cur + (safety_bytes(g.total, s) - used) * share / p
    return x, safe, p


def hold_optimum(prev: int, x: float) -> int:
    """The held optimum after observing the continuous optimum ``x`` (hysteresis band)."""
    if x < prev - SHRINK_HYSTERESIS or x >= prev + 1 + GROW_HYSTERESIS:
        return math.floor(x)
    return prev


def _ceiling(svc: ServiceState, now: float) -> int | None:
    return svc.ceiling if svc.ceiling is not None and now < svc.ceiling_until else None


def _publish(
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


def _start(gs: GpuState, p: Pending, events: list[Event]) -> GpuState:
    if any(x.trigger == p.trigger and x.service == p.service for x in gs.pending):
        return gs
    events.append(Event("optimization_started", gs.index, p.started_at, service=p.service, trigger=p.trigger))
    return dataclasses.replace(gs, pending=gs.pending + (p,))


def _raise_cleanup(gs: GpuState, trigger: str, now: float, events: list[Event]) -> GpuState:
    events.append(Event("cleanup_raised", gs.index, now, trigger=trigger, new=gs.cleanup_epoch + 1))
    return dataclasses.replace(gs, cleanup_epoch=gs.cleanup_epoch + 1, last_cleanup_at=now)


# --------------------------------------------------------------------------- pending optimizations


def _measure(p: Pending, usage: float, frag: float | None, services: dict[str, ServiceState]) -> bool | None:
    """Whether the trigger cleared (``None``: cannot tell from this sample)."""
    if p.measure == "usage":
        return usage < p.threshold
    if p.measure == "fragmentation":
        return None if frag is None else frag < p.threshold
    svc = services.get(p.service or "")
    return svc is None or svc.last_oom_at is None or svc.last_oom_at <= p.started_at


def _resolve_pending(gs: GpuState, used: int, usage: float, frag: float | None,
                     services: dict[str, ServiceState], now: float, events: list[Event]) -> GpuState:
    keep: list[Pending] = []
    for p in gs.pending:
        seen = p.samples_seen + 1
        low = used if p.min_used is None else min(p.min_used, used)
        ok = _measure(p, usage, frag, services)
        if ok or seen >= SUCCESS_SAMPLES:
            freed = max(0, p.used_at_start - low) if p.cleanup else None
            kind = "optimization_succeeded" if ok else "optimization_failed"
            events.append(Event(kind, gs.index, now, service=p.service, trigger=p.trigger, freed_bytes=freed))
        else:
            keep.append(dataclasses.replace(p, samples_seen=seen, min_used=low))
    return dataclasses.replace(gs, pending=tuple(keep))


# --------------------------------------------------------------------------- per-GPU step


def _window_len(s: Settings) -> int:
    return max(2, math.ceil(WINDOW_INTERVALS * s.optimization_interval / s.monitoring_interval))


def _step_gpu(
    sample: GpuSample, gs: GpuState, services: list[ServiceState], s: Settings, now: float, events: list[Event]
) -> tuple[GpuState, list[ServiceState]]:
    assert sample.memory_total_bytes and sample.memory_used_bytes is not None
    total, used = sample.memory_total_bytes, sample.memory_used_bytes
    usage = used / total
    pressure = classify(usage, s)
    frag = fragmentation(services, now, s)
    temp = sample.temperature_celsius
    hot = temp is not None and temp >= s.temperature_threshold
    if pressure is not gs.pressure:
        events.append(Event("pressure_changed", gs.index, now, detail=f"{gs.pressure.value}->{pressure.value}"))
    window = gs.window
    if now >= gs.adopt_after:
        window = (window + (used,))[-_window_len(s):]
    gs = dataclasses.replace(gs, pressure=pressure, fragmentation=frag, hot=hot, window=window, uuid=sample.uuid,
                             name=sample.name)
    gs = _resolve_pending(gs, used, usage, frag, {x.service: x for x in services}, now, events)
    if gs.optimized_at is None:
        gs = dataclasses.replace(gs, optimized_at=now)

    services = [_expire_override(x, now, events) for x in services]
    if not s.enabled:
        return gs, [_disabled(x, s, now, events) for x in services]

    g = _Gpu(total=total, used=used, peak=max(window) if window else used,
             weights={x.service: s.profile(x.service).weight for x in services})
    ready = now >= gs.adopt_after
    out = list(services)
    cleaned = False

    if ready and pressure is Pressure.OOM:
        # One emergency cleanup at a time: the next only after this one resolved (3 samples at most),
        # so sustained pressure with nothing left to cut does not raise the epoch on every sample.
        if not any(p.trigger == "oom" for p in gs.pending):
            gs = _raise_cleanup(gs, "oom", now, events)
            gs = _start(gs, Pending("oom", "usage", s.memory_threshold_oom, now, used, True), events)
        cleaned = True
        out = [_reduce(x, g, now, s, events, "oom", emergency=True) for x in services]
    elif ready and pressure is Pressure.CRITICAL:
        gs = _start(gs, Pending("critical", "usage", s.memory_threshold_critical, now, used, False), events)
        out = [_reduce(x, g, now, s, events, "critical", emergency=False) for x in services]
    elif ready and any(_over_safety(x, g, now, s) for x in services):
        out = [_cap_to_safety(x, g, now, s, events) for x in services]
    elif ready and hot and (gs.heat_step_at is None or now - gs.heat_step_at >= s.optimization_interval):
        # A heat step is a batch change, not a memory optimization: it is not counted as one.
        gs = dataclasses.replace(gs, heat_step_at=now)
        out = [_heat_step(x, now, s, events, temp) for x in services]
    elif window and gs.optimized_at is not None and now - gs.optimized_at >= s.optimization_interval:
        gs = dataclasses.replace(gs, optimized_at=now)
        out = [_optimize(x, g, gs, now, s, events, sample) for x in services]

    if not cleaned:
        gs = _maybe_cleanup(gs, usage, frag, used, now, s, events)
    if any(a.batch_size != b.batch_size for a, b in zip(out, services)):
        gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
    return gs, out


def _maybe_cleanup(gs: GpuState, usage: float, frag: float | None, used: int, now: float, s: Settings,
                   events: list[Event]) -> GpuState:
    if gs.last_cleanup_at is not None and now - gs.last_cleanup_at < s.cleanup_interval:
        return gs
    if usage >= s.gc_threshold:
        gs = _raise_cleanup(gs, "gc_threshold", now, events)
        return _start(gs, Pending("gc_threshold", "usage", s.gc_threshold, now, used, True), events)
    if frag is not None and frag >= s.fragmentation_threshold:
        gs = _raise_cleanup(gs, "fragmentation", now, events)
        return _start(gs, Pending("fragmentation", "fragmentation", s.fragmentation_threshold, now, used, True),
                      events)
    return gs


def _over_safety(svc: ServiceState, g: _Gpu, now: float, s: Settings) -> bool:
    lo, _ = s.batch_limits(s.profile(svc.service))
    _, safe, _ = _optimum(svc, g, g.used, now, s)
    return svc.batch_size > max(lo, math.floor(safe))


def _cap_to_safety(svc: ServiceState, g: _Gpu, now: float, s: Settings, events: list[Event]) -> ServiceState:
    lo, hi = s.batch_limits(s.profile(svc.service))
    _, safe, _ = _optimum(svc, g, g.used, now, s)
    cap = max(lo, math.floor(safe))
    if svc.batch_size <= cap:
        return svc
    reason = f"lowered to stay within the safety bound ({_gib(safety_bytes(g.total, s))} usable)"
    return _publish(svc, cap, min(svc.optimal, cap), reason, now, events, "safety")


def _reduce(svc: ServiceState, g: _Gpu, now: float, s: Settings, events: list[Event], trigger: str,
            *, emergency: bool) -> ServiceState:
    """Critical or oom pressure: aim at the target from the latest sample, and cut at least one item."""
    lo, hi = s.batch_limits(s.profile(svc.service))
    x, safe, _ = _optimum(svc, g, g.used, now, s)
    optimal = _clamp(min(svc.optimal, math.floor(x)), lo, hi)
    cut = max(1, math.ceil(svc.batch_size * EMERGENCY_CUT)) if emergency else 1
    batch = max(lo, min(apply_strategy(s.strategy, optimal), math.floor(safe), svc.batch_size - cut))
    usage = g.used / g.total
    level = "oom" if emergency else "critical"
    reason = f"memory {usage:.0%} at or above the {level} threshold: batch lowered"
    svc = _drop_override(svc, now, events, f"memory at the {level} threshold")
    return _publish(svc, batch, optimal, reason, now, events, trigger)


def _heat_step(svc: ServiceState, now: float, s: Settings, events: list[Event], temp: float | None) -> ServiceState:
    lo, _ = s.batch_limits(s.profile(svc.service))
    batch = max(lo, svc.batch_size - 1)
    reason = f"GPU at {temp:.0f} C, at or above {s.temperature_threshold:.0f} C: stepping down while hot"
    return _publish(svc, batch, svc.optimal, reason, now, events, "temperature")


def _optimize(svc: ServiceState, g: _Gpu, gs: GpuState, now: float, s: Settings, events: list[Event],
              sample: GpuSample) -> ServiceState:
    """The periodic optimization of one service (every ``optimization_interval``)."""
    profile = s.profile(svc.service)
    lo, hi = s.batch_limits(profile)
    x, safe, p = _optimum(svc, g, g.peak, now, s)
    optimal = _clamp(hold_optimum(svc.optimal, x), lo, hi)
    want = apply_strategy(s.strategy, optimal)
    why = f"{s.strategy.value}: {optimal} items fit {s.target_memory_utilization:.0%} of {_gib(g.total)}"
    manual = svc.override_active(now)
    if manual is not None:
        want, why = manual, f"manual override by an operator (the policy's optimum is {optimal})"
    caps: list[tuple[int, str]] = [(math.floor(safe), "safety bound")]
    ceiling = _ceiling(svc, now)
    if ceiling is not None:
        caps.append((ceiling - 1, f"OOM seen at batch {ceiling}"))
    if gs.hot:
        caps.append((svc.batch_size, "GPU hot: not growing"))
    if s.strategy is Strategy.ADAPTIVE and manual is None:
        if gs.pressure.level >= Pressure.WARNING.level:
            caps.append((svc.batch_size, "memory pressure: not growing"))
        util = sample.utilization_percent
        if util is not None and util < 50 and want > svc.batch_size:
            why += f"; GPU {util:.0f}% busy, growing"
    for cap, label in caps:
        if want > cap:
            want, why = cap, f"{why}; capped by {label}"
    batch = _clamp(want, lo, hi)
    return _publish(svc, batch, optimal, why, now, events, "optimization")


# --------------------------------------------------------------------------- disabled


def _disabled(svc: ServiceState, s: Settings, now: float, events: list[Event]) -> ServiceState:
    """With optimization disabled: the operator's override if any, else the configured default batch."""
    manual = svc.override_active(now)
    if manual is not None:
        return _publish(svc, manual, svc.optimal, "manual override by an operator (optimization disabled)", now,
                        events, "manual")
    d = s.default_batch(s.profile(svc.service))
    return _publish(svc, d, svc.optimal, "optimization disabled: configured default batch", now, events, "disabled")


def apply_disabled(state: PolicyState, settings: Settings, now: float) -> Outcome:
    """Publish the disabled decisions now (when an operator disables optimization), not at the next sample."""
    events: list[Event] = []
    services = {k: _disabled(v, settings, now, events) for k, v in state.services.items()}
    return Outcome(PolicyState(state.gpus, MappingProxyType(services)), tuple(events))


# --------------------------------------------------------------------------- manual overrides


def _drop_override(svc: ServiceState, now: float, events: list[Event], why: str) -> ServiceState:
    if svc.override is None:
        return svc
    events.append(Event("override_cleared", svc.gpu, now, service=svc.service, old=svc.override, detail=why))
    return dataclasses.replace(svc, override=None, override_until=None)


def _expire_override(svc: ServiceState, now: float, events: list[Event]) -> ServiceState:
    if svc.override is not None and svc.override_active(now) is None:
        return _drop_override(svc, now, events, "expired")
    return svc


def set_override(state: PolicyState, service: str, gpu_index: int, batch: int, until: float | None, now: float,
                 settings: Settings, gpu: GpuSample | None) -> Outcome:
    """An operator fixes ``service``'s batch (until ``until``, or until cleared).

    Published at once, but never above the safety bound of the latest sample (except the minimum);
    memory at critical or above, or an OOM report, clears it: safety comes first.
    """
    state, svc = touch(state, service, gpu_index, now, settings, gpu)
    lo, hi = settings.batch_limits(settings.profile(service))
    events: list[Event] = [Event("override_set", gpu_index, now, service=service, old=svc.override, new=batch)]
    published, why = batch, "manual override by an operator"
    if not lo <= batch <= hi:
        batch = published = max(lo, min(hi, batch))
        why = f"manual override held at {published}, within the service's batch limits [{lo}, {hi}]"
    svc = dataclasses.replace(svc, override=batch, override_until=until)
    if gpu is not None and not gpu.failed and gpu.memory_total_bytes and gpu.memory_used_bytes is not None:
        others = [v for (gi, name), v in state.services.items() if gi == gpu_index and name != service]
        weights = {v.service: settings.profile(v.service).weight for v in others + [svc]}
        g = _Gpu(total=gpu.memory_total_bytes, used=gpu.memory_used_bytes, peak=gpu.memory_used_bytes,
                 weights=weights)
        _, safe, _ = _optimum(svc, g, g.used, now, settings)
        if batch > max(lo, math.floor(safe)):
            published = max(lo, math.floor(safe))
            why = f"manual override {batch}, held at {published} by the safety bound"
    svc = _publish(svc, published, svc.optimal, why, now, events, "manual")
    return Outcome(_with_service(state, svc), tuple(events))


def clear_override(state: PolicyState, service: str, gpu_index: int, now: float) -> Outcome:
    """Drop an operator's override; the policy takes over at its next decision."""
    svc = state.services.get((gpu_index, service))
    if svc is None or svc.override is None:
        return Outcome(state, ())
    events: list[Event] = []
    svc = _drop_override(svc, now, events, "cleared by an operator")
    svc = dataclasses.replace(svc, reason="manual override cleared: the policy decides at its next optimization",
                              updated_at=now)
    return Outcome(_with_service(state, svc), tuple(events))


def optimize_now(snapshot: Snapshot, state: PolicyState, settings: Settings) -> Outcome:
    """Run the periodic optimization on every GPU now (an operator's request), from the latest snapshot.

    Unlike :func:`decide` it does not take the snapshot as a new sample: no window, pending or
    pressure changes; only the optimization and its clock. A GPU whose last batch change is not
    in its samples yet is skipped (its headroom is not known until then).
    """
    s = settings
    now = snapshot.timestamp
    events: list[Event] = []
    gpus = dict(state.gpus)
    services = dict(state.services)
    if not s.enabled:
        return Outcome(state, ())
    for sample in snapshot.gpus:
        gs = gpus.get(sample.index)
        if gs is None or sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None:
            continue
        if not gs.window or now < gs.adopt_after:
            # The last change is not in the samples yet: optimizing again now would count the same
            # headroom twice. As on the periodic path, wait for samples taken after adoption.
            continue
        mine = sorted((v for (gi, _), v in services.items() if gi == sample.index), key=lambda v: v.service)
        mine = [_expire_override(x, now, events) for x in mine]
        g = _Gpu(total=sample.memory_total_bytes, used=sample.memory_used_bytes, peak=max(gs.window),
                 weights={x.service: s.profile(x.service).weight for x in mine})
        out = [_optimize(x, g, gs, now, s, events, sample) for x in mine]
        gs = dataclasses.replace(gs, optimized_at=now)
        if any(a.batch_size != b.batch_size for a, b in zip(out, mine)):
            gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
        gpus[sample.index] = gs
        for svc in out:
            services[(svc.gpu, svc.service)] = svc
    return Outcome(PolicyState(MappingProxyType(gpus), MappingProxyType(services)), tuple(events))


# --------------------------------------------------------------------------- entry points


def decide(snapshot: Snapshot, state: PolicyState, settings: Settings) -> Outcome:
    """One loop tick: classify every GPU, resolve pending optimizations, update every decision.

    GPUs missing from the snapshot are forgotten with their services; a failed GPU keeps its
    state unchanged until it answers again; services not heard from for ``service_expiry`` go.
    """
    now = snapshot.timestamp
    s = settings
    events: list[Event] = []
    services = {k: v for k, v in state.services.items() if now - v.last_seen <= s.service_expiry}
    gpus: dict[int, GpuState] = {}
    for sample in snapshot.gpus:
        gs = state.gpus.get(sample.index) or GpuState(index=sample.index, uuid=sample.uuid, name=sample.name)
        if sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None:
            gpus[sample.index] = gs
            continue
        mine = sorted((v for (gi, _), v in services.items() if gi == sample.index), key=lambda v: v.service)
        gs, updated = _step_gpu(sample, gs, mine, s, now, events)
        gpus[sample.index] = gs
        for svc in updated:
            services[(svc.gpu, svc.service)] = svc
    services = {k: v for k, v in services.items() if k[0] in gpus}
    return Outcome(PolicyState(MappingProxyType(gpus), MappingProxyType(services)), tuple(events))


def initial_batch(service: str, gpu: GpuSample | None, state: PolicyState, settings: Settings) -> int:
    """A new service's first batch: the default, within the safety bound of the latest sample."""
    s = settings
    profile = s.profile(service)
    lo, hi = s.batch_limits(profile)
    batch = s.default_batch(profile)
    if gpu is None or not s.enabled or gpu.failed or not gpu.memory_total_bytes or gpu.memory_used_bytes is None:
        return batch
    others = [v for (gi, _), v in state.services.items() if gi == gpu.index]
    weights = sum(s.profile(v.service).weight for v in others) + profile.weight
    head = (safety_bytes(gpu.memory_total_bytes, s) - gpu.memory_used_bytes) * profile.weight / weights
    return _clamp(min(batch, math.floor(head / (profile.per_item_mb * MIB))), lo, hi)


def touch(state: PolicyState, service: str, gpu_index: int, now: float, settings: Settings,
          gpu: GpuSample | None) -> tuple[PolicyState, ServiceState]:
    """Note that ``service`` asked about ``gpu_index`` now; register it on first contact."""
    key = (gpu_index, service)
    svc = state.services.get(key)
    if svc is None:
        b = initial_batch(service, gpu, state, settings)
        reason = ("initial batch: the default, within the safety bound" if settings.enabled
                  else "optimization disabled: configured default batch")
        svc = ServiceState(service=service, gpu=gpu_index, batch_size=b, optimal=b, reason=reason,
                           changed_at=now, updated_at=now, last_seen=now)
    else:
        svc = dataclasses.replace(svc, last_seen=now)
    return _with_service(state, svc), svc


def _with_service(state: PolicyState, svc: ServiceState) -> PolicyState:
    services = dict(state.services)
    services[(svc.gpu, svc.service)] = svc
    return PolicyState(state.gpus, MappingProxyType(services))


def _record_peak(peaks: tuple[tuple[int, int], ...], batch: int, peak: int) -> tuple[tuple[int, int], ...]:
    table = dict(peaks)
    table[batch] = max(peak, table.get(batch, 0))
    items = list(table.items())
    if len(items) > 16:
        items = items[-16:]
    return tuple(items)


def apply_report(state: PolicyState, report: ServiceReport, settings: Settings,
                 gpu: GpuSample | None) -> Outcome:
    """Take a service's telemetry. An OOM report lowers its batch at once and bars the failed size.

    The lowered batch is in the returned state, so the reply to the report already carries it.
    """
    s = settings
    now = report.timestamp
    state, svc = touch(state, report.service, report.gpu, now, s, gpu)
    svc = dataclasses.replace(
        svc,
        reported_batch=report.batch_size if report.batch_size is not None else svc.reported_batch,
        reported_at=now,
        allocated_bytes=report.allocated_bytes if report.allocated_bytes is not None else svc.allocated_bytes,
        reserved_bytes=report.reserved_bytes if report.reserved_bytes is not None else svc.reserved_bytes,
        peaks=(_record_peak(svc.peaks, report.batch_size, report.peak_bytes)
               if report.batch_size is not None and report.peak_bytes is not None and not report.oom else svc.peaks),
    )
    events: list[Event] = []
    gs = state.gpus.get(report.gpu)
    if report.oom:
        failed = report.batch_size if report.batch_size is not None else svc.batch_size
        strikes = svc.strikes + 1 if svc.last_oom_at is not None and now - svc.last_oom_at < 3600 else 1
        bar = s.optimization_interval * CEILING_INTERVALS * 2 ** min(strikes - 1, MAX_CEILING_DOUBLINGS)
        active = _ceiling(svc, now)
        svc = dataclasses.replace(svc, last_oom_at=now, strikes=strikes,
                                  ceiling=failed if active is None else min(active, failed),
                                  ceiling_until=now + bar)
        svc = _drop_override(svc, now, events, f"OOM reported at batch {failed}")
        if s.enabled:
            lo, hi = s.batch_limits(s.profile(svc.service))
            batch = max(lo, min(svc.batch_size, failed - 1, math.floor(failed * OOM_BACKOFF)))
            reason = f"OOM reported at batch {failed}: lowered, and {failed} barred for {bar:.0f} s"
            svc = _publish(svc, batch, min(svc.optimal, batch), reason, now, events, "oom_report")
        if gs is not None:
            gs = _start(gs, Pending("oom_report", "oom", 1.0, now, gs.window[-1] if gs.window else 0, False,
                                    service=svc.service), events)
            if events and any(e.kind == "batch_changed" for e in events):
                gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
    state = _with_service(state, svc)
    if gs is not None:
        gpus = dict(state.gpus)
        gpus[gs.index] = gs
        state = PolicyState(MappingProxyType(gpus), state.services)
    return Outcome(state, tuple(events))
