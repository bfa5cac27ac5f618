"""A scenario family's summary as text (printed by the command) and as its JSON document.

The schema is in docs/benchmarks.md, "Scenario families"; :mod:`optimizer.benchmark.family`
computes what is shown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from optimizer.benchmark.family import FamilySummary, cotenant_failures, total_unavoidable
from optimizer.benchmark.run import Run, ScenarioBenchmark

FORMAT = "vlm-gpu-optimizer-benchmark-family"
VERSION = 1
#: The per-service columns of the JSON document's ``scenarios[].runs`` rows.
SERVICE_COLUMNS: tuple[str, ...] = ("gpu", "service", "items", "safe_ratio", "ooms", "restarts", "cotenant_failures")


def _fmt(v: float | int | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


SUMMARY_COLUMNS: tuple[str, ...] = ("run", "safe_ratio_median", "safe_ratio_p10", "safe_ratio_min",
                                    "within_unavoidable", "max_excess_ooms", "cotenant_failures", "restarts",
                                    "above_bound", "gpu_items_vs_adaptive_median", "gpu_items_vs_adaptive_min")


def render(summary: FamilySummary, *, offenders: int = 10) -> str:
    """The summary as text: a row per run name, then every check with (at most ``offenders``) offenders."""
    f = summary.family
    lines = [f"family gen-{f.seed}: {f.n} scenarios, oom_mode {f.oom_mode}; {summary.unavoidable} unavoidable "
             f"OOM(s) in all"]
    rows = [list(SUMMARY_COLUMNS)]
    for r in summary.runs:
        rows.append([r.name, _fmt(r.safe_ratio_median), _fmt(r.safe_ratio_p10), _fmt(r.safe_ratio_min),
                     f"{r.within_share:.1%}" if r.excess else "-", str(r.max_excess), str(r.cotenant_failures),
                     str(r.restarts), f"{r.above_bound_share:.1%}", _fmt(r.vs_reference_median),
                     _fmt(r.vs_reference_min)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_COLUMNS))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    failed = sum(1 for c in summary.checks if c.passed is False and not c.informational)
    lines += ["", "checks: " + ("all passed" if not failed else f"{failed} failed")]
    for c in summary.checks:
        lines.append(f"  {c.status:<4}  {c.key:<13}  {c.title}: {c.figure}")
        lines += [f"          {o.line()}" for o in c.offenders[:offenders]]
        if len(c.offenders) > offenders:
            lines.append(f"          ... and {len(c.offenders) - offenders} more (all of them in the JSON document)")
    return "\n".join(lines)


def _service_rows(run: Run) -> list[list[Any]]:
    return [[s.gpu, s.service, round(s.items, 1), round(s.safe_ratio, 4), s.ooms, s.restarts,
             cotenant_failures(run, s.gpu)] for s in run.services]


def document(summary: FamilySummary, benches: Sequence[ScenarioBenchmark],
             unavoidable: Mapping[str, Mapping[int, int]], *, command: str) -> dict[str, Any]:
    """The family's JSON document (schema in docs/benchmarks.md, "Scenario families")."""
    f = summary.family
    first = benches[0] if benches else None
    return {
        "format": FORMAT, "version": VERSION, "command": command,
        "family": {"n": f.n, "seed": f.seed, "oom_mode": f.oom_mode,
                   "duration_s": first.duration_s if first else None,
                   "interval_s": first.interval_s if first else None},
        "service_columns": list(SERVICE_COLUMNS),
        "scenarios": [
            {"scenario": b.scenario.name, "file": b.source, "seed": b.scenario.seed,
             "gpus": [{"index": g.index, "name": g.name, "total_mb": g.total_mb} for g in b.scenario.gpus],
             "unavoidable_ooms": total_unavoidable(unavoidable, b.scenario.name),
             "unavoidable_by_gpu": {str(k): v for k, v in sorted(unavoidable.get(b.scenario.name, {}).items())},
             "runs": {run.name: _service_rows(run) for run in b.runs}}
            for b in benches
        ],
        "summary": {"unavoidable_ooms": summary.unavoidable, "runs": [r.to_dict() for r in summary.runs]},
        "checks": [c.to_dict() for c in summary.checks],
        "passed": summary.passed,
    }


def dumps(value: Any, indent: int = 0) -> str:
    """JSON text of ``value``, indented by 2, with every list or object of plain values on one line.

    So each service row of the family document is one line. ``json.loads`` reads it back equal.
    """
    pad = "  " * (indent + 1)
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(pad + dumps(v, indent + 1) for v in value) + "\n" + "  " * indent + "]"
    return json.dumps(value)
