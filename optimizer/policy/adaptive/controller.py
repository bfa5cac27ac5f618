"""``adaptive``: size every batch from learned memory models, on every sample. Pure: no clock, no I/O.

For one GPU (all figures bytes):

- ``bound = total * memory_threshold_oom - memory_reserve_mb - reserved`` (``reserved``: memory that
  starting pods will take, from Kubernetes discovery);
- ``other``: the other tenants' memory (:mod:`.tenants`), carried forward by its trend over the time
  a decision needs to take effect, plus, while a tenant that left is likely to come back, what it
  held (the volatility reserve, weighed against ``oom_cost_s``);
- every service's fixed memory and worst per-item memory (:mod:`.memory`).

The memory for batches, ``bound - other - sum(fixed)``, is divided by weight; a service capped by
its ``max_batch_size`` leaves the rest of its share to the others (one held back by its trust region
keeps its part while it grows into it). Each service's
target is the largest batch whose worst footprint fits its part (:func:`.plan.plan`, in :mod:`.plan`).

Timing (:func:`step`): a target below the batch is published on the sample that shows it; a target
above it only when the samples are settled (no change still being adopted), the other tenants'
level rests on two samples, the GPU is not hot, and no OOM of the service waits for its
explanation; and only as far as the memory free now allows (so that no order in which services
adopt their batches overruns the bound), to what its part holds with its worst per-item memory raised by
the model's error (:func:`growth_reach`).

OOM reports (:func:`on_oom`): the batch is cut at once, by at least 10 %, to what fits if the memory
that arrived since the last settled sample (at least all the GPU had free) goes on arriving at the
pace it came at until a settled sample can act (:func:`oom_cut`). At the next settled sample the OOM
is explained (the other tenants' memory rose: their arrival is recorded at the level it reached) or,
if the model says the failed batch still fits, it raises the service's worst per-item memory to what
the OOM proved (:func:`explain_ooms`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.config import Settings
from optimizer.gpu.types import GpuSample
from optimizer.policy.adaptive.memory import FLOOR_TTL, Fit, fit, forget_oom_region, raise_floor
from optimizer.policy.adaptive.plan import HORIZON_INTERVALS
from optimizer.policy.adaptive.plan import NEWCOMER_S as NEWCOMER_S
from optimizer.policy.adaptive.plan import Member as Member
from optimizer.policy.adaptive.plan import Plan, growth_room, in_force, planning_other
from optimizer.policy.adaptive.plan import members as members
from optimizer.policy.adaptive.plan import plan as plan
from optimizer.policy.adaptive.plan import volatility_reserve as volatility_reserve
from optimizer.policy.adaptive.tenants import Tenants, assume_at_least, confirm_arrival, update
from optimizer.policy.model import (
    ADOPTION_INTERVALS,
    active_ceiling,
    clamp,
    gpu_view,
    is_fresh,
    publish,
    raise_cleanup,
    safety_bytes,
    start_pending,
)
from optimizer.policy.types import MIB, Event, GpuState, Pending, Roster, ServiceState

REGROWTH_MARGIN = 0.25  # items a part must hold to spare to grow back to a batch it was lowered from within REGROWTH_S
REGROWTH_S = 600.0
OOM_CUT = 0.9  # an OOM report cuts the batch to at most 90 % of the size that failed
OOM_HORIZON_INTERVALS = ADOPTION_INTERVALS + HORIZON_INTERVALS  # an OOM cut holds until a settled sample acts
CLEANUP_COST_S = 1.0  # what a cleanup costs each service of its GPU (a stall, s) ...
CLEANUP_MIN_INTERVALS = 6.0  # ... and at most one per this many monitoring intervals
CLEANUP_DELAY_INTERVALS = 3.0  # a cleanup raised now clears the waste and shows in a settled sample this much later
THROUGHPUT_ELASTICITY = 0.5  # the fraction of its items a service loses per fraction of its batch memory lost
TOLERANCE_BYTES = 64 * MIB  # changes of the other tenants' memory smaller than this, or than ...
TOLERANCE_SPREAD = 0.1  # ... this fraction of the range one sample leaves them in, are noise
FLOOR_MARGIN = 1.02  # an unexplained OOM's floor: 2 % above the per-item memory that just fills the GPU ...
FLOOR_STEP = 1.1  # ... and at most 10 % above the worst the model knew (a wrong blame costs little)
SETTLED_REPORTS = 24  # a model this many reports old (2 minutes at 5 s) is past learning: its drops may flap


@dataclass(frozen=True)
class View:
    """One GPU's sample as the plan reads it: its memory, who shares it by how much, who runs what (bytes)."""

    total: int
    used: int
    bound: float  # the safety bound, less the memory starting pods will take
    shares: dict[str, float]
    running: dict[str, int]


