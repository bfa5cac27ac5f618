"""What adaptive learns of one service's memory from its reports. Pure: values in, values out.

A PyTorch service measures each batch (the client library's ``measure``): the highest allocation
during the batch (``peak_bytes``, ``torch.cuda.max_memory_allocated``), what stays allocated after it
(``allocated_bytes``: the weights and other fixed memory), what its caching allocator holds from the
GPU (``reserved_bytes``) and the part of that lost to fragmentation (``inactive_split_bytes``). From
these the model keeps, in bytes:

- ``fixed``: the fixed memory, the latest ``allocated_bytes`` (it follows a slow leak); from a client
  that does not send it, the intercept of its peaks at two batch sizes or more;
- per-item observations ``(peak - fixed) / batch``, one per report, for the last
  :data:`OBSERVATION_TTL` seconds (it follows a per-item memory that changes);
- the worst per-item memory: the highest observation, plus an allowance for jitter not seen yet
  that shrinks with the number of observations (``PRIOR_JITTER / n``), never below a floor that an
  OOM the model could not explain left behind (:func:`raise_floor`); and its error, how far it may
  still be short: ``(highest - least) / (n + 1)``, the spacing ``n`` draws of a bounded jitter leave
  between the highest of them and the bound, on average (what growth keeps to spare,
  :func:`optimizer.policy.adaptive.controller.grants`);
- the memory it holds per item beyond the fixed memory (``(reserved - allocated) / batch``), its least
  and its most over the last :data:`HELD_TTL` seconds of reports (what one moment can show: a
  per-item memory that rose is not taken for another tenant's arrival for long), and the
  fragmentation waste per byte of activations.

Predictions at a batch ``b``: the worst footprint ``fixed + b * worst_per_item * (1 + waste)``, and
the range one sample of the GPU can show it holding, ``fixed + b * held`` at the least and the most
held seen (what separates the other tenants' memory from its own, :mod:`.tenants`). The waste
fractions reported since the waste was last cleared are kept: what the waste cost since the last
cleanup weighs the next one (:func:`optimizer.policy.adaptive.controller.want_cleanup`). Until a report
with a peak has come, the service is *unmeasured*: its memory is part of what the GPU shows beyond
the measured services, and its per-item memory is the declared one, doubled for the worst case.

Trust region: extrapolating far beyond the batches seen is how a wrong model OOMs (activations
need not grow linearly: padding to the longest item grows with the batch), so a service grows at
most to twice the largest batch it ran without an OOM (:data:`TRUST_GROWTH`; at least 2 items more),
the step a batch-size search takes. It never blocks: every batch it reaches widens it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

OBSERVATION_TTL = 600.0  # s: per-item observations older than this are forgotten (drift)
MAX_OBSERVATIONS = 96  # per-item observations kept at most (about 8 minutes of reports every 5 s)
PRIOR_JITTER = 0.15  # relative allowance for the jitter not seen yet, divided by the observations made
UNMEASURED_FACTOR = 2.0  # an unmeasured service's worst per-item memory: twice what it declares
TRUST_GROWTH = 1.0  # growth allowed beyond the largest batch run without an OOM (fraction, >= 2 items)
FLOOR_TTL = 1800.0  # s: how long an unexplained OOM's floor on the per-item memory holds
MAX_WASTE_FRACTION = 3.0  # fragmentation waste per byte of activations, at most (a sanity bound)
RANGE_ALLOWANCE = 0.1  # the range of memory held per item seen, widened by this fraction on each side
HELD_TTL = 300.0  # s: the memory held per item is what one moment shows: the last 5 minutes' range
MAX_WASTES = 256  # fragmentation figures kept since the waste was last cleared (about 20 minutes at 5 s)
WASTE_RESTART = 0.5  # a waste fraction below this share of the previous one was cleared: its history restarts


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """One service's memory as adaptive has learned it (bytes; times in seconds on the sampler's clock)."""

    fixed: float | None = None
    observations: tuple[tuple[float, float], ...] = ()  # (t, per-item bytes at that report's peak)
    held: tuple[tuple[float, float], ...] = ()  # (t, memory held per item beyond the fixed memory) per report
    waste: float = 0.0  # fragmentation waste in the latest report (bytes)
    waste_fraction: float = 0.0  # waste per byte of activations held
    largest_ok: int = 0  # the largest batch reported without an OOM (the trust region's base)
    floor: float = 0.0  # worst per-item memory an unexplained OOM proved (bytes), until floor_until
    floor_until: float = float("-inf")
    reports: int = 0
    bare_peaks: tuple[tuple[int, float], ...] = ()  # (batch, highest peak) of reports without allocated_bytes
    wastes: tuple[tuple[float, float], ...] = ()  # (t, waste_fraction) of the reports since the waste last fell

    @property
    def measured(self) -> bool:
        return self.fixed is not None and bool(self.observations)


def observe(model: MemoryModel, t: float, batch: int | None, peak: int | None, allocated: int | None,
            reserved: int | None, inactive_split: int | None) -> MemoryModel:
    """The model after a report that was not an OOM (any figure may be missing: ``None``)."""
    if batch is None or batch < 1:
        return model
    fixed = model.fixed
    bare = model.bare_peaks
    if allocated is not None and (peak is None or allocated <= peak):
        fixed = float(allocated)
    elif allocated is None and peak is not None:
        bare = _bare(bare, batch, float(peak))
        if fixed is None:
            fixed = _intercept(bare)
    observations = model.observations
    if peak is not None and fixed is not None and peak >= fixed:
        observations = _recent((*observations, (t, (peak - fixed) / batch)), t)
    held = model.held
    if reserved is not None and fixed is not None:
        per_item = max(0.0, reserved - fixed) / batch
        # A report taken while no batch ran (recovering from an OOM, emptying the cache) shows the
        # weights alone: it says nothing of what a batch holds.
        ran = reserved > fixed if peak is None else peak > fixed and reserved - fixed >= 0.5 * (peak - fixed)
        if ran:
            held = _recent((*held, (t, per_item)), t, HELD_TTL)
    waste, fraction = model.waste, model.waste_fraction
    if reserved is not None:
        if inactive_split is not None:
            waste = float(min(inactive_split, reserved))
        elif peak is not None:
            waste = float(max(0, reserved - peak))
        activations = reserved - waste - (fixed or 0.0)
        fraction = min(MAX_WASTE_FRACTION, waste / activations) if activations > 0 else 0.0
    wastes = model.wastes
    if reserved is not None:
        # A waste that fell by half or more was cleared (a cleanup, an emptied cache): its history restarts.
        fell = not wastes or fraction < WASTE_RESTART * wastes[-1][1]
        wastes = ((t, fraction),) if fell else (*wastes, (t, fraction))[-MAX_WASTES:]
    return dataclasses.replace(
        model, fixed=fixed, observations=observations, held=held,
        waste=waste, waste_fraction=fraction, largest_ok=max(model.largest_ok, batch), reports=model.reports + 1,
        bare_peaks=bare, wastes=wastes)


def _bare(bare: tuple[tuple[int, float], ...], batch: int, peak: float) -> tuple[tuple[int, float], ...]:
    table = dict(bare)
    table[batch] = max(peak, table.get(batch, 0.0))
    return tuple(sorted(table.items()))[-8:]


def _intercept(bare: tuple[tuple[int, float], ...]) -> float | None:
    """Without ``allocated_bytes``: the fixed memory as the intercept of the peaks at two batch sizes or more."""
    if len(bare) < 2:
        return None
    n = len(bare)
    mean_b = sum(b for b, _ in bare) / n
    mean_p = sum(p for _, p in bare) / n
    var = sum((b - mean_b) ** 2 for b, _ in bare)
    slope = sum((b - mean_b) * (p - mean_p) for b, p in bare) / var
    if slope <= 0:
        return None
    return max(0.0, min(min(p for _, p in bare), mean_p - slope * mean_b))


def _recent(observations: tuple[tuple[float, float], ...], now: float,
            ttl: float = OBSERVATION_TTL) -> tuple[tuple[float, float], ...]:
    kept = tuple(o for o in observations if now - o[0] <= ttl)
    return kept[-MAX_OBSERVATIONS:]


def forget_oom_region(model: MemoryModel, failed_batch: int) -> MemoryModel:
    """After an OOM at ``failed_batch``: the trust region no longer reaches it."""
    return dataclasses.replace(model, largest_ok=min(model.largest_ok, max(0, failed_batch - 1)))


def raise_floor(model: MemoryModel, per_item: float, now: float) -> MemoryModel:
    """An OOM the model could not explain: the worst per-item memory is at least ``per_item`` for a while."""
    return dataclasses.replace(model, floor=max(per_item, model.floor if now < model.floor_until else 0.0),
                               floor_until=now + FLOOR_TTL)


@dataclass(frozen=True, slots=True)
class Fit:
    """The model's figures at one moment (bytes): what the sizing and the tenants' accounting use."""

    measured: bool
    fixed: float  # 0 for an unmeasured service (its memory is in what the GPU shows beyond the others)
    worst_per_item: float
    mean_per_item: float
    waste_fraction: float
    waste: float
    held_low: float  # the least and the most memory held per item seen (bytes): what one moment can show
    held_high: float
    trust_cap: int
    jitter: float  # the relative spread seen: worst / mean - 1
    wastes: tuple[tuple[float, float], ...] = ()  # (t, waste_fraction) since the waste was last cleared
    error: float = 0.0  # how far the worst per-item memory may still be short (bytes): see :func:`fit`

    def worst(self, b: int) -> float:
        """The most the service can hold at batch ``b`` (bytes), fixed memory included."""
        return self.fixed + b * self.worst_per_item * (1 + self.waste_fraction)

    def low(self, b: int) -> float:
        """The least one moment can show the service holding at batch ``b`` (bytes)."""
        return self.fixed + b * self.held_low

    def high(self, b: int) -> float:
        """The most one moment can show the service holding at batch ``b`` (bytes)."""
        return self.fixed + b * self.held_high


def fit(model: MemoryModel, declared_per_item: float, now: float, current_batch: int) -> Fit:
    """The model's figures now; ``declared_per_item`` (bytes) stands in until reports come."""
    observations = [x for t, x in model.observations if now - t <= OBSERVATION_TTL]
    floor = model.floor if now < model.floor_until else 0.0
    base = max(model.largest_ok, 1)
    trust = base + max(2, math.ceil(TRUST_GROWTH * base)) if model.largest_ok else current_batch + 2
    if model.fixed is None or not observations:
        worst = max(declared_per_item * UNMEASURED_FACTOR, floor)
        return Fit(measured=False, fixed=0.0, worst_per_item=worst, mean_per_item=declared_per_item,
                   waste_fraction=0.0, waste=0.0, held_low=0.0, held_high=0.0,
                   trust_cap=min(trust, current_batch + 2), jitter=0.0)
    top = max(observations)
    mean = sum(observations) / len(observations)
    worst = max(top + (top - mean + top * PRIOR_JITTER) / len(observations), floor)
    # n draws of a bounded jitter leave its bound, on average, one spacing of them above the highest:
    # the range they span over n + 1. What the worst may still rise by as reports come.
    error = (top - min(observations)) / (len(observations) + 1)
    held = [x for t, x in model.held if now - t <= HELD_TTL]
    per_item = mean * (1 + model.waste_fraction)
    low, high = (min(held), max(held)) if held else (per_item, worst * (1 + model.waste_fraction))
    if held:  # a sample is one more draw: it may lie beyond the range the reports showed
        spread = (high - low) * max(RANGE_ALLOWANCE, 1 / len(held))
        low, high = max(0.0, low - spread), high + spread
    return Fit(measured=True, fixed=model.fixed, worst_per_item=worst, mean_per_item=mean,
               waste_fraction=model.waste_fraction, waste=model.waste, held_low=low, held_high=high,
               trust_cap=trust, jitter=worst / mean - 1 if mean > 0 else 0.0, wastes=model.wastes, error=error)
