"""The policy: a functional core (no I/O, no clock) that turns snapshots and reports into decisions."""

from optimizer.policy.core import decide, initial_batch, touch
from optimizer.policy.operator import (
    Deferral,
    apply_disabled,
    clear_override,
    deferred_optimizations,
    optimize_now,
    rebalance,
    set_override,
)
from optimizer.policy.reports import apply_report, oom_verdict
from optimizer.policy.types import (
    Event,
    GpuState,
    Outcome,
    PolicyState,
    Pressure,
    Roster,
    ServiceReport,
    ServiceState,
    Snapshot,
)

__all__ = [
    "Deferral",
    "Event",
    "GpuState",
    "Outcome",
    "PolicyState",
    "Pressure",
    "Roster",
    "ServiceReport",
    "ServiceState",
    "Snapshot",
    "apply_disabled",
    "apply_report",
    "clear_override",
    "decide",
    "deferred_optimizations",
    "initial_batch",
    "oom_verdict",
    "optimize_now",
    "rebalance",
    "set_override",
    "touch",
]
