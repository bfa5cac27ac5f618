"""Operator actions on the policy state (the admin API): manual overrides, disabling, optimizing now.

Pure like the rest of the policy: the caller passes the time and the latest snapshot.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from optimizer.config import Settings, Strategy
from optimizer.gpu.types import GpuSample
from optimizer.policy.adaptive import controller as adaptive
from optimizer.policy.core import cap_to_safety, optimize_service, touch
from optimizer.policy.model import (
    ADOPTION_INTERVALS,
    gpu_view,
    continuous_optimum,
    disabled_decision,
    drop_override,
    expire_override,
    publish,
    with_service,
)
from optimizer.policy.types import Event, GpuState, Outcome, PolicyState, Snapshot


def apply_disabled(state: PolicyState, settings: Settings, now: float) -> Outcome:
    """Publish the disabled decisions now (when an operator disables optimization), not at the next sample."""
    events: list[Event] = []
    services = {k: disabled_decision(v, settings, now, events) for k, v in state.services.items()}
    return Outcome(state.with_(services=services), tuple(events))


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
        if settings.strategy is Strategy.ADAPTIVE:
            gs = state.gpus.get(gpu_index) or GpuState(gpu_index, gpu.uuid, gpu.name)
            cap = max(lo, adaptive.safe_batch(svc, others, gs, gpu, settings, state.roster, now))
        else:
            g = gpu_view(gpu_index, gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.memory_used_bytes,
                         [*others, svc], settings, state.roster, now)
            _, safe, _ = continuous_optimum(svc, g, g.used, now, settings)
            cap = max(lo, math.floor(safe))
        if batch > cap:
            published = cap
            why = f"manual override {batch}, held at {published} by the safety bound"
    svc = publish(svc, published, svc.optimal, why, now, events, "manual")
    return Outcome(with_service(state, svc), tuple(events))


def clear_override(state: PolicyState, service: str, gpu_index: int, now: float) -> Outcome:
    """Drop an operator's override; the policy takes over at its next decision."""
    svc = state.services.get((gpu_index, service))
    if svc is None or svc.override is None:
        return Outcome(state, ())
    events: list[Event] = []
    svc = drop_override(svc, now, events, "cleared by an operator")
    svc = dataclasses.replace(svc, reason="manual override cleared: the policy decides at its next optimization",
                              updated_at=now)
    return Outcome(with_service(state, svc), tuple(events))


