"""The policy's functional core: ``decide(snapshot, state, settings) -> Outcome``, and a service's registration
(:func:`touch`); the report path (``apply_report``) is :mod:`optimizer.policy.reports`.

No I/O and no clock: time is the snapshot's or the report's timestamp. The sampler loop, the HTTP
handlers and the virtual-time simulator all call these functions, so the math exists once. The
model itself is in :mod:`optimizer.policy.model`; operator actions in :mod:`optimizer.policy.operator`.
"""

from __future__ import annotations

import dataclasses
import math

from optimizer.config import Settings, Strategy
from optimizer.gpu.types import HEAT_THROTTLE_REASONS, GpuSample
from optimizer.policy.model import (
    ADOPTION_INTERVALS,
    EMERGENCY_CUT,
    GpuView,
    SUCCESS_SAMPLES,
    WINDOW_INTERVALS,
    active_ceiling,
    clamp,
    classify,
    continuous_optimum,
    disabled_decision,
    drop_override,
    expire_override,
    fragmentation,
    gib,
    gpu_view,
    hold_optimum,
    publish,
    raise_cleanup,
    safety_bytes,
    start_pending,
    with_service,
)
from optimizer.policy.adaptive import controller as adaptive
from optimizer.policy.strategies import apply_strategy
from optimizer.policy.types import (
    MIB,
    Event,
    GpuState,
    Outcome,
    Pending,
    PolicyState,
    Pressure,
    Roster,
    ServiceState,
    Snapshot,
)


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


def _adaptive_gpu(sample: GpuSample, gs: GpuState, services: list[ServiceState], s: Settings, now: float,
                  events: list[Event], roster: Roster, pressure: Pressure, used: int) -> tuple[GpuState, list[ServiceState]]:
    """adaptive's sample: an emergency cleanup at the oom level, then the controller (optimizer.policy.adaptive)."""
    ready = now >= gs.adopt_after
    if ready and pressure is Pressure.OOM and not any(p.trigger == "oom" for p in gs.pending):
        gs = raise_cleanup(gs, "oom", now, events)
        gs = start_pending(gs, Pending("oom", "usage", s.memory_threshold_oom, now, used, True), events)
    gs, out = adaptive.step(sample, gs, services, s, now, events, roster, settled=ready)
    if ready and gs.requested_at is not None:
        # An operator's optimization waited for this settled sample (see operator.optimize_now): this
        # sample's plan is one; where it changed no batch, grow now as "optimize now" does.
        if all(a.batch_size == b.batch_size for a, b in zip(out, services)):
            gs, out = adaptive.step(sample, gs, out, s, now, events, roster, settled=True, mode="now")
        gs = dataclasses.replace(gs, optimized_at=now, requested_at=None)
    if any(a.batch_size != b.batch_size for a, b in zip(out, services)):
        gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
    return gs, out


