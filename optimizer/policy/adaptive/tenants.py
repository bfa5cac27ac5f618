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
(:func:`optimizer.policy.adaptive.plan.volatility_reserve`): each at the level its window settled
to; one that left as coming back on top of what is there now (:meth:`Tenants.returns`); arrivals
that keep a period as due only around the next one (:meth:`Tenants.due`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VOLATILITY_WINDOW = 1200.0  # s: arrivals kept to judge how volatile the other tenants are
MAX_WINDOW = 720  # samples kept since the level last changed (an hour at 5 s)
MAX_CHANGES = 64
TREND_SAMPLES = 3  # a window needs this many samples before its slope is believed
LEFT_SHARE = 0.5  # an arrival that departures since took this share of has left: it may come again on top ...
SAME_SIZE = 0.3  # ... unless one of its size (within this fraction) has come since and is there now
PERIODIC_ARRIVALS = 3  # arrivals whose gaps are whole multiples of one period (two gaps or more) are periodic ...
PERIOD_TOLERANCE = 0.05  # ... each gap within this fraction of the period of its multiple ...
PERIOD_SLACK_INTERVALS = 2.5  # ... or this many monitoring intervals (a settled sample may see an arrival late)


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

    def returns(self, now: float) -> list[tuple[float, float]]:
        """``(t, level)`` for each arrival of the last :data:`VOLATILITY_WINDOW` seconds: the level it would
        bring the tenants to if it came again now (bytes).

        One that left since (departures after it took :data:`LEFT_SHARE` of it or more) comes back on
        top of what is there now: its size adds to the level (another tenant may have come, or gone,
        since). One still there brings nothing new: the level it reached. The latest change being an
        arrival, the ones that left of about its size (:data:`SAME_SIZE`) are taken for that tenant,
        there now: not twice.
        """
        recent = [c for c in self.changes if now - c[0] <= VOLATILITY_WINDOW]
        present = recent[-1][1] if recent and recent[-1][1] > 0 else None
        out = []
        for i, (t, delta, after) in enumerate(recent):
            if delta <= 0:
                continue
            gone = -sum(d for _, d, _ in recent[i + 1:] if d < 0)
            same = present is not None and abs(delta - present) <= SAME_SIZE * max(delta, present)
            out.append((t, self.level + delta if gone >= LEFT_SHARE * delta and not same else after))
        return out

    def peaks(self, now: float) -> list[float]:
        """The levels the arrivals of the last :data:`VOLATILITY_WINDOW` seconds would bring (bytes, :meth:`returns`),
        highest first."""
        return sorted({level for _, level in self.returns(now)}, reverse=True)

    def peak(self, now: float) -> float:
        """The highest level of the last :data:`VOLATILITY_WINDOW` seconds (bytes)."""
        return max([self.level, *self.peaks(now)])

    def _arrivals(self, now: float, reaching: float) -> list[float]:
        """When the tenants' memory arrived at ``reaching`` bytes or more in the last :data:`VOLATILITY_WINDOW` seconds."""
        return [t for t, level in self.returns(now) if level >= reaching]

    def period(self, now: float, reaching: float, interval: float) -> float | None:
        """The period (s) of the arrivals at ``reaching`` bytes or more, if they keep one (else ``None``).

        Periodic: :data:`PERIODIC_ARRIVALS` or more, every gap a whole multiple of the shortest (an
        arrival in between may have gone unrecorded: seen while a service restarted), each within
        :func:`period_tolerance` of its multiple of the period they span on average, and the period
        itself seen as a gap at least ``PERIODIC_ARRIVALS - 1`` times (one stray arrival, 110 s after
        a burst that comes every 586 s, made 475 s look like four periods of 117).
        """
        return _period(self._arrivals(now, reaching), interval)

    def due(self, now: float, reaching: float, interval: float, lead: float) -> bool:
        """Whether an arrival at ``reaching`` bytes or more may come within ``lead`` seconds.

        Always, unless those arrivals are periodic (:meth:`period`): then only from ``lead`` seconds
        (and the period's tolerance) before the next one is due, until that tolerance after it (it may
        be seen late). A tenant that keeps a schedule needs its room kept only when it is due, not for
        the whole time between its visits.
        """
        times = self._arrivals(now, reaching)
        period = _period(times, interval)
        if period is None:
            return True
        tolerance = period_tolerance(period, interval)
        phase = (now - times[-1]) % period
        return phase >= period - lead - tolerance or phase <= tolerance

    def arrival_rate(self, now: float, reaching: float) -> float:
        """How often the tenants' memory arrived at ``reaching`` bytes or more (per second) in the last
        :data:`VOLATILITY_WINDOW` seconds: one over the mean time between such arrivals when there were
        two or more (less if the last is longer ago than that); for a single one, one over the time since it came."""
        times = self._arrivals(now, reaching)
        if not times:
            return 0.0
        if len(times) == 1:  # it came once: it may come again as soon (the time since it came, so far)
            return 1.0 / max(now - times[0], 1e-9)
        gap = (times[-1] - times[0]) / (len(times) - 1)
        return 1.0 / max(gap, now - times[-1], 1e-9)


def _period(times: list[float], interval: float) -> float | None:
    """The period (s) of arrivals at ``times``, if they keep one (:meth:`Tenants.period`), else ``None``."""
    if len(times) < PERIODIC_ARRIVALS:
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    shortest = min(gaps)
    if shortest <= 2 * period_tolerance(shortest, interval):
        return None
    counts = [max(1, round(g / shortest)) for g in gaps]
    if counts.count(1) < PERIODIC_ARRIVALS - 1:  # the period itself seen once only: a stray arrival's
        return None
    period = (times[-1] - times[0]) / sum(counts)
    if any(abs(g - k * period) > period_tolerance(period, interval) for g, k in zip(gaps, counts)):
        return None
    return period


def period_tolerance(period: float, interval: float) -> float:
    """How far (s) a periodic tenant's arrival may be seen from its multiple of the period."""
    return max(PERIOD_TOLERANCE * period, PERIOD_SLACK_INTERVALS * interval)


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
    if changes and not (arrived or departed) and changes[-1][0] >= since and changes[-1][1] > 0 and level < changes[-1][2]:
        # The arrival that started this window reached no more than the window has settled to since (the
        # first sample's upper bound holds the services' jitter too): it is what a return would bring.
        t0, delta0, after0 = changes[-1]
        changes = (*changes[:-1], (t0, delta0 - (after0 - level), level))
    delta = level - tenants.level
    if record and (arrived or departed) and abs(delta) > max(tolerance, significant):
        if arrived and changes and tenants.window and changes[-1][0] > tenants.window[-1][0] and changes[-1][1] > 0:
            # An OOM recorded this arrival since the last sample (:func:`assume_at_least`), at what it
            # proved: this is the sample that shows it, and what it reached. One arrival, at the OOM's time.
            changes = (*changes[:-1], (changes[-1][0], max(delta, changes[-1][1]), level))
        elif changes and now - changes[-1][0] <= 2 * interval and changes[-1][1] * delta > 0:
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