def view(sample: GpuSample, gs: GpuState, services: Sequence[ServiceState], s: Settings, roster: Roster,
         now: float) -> View:
    total, used = sample_view(sample)
    g = gpu_view(gs.index, total, used, used, list(services), s, roster, now)
    return View(total=total, used=used, bound=safety_bytes(total, s) - g.reserved,
                shares={x.service: g.share(x.service) for x in services},
                running={x.service: in_force(x, now, s) for x in services})


def observe_tenants(gs: GpuState, used: int, ms: Sequence[Member], now: float, s: Settings) -> GpuState:
    """Take a settled sample into the tenants' model: what the GPU uses beyond what the services can hold.

    A service counts only while its reports are fresh, and not from an OOM to its next report: one
    that stopped reporting (its process crashed, or restarts and loads its weights again) or that
    just ran out of memory may hold nothing, or less than its batch needs, and what it holds is then
    in what the GPU shows beyond the others.
    """
    measured = [m for m in ms if m.fit.measured and is_fresh(m.svc.reported_at, now, s)
                and (m.svc.last_oom_at is None or (m.svc.reported_at or 0.0) > m.svc.last_oom_at)]
    lower = used - sum(m.fit.high(m.cur) for m in measured)
    upper = used - sum(m.fit.low(m.cur) for m in measured)
    tolerance = max(TOLERANCE_BYTES, TOLERANCE_SPREAD * (upper - lower))
    # A change is the other tenants' only if no service of the GPU may be loading or dropping its own
    # memory unseen: every service is counted, or has been silent longer than a restart takes.
    quiet = max(NEWCOMER_S, s.service_expiry)
    counted = {m.name for m in measured}
    clean = all(now - _last_sign(m.svc) > quiet for m in ms if m.name not in counted)
    # Early on a service's held memory still creeps up to its worst as the jitter draws its maximum.
    unseen = sum(max(0.0, m.fit.worst(m.cur) - m.fit.high(m.cur)) for m in measured)
    return dataclasses.replace(gs, tenants=update(gs.tenants, now, lower, upper, tolerance, s.monitoring_interval,
                                                  record=clean, significant=unseen))


def _last_sign(svc: ServiceState) -> float:
    """When the service last showed what it holds could change: its first contact, report or OOM."""
    return max(t for t in (svc.registered_at, svc.reported_at, svc.last_oom_at) if t is not None)


