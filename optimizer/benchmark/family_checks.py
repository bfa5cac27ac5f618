"""A scenario family's acceptance checks (docs/benchmarks.md, "Scenario families"): their thresholds, titles,
and the check of each, with the offenders where one fails; :func:`optimizer.benchmark.family.summarize` runs them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.benchmark.family_figures import (
    ORACLE,
    REFERENCE,
    Family,
    RunSummary,
    _find,
    cotenant_failures,
    gpu_items,
    total_unavoidable,
)
from optimizer.benchmark.run import Run, ScenarioBenchmark
from optimizer.simulation.run import ServiceResult


MEDIAN_SAFE_RATIO = 0.97
P10_SAFE_RATIO = 0.93
MIN_SAFE_RATIO = 0.85
WITHIN_SHARE = 0.95  # of scenarios within the unavoidable OOMs
MOST_EXCESS = 1  # OOMs over the unavoidable count, at most, in any scenario
DOMINANCE_MARGIN = 0.01  # a baseline taking more than 1 % more items without more OOMs dominates
CRASH_MARGIN = 0.01
ABOVE_BOUND_S = 60.0  # a dominance case whose GPU ran this long above the safety bound is counted apart in the figure
CRASH_BASELINES: tuple[str, ...] = ("accelerate", "lightning", "lightning-binsearch", "fixed-4")


@dataclass(frozen=True)
class Offender:
    """Where a check failed: the scenario, its GPU and service where that applies, the run, the figures."""

    scenario: str
    detail: str
    gpu: int | None = None
    service: str | None = None
    run: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "gpu": self.gpu, "service": self.service, "run": self.run,
                "detail": self.detail}

    def line(self) -> str:
        where = [self.scenario] + ([f"GPU {self.gpu}"] if self.gpu is not None else []) + (
            [self.service] if self.service is not None else []) + ([self.run] if self.run is not None else [])
        return f"{' '.join(where)}: {self.detail}"


@dataclass(frozen=True)
class Check:
    """One acceptance check: ``passed`` ``None`` when it does not apply; ``informational`` ones never fail the family."""

    key: str
    title: str
    passed: bool | None
    figure: str
    offenders: tuple[Offender, ...] = ()
    informational: bool = False

    @property
    def status(self) -> str:
        if self.passed is None:
            return "n/a"
        if self.informational:
            return "info"
        return "pass" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "status": self.status.lower(), "passed": self.passed,
                "informational": self.informational, "figure": self.figure,
                "offenders": [o.to_dict() for o in self.offenders]}


def gpu_failures(run: Run) -> dict[int, int]:
    """Per GPU index: its services' OOMs plus its co-tenant failures."""
    out: dict[int, int] = {}
    for s in run.services:
        out[s.gpu] = out.get(s.gpu, 0) + s.ooms
    for g in run.gpus:
        out[g.gpu] = out.get(g.gpu, 0) + g.cotenant_failures
    return out


def kept_out(run: Run, ref: Run, gpu: int) -> bool:
    """Whether ``run`` kept others out of ``gpu`` where ``ref`` did not: more co-tenant failures there,
    or one of its services kept down (more restarts than under ``ref``, and more than 1 % fewer items)."""
    if cotenant_failures(run, gpu) > cotenant_failures(ref, gpu):
        return True
    theirs = {s.service: s for s in ref.services if s.gpu == gpu}
    return any(s.restarts > theirs[s.service].restarts and s.items < theirs[s.service].items * (1 - CRASH_MARGIN)
               for s in run.services if s.gpu == gpu and s.service in theirs)


def against_weights(run: Run, ref: Run, gpu: int, weights: Mapping[str, float]) -> bool:
    """Whether ``run`` split ``gpu`` against the configured weights where ``ref`` did not: a service of a
    higher weight took more than 1 % fewer items than under ``ref`` while one of a lower weight took more.

    The issue sizes every batch "divided by weight among the services on the GPU"; a baseline that
    ignores the weights (fixed-4 gives every service the same batch) can sum more items on a GPU by
    moving memory from a weightier service to a lighter one that computes more per byte. That sum
    is not a better way to run the configuration, so such a GPU is named but not an offender.
    Services absent from ``weights`` weigh 1 (the default).
    """
    ours = {s.service: s.items for s in ref.services if s.gpu == gpu}
    theirs = {s.service: s.items for s in run.services if s.gpu == gpu and s.service in ours}
    lost = [n for n in theirs if theirs[n] < ours[n] * (1 - CRASH_MARGIN)]
    gained = [n for n in theirs if theirs[n] > ours[n]]
    return any(weights.get(a, 1.0) > weights.get(b, 1.0) for a in lost for b in gained)


