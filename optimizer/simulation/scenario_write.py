"""Writing a scenario back to the file format (what :func:`optimizer.simulation.scenario.parse_scenario` reads)."""

from __future__ import annotations

import dataclasses
from typing import Any

from optimizer.simulation.scenario_types import _MIG_INTERNAL, Scenario


def scenario_to_dict(sc: Scenario) -> dict[str, Any]:
    """The scenario in the file format (what :func:`parse_scenario` reads back to an equal value).

    Fields at their defaults are left out, so a written file shows what is particular to it.
    """
    def fields(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name in skip or v == f.default:
                continue
            out[f.name] = v
        return out

    doc: dict[str, Any] = {"name": sc.name, "seed": sc.seed, "duration_s": sc.duration_s, "step_s": sc.step_s}
    doc.update(fields(sc, skip=("name", "seed", "duration_s", "step_s", "gpus", "services", "background",
                                "thermal", "health")))
    doc["gpus"] = []
    for g in sc.gpus:
        if g.parent_index is None:
            doc["gpus"].append(fields(g) | {"index": g.index, "total_mb": g.total_mb})
            continue
        mig = {"profile": g.mig_profile, "memory_gb": g.total_mb / 1024, "gpu_instance_id": g.gpu_instance_id}
        mig |= {} if g.uuid is None else {"uuid": g.uuid}
        parent = next((d for d in doc["gpus"] if d["index"] == g.parent_index and "mig" in d), None)
        if parent is None:
            parent = fields(g, skip=("uuid", *_MIG_INTERNAL)) | {"index": g.parent_index,
                                                               "total_mb": g.parent_total_mb, "mig": []}
            parent |= {} if g.parent_uuid is None else {"uuid": g.parent_uuid}
            doc["gpus"].append(parent)
        parent["mig"].append(mig)
    services = []
    for s in sc.services:
        d = fields(s, skip=("per_item_changes",)) | {"name": s.name, "gpu": s.gpu, "base_mb": s.base_mb,
                                                     "per_item_mb": s.per_item_mb, "item_ms": s.item_ms}
        if s.per_item_changes:
            d["per_item_changes"] = [{"at_s": at, "per_item_mb": mb} for at, mb in s.per_item_changes]
        services.append(d)
    doc["services"] = services
    if sc.background:
        doc["background"] = [fields(b) | {"gpu": b.gpu, "mb": b.mb} for b in sc.background]
    if sc.thermal:
        doc["thermal"] = [fields(t) | {"gpu": t.gpu, "celsius": t.celsius} for t in sc.thermal]
    if sc.health:
        doc["health"] = [fields(h) | {"gpu": h.gpu, "at_s": h.at_s} for h in sc.health]
    return doc
