"""A scenario family's summary: every run's figures over all the scenarios, and the acceptance checks.

The input is the :class:`~optimizer.benchmark.run.ScenarioBenchmark` of every generated scenario and
the OOMs no policy can avoid in each (:func:`optimizer.benchmark.generate.unavoidable_ooms`). Per run
name (strategy or baseline) the summary gives, over all services of all scenarios, the median, 10th
percentile and minimum ``safe_ratio`` (percentiles interpolate linearly between the sorted values; a
service the safe oracle credits with no items, one that had not started by the end, is left out);
the share of scenarios whose OOMs (all services) are within the unavoidable count and the largest
excess over it; the co-tenant failures and restarts in all; and the items per GPU (summed over its
services) over adaptive's on the same GPU, median and minimum (GPUs where adaptive took no items are
left out). The checks are those of docs/benchmarks.md, "Scenario families". The figures are computed in
:mod:`optimizer.benchmark.family_figures`, the checks in :mod:`optimizer.benchmark.family_checks` (their names
are importable from here); the text and the JSON document are in :mod:`optimizer.benchmark.family_report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optimizer.benchmark.family_checks import (
    CRASH_BASELINES,
    CRASH_MARGIN,
    DOMINANCE_MARGIN,
    MEDIAN_SAFE_RATIO,
    MIN_SAFE_RATIO,
    MOST_EXCESS,
    P10_SAFE_RATIO,
    TITLES,
    WITHIN_SHARE,
    Check,
    Offender,
    _adaptive_checks,
    _crash_check,
    _dominance_check,
    gpu_failures,
    kept_out,
)
from optimizer.benchmark.family_figures import (
    ORACLE,
    REFERENCE,
    Family,
    RunSummary,
    _run_summary,
    cotenant_failures,
    gpu_items,
    percentile,
    total_unavoidable,
)
from optimizer.benchmark.run import ScenarioBenchmark

__all__ = ["CRASH_BASELINES", "CRASH_MARGIN", "DOMINANCE_MARGIN", "MEDIAN_SAFE_RATIO", "MIN_SAFE_RATIO", "MOST_EXCESS",
           "ORACLE", "P10_SAFE_RATIO", "REFERENCE", "TITLES", "WITHIN_SHARE", "Check", "Family", "FamilySummary",
           "Offender", "RunSummary", "cotenant_failures", "gpu_failures", "gpu_items", "kept_out", "percentile",
           "summarize", "total_unavoidable"]


@dataclass(frozen=True)
class FamilySummary:
    family: Family
    runs: tuple[RunSummary, ...]
    checks: tuple[Check, ...]
    unavoidable: int  # in all scenarios together

    def run(self, name: str) -> RunSummary | None:
        return next((r for r in self.runs if r.name == name), None)

    @property
    def passed(self) -> bool:
        """Whether every check that applies and is not informational passed."""
        return all(c.passed is not False for c in self.checks if not c.informational)


def summarize(benches: Sequence[ScenarioBenchmark], unavoidable: Mapping[str, Mapping[int, int]],
              family: Family) -> FamilySummary:
    """The family's figures per run name and its checks.

    ``unavoidable`` maps each scenario's name to its unavoidable OOMs per GPU index.
    """
    names = list(dict.fromkeys(r.name for b in benches for r in b.runs))
    runs = tuple(_run_summary(n, benches, unavoidable) for n in names)
    ref = next((r for r in runs if r.name == REFERENCE), None)
    baselines = [r.name for r in runs if r.kind == "baseline" and r.name != ORACLE]
    checks = [
        *_adaptive_checks(ref, benches, unavoidable),
        _dominance_check("b.dominance", baselines, benches, informational=False),
        _dominance_check("b.oracle", [ORACLE] if ORACLE in names else [], benches, informational=True),
        _crash_check(family, benches),
    ]
    return FamilySummary(family=family, runs=runs, checks=tuple(checks),
                         unavoidable=sum(total_unavoidable(unavoidable, b.scenario.name) for b in benches))
