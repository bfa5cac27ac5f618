"""``adaptive``'s plan for one GPU: the services as members with their memory models, and the largest batches
whose worst footprints fit the bound next to the other tenants, divided by weight (:func:`plan`); the other
tenants' memory to plan for (:func:`planning_other`, with the volatility reserve). Pure; the timing, OOMs and
cleanups that act on the plan are :mod:`optimizer.policy.adaptive.controller`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from optimizer.config import Settings
from optimizer.policy.adaptive.memory import Fit, fit
from optimizer.policy.adaptive.tenants import Tenants
from optimizer.policy.model import ADOPTION_INTERVALS, active_ceiling, is_fresh
from optimizer.policy.types import MIB, ServiceState

HORIZON_INTERVALS = 2.0  # a decision takes effect within this many monitoring intervals (poll, then batch)
DUE_LEAD_INTERVALS = HORIZON_INTERVALS + 1.0  # a periodic tenant's room is kept from this long before it is due
NEWCOMER_S = 120.0  # a service this new that has not reported yet may still be loading its weights
REMAINDER_NEW_MARGIN = 0.25  # items a remainder item leaves to spare to go to a service that does not run it yet
# (as controller.REGROWTH_MARGIN); one that runs it keeps it while it fits, as an item of its own part


@dataclass(frozen=True)
class Member:
    """One service on the GPU as the plan sees it."""

    svc: ServiceState
    fit: Fit
    cur: int  # the batch it runs
    lo: int
    hi: int
    share: float  # its share of the batch memory (0: it holds its batch)
    assumed_fixed: float = 0.0  # a newcomer's weights, before its reports measure them (bytes)
    ceiling: int | None = None  # an unexplained OOM's size: not published again under the same conditions

    @property
    def name(self) -> str:
        return self.svc.service

    @property
    def cost(self) -> float:
        """Bytes of worst footprint per item."""
        return self.fit.worst_per_item * (1 + self.fit.waste_fraction)

    @property
    def barred(self) -> int:
        """The largest batch an unexplained OOM leaves it (``hi`` without one)."""
        return self.ceiling - 1 if self.ceiling is not None else self.hi

    @property
    def top(self) -> int:
        """The largest batch it may be given now: within ``hi``, its trust region and :attr:`barred`."""
        return min(self.hi, self.fit.trust_cap, self.barred)

    @property
    def fixed(self) -> float:
        return (self.fit.fixed + self.assumed_fixed) if self.share > 0 else self.fit.worst(self.cur)


@dataclass(frozen=True)
class Plan:
    """Targets per service, and what they came from (bytes)."""

    targets: dict[str, int]
    bound: float
    other: float
    fits: dict[str, float]  # items of worst footprint each service's part holds, before any cap
    capped: dict[str, str]  # why a service's target is below its part ("max_batch_size", "trust region")
    remainder: dict[str, int] = dataclasses.field(default_factory=dict)  # items of a target beyond its part


def members(services: Sequence[ServiceState], shares: dict[str, float], s: Settings, now: float,
            in_force: dict[str, int]) -> list[Member]:
    """The services of one GPU with their models; a newcomer not measured yet, next to measured
    services, is assumed to be loading weights as large as theirs (their mean) for :data:`NEWCOMER_S`
    seconds, so that they make room for it: a service that never reports holds memory the samples
    show."""
    out = []
    for svc in services:
        profile = s.profile(svc.service)
        lo, hi = s.batch_limits(profile)
        cur = in_force[svc.service]
        f = fit(svc.memory, profile.per_item_mb * MIB, now, cur)
        out.append(Member(svc=svc, fit=f, cur=cur, lo=lo, hi=hi, share=shares.get(svc.service, 0.0),
                          ceiling=active_ceiling(svc, now)))
    measured = [m.fit.fixed for m in out if m.fit.measured]
    if not measured:  # a cold start: what loads is in the samples; there is nobody to make room
        return out
    guess = sum(measured) / len(measured)
    return [dataclasses.replace(m, assumed_fixed=guess)
            if not m.fit.measured and now - m.svc.registered_at <= NEWCOMER_S else m for m in out]


def plan(ms: Sequence[Member], bound: float, other: float) -> Plan:
    """The largest batches whose worst footprints fit ``bound`` next to ``other``, divided by weight."""
    pool = bound - other - sum(m.fixed for m in ms)
    active = [m for m in ms if m.share > 0]
    parts = {m.name: max(0.0, pool) * m.share for m in active}
    targets = {m.name: m.cur for m in ms if m.share <= 0}
    capped: dict[str, str] = {}
    fits_items: dict[str, float] = {}
    free = list(active)
    while free:
        spare = 0.0
        still = []
        for m in free:
            fits_items[m.name] = parts[m.name] / m.cost if m.cost > 0 else float(m.hi)
            fits = math.floor(fits_items[m.name] + 1e-9)
            barred, top = m.barred, m.top
            if fits >= top:
                targets[m.name] = max(m.lo, top)
                if top == barred < m.hi:
                    capped[m.name] = f"the OOM at batch {m.ceiling}"
                    spare += parts[m.name] - top * m.cost
                    parts[m.name] = top * m.cost
                elif top == m.hi:  # for good: what its part holds beyond it goes to the others
                    capped[m.name] = "max_batch_size"
                    spare += parts[m.name] - top * m.cost
                    parts[m.name] = top * m.cost
                else:  # for now: its part stays its own while it grows into it
                    capped[m.name] = "trust region"
            else:
                targets[m.name] = max(m.lo, fits)
                still.append(m)
        if spare <= 0 or not still or len(still) == len(free):
            break
        weight = sum(m.share for m in still)
        for m in still:
            parts[m.name] += spare * m.share / weight
        free = still
    remainder = _share_remainder(active, max(0.0, pool), parts, targets, fits_items, capped)
    return Plan(targets=targets, bound=bound, other=other, fits=fits_items, capped=capped, remainder=remainder)


def _share_remainder(active: Sequence[Member], pool: float, parts: dict[str, float], targets: dict[str, int],
                     fits_items: dict[str, float], capped: dict[str, str]) -> dict[str, int]:
    """Give the memory the whole items of the weighted parts leave over to whoever it holds one more item
    of (in place), one item at a time: a service that runs that item already first (so that it does not
    move between services as their estimates move), else the one that would stay furthest below its
    weighted share.

    Divided by weight, each part is floored to whole items, and at small batches the pieces left over
    can together hold another item of some service that no part holds alone (three services sharing
    23 GB at 3 to 5 items each can leave a whole item of the largest unused). A service held back by
    its trust region keeps its part; one capped for good has none to spare. A service that runs the
    item keeps it while the remainder holds it, as it keeps an item of its own part while the part
    holds it; a new taker needs :data:`REMAINDER_NEW_MARGIN` to spare. The receiver's ``fits`` becomes
    its new batch plus what the remainder holds beyond the item (at most one more item), so that it
    grows into it as into its own part, with the model's error to spare
    (:func:`~optimizer.policy.adaptive.controller.growth_reach`). Returns the items given, by service:
    they are granted after every service's growth into its own part
    (:func:`~optimizer.policy.adaptive.controller.grants`).
    """
    left = pool - sum(parts[m.name] if capped.get(m.name) == "trust region" else targets[m.name] * m.cost
                      for m in active)
    open_ = [m for m in active if m.name not in capped and m.cost > 0]
    given: dict[str, int] = {}

    def runs_it(m: Member) -> bool:  # it keeps an item it runs while the item fits; a new taker needs a margin
        return m.cur > targets[m.name]

    while True:
        takers = [m for m in open_ if targets[m.name] < m.top
                  and m.cost * (1 + (0.0 if runs_it(m) else REMAINDER_NEW_MARGIN)) <= left]
        if not takers:
            return given
        m = min(takers, key=lambda m: (not runs_it(m), (targets[m.name] + 1) * m.cost / m.share, m.name))
        targets[m.name] += 1
        given[m.name] = given.get(m.name, 0) + 1
        fits_items[m.name] = max(fits_items[m.name], targets[m.name] + min(1.0, left / m.cost - 1))
        left -= m.cost


def volatility_reserve(tenants: Tenants, ms: Sequence[Member], bound: float, level: float, now: float,
                       s: Settings) -> float:
    """Memory to keep for a tenant that left and is likely to return (bytes), weighed against ``oom_cost_s``.

    For each level the tenants' arrivals reached lately: holding it saves, per second, the OOMs of
    the arrivals that would not fit the batches riding at the level now but fit beside it (the rate
    of arrivals reaching an item above the level now, less the rate of those reaching an item above
    the held one, :meth:`Tenants.arrival_rate`) times ``oom_cost_s`` of every service's throughput;
    it costs the batches it takes (counted linearly in items, which overstates the loss for
    services whose throughput saturates; the parts' items only, not the remainder's, which moves in
    whole items of whichever service it fits and would make the choice jump). Hold the level where that
    pays most, if any does. When the arrivals that would not fit beside the batches riding now keep a
    period (:meth:`Tenants.due`), room is held for them only from :data:`DUE_LEAD_INTERVALS`
    monitoring intervals (and the period's tolerance) before the next is due: a decision takes that
    long to take effect. (A lower level held saves only the arrivals that stay below it: the ones
    that go higher still OOM.)
    """
    smallest = min((m.cost for m in ms if m.share > 0), default=0.0)
    ride = _parts_items(ms, plan(ms, bound, level))
    if smallest <= 0 or ride <= 0:
        return 0.0
    if not tenants.due(now, level + smallest, s.monitoring_interval, DUE_LEAD_INTERVALS * s.monitoring_interval):
        return 0.0  # the arrivals that would not fit keep a period, and the next is not due yet
    best, reserve = 0.0, 0.0
    riding = tenants.arrival_rate(now, reaching=level + smallest)
    for peak in tenants.peaks(now):  # every level arrivals reached: hold the one that pays best
        extra = peak - level
        if extra < smallest:
            continue
        hold = _parts_items(ms, plan(ms, bound, level + extra))
        saved = max(0.0, riding - tenants.arrival_rate(now, reaching=peak + smallest))
        gain = saved * s.oom_cost_s - (1 - hold / ride)
        if gain > best:
            best, reserve = gain, extra
    return reserve


def _parts_items(ms: Sequence[Member], p: Plan) -> int:
    """The items of the services' own parts in ``p`` (their targets less the remainder's items)."""
    return sum(p.targets[m.name] - p.remainder.get(m.name, 0) for m in ms if m.share > 0)


def planning_other(tenants: Tenants, ms: Sequence[Member], bound: float, now: float, s: Settings) -> float:
    """The other tenants' memory to plan for: the level, its trend over the horizon, the volatility reserve."""
    level = tenants.planned() + tenants.trend * HORIZON_INTERVALS * s.monitoring_interval
    return level + volatility_reserve(tenants, ms, bound, level, now, s)


def in_force(svc: ServiceState, now: float, s: Settings) -> int:
    """The batch the service runs: the one it reported after its last change was adopted, else the published one."""
    if (svc.reported_batch is not None and svc.reported_at is not None and is_fresh(svc.reported_at, now, s)
            and svc.reported_at >= svc.changed_at + ADOPTION_INTERVALS * s.monitoring_interval):
        return svc.reported_batch
    return svc.batch_size


def growth_room(ms: Sequence[Member], bound: float, other: float) -> float:
    """Memory free now if every service held its worst footprint at the batch it runs (bytes)."""
    return bound - other - sum(m.fit.worst(m.cur) if m.fit.measured else m.cur * m.cost for m in ms)