#: The checks' titles, by key (docs/benchmarks.md, "Scenario families").
TITLES: dict[str, str] = {
    "a.median": f"{REFERENCE}: median safe_ratio >= {MEDIAN_SAFE_RATIO:g}",
    "a.p10": f"{REFERENCE}: 10th percentile safe_ratio >= {P10_SAFE_RATIO:g}",
    "a.min": f"{REFERENCE}: every service's safe_ratio >= {MIN_SAFE_RATIO:g}",
    "a.ooms_within": f"{REFERENCE}: OOMs within the unavoidable count in >= {WITHIN_SHARE:.0%} of scenarios",
    "a.ooms_excess": f"{REFERENCE}: never more than {MOST_EXCESS} OOM over the unavoidable count",
    "b.dominance": f"no baseline takes > {DOMINANCE_MARGIN:.0%} more items than {REFERENCE} without more OOMs "
                   f"(per service at no other's cost, and per GPU counting co-tenant failures; {ORACLE} excluded)",
    "b.oracle": f"the same for {ORACLE} (a ceiling, not a policy: reported, never failed)",
    "c.crash": f"crash mode: {REFERENCE}'s items per GPU >= those of {', '.join(CRASH_BASELINES)} within "
               f"{CRASH_MARGIN:.0%} in every scenario (but where they kept co-tenants or a service out, or split against "
               f"the weights), and more in most",
}


def _ratio_check(key: str, figure: float, threshold: float, benches: Sequence[ScenarioBenchmark]) -> Check:
    """A check on a statistic of adaptive's safe_ratio; the offenders are the services below ``threshold``.

    For the median and the 10th percentile they are listed only when the check fails.
    """
    below: list[tuple[float, Offender]] = []
    for bench in benches:
        run = _find(bench, REFERENCE)
        for s in run.services if run is not None else ():
            if s.safe_oracle_items > 0 and s.safe_ratio < threshold:
                below.append((s.safe_ratio, Offender(
                    bench.scenario.name, f"safe_ratio {s.safe_ratio:.4f} ({s.items:.1f} of {s.safe_oracle_items:.1f} "
                                         f"safe-oracle items, {s.ooms} OOMs)", gpu=s.gpu, service=s.service,
                    run=REFERENCE)))
    below.sort(key=lambda x: x[0])
    passed = figure >= threshold
    if passed and key != "a.min":  # a median or a percentile that passes has services below it by design
        below = []
    return Check(key, TITLES[key], passed, f"{figure:.4f}", tuple(o for _, o in below))


def _oom_checks(ref: RunSummary, benches: Sequence[ScenarioBenchmark],
                unavoidable: Mapping[str, Mapping[int, int]]) -> list[Check]:
    """adaptive's OOMs against the unavoidable count: the share of scenarios within it, and the largest excess."""
    over: list[tuple[int, Offender]] = []
    for bench in benches:
        run = _find(bench, REFERENCE)
        if run is None:
            continue
        name = bench.scenario.name
        ooms, allowed = sum(s.ooms for s in run.services), total_unavoidable(unavoidable, name)
        if ooms > allowed:
            counts = unavoidable.get(name, {})
            gpus = sorted({s.gpu for s in run.services} | set(counts))
            per_gpu = ", ".join(f"GPU {g}: {sum(s.ooms for s in run.services if s.gpu == g)} of {counts.get(g, 0)} "
                                f"unavoidable" for g in gpus)
            over.append((ooms - allowed, Offender(name, f"{ooms} OOMs, {allowed} unavoidable, {ooms - allowed} "
                                                        f"over ({per_gpu})", run=REFERENCE)))
    over.sort(key=lambda x: -x[0])
    return [
        Check("a.ooms_within", TITLES["a.ooms_within"], ref.within_share >= WITHIN_SHARE,
              f"{ref.within_share:.1%} of {len(ref.excess)} scenarios", tuple(o for _, o in over)),
        Check("a.ooms_excess", TITLES["a.ooms_excess"], ref.max_excess <= MOST_EXCESS,
              f"at most {ref.max_excess} over", tuple(o for e, o in over if e > MOST_EXCESS)),
    ]