def explain_ooms(ms: Sequence[Member], total: int, tenants: Tenants, now: float,
                 events: list[Event], gpu: int) -> tuple[dict[str, ServiceState], Tenants]:
    """Settle the OOMs waiting for a settled sample: explained by the other tenants, or raise the model.

    Returns the services whose state changed, by name, and the tenants: an OOM the other tenants
    explain was their arrival, recorded at the OOM as no more than the OOM proved; it reached the
    level this sample shows (:func:`.tenants.confirm_arrival`), which the sample itself may not
    record (the service that ran out of memory may have died with it, and a sample that may not
    count a service's own memory records no change).
    """
    out: dict[str, ServiceState] = {}
    for m in ms:
        pending = m.svc.oom_pending
        if pending is None:
            continue
        at, failed = pending
        others = sum(o.fit.high(o.cur) for o in ms if o is not m and o.fit.measured)
        # What one sample cannot tell apart from the services' own jitter may have arrived unseen.
        unseen = sum(o.fit.high(o.cur) - o.fit.low(o.cur) for o in ms if o.fit.measured)
        room = total - tenants.level - unseen - others - m.fit.fixed
        per_item = room / (failed * (1 + m.fit.waste_fraction)) if failed > 0 else 0.0
        memory = m.svc.memory
        steady = tenants.since < at  # no arrival or departure since the OOM
        ceiling, until = m.svc.ceiling, m.svc.ceiling_until
        if m.fit.measured and steady and per_item > m.fit.worst_per_item:
            per_item = min(per_item * FLOOR_MARGIN, m.fit.worst_per_item * FLOOR_STEP)
            memory = raise_floor(memory, per_item, now)
            ceiling, until = (failed if m.ceiling is None else min(m.ceiling, failed)), now + FLOOR_TTL
            detail = (f"OOM at batch {failed} not explained by the other tenants: worst per-item memory raised to "
                      f"{per_item / MIB:.0f} MiB, and {failed} not published again while they stay as they are")
        else:
            detail = f"OOM at batch {failed} explained: the other tenants hold {tenants.level / 2**30:.1f} GiB"
            tenants = confirm_arrival(tenants, at, tenants.level)
        events.append(Event("optimization_succeeded", gpu, now, service=m.name, trigger="oom_model", detail=detail))
        out[m.name] = dataclasses.replace(m.svc, memory=memory, oom_pending=None, ceiling=ceiling, ceiling_until=until)
    return out, tenants


def lift_ceilings(services: Sequence[ServiceState], tenants: Tenants, now: float) -> list[ServiceState]:
    """An unexplained OOM's size bars the same conditions only: the other tenants' memory changed since
    (an arrival or a departure after the OOM), the ceiling lapses."""
    return [dataclasses.replace(x, ceiling=None, ceiling_until=float("-inf"))
            if active_ceiling(x, now) is not None and x.last_oom_at is not None and tenants.since > x.last_oom_at
            else x for x in services]


def oom_cut(ms: Sequence[Member], failing: Member, cut: int, total: int, bound: float, tenants: Tenants,
            s: Settings, now: float) -> tuple[int, Tenants]:
    """The batch after an OOM report, at most ``cut``, and the tenants as the OOM proves them.

    The OOM proves more memory in use than the models explain: at least the GPU's total beyond the
    services' worst footprints at the batches they ran. That is a floor, not the size of what came:
    the memory that arrived since the last settled sample is at least what the OOM proves beyond the
    level that sample left, and it may still be rising (a ramp) or be larger than the free memory it
    took (a sudden arrival). Plan for it carried on at the pace it came at (that excess over the time
    since the sample, or one monitoring interval if less) until a settled sample can tell what is
    there and a decision on it takes effect (:data:`OOM_HORIZON_INTERVALS`): so that the cut holds
    until the samples can show the cause, instead of one OOM per cut of 10 %.
    """
    worst = sum(m.fit.worst(m.cur) for m in ms if m.fit.measured)
    proven = total - worst
    tenants = assume_at_least(tenants, proven, now)
    excess = proven - tenants.level
    if excess > 0 and tenants.window:
        pace = excess / max(now - tenants.window[-1][0], s.monitoring_interval)
        tenants = dataclasses.replace(tenants, assumed=max(
            tenants.assumed, proven + pace * OOM_HORIZON_INTERVALS * s.monitoring_interval))
    p = plan(ms, bound, planning_other(tenants, ms, bound, now, s))
    return max(failing.lo, min(p.targets.get(failing.name, failing.lo), cut)), tenants


