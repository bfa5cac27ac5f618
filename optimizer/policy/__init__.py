"""The policy: a functional core (no I/O, no clock) that turns snapshots and reports into decisions."""

from optimizer.policy.core import (
    apply_disabled,
    apply_report,
    clear_override,
    decide,
    initial_batch,
    optimize_now,
    set_override,
    touch,
)
from optimizer.policy.types import (
    Event,
    GpuState,
    Outcome,
    PolicyState,
    Pressure,
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
    "ServiceReport",
    "ServiceState",
    "Snapshot",
    "apply_disabled",
    "apply_report",
    "clear_override",
    "decide",
    "initial_batch",
    "optimize_now",
    "set_override",
    "touch",
]
