"""The policy's report path: ``apply_report(state, report, settings, gpu) -> Outcome``, and what an OOM report
counts for (:func:`oom_verdict`). Pure, as :mod:`optimizer.policy.core` (which holds the sample path and the
registration a report goes through, :func:`~optimizer.policy.core.touch`)."""

from __future__ import annotations

import dataclasses
import math

from optimizer.config import Settings, Strategy
from optimizer.gpu.types import GpuSample
from optimizer.policy.adaptive import controller as adaptive
from optimizer.policy.adaptive import memory as adaptive_memory
from optimizer.policy.core import touch
from optimizer.policy.model import (
    ADOPTION_INTERVALS,
    CEILING_INTERVALS,
    CONTRADICTED_FRACTION,
    MAX_CEILING_DOUBLINGS,
    OOM_BACKOFF,
    OOM_REPORT_INTERVALS,
    SAME_INCIDENT_INTERVALS,
    active_ceiling,
    drop_override,
    gib,
    publish,
    safety_bytes,
    start_pending,
    with_service,
)
from optimizer.policy.strategies import per_item_bytes
from optimizer.policy.types import Event, GpuState, Outcome, Pending, PolicyState, ServiceReport, ServiceState


def oom_verdict(svc: ServiceState | None, report: ServiceReport, settings: Settings, gpu: GpuSample | None) -> str:
    """What an OOM report counts for (``svc``: the service's state before it, ``None`` if new):

    - ``rate_limited``: within :data:`OOM_REPORT_INTERVALS` monitoring intervals of the service's last OOM
      on this GPU: acknowledged, no effect (a burst of reports, forged or retried, is one OOM);
    - ``contradicted``: the memory the GPU's latest sample shows in use, plus the whole failed batch's
      memory (its profile's ``per_item_mb`` per item) on top of it, is at most :data:`CONTRADICTED_FRACTION`
      of the safety bound, so this GPU's memory cannot have run out (the sample may predate the failed
      batch: hence its memory on top): the batch is lowered once, nothing is
      barred and no strike counted; one per ``optimization_interval`` (the next optimization may give
      the batch back: reports the samples keep contradicting cannot keep it down), the others are
      ``rate_limited``;
    - ``counted``: an OOM (a bar on the failed size, strikes; adaptive learns from it).
    """
    now = report.timestamp
    last = None if svc is None else max((t for t in (svc.last_oom_at, svc.contradicted_at) if t is not None),
                                        default=None)
    if last is not None and 0 <= now - last < OOM_REPORT_INTERVALS * settings.monitoring_interval:
        return "rate_limited"
    failed = report.batch_size if report.batch_size is not None else (svc.batch_size if svc is not None else 0)
    if (gpu is not None and not gpu.failed and gpu.memory_total_bytes and gpu.memory_used_bytes is not None
            and gpu.memory_used_bytes + failed * per_item_bytes(settings.profile(report.service))
            <= CONTRADICTED_FRACTION * safety_bytes(gpu.memory_total_bytes, settings)):
        if (svc is not None and svc.contradicted_at is not None
                and 0 <= now - svc.contradicted_at < settings.optimization_interval):
            return "rate_limited"
        return "contradicted"
    return "counted"


def _contradicted_oom(svc: ServiceState, failed: int, gpu: GpuSample, s: Settings, now: float,
                      events: list[Event]) -> ServiceState:
    """An OOM the samples contradict: lower the batch once, as far as a real one would; bar nothing.

    An operator's override holds (a report the samples contradict does not undo an operator's decision),
    and ``last_oom_at`` is left as it was: strikes and what adaptive reads from an OOM do not see it.
    """
    svc = dataclasses.replace(svc, contradicted_at=now)
    if not s.enabled or svc.override_active(now) is not None:
        return svc
    lo, _ = s.batch_limits(s.profile(svc.service))
    backoff = adaptive.OOM_CUT if s.strategy is Strategy.ADAPTIVE else OOM_BACKOFF
    batch = max(lo, min(svc.batch_size, failed - 1, math.floor(failed * backoff)))
    assert gpu.memory_total_bytes and gpu.memory_used_bytes is not None
    reason = (f"OOM reported at batch {failed}, but the GPU's latest sample shows {gib(gpu.memory_used_bytes)} in use,"
              f" which with the whole batch on top is far below the safety bound"
              f" ({gib(safety_bytes(gpu.memory_total_bytes, s))}): lowered once, nothing barred")
    return publish(svc, batch, min(svc.optimal, batch), reason, now, events, "oom_report")