def optimize_now(snapshot: Snapshot, state: PolicyState, settings: Settings) -> Outcome:
    """Run the periodic optimization on every GPU now (an operator's request), from the latest snapshot.

    Unlike :func:`decide` it does not take the snapshot as a new sample: no window, pending or
    pressure changes; only the optimization and its clock. Not held back by what damps the periodic
    loop (the optimization interval). One rule holds for safety: a GPU whose last batch change is
    not in its samples yet (or whose last sample failed) is not optimized from them, since its
    headroom is not known until then (optimizing would count the same headroom twice). Its
    optimization is deferred to the first settled sample (``requested_at``), not to the next
    interval, and its services' reasons say so; :func:`deferred_optimizations` lists them.
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
        if gs is None:
            continue
        mine = sorted((v for (gi, _), v in services.items() if gi == sample.index), key=lambda v: v.service)
        failed = sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None
        if failed or not gs.window or now < gs.adopt_after:
            gs = dataclasses.replace(gs, requested_at=now)
            gpus[sample.index] = gs
            why = "optimization requested by an operator: " + _deferral_text(gs, failed)
            for svc in mine:
                if svc.override_active(now) is None:
                    svc = publish(svc, svc.batch_size, svc.optimal, why, now, events, "optimization")
                elif svc.reason.endswith("(optimization disabled)"):  # enabled again: the override holds
                    svc = publish(svc, svc.batch_size, svc.optimal, "manual override by an operator", now, events,
                                  "manual")
                services[(svc.gpu, svc.service)] = svc
            continue
        assert sample.memory_total_bytes and sample.memory_used_bytes is not None
        mine = [expire_override(x, now, events) for x in mine]
        if s.strategy is Strategy.ADAPTIVE:
            gs, out = adaptive.step(sample, gs, mine, s, now, events, state.roster, settled=True, mode="now")
        else:
            g = gpu_view(sample.index, sample.memory_total_bytes, sample.memory_used_bytes, max(gs.window), mine, s,
                         state.roster, now)
            out = [optimize_service(x, g, gs, now, s, events, sample) for x in mine]
        gs = dataclasses.replace(gs, optimized_at=now, requested_at=None)
        if any(a.batch_size != b.batch_size for a, b in zip(out, mine)):
            gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
        gpus[sample.index] = gs
        for svc in out:
            services[(svc.gpu, svc.service)] = svc
    return Outcome(state.with_(gpus=gpus, services=services), tuple(events))


@dataclass(frozen=True, slots=True)
class Deferral:
    """An operator's optimization of ``service`` on ``gpu`` that waits (see :func:`optimize_now`).

    ``until``: the earliest time it runs, at the first sample from then on (``None``: when the GPU
    answers a sample again); ``why``: the same in words.
    """

    service: str
    gpu: int
    until: float | None
    why: str


def deferred_optimizations(state: PolicyState, snapshot: Snapshot) -> tuple[Deferral, ...]:
    """The operator's optimizations still waiting for a settled sample, one per service."""
    samples = {g.index: g for g in snapshot.gpus}
    out: list[Deferral] = []
    for index, gs in sorted(state.gpus.items()):
        sample = samples.get(index)
        if gs.requested_at is None or sample is None:
            continue
        failed = sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None
        until = None if failed else max(gs.adopt_after, snapshot.timestamp)
        why = _deferral_text(gs, failed)
        out.extend(Deferral(name, index, until, why) for gi, name in sorted(state.services) if gi == index)
    return tuple(out)


def _deferral_text(gs: GpuState, failed: bool) -> str:
    if failed:
        return f"deferred until GPU {gs.index} answers a sample again (its last sample failed); batch kept"
    return (f"deferred to the first sample from {clock_text(gs.adopt_after)} on, when the samples show the last "
            "batch change (earlier ones would count its headroom twice); batch kept until then")


def clock_text(t: float) -> str:
    """A time of the sampler's clock (Unix time when serving) for a reason text: ``HH:MM:SS UTC``."""
    if not math.isfinite(t):
        return "now"
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def rebalance(snapshot: Snapshot, state: PolicyState, settings: Settings, now: float) -> Outcome:
    """The shares moved (a pod came, went or changed readiness): lower at once every batch that no
    longer fits within the safety bound of its service's share, from the latest snapshot.

    Nothing grows here: growing waits for the periodic optimization, measured from samples.
    """
    s = settings
    if not s.enabled:
        return Outcome(state, ())
    events: list[Event] = []
    gpus = dict(state.gpus)
    services = dict(state.services)
    for sample in snapshot.gpus:
        gs = gpus.get(sample.index)
        if gs is None or sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None:
            continue
        mine = sorted((v for (gi, _), v in services.items() if gi == sample.index), key=lambda v: v.service)
        if s.strategy is Strategy.ADAPTIVE:
            _, out = adaptive.step(sample, gs, mine, s, now, events, state.roster, settled=False, mode="rebalance")
        else:
            g = gpu_view(sample.index, sample.memory_total_bytes, sample.memory_used_bytes, sample.memory_used_bytes,
                         mine, s, state.roster, now)
            out = [cap_to_safety(x, g, now, s, events) for x in mine]
        if any(a.batch_size != b.batch_size for a, b in zip(out, mine)):
            gpus[sample.index] = dataclasses.replace(
                gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
        for svc in out:
            services[(svc.gpu, svc.service)] = svc
    return Outcome(state.with_(gpus=gpus, services=services), tuple(events))