def want_cleanup(ms: Sequence[Member], p: Plan, gs: GpuState, now: float, s: Settings,
                 utilization: float | None, over_bound: bool = False) -> Member | None:
    """The service whose fragmentation makes a cleanup worth its cost now, if any (else ``None``).

    A cleanup stalls every service on the GPU for about :data:`CLEANUP_COST_S` (each one's epoch
    poll empties its cache), so it costs ``n * CLEANUP_COST_S`` seconds of throughput over the
    GPU's ``n`` services (each counted as a fraction of its own items). What waste costs a service
    ``tau`` seconds after a cleanup, ``loss(tau)``, is the items its batch loses to it then (its
    target with the waste cleared less what fits with the waste it will have built up, growing at
    the pace it grew since the last cleanup) times ``elasticity / b``: one more item of ``b`` gains
    about ``elasticity / b`` of the items, where the elasticity is the share of the time the GPU is
    not computing (``1 - utilization``; 0.5 when unknown). Cleaning every ``T`` seconds loses
    ``(integral of loss over [0, T] + cost) / T`` on average, least where
    ``T * loss(T) - integral of loss over [0, T] = cost`` (the replacement rule of renewal theory):
    a cleanup is due when, summed over the services, that reaches the cost at ``T`` = the time
    since the last cleanup plus the :data:`CLEANUP_DELAY_INTERVALS` it takes to act (a poll, a
    report, a settled sample). Cleaning sooner pays the stall more often than the waste costs;
    later, the waste costs more than the stall. ``over_bound`` (the GPU uses more than the safety
    bound): any waste is worth clearing, the service holding the most. At most one per
    :data:`CLEANUP_MIN_INTERVALS` monitoring intervals.
    """
    since = now - gs.last_cleanup_at if gs.last_cleanup_at is not None else now - min(
        (m.svc.registered_at for m in ms), default=now)
    if since < CLEANUP_MIN_INTERVALS * s.monitoring_interval:
        return None
    if over_bound:
        wasting = [m for m in ms if m.fit.measured and m.fit.waste > 0]
        if wasting:
            return max(wasting, key=lambda m: m.fit.waste)
    elasticity = THROUGHPUT_ELASTICITY if utilization is None else min(1.0, max(0.1, 1 - utilization / 100))
    horizon = since + CLEANUP_DELAY_INTERVALS * s.monitoring_interval
    gains: list[tuple[float, Member]] = []
    for m in ms:
        f = m.fit
        if not f.measured or f.worst_per_item <= 0 or f.waste <= 0 or f.waste_fraction <= 0:
            continue
        clean_fits = p.fits.get(m.name, 0.0) * (1 + f.waste_fraction)
        top = min(math.floor(clean_fits + 1e-9), m.hi, f.trust_cap)
        if top < 1:
            continue
        limit = min(m.hi, f.trust_cap)
        # A batch at its cap loses nothing to its waste, but the others held by memory lose the memory it takes.
        others = sum(p.fits.get(o.name, 0.0) * o.cost for o in ms
                     if o is not m and o.share > 0 and o.name not in p.capped and o.cost > 0)
        spill = m.cur * f.mean_per_item / others if others > 0 and top >= limit else 0.0
        gains.append((_cleanup_gain(f, clean_fits, top, limit, elasticity, now, since, horizon, spill), m))
    if not gains or sum(g for g, _ in gains) < CLEANUP_COST_S * len(ms):
        return None
    return max(gains, key=lambda x: x[0])[1]


def _cleanup_gain(f: Fit, clean_fits: float, top: int, limit: int, elasticity: float, now: float, since: float,
                  horizon: float, spill: float = 0.0) -> float:
    """``T * loss(T) - integral of loss over [0, T]`` for one service (s of its throughput), ``T`` the
    time since the last cleanup plus the delay a cleanup takes (``horizon - since``).

    The loss at a waste fraction ``w`` is ``elasticity / top`` per item its batch loses to it. Its
    integral since the last cleanup comes from the waste its reports showed (the loss that was
    paid); the loss at ``T`` from the latest waste, grown at the pace it grew, to the horizon. (A
    batch lowered for the waste leaves the memory it held reserved, as waste too: then the loss
    jumps, and a cleanup pays at once, though little was lost before.) Without two reports since the
    last cleanup, the waste is taken to have grown evenly from none. ``spill``: for a batch at its
    cap (``limit``), the share of the other services' batch memory one unit of waste fraction takes
    from them: they lose about that share of their items, grown evenly.
    """
    def loss(w: float) -> float:
        return elasticity * max(0, top - math.floor(clean_fits / (1 + w) + 1e-9)) / top

    start = now - since
    seen = [(t, w) for t, w in f.wastes if start <= t <= now]
    if len(seen) < 2:
        rate = f.waste_fraction / since if since > 0 else 0.0
        steps = elasticity / top * sum(_lost_at(clean_fits, top, rate, horizon)) if rate > 0 else 0.0
        ahead = f.waste_fraction + rate * (horizon - since)
    else:
        (t0, w0), (t1, w1) = seen[0], seen[-1]
        rate = max(0.0, (w1 - w0) / (t1 - t0)) if t1 > t0 else 0.0
        ahead = w1 + rate * (start + horizon - t1)
        paid = sum(loss(w) * (t_next - t) for (t, w), (t_next, _) in zip(seen, [*seen[1:], (now, 0.0)]))
        steps = since * loss(ahead) - paid
    if top >= limit:
        return max(steps, elasticity * ahead * spill * since / 2)
    return steps


