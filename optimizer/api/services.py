"""``GET /services``: what discovery found on this node, and how each GPU's headroom is shared."""

from __future__ import annotations

import dataclasses
from typing import Any

from optimizer import coordination
from optimizer.engine import Engine
from optimizer.pods import PodInfo
from optimizer.policy.model import gpu_view
from optimizer.policy.types import MIB


def _shares(engine: Engine) -> dict[int, tuple[dict[str, float], float]]:
    """Per GPU: (per-instance share by service name, for every service counted or registered there)."""
    s = engine.policy_settings
    out: dict[int, tuple[dict[str, float], float]] = {}
    for g in engine.snapshot.gpus if engine.snapshot else ():
        mine = [v for (gi, _), v in sorted(engine.state.services.items()) if gi == g.index]
        registered = [v.service for v in mine]
        view = gpu_view(g.index, g.memory_total_bytes or 0, g.memory_used_bytes or 0, 0, mine, s,
                        engine.state.roster, engine.snapshot.timestamp if engine.snapshot else 0.0)
        names = set(registered) | set(engine.state.roster.pods.get(g.index, {}))
        shares = {n: (s.profile(n).weight / view.total_weight if view.total_weight > 0 else 0.0) for n in names}
        for n in registered:
            shares[n] = view.share(n)
        out[g.index] = (shares, view.total_weight)
    return out


def _pod_row(engine: Engine, pod: PodInfo, shares: dict[int, tuple[dict[str, float], float]]) -> dict[str, Any]:
    gpus = list(engine.snapshot.gpus) if engine.snapshot else []
    known, source = coordination.pod_gpus(pod, engine.pod_gpus, gpus, engine.pod_devices)
    index = known[0] if known else None  # the first of its GPUs: where "gpu", batch and epoch below are read
    counted = coordination.counted(pod, engine.ever_ready)
    on = (list(known) or [g.index for g in gpus]) if counted else []
    share = None
    if on and pod.service is not None:
        share = round(min(shares.get(i, ({}, 0.0))[0].get(pod.service, 0.0) for i in on), 4)
    svc = engine.state.services.get((index, pod.service)) if index is not None and pod.service else None
    gs = engine.state.gpus.get(index) if index is not None else None
    sample = engine.gpu_sample(index) if index is not None else None
    footprint = pod.profile.footprint_mb if coordination.starting(pod, engine.ever_ready) else None
    declared = {k: v for k, v in dataclasses.asdict(pod.profile).items() if v is not None}
    return {
        "pod": pod.key,
        "service": pod.service,
        "state": pod.state,
        "counted": counted,
        "gpu": None if index is None else {"index": index, "uuid": sample.uuid if sample else None},
        "gpus": [{"index": i, "uuid": s.uuid if (s := engine.gpu_sample(i)) else None} for i in known],
        "gpu_source": source,
        "devices": list(engine.pod_devices.get(pod.key, ())),
        "gpus_counted": on,
        "share": share,
        "reserved_bytes": footprint * MIB if footprint and on else 0,
        "batch_size": svc.batch_size if svc else None,
        "optimal_batch_size": svc.optimal if svc else None,
        "cleanup_epoch": gs.cleanup_epoch if gs else None,
        "declared": declared,
        "published": dict(pod.published),
    }


def services_body(engine: Engine, discovery: dict[str, Any] | None) -> dict[str, Any]:
    """The document of ``GET /services``. ``discovery`` is the watcher's status (None: discovery off)."""
    shares = _shares(engine)
    managed = engine.state.roster.managed
    pods = [_pod_row(engine, engine.pods[k], shares) for k in sorted(engine.pods)]
    others = []
    for (gi, name), svc in sorted(engine.state.services.items()):
        if name in managed:
            continue
        others.append({"service": name, "gpu": gi, "share": round(shares.get(gi, ({}, 0.0))[0].get(name, 0.0), 4),
                       "batch_size": svc.batch_size, "optimal_batch_size": svc.optimal, "source": "reports"})
    gpus = [{"index": i, "total_weight": round(w, 4),
             "reserved_bytes": engine.state.roster.reserved_bytes.get(i, 0)} for i, (_, w) in sorted(shares.items())]
    return {"discovery": discovery or {"enabled": False}, "pods": pods, "services": others, "gpus": gpus}
