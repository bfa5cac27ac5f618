"""The simulated world's rules, as small pure functions: throughput, heat, restarts, who gets memory.

:mod:`optimizer.simulation.world` steps the world with them; they are apart so that each rule can be
read, documented (docs/scenarios.md) and tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optimizer.simulation.scenario import SimGpu, SimService

# Kubernetes restarts a failed container after an exponential back-off: 10 s, 20 s, 40 s, ... capped at
# five minutes, and forgets the back-off once the container has run for ten minutes without failing
# (kubernetes.io, "Pod Lifecycle", container restarts). The world applies it to crashed services and
# to co-tenants whose memory did not fit.
BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0
BACKOFF_RESET_S = 600.0


def backoff_s(failures: int) -> float:
    """The wait before the restart after ``failures`` consecutive failures (seconds; ``failures`` >= 1)."""
    return float(min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** max(0, failures - 1)))


def throughput_per_ms(b: int, spec: SimService) -> float:
    """Items per millisecond at batch ``b`` and full clocks: ``b / (overhead_ms + b * item_ms)``."""
    return b / (spec.overhead_ms + b * spec.item_ms) if b > 0 else 0.0


def compute_share(b: int, spec: SimService) -> float:
    """The fraction of the time the service's batches keep the GPU computing (0 to 1)."""
    return b * spec.item_ms / (spec.overhead_ms + b * spec.item_ms) if b > 0 else 0.0


def clock_fraction(gpu: SimGpu, util: float, thermal_c: float) -> float:
    """The clock a GPU runs at, as a fraction of its full clock (thermal throttling).

    Heat comes from computing: at full clocks the GPU reaches ``idle + load_temperature_rise_c * util
    + thermal_c``. Above ``slowdown_temperature_c`` it lowers its clock until the heat fits under it,
    never below ``min_clock_fraction``. Throttled, the items per second are then set by the heat budget,
    whatever the batch size: a smaller batch computes less of the time but no faster.
    """
    heat = gpu.load_temperature_rise_c * util
    budget = gpu.slowdown_temperature_c - gpu.idle_temperature_c - thermal_c
    if heat <= budget:
        return 1.0
    if heat <= 0 or budget <= 0:
        return gpu.min_clock_fraction
    return max(gpu.min_clock_fraction, budget / heat)


def temperature_c(gpu: SimGpu, util: float, thermal_c: float, clock: float) -> float:
    """What the GPU's sensor reads at compute share ``util`` and ``clock`` (degrees Celsius)."""
    return gpu.idle_temperature_c + gpu.load_temperature_rise_c * util * clock + thermal_c


@dataclass
class Demand:
    """One party's memory on a GPU in one step (MiB): what it held in the step before, what it wants now.

    ``arriving`` memory (a co-tenant's, a starting service's weights) is served before the services'
    batches (``arriving=False``); within each group the smaller asks first.
    """

    key: str
    held_before: float
    wants: float
    arriving: bool
    needs: str | None = None  # the key of another demand this one cannot go on without (a service's weights)

    @property
    def held(self) -> float:
        return min(self.held_before, self.wants)

    @property
    def increment(self) -> float:
        return max(0.0, self.wants - self.held_before)


def allocate(total_mb: float, demands: list[Demand]) -> list[str]:
    """Who does not get the memory they ask for in a step (their keys, in the order they failed).

    Memory held in the step before stays held (up to what each party wants now: freeing is
    immediate). The increments are then served from what is free: first the arriving ones,
    then the batches' (see :class:`Demand`), each group smallest first. An increment that does not
    fit fails: that party is returned, and its memory held is freed for the increments after it.
    The allocation that does not fit fails, whoever's it is: a co-tenant arriving into a full GPU, a
    service starting next to it, or a service whose batch grew. A demand whose ``needs`` failed
    fails with it.
    """
    free = total_mb - sum(d.held for d in demands)
    failed: list[str] = []
    order = sorted(demands, key=lambda d: (not d.arriving, d.increment, d.key))
    for d in order:
        if d.needs is not None and d.needs in failed:
            failed.append(d.key)
            free += d.held
        elif d.increment <= 0:
            continue
        elif d.increment <= free + 1e-9:
            free -= d.increment
        else:
            failed.append(d.key)
            free += d.held
    return failed


def fits(budget_mb: float, per_item_mb: float, cap: int) -> int:
    """The largest batch of ``per_item_mb`` items within ``budget_mb``, from 0 to ``cap``."""
    if budget_mb <= 0 or per_item_mb <= 0:
        return 0
    return max(0, min(cap, math.floor(budget_mb / per_item_mb + 1e-9)))