def _lost_at(clean_fits: float, top: int, rate: float, horizon: float) -> list[float]:
    """When, after a cleanup, each item of the batch ``top`` was lost to a waste growing evenly at
    ``rate`` from none, for those lost by ``horizon`` (s): the ``k``-th when ``clean_fits / (1 + rate
    * tau)`` drops below ``top - k + 1``. ``T * loss(T) - integral of loss over [0, T]`` is then
    ``elasticity / top`` times the sum of these times."""
    out: list[float] = []
    for k in range(1, top + 1):
        tau = max(0.0, (clean_fits / (top - k + 1) - 1) / rate)
        if tau >= horizon:
            break
        out.append(tau)
    return out


def describe(m: Member, p: Plan) -> str:
    f = m.fit
    gib = 2**30
    if not f.measured:
        return (f"adaptive: {p.targets[m.name]} items, stepping up until its reports measure it "
                f"(declared {f.mean_per_item / MIB:.0f} MiB per item)")
    text = (f"adaptive: {p.targets[m.name]} items fit the safety bound ({p.bound / gib:.1f} GiB): "
            f"{f.fixed / gib:.1f} GiB fixed, {f.worst_per_item / MIB:.0f} MiB per item at worst "
            f"({f.jitter:.0%} above the mean), other tenants {p.other / gib:.1f} GiB")
    if f.waste_fraction > 0.005:
        text += f", fragmentation {f.waste_fraction:.0%} of activations"
    why = p.capped.get(m.name)
    if why == "trust region":
        text += f"; growing step by step (largest batch run: {m.svc.memory.largest_ok})"
    elif why:
        text += f"; capped by {why}"
    return text


def sample_view(sample: GpuSample) -> tuple[int, int]:
    assert sample.memory_total_bytes and sample.memory_used_bytes is not None
    return sample.memory_total_bytes, sample.memory_used_bytes


def after_oom(svc: ServiceState, failed: int, now: float) -> ServiceState:
    """The service's model after an OOM at ``failed``: its trust region shrinks; the OOM waits for an explanation."""
    return dataclasses.replace(svc, memory=forget_oom_region(svc.memory, failed), oom_pending=(now, failed))


def step(sample: GpuSample, gs: GpuState, services: list[ServiceState], s: Settings, now: float,
         events: list[Event], roster: Roster, *, settled: bool, mode: str = "sample") -> tuple[GpuState, list[ServiceState]]:
    """One GPU under adaptive: learn from the sample if settled, plan, publish, clean up if due.

    ``mode``: ``sample`` (a sampler tick), ``now`` (an operator's "optimize now": grow without waiting
    for the samples to confirm, learn nothing new) or ``rebalance`` (the shares moved: only lower).
    """
    force = mode == "now"
    v = view(sample, gs, services, s, roster, now)
    used, bound = v.used, v.bound
    ms = members(services, v.shares, s, now, v.running)
    if settled and mode == "sample":
        gs = observe_tenants(gs, used, ms, now, s)
        changed, tenants = explain_ooms(ms, v.total, gs.tenants, now, events, gs.index)
        gs = dataclasses.replace(gs, tenants=tenants)
        lifted = lift_ceilings([changed.get(x.service, x) for x in services], gs.tenants, now)
        if any(new is not old for new, old in zip(lifted, services)):
            services = lifted
            ms = members(services, v.shares, s, now, v.running)
    other = planning_other(gs.tenants, ms, bound, now, s)
    p = plan(ms, bound, other)
    grow = force or (mode == "sample" and settled and gs.tenants.confirmed and not gs.hot)
    granted = grants(ms, p, growth_room(ms, bound, other), now, gs.last_cleanup_at) if grow else {}
    cleaning = mode == "sample" and want_cleanup(ms, p, gs, now, s, sample.utilization_percent,
                                                 over_bound=used > bound) is not None
    out = [_decide(m, p, granted.get(m.name, 0), grow, gs, sample, now, events,
                   hold=cleaning and _waste_only(m, p, s)) for m in ms]
    if cleaning:
        gs = raise_cleanup(gs, "fragmentation", now, events)
        gs = start_pending(gs, Pending("fragmentation", "fragmentation", s.fragmentation_threshold, now, used, True),
                           events)
    return gs, out


