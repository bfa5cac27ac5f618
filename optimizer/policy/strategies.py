"""The four strategies and the per-item memory model they read."""

from __future__ import annotations

import math

from optimizer.config import ServiceProfile, Strategy
from optimizer.policy.types import MIB

#: Fraction of the computed optimum each strategy publishes (seed 004). adaptive sizes from learned
#: memory models instead (optimizer.policy.adaptive); its factor is 1 on its own target.
STRATEGY_FACTORS: dict[Strategy, float] = {
    Strategy.CONSERVATIVE: 0.7,
    Strategy.BALANCED: 1.0,
    Strategy.AGGRESSIVE: 1.2,
    Strategy.ADAPTIVE: 1.0,
}


def apply_strategy(strategy: Strategy, optimal: int) -> int:
    """The batch a strategy publishes for a computed optimum (before safety caps and limits)."""
    return math.floor(optimal * STRATEGY_FACTORS[strategy] + 1e-9)


def per_item_bytes(profile: ServiceProfile) -> float:
    """Memory of one more item for the fixed-factor strategies: what the profile declares (bytes).

    adaptive does not use it: it sizes from what the service's reports taught (:mod:`optimizer.policy.adaptive`).
    """
    return profile.per_item_mb * MIB