def _step_gpu(
    sample: GpuSample, gs: GpuState, services: list[ServiceState], s: Settings, now: float, events: list[Event],
    roster: Roster,
) -> tuple[GpuState, list[ServiceState]]:
    assert sample.memory_total_bytes and sample.memory_used_bytes is not None
    total, used = sample.memory_total_bytes, sample.memory_used_bytes
    usage = used / total
    pressure = classify(usage, s)
    frag = fragmentation(services, now, s)
    hot, heat = heat_of(sample, s)
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

    services = [expire_override(x, now, events) for x in services]
    if not s.enabled:
        return gs, [disabled_decision(x, s, now, events) for x in services]
    if s.strategy is Strategy.ADAPTIVE:
        return _adaptive_gpu(sample, gs, services, s, now, events, roster, pressure, used)

    g = gpu_view(gs.index, total, used, max(window) if window else used, services, s, roster, now)
    ready = now >= gs.adopt_after
    out = list(services)
    cleaned = False

    if ready and pressure is Pressure.OOM:
        # One emergency cleanup at a time: the next only after this one resolved (3 samples at most),
        # so sustained pressure with nothing left to cut does not raise the epoch on every sample.
        if not any(p.trigger == "oom" for p in gs.pending):
            gs = raise_cleanup(gs, "oom", now, events)
            gs = start_pending(gs, Pending("oom", "usage", s.memory_threshold_oom, now, used, True), events)
        cleaned = True
        out = [_reduce(x, g, now, s, events, "oom", emergency=True) for x in services]
    elif ready and pressure is Pressure.CRITICAL:
        gs = start_pending(gs, Pending("critical", "usage", s.memory_threshold_critical, now, used, False), events)
        out = [_reduce(x, g, now, s, events, "critical", emergency=False) for x in services]
    elif ready and any(_over_safety(x, g, now, s) for x in services):
        out = [cap_to_safety(x, g, now, s, events) for x in services]
    elif ready and hot and (gs.heat_step_at is None or now - gs.heat_step_at >= s.optimization_interval):
        # A heat step is a batch change, not a memory optimization: it is not counted as one.
        gs = dataclasses.replace(gs, heat_step_at=now)
        out = [_heat_step(x, now, s, events, heat) for x in services]
    elif window and (gs.requested_at is not None  # an operator's request waited for this settled sample
                     or gs.optimized_at is not None and now - gs.optimized_at >= s.optimization_interval):
        gs = dataclasses.replace(gs, optimized_at=now, requested_at=None)
        out = [optimize_service(x, g, gs, now, s, events, sample) for x in services]

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
        gs = raise_cleanup(gs, "gc_threshold", now, events)
        return start_pending(gs, Pending("gc_threshold", "usage", s.gc_threshold, now, used, True), events)
    if frag is not None and frag >= s.fragmentation_threshold:
        gs = raise_cleanup(gs, "fragmentation", now, events)
        return start_pending(gs, Pending("fragmentation", "fragmentation", s.fragmentation_threshold, now, used, True),
                      events)
    return gs


def _over_safety(svc: ServiceState, g: GpuView, now: float, s: Settings) -> bool:
    lo, _ = s.batch_limits(s.profile(svc.service))
    _, safe, _ = continuous_optimum(svc, g, g.used, now, s)
    return svc.batch_size > max(lo, math.floor(safe))


def cap_to_safety(svc: ServiceState, g: GpuView, now: float, s: Settings, events: list[Event]) -> ServiceState:
    lo, hi = s.batch_limits(s.profile(svc.service))
    _, safe, _ = continuous_optimum(svc, g, g.used, now, s)
    cap = max(lo, math.floor(safe))
    if svc.batch_size <= cap:
        return svc
    reason = f"lowered to stay within the safety bound ({gib(safety_bytes(g.total, s))} usable)"
    return publish(svc, cap, min(svc.optimal, cap), reason, now, events, "safety")


def _reduce(svc: ServiceState, g: GpuView, now: float, s: Settings, events: list[Event], trigger: str,
            *, emergency: bool) -> ServiceState:
    """Critical or oom pressure: aim at the target from the latest sample, and cut at least one item."""
    lo, hi = s.batch_limits(s.profile(svc.service))
    x, safe, _ = continuous_optimum(svc, g, g.used, now, s)
    optimal = clamp(min(svc.optimal, math.floor(x)), lo, hi)
    cut = max(1, math.ceil(svc.batch_size * EMERGENCY_CUT)) if emergency else 1
    batch = max(lo, min(apply_strategy(s.strategy, optimal), math.floor(safe), svc.batch_size - cut))
    usage = g.used / g.total
    level = "oom" if emergency else "critical"
    reason = f"memory {usage:.0%} at or above the {level} threshold: batch lowered"
    svc = drop_override(svc, now, events, f"memory at the {level} threshold")
    return publish(svc, batch, optimal, reason, now, events, trigger)


