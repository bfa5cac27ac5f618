"""A scenario family's figures per run name (strategy or baseline), over all the scenarios, and per GPU;
the summary and its checks built on them are :mod:`optimizer.benchmark.family`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.benchmark.run import Run, ScenarioBenchmark


REFERENCE = "adaptive"
ORACLE = "oracle"


@dataclass(frozen=True)
class Family:
    """What the family was drawn with: ``n`` scenarios of ``seed`` in ``oom_mode``."""

    n: int
    seed: int
    oom_mode: str


@dataclass(frozen=True)
class RunSummary:
    """One run name's figures over the family (ratios are fractions; ``None``: adaptive did not run)."""

    name: str
    kind: str
    safe_ratios: tuple[float, ...]  # per service of every scenario, in family order (those with safe-oracle items)
    excess: tuple[int, ...]  # per scenario: the run's OOMs less the unavoidable count (may be negative)
    cotenant_failures: int
    restarts: int
    vs_reference: tuple[float, ...]  # per scenario and GPU: the GPU's items over adaptive's
    above_bound_share: float = 0.0  # of the GPU-seconds, the share spent above the safety bound

    @property
    def safe_ratio_median(self) -> float:
        return percentile(self.safe_ratios, 0.5)

    @property
    def safe_ratio_p10(self) -> float:
        return percentile(self.safe_ratios, 0.1)

    @property
    def safe_ratio_min(self) -> float:
        return min(self.safe_ratios, default=math.nan)

    @property
    def within_share(self) -> float:
        """The share of scenarios whose OOMs are within the unavoidable count."""
        return sum(1 for e in self.excess if e <= 0) / len(self.excess) if self.excess else math.nan

    @property
    def max_excess(self) -> int:
        """The most OOMs over the unavoidable count in any scenario (0 when always within)."""
        return max([0, *self.excess])

    @property
    def vs_reference_median(self) -> float | None:
        return percentile(self.vs_reference, 0.5) if self.vs_reference else None

    @property
    def vs_reference_min(self) -> float | None:
        return min(self.vs_reference) if self.vs_reference else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "services": len(self.safe_ratios),
                "safe_ratio_median": _r(self.safe_ratio_median), "safe_ratio_p10": _r(self.safe_ratio_p10),
                "safe_ratio_min": _r(self.safe_ratio_min), "within_unavoidable_share": _r(self.within_share),
                "max_excess_ooms": self.max_excess, "cotenant_failures": self.cotenant_failures,
                "restarts": self.restarts, "above_bound_share": _r(self.above_bound_share),
                "gpu_items_vs_adaptive_median": _r(self.vs_reference_median),
                "gpu_items_vs_adaptive_min": _r(self.vs_reference_min)}


def _r(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, interpolating linearly between the sorted values; NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------- per GPU


def gpu_items(run: Run) -> dict[int, float]:
    """Items per GPU index, summed over the GPU's services."""
    out: dict[int, float] = {}
    for s in run.services:
        out[s.gpu] = out.get(s.gpu, 0.0) + s.items
    return out


def cotenant_failures(run: Run, gpu: int) -> int:
    """The co-tenant failures of ``run`` on GPU ``gpu``."""
    return sum(g.cotenant_failures for g in run.gpus if g.gpu == gpu)


def _find(bench: ScenarioBenchmark, name: str) -> Run | None:
    return next((r for r in bench.runs if r.name == name), None)


def total_unavoidable(unavoidable: Mapping[str, Mapping[int, int]], scenario: str) -> int:
    return sum(unavoidable.get(scenario, {}).values())


def _run_summary(name: str, benches: Sequence[ScenarioBenchmark],
                 unavoidable: Mapping[str, Mapping[int, int]]) -> RunSummary:
    ratios: list[float] = []
    excess: list[int] = []
    failures = restarts = 0
    above = gpu_seconds = 0.0
    vs: list[float] = []
    kind = ""
    for bench in benches:
        run = _find(bench, name)
        if run is None:
            continue
        kind = run.kind
        ratios += [s.safe_ratio for s in run.services if s.safe_oracle_items > 0]
        excess.append(sum(s.ooms for s in run.services) - total_unavoidable(unavoidable, bench.scenario.name))
        failures += sum(g.cotenant_failures for g in run.gpus)
        above += sum(g.seconds_above_bound for g in run.gpus)
        gpu_seconds += bench.duration_s * len(run.gpus)
        restarts += sum(s.restarts for s in run.services)
        ref = _find(bench, REFERENCE)
        if ref is not None:
            mine, theirs = gpu_items(run), gpu_items(ref)
            vs += [mine.get(gpu, 0.0) / items for gpu, items in sorted(theirs.items()) if items > 0]
    return RunSummary(name=name, kind=kind, safe_ratios=tuple(ratios), excess=tuple(excess),
                      cotenant_failures=failures, restarts=restarts, vs_reference=tuple(vs),
                      above_bound_share=above / gpu_seconds if gpu_seconds else 0.0)
