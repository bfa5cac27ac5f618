"""What adaptive knows of a GPU's other tenants: memory used there that its services do not hold.

Each measured service holds, at any moment, between ``low(b)`` and ``high(b)`` at the batch ``b`` it
runs (:class:`~optimizer.policy.adaptive.memory.Fit`: the least and the most per item its reports
showed). So every settled sample (no batch change still being adopted) bounds the other tenants'
memory: at least ``used - sum(high)``, at most ``used - sum(low)``.

Since their memory last changed visibly, the samples form a window. The tenants' memory over it is
modelled as a line: its slope (``trend``, at least 0) is the least-squares slope of the bounds'
midpoints, so a ramp is seen coming; each sample's upper bound, carried forward along the slope to
now, bounds what they hold now, and ``level`` is the least of these. With no ramp it is the
smallest upper bound seen, which tightens as samples come. ``floor`` is the largest lower bound.
A sample whose lower bound is above ``level`` shows an arrival; one whose upper bound is below
``floor``, a departure: the window restarts there.

Arrivals and departures of the last :data:`VOLATILITY_WINDOW` seconds are kept, so that a tenant that
comes and goes can be weighed against ``oom_cost_s``
(:func:`optimizer.policy.adaptive.plan.volatility_reserve`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VOLATILITY_WINDOW = 1200.0  # s: arrivals kept to judge how volatile the other tenants are
MAX_WINDOW = 720  # samples kept since the level last changed (an hour at 5 s)
MAX_CHANGES = 64
TREND_SAMPLES = 3  # a window needs this many samples before its slope is believed


@dataclass(frozen=True, slots=True)
class Tenants:
    """Other tenants' memory on one GPU (bytes; times in seconds), as seen from settled samples."""

    window: tuple[tuple[float, float, float], ...] = ()  # (t, at least, at most) since the level last changed
    level: float = 0.0  # at most this much now
    floor: float = 0.0  # at least this much
    trend: float = 0.0  # bytes per second they are growing at (a ramp), else 0
    changes: tuple[tuple[float, float, float], ...] = ()  # (t, change, level after) of the last VOLATILITY_WINDOW
    since: float = float("-inf")  # when the window last restarted (an arrival, a departure)
    assumed: float = 0.0  # at least this much, as an OOM proved, until the next settled sample

    def planned(self) -> float:
        """What the plan counts now (bytes): the level, or what an OOM since the last sample proved."""
        return max(self.level, self.assumed)

    @property
    def confirmed(self) -> bool:
        """The level rests on two samples or more (a departure is not believed on one)."""
        return len(self.window) >= 2

    def peaks(self, now: float) -> list[float]:
        """The levels arrivals of the last :data:`VOLATILITY_WINDOW` seconds reached (bytes), highest first."""
        return sorted({after for t, delta, after in self.changes if now - t <= VOLATILITY_WINDOW and delta > 0},
                      reverse=True)

    def peak(self, now: float) -> float:
        """The highest level of the last :data:`VOLATILITY_WINDOW` seconds (bytes)."""
        return max([self.level, *self.peaks(now)])

    def arrival_rate(self, now: float, reaching: float) -> float:
        """How often the tenants' memory arrived at ``reaching`` bytes or more (per second) in the last
        :data:`VOLATILITY_WINDOW` seconds: one over the mean time between such arrivals when there were
        two or more (less if the last is longer ago than that), one per window for a single one."""
        times = [t for t, delta, after in self.changes
                 if now - t <= VOLATILITY_WINDOW and delta > 0 and after >= reaching]
        if not times:
            return 0.0
        if len(times) == 1:
            return 1.0 / VOLATILITY_WINDOW
        gap = (times[-1] - times[0]) / (len(times) - 1)
        return 1.0 / max(gap, now - times[-1], 1e-9)


def update(tenants: Tenants, now: float, lower: float, upper: float, tolerance: float, interval: float,
           record: bool = True, significant: float = 0.0) -> Tenants:
    """The tenants after a settled sample that bounds their memory between ``lower`` and ``upper`` (bytes).

    ``tolerance`` (bytes) is noise to ignore; ``interval`` the monitoring interval (s): changes of one
    sign within two intervals are one arrival (a ramp) or one departure. A change is kept for the
    volatility judgement only if ``record`` (False: the sample also saw a service of the GPU come or
    go) and it is larger than ``significant`` bytes (what the services' own memory may still grow by
    unseen: a change within it may be theirs).
    """
    upper = max(upper, lower)
    sample = (now, lower, upper)
    arrived = bool(tenants.window) and lower > tenants.level + tenants.trend * (now - tenants.window[-1][0]) + tolerance
    departed = bool(tenants.window) and not arrived and upper < tenants.floor - tolerance
    since = tenants.since
    if arrived or departed or not tenants.window:
        window: tuple[tuple[float, float, float], ...] = (sample,)
        since = now
    else:
        window = (*tenants.window, sample)[-MAX_WINDOW:]
    trend = _slope(window) if len(window) >= TREND_SAMPLES else 0.0
    level = max(0.0, min(u + trend * (now - t) for t, _, u in window))
    floor = min(level, max(0.0, max(lo for _, lo, _ in window)))
    changes = tuple(c for c in tenants.changes if now - c[0] <= VOLATILITY_WINDOW)
    delta = level - tenants.level
    if record and (arrived or departed) and abs(delta) > max(tolerance, significant):
        if changes and now - changes[-1][0] <= 2 * interval and changes[-1][1] * delta > 0:
            changes = (*changes[:-1], (now, changes[-1][1] + delta, level))  # one ramp, one departure
        else:
            changes = (*changes, (now, delta, level))[-MAX_CHANGES:]
    return dataclasses.replace(tenants, window=window, level=level, floor=floor, trend=trend, changes=changes,
                               since=since, assumed=0.0)


def _slope(window: tuple[tuple[float, float, float], ...]) -> float:
    """The least-squares slope of the bounds' midpoints over time (bytes per second), at least 0."""
    n = len(window)
    mt = sum(t for t, _, _ in window) / n
    mv = sum((lo + u) / 2 for _, lo, u in window) / n
    var = sum((t - mt) ** 2 for t, _, _ in window)
    if var <= 0:
        return 0.0
    return max(0.0, sum((t - mt) * ((lo + u) / 2 - mv) for t, lo, u in window) / var)


def assume_at_least(tenants: Tenants, level: float, now: float) -> Tenants:
    """An OOM proved more memory in use than the models explain: plan for at least ``level`` (bytes).

    It holds until the next settled sample, which tells what is really there. It is also an arrival
    for the volatility judgement (the sample that would show it may no longer see the service that
    ran out of memory, if its process died).
    """
    changes = tenants.changes
    if level > tenants.level:
        changes = (*tuple(c for c in changes if now - c[0] <= VOLATILITY_WINDOW), (now, level - tenants.level, level))
    return dataclasses.replace(tenants, assumed=max(tenants.assumed, level), changes=changes[-MAX_CHANGES:])


def confirm_arrival(tenants: Tenants, at: float, level: float) -> Tenants:
    """The arrival recorded at ``at`` (an OOM's, as what it proved) reached ``level`` bytes, as a settled
    sample since showed: so that the volatility judgement weighs what came, not the free memory it took."""
    changes = tuple((t, delta + level - after, level) if t == at and delta > 0 and level > after else (t, delta, after)
                    for t, delta, after in tenants.changes)
    return dataclasses.replace(tenants, changes=changes)