def heat_of(sample: GpuSample, s: Settings) -> tuple[bool, str]:
    """Whether the heat rule acts on the GPU, and why in words.

    Where the board reports its clock-throttle reasons, a thermal or hardware slowdown is what costs
    throughput, whatever the temperature; only where the reasons are unknown does the temperature
    against ``temperature_threshold`` stand for it (docs/policy.md, rule 4).
    """
    reasons = sample.throttle_reasons
    if reasons is not None:
        active = sorted(reasons & HEAT_THROTTLE_REASONS)
        return bool(active), f"GPU throttling ({', '.join(active)})"
    temp = sample.temperature_celsius
    if temp is None:
        return False, "GPU temperature unknown"
    return temp >= s.temperature_threshold, f"GPU at {temp:.0f} C, at or above {s.temperature_threshold:.0f} C"


def _heat_step(svc: ServiceState, now: float, s: Settings, events: list[Event], heat: str) -> ServiceState:
    lo, _ = s.batch_limits(s.profile(svc.service))
    batch = max(lo, svc.batch_size - 1)
    reason = f"{heat}: stepping down while hot"
    return publish(svc, batch, svc.optimal, reason, now, events, "temperature")


def optimize_service(svc: ServiceState, g: GpuView, gs: GpuState, now: float, s: Settings, events: list[Event],
              sample: GpuSample) -> ServiceState:
    """The periodic optimization of one service (every ``optimization_interval``)."""
    profile = s.profile(svc.service)
    lo, hi = s.batch_limits(profile)
    x, safe, p = continuous_optimum(svc, g, g.peak, now, s)
    optimal = clamp(hold_optimum(svc.optimal, x), lo, hi)
    want = apply_strategy(s.strategy, optimal)
    why = f"{s.strategy.value}: {optimal} items fit {s.target_memory_utilization:.0%} of {gib(g.total)}"
    manual = svc.override_active(now)
    if manual is not None:
        want, why = manual, f"manual override by an operator (the policy's optimum is {optimal})"
    caps: list[tuple[int, str]] = [(math.floor(safe), "safety bound")]
    ceiling = active_ceiling(svc, now)
    if ceiling is not None:
        caps.append((ceiling - 1, f"OOM seen at batch {ceiling}"))
    if gs.hot:
        caps.append((svc.batch_size, "GPU hot: not growing"))
    for cap, label in caps:
        if want > cap:
            want, why = cap, f"{why}; capped by {label}"
    batch = clamp(want, lo, hi)
    return publish(svc, batch, optimal, why, now, events, "optimization")


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
        gs, updated = _step_gpu(sample, gs, mine, s, now, events, state.roster)
        gpus[sample.index] = gs
        for svc in updated:
            services[(svc.gpu, svc.service)] = svc
    services = {k: v for k, v in services.items() if k[0] in gpus}
    return Outcome(state.with_(gpus=gpus, services=services), tuple(events))


def initial_batch(service: str, gpu: GpuSample | None, state: PolicyState, settings: Settings) -> int:
    """A new service's first batch: the default, within the safety bound of the latest sample."""
    s = settings
    profile = s.profile(service)
    lo, hi = s.batch_limits(profile)
    batch = s.default_batch(profile)
    if gpu is None or not s.enabled or gpu.failed or not gpu.memory_total_bytes or gpu.memory_used_bytes is None:
        return batch
    others = [v for (gi, name), v in state.services.items() if gi == gpu.index and name != service]
    g = gpu_view(gpu.index, gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.memory_used_bytes, others, s,
                 state.roster, gpu.timestamp, newcomer=service)
    head = (safety_bytes(g.total, s) - g.used - g.reserved) * g.share(service)
    return clamp(min(batch, math.floor(head / (profile.per_item_mb * MIB))), lo, hi)


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
                           changed_at=now, updated_at=now, last_seen=now, registered_at=now)
    else:
        svc = dataclasses.replace(svc, last_seen=now)
    return with_service(state, svc), svc
