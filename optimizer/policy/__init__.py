"""The policy: a functional core (no I/O, no clock) that turns snapshots and reports into decisions."""

from optimizer.policy.core import apply_report, decide, initial_batch, oom_verdict, touch
from optimizer.policy.operator import apply_disabled, clear_override, optimize_now, rebalance, set_override
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
    "initial_batch",
    "oom_verdict",
    "optimize_now",
    "rebalance",
    "set_override",
    "touch",
]