def _waste_only(m: Member, p: Plan, s: Settings) -> bool:
    """Whether only fragmentation waste, which a cleanup raised now clears at the next poll, puts the
    service's batch over its part, and by no more than ``memory_reserve_mb`` (it holds its batch)."""
    f = m.fit
    if not f.measured or f.waste_fraction <= 0 or p.targets.get(m.name, m.cur) >= m.svc.batch_size:
        return False
    clean = math.floor(p.fits.get(m.name, 0.0) * (1 + f.waste_fraction) + 1e-9)
    over = (m.svc.batch_size - p.fits.get(m.name, 0.0)) * m.cost
    return clean >= m.svc.batch_size and over <= s.memory_reserve_mb * MIB


def grants(ms: Sequence[Member], p: Plan, room: float, now: float, cleaned_at: float | None = None) -> dict[str, int]:
    """How many items each service may grow by now: together they fit ``room`` (bytes), shared by weight.

    A service grows towards its target, as far as its part holds with the model's error to spare
    (:func:`growth_reach`), or with :data:`REGROWTH_MARGIN` items to spare back to a batch the plan
    lowered it from in the last :data:`REGROWTH_S`
    seconds (so that a steady load does not flap across an item's edge; not after a cleanup since,
    which cleared what it was lowered for, ``cleaned_at``). When the room does not hold
    every growth, each gets its share of it by weight, what one does not need going to the others.
    Growth into items of the plan's remainder (:attr:`Plan.remainder`) is granted only once every
    service's growth into its own part is: the remainder never keeps a part from being filled.
    """
    wants: dict[str, int] = {}
    extras: dict[str, int] = {}  # growth into items of the plan's remainder: granted after every other's
    for m in ms:
        if m.share <= 0 or m.cost <= 0 or m.svc.oom_pending is not None or m.svc.override_active(now) is not None:
            continue
        reach = growth_reach(m.fit, p.fits.get(m.name, 0.0))
        lowered = m.svc.lowered
        if lowered is not None and now - lowered[0] < REGROWTH_S and (cleaned_at is None or cleaned_at < lowered[0]):
            reach = min(reach, max(lowered[1] - 1, math.floor(p.fits.get(m.name, 0.0) - REGROWTH_MARGIN + 1e-9)))
        want = min(p.targets[m.name], reach) - m.cur
        own = min(want, p.targets[m.name] - p.remainder.get(m.name, 0) - m.cur)
        if own > 0:
            wants[m.name] = own
        if want > max(0, own):
            extras[m.name] = want - max(0, own)
    by_name = {m.name: m for m in ms}
    out, left = _share_room(wants, by_name, max(0.0, room))
    if extras and all(out.get(n, 0) >= w for n, w in wants.items()):  # every part's growth granted first
        more, _ = _share_room(extras, by_name, left)
        for n, w in more.items():
            if w > 0:
                out[n] = out.get(n, 0) + w
    return out


def growth_reach(f: Fit, fits: float) -> int:
    """The largest batch a part of ``fits`` items (of worst footprint) lets a service grow to: what the part
    holds with its worst per-item memory raised by the model's error (:attr:`.memory.Fit.error`).

    A part that holds the next item by less than that is within what the next reports may take back (a
    new highest observation raises the worst): growing into it would lower the batch again soon, and then
    bar the item for :data:`REGROWTH_S`. The error shrinks as reports come, so a part that holds the item
    by a little grows into it once enough reports show it does (a fixed share of an item would bar such a
    part for good).
    """
    scale = 1 + f.error / f.worst_per_item if f.worst_per_item > 0 else 1.0
    return math.floor(fits / scale + 1e-9)