def _adaptive_checks(ref: RunSummary | None, benches: Sequence[ScenarioBenchmark],
                     unavoidable: Mapping[str, Mapping[int, int]]) -> list[Check]:
    """(a): adaptive's safe_ratio median, 10th percentile and minimum, and its OOMs against the unavoidable count."""
    keys = ("a.median", "a.p10", "a.min", "a.ooms_within", "a.ooms_excess")
    if ref is None or not ref.safe_ratios:
        return [Check(k, TITLES[k], None, f"{REFERENCE} did not run") for k in keys]
    return [
        _ratio_check("a.median", ref.safe_ratio_median, MEDIAN_SAFE_RATIO, benches),
        _ratio_check("a.p10", ref.safe_ratio_p10, P10_SAFE_RATIO, benches),
        _ratio_check("a.min", ref.safe_ratio_min, MIN_SAFE_RATIO, benches),
        *_oom_checks(ref, benches, unavoidable),
    ]


def _more(items: float, ref: float) -> str:
    return f"+{items / ref - 1:.1%}" if ref > 0 else "adaptive took none"


def _dominated(bench: ScenarioBenchmark, ref: Run, run: Run) -> list[Offender]:
    """Where ``run`` took more than 1 % more items than ``ref`` without more OOMs: per service, then per GPU.

    Per service it is a gain at nobody's cost: no other service on that GPU takes more than 1 % fewer
    items than under ``ref``, and the GPU has no more co-tenant failures. (Shared differently, one
    service of a GPU can always take more; what it takes from the others is judged per GPU.)
    """
    name = bench.scenario.name
    out = []
    theirs = {(s.gpu, s.service): s for s in ref.services}

    def at_no_cost(s: ServiceResult) -> bool:
        others = [o for o in run.services if o.gpu == s.gpu and o is not s and (o.gpu, o.service) in theirs]
        return (all(o.items >= theirs[(o.gpu, o.service)].items * (1 - DOMINANCE_MARGIN) for o in others)
                and cotenant_failures(run, s.gpu) <= cotenant_failures(ref, s.gpu))

    for s in run.services:
        a = theirs.get((s.gpu, s.service))
        if a is not None and s.items > a.items * (1 + DOMINANCE_MARGIN) and s.ooms <= a.ooms and at_no_cost(s):
            out.append(Offender(name, f"{s.items:.1f} items ({_more(s.items, a.items)}) with {s.ooms} OOMs; "
                                      f"{REFERENCE} {a.items:.1f} with {a.ooms}", gpu=s.gpu, service=s.service,
                                run=run.name))
    ref_items, ref_failures = gpu_items(ref), gpu_failures(ref)
    failures = gpu_failures(run)
    for gpu, items in sorted(gpu_items(run).items()):
        a_items, a_fail = ref_items.get(gpu, 0.0), ref_failures.get(gpu, 0)
        if items > a_items * (1 + DOMINANCE_MARGIN) and failures.get(gpu, 0) <= a_fail:
            above = _seconds_above(run, gpu)
            out.append(Offender(name, f"GPU {items:.1f} items ({_more(items, a_items)}) with {failures.get(gpu, 0)} "
                                      f"OOMs + co-tenant failures ({cotenant_failures(run, gpu)} of them co-tenant), "
                                      f"{above:.0f} s above the safety bound; {REFERENCE} {a_items:.1f} with {a_fail} "
                                      f"({cotenant_failures(ref, gpu)})", gpu=gpu, run=run.name))
    return out


def _dominance_check(key: str, names: Sequence[str], benches: Sequence[ScenarioBenchmark], *,
                     informational: bool) -> Check:
    """(b): the cases where one of ``names`` dominates adaptive (see :func:`_dominated`)."""
    offenders: list[Offender] = []
    compared = False
    for bench in benches:
        ref = _find(bench, REFERENCE)
        for name in names:
            run = _find(bench, name)
            if ref is not None and run is not None:
                compared = True
                offenders += _dominated(bench, ref, run)
    if not compared:
        return Check(key, TITLES[key], None, f"{REFERENCE} or the baselines did not run", informational=informational)
    scenarios = len({o.scenario for o in offenders})
    figure = f"{len(offenders)} case(s) in {scenarios} scenario(s)"
    if offenders:
        by_run = Counter(o.run for o in offenders)
        above = sum(1 for o in offenders if _above_bound_s(benches, o) >= ABOVE_BOUND_S)
        figure += (f" ({', '.join(f'{n} {c}' for n, c in by_run.most_common())}; {above} of them on a GPU the "
                   f"baseline ran >= {ABOVE_BOUND_S:.0f} s above the safety bound, which {REFERENCE} sizes to)")
    return Check(key, TITLES[key], not offenders, figure, tuple(offenders), informational)