def apply_report(state: PolicyState, report: ServiceReport, settings: Settings,
                 gpu: GpuSample | None) -> Outcome:
    """Take a service's telemetry. An OOM report lowers its batch at once and bars the failed size.

    The lowered batch is in the returned state, so the reply to the report already carries it. OOM
    reports go by :func:`oom_verdict`: a rate-limited one has no effect, a contradicted one lowers
    the batch once and bars nothing.
    """
    s = settings
    now = report.timestamp
    verdict = oom_verdict(state.services.get((report.gpu, report.service)), report, s, gpu) if report.oom else None
    state, svc = touch(state, report.service, report.gpu, now, s, gpu)
    svc = dataclasses.replace(
        svc,
        reported_batch=report.batch_size if report.batch_size is not None else svc.reported_batch,
        reported_at=now,
        allocated_bytes=report.allocated_bytes if report.allocated_bytes is not None else svc.allocated_bytes,
        reserved_bytes=report.reserved_bytes if report.reserved_bytes is not None else svc.reserved_bytes,
        inactive_split_bytes=(report.inactive_split_bytes if report.inactive_split_bytes is not None
                              else svc.inactive_split_bytes),
        memory=svc.memory if report.oom else adaptive_memory.observe(
            svc.memory, now, report.batch_size, report.peak_bytes, report.allocated_bytes, report.reserved_bytes,
            report.inactive_split_bytes),
    )
    events: list[Event] = []
    gs = state.gpus.get(report.gpu)
    oom = verdict in ("counted", "contradicted")
    if verdict == "contradicted":
        assert gpu is not None
        svc = _contradicted_oom(svc, report.batch_size if report.batch_size is not None else svc.batch_size, gpu,
                                s, now, events)
    elif verdict == "counted" and s.strategy is Strategy.ADAPTIVE:
        failed = report.batch_size if report.batch_size is not None else svc.batch_size
        svc = drop_override(svc, now, events, f"OOM reported at batch {failed}")
        others = [v for (gi, name), v in state.services.items() if gi == report.gpu and name != svc.service]
        svc, cut_gs, batch = adaptive.on_oom(svc, others, failed, gs or GpuState(report.gpu, "", ""), gpu, s,
                                             state.roster, now)
        svc = dataclasses.replace(svc, last_oom_at=now, strikes=svc.strikes + 1)
        if gs is not None:
            gs = cut_gs
        if s.enabled:
            reason = (f"OOM reported at batch {failed}: lowered to what fits if what arrived goes on arriving "
                      "at its pace")
            svc = publish(svc, batch, min(svc.optimal, batch), reason, now, events, "oom_report")
    elif verdict == "counted":
        failed = report.batch_size if report.batch_size is not None else svc.batch_size
        active = active_ceiling(svc, now)
        recent = svc.last_oom_at is not None and now - svc.last_oom_at < 3600
        # A second report of the same incident (a client's retry at the same size, seconds later) is
        # not a new strike: it still lowers the batch, but does not double the bar.
        same_incident = (active is not None and failed >= active and svc.last_oom_at is not None
                         and now - svc.last_oom_at < SAME_INCIDENT_INTERVALS * s.monitoring_interval)
        strikes = svc.strikes if same_incident else (svc.strikes + 1 if recent else 1)
        bar = s.optimization_interval * CEILING_INTERVALS * 2 ** min(strikes - 1, MAX_CEILING_DOUBLINGS)
        svc = dataclasses.replace(svc, last_oom_at=now, strikes=strikes,
                                  ceiling=failed if active is None else min(active, failed),
                                  ceiling_until=now + bar)
        svc = drop_override(svc, now, events, f"OOM reported at batch {failed}")
        if s.enabled:
            lo, hi = s.batch_limits(s.profile(svc.service))
            batch = max(lo, min(svc.batch_size, failed - 1, math.floor(failed * OOM_BACKOFF)))
            reason = f"OOM reported at batch {failed}: lowered, and {failed} barred for {bar:.0f} s"
            svc = publish(svc, batch, min(svc.optimal, batch), reason, now, events, "oom_report")
    if oom and gs is not None:
        gs = start_pending(gs, Pending("oom_report", "oom", 1.0, now, gs.window[-1] if gs.window else 0, False,
                                       service=svc.service), events)
        if events and any(e.kind == "batch_changed" for e in events):
            gs = dataclasses.replace(gs, window=(), adopt_after=now + ADOPTION_INTERVALS * s.monitoring_interval)
    state = with_service(state, svc)
    if gs is not None:
        gpus = dict(state.gpus)
        gpus[gs.index] = gs
        state = state.with_(gpus=gpus)
    return Outcome(state, tuple(events))
