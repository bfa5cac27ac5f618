"""The policy: a functional core (no I/O, no clock) that turns snapshots and reports into decisions."""

from optimizer.policy.core import apply_report, decide, initial_batch, touch
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
    "apply_report",
    "decide",
    "initial_batch",
    "touch",
]