def _seconds_above(run: Run, gpu: int | None) -> float:
    """How long ``run`` held ``gpu`` above the safety bound (s)."""
    return next((g.seconds_above_bound for g in run.gpus if g.gpu == gpu), 0.0)


def _above_bound_s(benches: Sequence[ScenarioBenchmark], o: Offender) -> float:
    """How long the offender's run held the offender's GPU above the safety bound (s)."""
    bench = next(b for b in benches if b.scenario.name == o.scenario)
    run = _find(bench, o.run or "")
    return _seconds_above(run, o.gpu) if run is not None else 0.0


def _crash_check(family: Family, benches: Sequence[ScenarioBenchmark]) -> Check:
    """(c): in crash mode, adaptive's items per GPU against the start-up finders' and fixed-4's.

    A GPU where the baseline kept others out is not an offender: its items came out of their memory.
    That is more co-tenant failures there than adaptive's, or a service of the GPU kept down (more
    restarts than under adaptive, and more than 1 % fewer items). Nor is one where it split the GPU
    against the configured weights (:func:`against_weights`). Both are counted and named in the figure.
    """
    if family.oom_mode != "crash":
        return Check("c.crash", TITLES["c.crash"], None, "applies to crash-mode families only")
    offenders: list[Offender] = []
    excused: list[str] = []
    split: list[str] = []
    counts: dict[str, list[int]] = {}  # per baseline: [GPUs where adaptive took strictly more, GPUs compared]
    for bench in benches:
        ref = _find(bench, REFERENCE)
        weights = {(x.gpu, x.name): x.weight for x in bench.scenario.services}
        for name in CRASH_BASELINES:
            run = _find(bench, name)
            if ref is None or run is None:
                continue
            theirs = gpu_items(run)
            for gpu, items in sorted(gpu_items(ref).items()):
                other = theirs.get(gpu, 0.0)
                c = counts.setdefault(name, [0, 0])
                c[0] += items > other
                c[1] += 1
                if items < other * (1 - CRASH_MARGIN) and kept_out(run, ref, gpu):
                    excused.append(f"{bench.scenario.name} GPU {gpu} {name}")
                elif items < other * (1 - CRASH_MARGIN) and against_weights(
                        run, ref, gpu, {n: w for (g, n), w in weights.items() if g == gpu}):
                    split.append(f"{bench.scenario.name} GPU {gpu} {name}")
                elif items < other * (1 - CRASH_MARGIN):
                    offenders.append(Offender(bench.scenario.name, f"{REFERENCE} {items:.1f} items, {name} {other:.1f} "
                                                                   f"({items / other - 1:+.1%}), {name} "
                                                                   f"{_seconds_above(run, gpu):.0f} s above the safety "
                                                                   f"bound", gpu=gpu, run=name))
    if not counts:
        return Check("c.crash", TITLES["c.crash"], None, f"{REFERENCE} or the baselines did not run")
    shares = {name: more / total for name, (more, total) in counts.items()}
    above = sum(1 for o in offenders if _above_bound_s(benches, o) >= ABOVE_BOUND_S)
    figure = "strictly more on " + ", ".join(f"{shares[n]:.1%} of GPUs vs {n}" for n in counts) + (
        f"; {len(offenders)} case(s) more than {CRASH_MARGIN:.0%} below") + (
        f" ({above} of them on a GPU the baseline ran >= {ABOVE_BOUND_S:.0f} s above the safety bound)"
        if offenders else "") + (
        f"; {len(excused)} more where the baseline kept others out ({', '.join(excused[:5])}"
        f"{', ...' if len(excused) > 5 else ''})" if excused else "") + (
        f"; {len(split)} more where the baseline split the GPU against the weights ({', '.join(split[:5])}"
        f"{', ...' if len(split) > 5 else ''})" if split else "")
    passed = not offenders and all(share > 0.5 for share in shares.values())
    return Check("c.crash", TITLES["c.crash"], passed, figure, tuple(offenders))