def _share_room(wants: dict[str, int], by_name: dict[str, Member], left: float) -> tuple[dict[str, int], float]:
    """``wants`` (items by service) granted within ``left`` bytes, shared by weight, what one does not need
    going to the others; with the bytes left."""
    wants = dict(wants)
    out: dict[str, int] = {}
    while wants:
        weight = sum(by_name[n].share for n in wants)
        settled = {n: w for n, w in wants.items() if w * by_name[n].cost <= left * by_name[n].share / weight}
        if not settled:
            for n, w in wants.items():
                m = by_name[n]
                out[n] = min(w, math.floor(left * m.share / weight / m.cost + 1e-9))
            left -= sum(out[n] * by_name[n].cost for n in wants)
            break
        for n, w in settled.items():
            out[n] = w
            left -= w * by_name[n].cost
            del wants[n]
    return out, left


def safe_batch(svc: ServiceState, others: Sequence[ServiceState], gs: GpuState, sample: GpuSample, s: Settings,
               roster: Roster, now: float) -> int:
    """The largest batch adaptive would publish for ``svc`` now (what an operator's override is held to)."""
    services = [*others, svc]
    v = view(sample, gs, services, s, roster, now)
    ms = members(services, v.shares, s, now, v.running)
    return plan(ms, v.bound, planning_other(gs.tenants, ms, v.bound, now, s)).targets[svc.service]


def _decide(m: Member, p: Plan, granted: int, grow: bool, gs: GpuState, sample: GpuSample, now: float,
            events: list[Event], *, hold: bool = False) -> ServiceState:
    svc = m.svc
    target = p.targets[m.name]
    why = describe(m, p)
    manual = svc.override_active(now)
    if manual is not None:
        batch = min(manual, max(m.lo, target))
        reason = (f"manual override by an operator (adaptive's target is {target})" if batch == manual else
                  f"manual override {manual}, held at {batch} by the safety bound")
        return publish(svc, batch, target, reason, now, events, "manual")
    cur = svc.batch_size
    batch = cur
    if target < cur and hold:
        why += "; held while a cleanup clears its fragmentation"
    elif target < cur:
        batch = target
        if m.fit.measured and svc.memory.reports >= SETTLED_REPORTS:  # not while it is still being learned
            svc = dataclasses.replace(svc, lowered=(now, cur))
    elif target > cur and m.share > 0:
        if not grow:
            why += "; GPU hot: not growing" if gs.hot else "; growing once the samples confirm the headroom"
        elif svc.oom_pending is not None:
            why += "; growing once the last OOM is explained"
        else:
            batch = max(cur, min(target, m.cur + granted))
            util = sample.utilization_percent
            if batch > cur and util is not None and util < 50:
                why += f"; GPU {util:.0f}% busy, growing"
    return publish(svc, clamp(batch, m.lo, m.hi), target, why, now, events, "optimization")


def on_oom(svc: ServiceState, others: Sequence[ServiceState], failed: int, gs: GpuState, sample: GpuSample | None,
           s: Settings, roster: Roster, now: float) -> tuple[ServiceState, GpuState, int]:
    """An OOM report at ``failed``: the service's state after it, the GPU's, and the batch to publish now."""
    lo, _ = s.batch_limits(s.profile(svc.service))
    cut = max(lo, min(failed - 1, math.floor(failed * OOM_CUT)))
    svc = after_oom(svc, failed, now)
    if sample is None or sample.failed or not sample.memory_total_bytes or sample.memory_used_bytes is None:
        return svc, gs, cut
    services = [*others, svc]
    v = view(sample, gs, services, s, roster, now)
    ms = members(services, v.shares, s, now, {**v.running, svc.service: failed})
    failing = next(m for m in ms if m.name == svc.service)
    batch, tenants = oom_cut(ms, failing, cut, v.total, v.bound, gs.tenants, s, now)
    return svc, dataclasses.replace(gs, tenants=tenants), batch
