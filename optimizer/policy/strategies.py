"""The four strategies and the per-item memory model they read."""

from __future__ import annotations

import math

from optimizer.config import ServiceProfile, Strategy
from optimizer.policy.types import MIB, ServiceState

#: Fraction of the computed optimum each strategy publishes (seed 004). Adaptive moves from
#: feedback instead (learned per-item memory, OOM ceilings, pressure, utilisation).
STRATEGY_FACTORS: dict[Strategy, float] = {
    Strategy.CONSERVATIVE: 0.7,
    Strategy.BALANCED: 1.0,
    Strategy.AGGRESSIVE: 1.2,
    Strategy.ADAPTIVE: 1.0,
}


def apply_strategy(strategy: Strategy, optimal: int) -> int:
    """The batch a strategy publishes for a computed optimum (before safety caps and limits)."""
    return math.floor(optimal * STRATEGY_FACTORS[strategy] + 1e-9)


def learned_per_item_bytes(peaks: tuple[tuple[int, int], ...]) -> float | None:
    """Per-item memory from a service's reports: the least-squares slope of peak bytes on batch size.

    ``peaks`` holds, per batch size, the highest peak the service reported at it, so the slope
    follows the worst jitter seen. Needs two distinct batch sizes; ``None`` when the slope is
    not positive (too little evidence).
    """
    if len(peaks) < 2:
        return None
    n = len(peaks)
    mean_b = sum(b for b, _ in peaks) / n
    mean_p = sum(p for _, p in peaks) / n
    var = sum((b - mean_b) ** 2 for b, _ in peaks)
    if var <= 0:
        return None
    slope = sum((b - mean_b) * (p - mean_p) for b, p in peaks) / var
    return slope if slope > 0 else None


def per_item_bytes(strategy: Strategy, profile: ServiceProfile, svc: ServiceState) -> float:
    """Memory of one more item: adaptive trusts what the service reported; the others, its profile."""
    declared = profile.per_item_mb * MIB
    if strategy is Strategy.ADAPTIVE:
        learned = learned_per_item_bytes(svc.peaks)
        if learned is not None:
            return learned
    return declared
