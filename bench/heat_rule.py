"""The heat rule, measured: adaptive as built (a hot GPU holds its batches) against adaptive with the
seed rule (step down one item per ``optimization_interval`` while hot), in the simulated world where
a GPU above its slowdown temperature lowers its clocks (docs/scenarios.md, Thermal throttling).

Runs ``examples/scenarios/heat.yaml`` and every scenario with a thermal event among ``--generate N``
scenarios drawn with ``--seed S`` (the benchmark's generator), both ways, and prints per scenario
the items, OOMs and seconds throttled, then the median and the range of step/hold items. The
step-down variant wraps the controller's per-service decision (an ablation, not a product setting).

    .venv/bin/python bench/heat_rule.py [--generate 100] [--seed 7] [--oom-mode recover|crash] [FILE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import structlog

from optimizer.benchmark.generate import generate
from optimizer.benchmark.run import settings_for
from optimizer.config import Settings, Strategy
from optimizer.policy.adaptive import controller
from optimizer.simulation.run import simulate
from optimizer.simulation.scenario import Scenario, load_scenario

ROOT = Path(__file__).resolve().parent.parent
_decide = controller._decide


def stepping_down(interval_s: float) -> Any:
    """``controller._decide`` with the seed heat rule added: one item down per ``interval_s`` while hot."""
    last: dict[tuple[int, str], float] = {}

    def decide(m: Any, p: Any, granted: int, grow: bool, gs: Any, sample: Any, now: float, events: Any, *,
               hold: bool = False) -> Any:
        svc = _decide(m, p, granted, grow, gs, sample, now, events, hold=hold)
        key = (gs.index, m.name)
        if gs.hot and svc.batch_size >= m.svc.batch_size > m.lo and now - last.get(key, -1e18) >= interval_s:
            last[key] = now
            svc = dataclasses.replace(svc, batch_size=m.svc.batch_size - 1)
        return svc

    return decide


def totals(scenario: Scenario, settings: Settings) -> tuple[float, int, float]:
    r = simulate(scenario, settings, strategy=Strategy.ADAPTIVE)
    return (sum(s.items for s in r.services), sum(s.ooms for s in r.services),
            sum(g.seconds_throttled for g in r.gpus))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--generate", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--oom-mode", choices=("recover", "crash"), default="recover")
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    scenarios = [load_scenario(f) for f in (args.files or [ROOT / "examples/scenarios/heat.yaml"])]
    scenarios += [g.scenario for g in generate(args.generate, args.seed, oom_mode=args.oom_mode) if g.scenario.thermal]
    ratios = []
    for sc in scenarios:
        settings = settings_for(sc, Settings())
        controller._decide = _decide  # type: ignore[assignment]
        hold = totals(sc, settings)
        controller._decide = stepping_down(settings.optimization_interval)  # type: ignore[assignment]
        step = totals(sc, settings)
        controller._decide = _decide  # type: ignore[assignment]
        ratios.append(step[0] / hold[0])
        print(f"{sc.name:14s} hold: {hold[0]:9.0f} items {hold[1]} OOMs {hold[2]:5.0f} s throttled | "
              f"step down: {step[0]:9.0f} items {step[1]} OOMs {step[2]:5.0f} s throttled | step/hold {ratios[-1]:.4f}")
    print(f"{len(ratios)} scenarios: step/hold items median {statistics.median(ratios):.4f}, "
          f"min {min(ratios):.4f}, max {max(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
