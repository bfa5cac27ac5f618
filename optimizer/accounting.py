"""The engine's books: the samples' history, the event log, the per-GPU totals, refusals and OOM reports.

What the metrics (``optimizer/metrics.py``) and the history endpoints read; only the engine writes it
(:class:`optimizer.engine.Engine` keeps one :class:`Ledger` and exposes copies).
"""

from __future__ import annotations

import collections
from collections import defaultdict, deque
from collections.abc import Collection
from dataclasses import dataclass, field

import structlog

from optimizer.gpu.types import GpuSample
from optimizer.policy.types import Event, Snapshot

log = structlog.get_logger("optimizer.engine")  # the events are the engine's: logged under its name

EVENT_HISTORY = 1000

#: What became of OOM reports: the ``outcome`` label of ``vlm_optimizer_oom_reports_total``.
OOM_OUTCOMES = ("counted", "contradicted", "rate_limited")


@dataclass
class GpuCounters:
    """Monotonic totals per GPU; labelled by trigger where the metric has one."""

    optimizations: collections.Counter[str] = field(default_factory=collections.Counter)
    successes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    cleanups: collections.Counter[str] = field(default_factory=collections.Counter)
    freed_bytes: int = 0
    batch_changes: collections.Counter[str] = field(default_factory=collections.Counter)  # by service

    def copy(self) -> GpuCounters:
        """An independent copy (what :attr:`Engine.counters` hands out)."""
        return GpuCounters(self.optimizations.copy(), self.successes.copy(), self.failures.copy(),
                           self.cleanups.copy(), self.freed_bytes, self.batch_changes.copy())


class Ledger:
    """The last samples of each GPU, the event log (the last :data:`EVENT_HISTORY`) and the totals, by GPU,
    refusal reason and OOM outcome."""

    def __init__(self) -> None:
        self.history: dict[int, deque[GpuSample]] = {}
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self.counters: dict[int, GpuCounters] = defaultdict(GpuCounters)
        self.refused: collections.Counter[str] = collections.Counter()  # requests refused, by reason
        self.oom_reports: collections.Counter[str] = collections.Counter()  # OOM reports, by outcome

    def record(self, events: tuple[Event, ...]) -> None:
        """Keep, count and log the policy's events."""
        for e in events:
            self.events.append(e)
            c = self.counters[e.gpu]
            if e.kind == "optimization_started":
                c.optimizations[e.trigger or "unknown"] += 1
            elif e.kind in ("optimization_succeeded", "optimization_failed"):
                (c.successes if e.kind == "optimization_succeeded" else c.failures)[e.trigger or "unknown"] += 1
                c.freed_bytes += e.freed_bytes or 0
            elif e.kind == "cleanup_raised":
                c.cleanups[e.trigger or "unknown"] += 1
            elif e.kind == "batch_changed":
                c.batch_changes[e.service or ""] += 1
            fields = {k: v for k, v in (("service", e.service), ("trigger", e.trigger), ("old", e.old),
                                        ("new", e.new), ("freed_bytes", e.freed_bytes), ("detail", e.detail))
                      if v is not None}
            # Pressure crossing a threshold back and forth is normal near the target: debug only.
            (log.debug if e.kind == "pressure_changed" else log.info)(e.kind, gpu=e.gpu, **fields)

    def sampled(self, snapshot: Snapshot, history_size: int) -> None:
        """Keep a sample in each GPU's history (the last ``history_size``); forget the GPUs no longer present."""
        present = {g.index for g in snapshot.gpus}
        for gone in [i for i in self.history if i not in present]:
            del self.history[gone]
            self.counters.pop(gone, None)
        for g in snapshot.gpus:
            h = self.history.get(g.index)
            if h is None or h.maxlen != history_size:
                h = self.history[g.index] = deque(h or (), maxlen=history_size)
            h.append(g)

    def forget(self, live: Collection[tuple[int, str]]) -> None:
        """Drop the counts of services no longer known (names may churn), by (GPU, service)."""
        for index, c in self.counters.items():
            for name in [n for n in c.batch_changes if (index, n) not in live]:
                del c.batch_changes[name]
