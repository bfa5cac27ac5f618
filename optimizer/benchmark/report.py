"""The benchmark's text table and JSON document (schema in docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optimizer.benchmark.run import ScenarioBenchmark
from optimizer.simulation.run import MEASURES, ServiceResult

FORMAT = "vlm-gpu-optimizer-benchmark"
VERSION = 1

#: The table's and the JSON's columns: simulate's measures, then ``vs_oracle``.
COLUMNS: tuple[str, ...] = (*MEASURES, "vs_oracle")


def service_row(result: ServiceResult, oracle_items: float | None) -> dict[str, Any]:
    """simulate's per-service dictionary, plus ``vs_oracle``: items over the oracle baseline's items.

    ``vs_oracle`` is ``None`` when the oracle baseline did not run (or credited no items).
    """
    d = result.to_dict()
    d["vs_oracle"] = round(result.items / oracle_items, 4) if oracle_items else None
    return d


def scenario_document(bench: ScenarioBenchmark) -> dict[str, Any]:
    """One scenario's part of the JSON document."""
    oracle = bench.oracle_items()
    sc = bench.scenario
    return {
        "scenario": sc.name,
        "file": bench.source,
        "seed": sc.seed,
        "duration_s": bench.duration_s,
        "interval_s": bench.interval_s,
        "step_s": sc.step_s,
        "max_batch_size": bench.settings.max_batch_size,
        "gpus": [{"index": g.index, "name": g.name, "total_mb": g.total_mb} for g in sc.gpus],
        "runs": [
            {
                "name": run.name,
                "kind": run.kind,
                "poll_interval_s": run.poll_interval_s,
                "gpus": [{"gpu": g.gpu, **g.to_dict()} for g in run.gpus],
                "services": [
                    {"service": s.service, **service_row(s, None if oracle is None else oracle.get((s.gpu, s.service))),
                     **({"note": run.notes[s.service]} if s.service in run.notes else {})}
                    for s in run.services
                ],
            }
            for run in bench.runs
        ],
    }


def document(benches: Sequence[ScenarioBenchmark], *, command: str) -> dict[str, Any]:
    """The whole JSON document: ``format``, ``version``, the ``command`` that made it, its ``scenarios``."""
    return {"format": FORMAT, "version": VERSION, "command": command,
            "measures": list(COLUMNS), "scenarios": [scenario_document(b) for b in benches]}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column.endswith("ratio") or column == "vs_oracle":
        return f"{value:.4f}"
    return str(value)


def table(bench: ScenarioBenchmark) -> str:
    """One scenario's table: a row per run and service (and per run, ``all`` when a run has several)."""
    sc = bench.scenario
    gpus = ", ".join(f"GPU {g.index} {g.name} {g.total_mb:g} MiB" for g in sc.gpus)
    lines = [f"scenario {sc.name} (seed {sc.seed}): {bench.duration_s:g} s virtual, services poll every "
             f"{bench.interval_s:g} s (the oracle every {sc.step_s:g} s); {gpus}"]
    oracle = bench.oracle_items()
    head = ["run", "service", *COLUMNS]
    rows = [head]
    for run in bench.runs:
        for s in run.services:
            d = service_row(s, None if oracle is None else oracle.get((s.gpu, s.service)))
            rows.append([run.name, s.service, *(_cell(c, d[c]) for c in COLUMNS)])
        if len(run.services) > 1:
            rows.append([run.name, "all", *(_cell(c, v) for c, v in _total(run.services, oracle).items())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    notes = [f"  {run.name} {svc}: {note}" for run in bench.runs for svc, note in run.notes.items()]
    failures = [f"  {run.name} GPU {g.gpu}: {g.cotenant_failures} co-tenant arrival(s) did not fit"
                for run in bench.runs for g in run.gpus if g.cotenant_failures]
    return "\n".join(lines + notes + failures)


def _total(services: Sequence[ServiceResult], oracle: dict[tuple[int, str], float] | None) -> dict[str, Any]:
    """A run's services together: sums, ratios of the sums; time above critical is the longest (per GPU)."""
    items = sum(s.items for s in services)
    o = sum(s.oracle_items for s in services)
    so = sum(s.safe_oracle_items for s in services)
    ceiling = sum(oracle.get((s.gpu, s.service), 0.0) for s in services) if oracle else 0.0
    return {
        "items": round(items, 1), "oracle_items": round(o, 1), "safe_oracle_items": round(so, 1),
        "ratio": round(items / o, 4) if o else 0.0, "safe_ratio": round(items / so, 4) if so else 0.0,
        "ooms": sum(s.ooms for s in services), "restarts": sum(s.restarts for s in services),
        "cleanups": sum(s.cleanups for s in services), "seconds_down": round(sum(s.seconds_down for s in services), 1),
        "batch_changes": sum(s.batch_changes for s in services),
        "seconds_above_critical": round(max(s.seconds_above_critical for s in services), 1),
        "vs_oracle": round(items / ceiling, 4) if ceiling else None,
    }
