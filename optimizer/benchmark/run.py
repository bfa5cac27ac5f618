"""Replay one scenario against every selected strategy and baseline, each in a fresh world.

Strategies run through :func:`optimizer.simulation.run.simulate` (the engine and policy of
``serve``); baselines drive the same :class:`~optimizer.simulation.world.World` through their
own :class:`~optimizer.simulation.world.ServiceLink`. Both record the memory used per GPU at every
step and the OOMs, for the plots. The same scenario, seed and settings give the same numbers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from optimizer.benchmark.baselines import BASELINES, lightning_search, make_link, poll_interval
from optimizer.config import ConfigError, Settings, Strategy, validate_settings
from optimizer.gpu.simulated import limits_from
from optimizer.simulation.run import (
    GpuResult,
    ServiceResult,
    gpu_results,
    service_results,
    simulate,
    with_scenario_profiles,
)
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.world import Trace, World

log = structlog.get_logger("optimizer.benchmark")

STRATEGIES: tuple[str, ...] = tuple(s.value for s in Strategy)


@dataclass(frozen=True)
class Run:
    """One strategy or baseline on one scenario.

    ``kind`` is ``"strategy"`` or ``"baseline"``; ``poll_interval_s`` how often its services polled
    (seconds); ``notes`` per service what a baseline decided (Lightning: the size it kept).
    """

    name: str
    kind: str
    services: tuple[ServiceResult, ...]
    trace: Trace
    poll_interval_s: float
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    gpus: tuple[GpuResult, ...] = ()


@dataclass(frozen=True)
class ScenarioBenchmark:
    """Every run of one scenario; ``duration_s`` and ``interval_s`` in seconds."""

    scenario: Scenario
    source: str  # the file it came from, as given
    duration_s: float
    interval_s: float
    settings: Settings
    runs: tuple[Run, ...]

    def oracle_items(self) -> dict[tuple[int, str], float] | None:
        """Items of the ``oracle`` baseline per (GPU, service), or ``None`` when it was not run."""
        for run in self.runs:
            if run.name == "oracle":
                return {(s.gpu, s.service): s.items for s in run.services}
        return None


def parse_selection(flag: str, value: str | None, allowed: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated selection out of ``allowed`` (``None``: all of them; ``none``: none).

    Raises :class:`ConfigError` naming ``flag`` and the allowed values.
    """
    if value is None:
        return tuple(allowed)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        got = repr(bad[0]) if bad else repr(value)
        raise ConfigError(flag, f"must be a comma-separated list of {', '.join(allowed)} (or none), got {got}")
    return tuple(dict.fromkeys(names))  # in the order given, once each


def benchmark_settings(settings: Settings, scenario: Scenario, interval_s: float | None) -> Settings:
    """The settings every run of ``scenario`` uses: ``interval_s`` as the monitoring interval, its profiles.

    Raises :class:`ConfigError` when ``interval_s`` does not fit the other settings.
    """
    s = settings
    if interval_s is not None:
        s = validate_settings(dataclasses.replace(s, monitoring_interval=interval_s))
    return with_scenario_profiles(s, scenario)


def run_baseline(name: str, scenario: Scenario, settings: Settings, duration_s: float) -> Run:
    """Run baseline ``name`` (one of :data:`BASELINES`) over ``duration_s`` seconds of ``scenario``."""
    interval = poll_interval(name, scenario.step_s, settings.monitoring_interval)
    if name == "oracle":  # a ceiling: its cleanups at every poll cost nothing
        scenario = dataclasses.replace(scenario, cleanup_stall_s=0.0)
    world = World(scenario, initial_batch=settings.default_batch(settings.default_profile),
                  limits=limits_from(settings), poll_interval=interval)
    trace = world.record()
    link = make_link(name, settings, world)
    world.advance_to(duration_s, link)
    notes = {}
    for r in world.runs:
        found, trials = lightning_search(link, r.spec.gpu, r.spec.name)
        if trials:
            sizes = " ".join(f"{b}{'' if ok else '✗'}" for _, b, ok in trials)
            notes[r.spec.name] = f"searched {sizes}; kept {found}"
    return Run(name=name, kind="baseline", services=service_results(world), trace=trace, poll_interval_s=interval,
               notes=notes, gpus=gpu_results(world))


def run_strategy(name: str, scenario: Scenario, settings: Settings, duration_s: float) -> Run:
    """Run strategy ``name`` through :func:`simulate` over ``duration_s`` seconds of ``scenario``."""
    result = simulate(scenario, settings, strategy=Strategy(name), duration_s=duration_s, record=True)
    assert result.trace is not None
    return Run(name=name, kind="strategy", services=result.services, trace=result.trace,
               poll_interval_s=settings.monitoring_interval, gpus=result.gpus)


def run_scenario(scenario: Scenario, settings: Settings, *, source: str = "",
                 strategies: Sequence[str] = STRATEGIES, baselines: Sequence[str] = BASELINES,
                 duration_s: float | None = None, interval_s: float | None = None) -> ScenarioBenchmark:
    """Every selected strategy, then every selected baseline, on ``scenario``.

    ``duration_s`` (default: the scenario's) and ``interval_s`` (default: the settings'
    ``monitoring_interval``) are seconds. Raises :class:`ConfigError` for an interval the settings
    reject, ``ValueError`` for an unknown strategy, ``KeyError`` for an unknown baseline.
    """
    s = benchmark_settings(settings, scenario, interval_s)
    duration = scenario.duration_s if duration_s is None else duration_s
    started = time.perf_counter()
    runs = [run_strategy(n, scenario, s, duration) for n in strategies]
    runs += [run_baseline(n, scenario, s, duration) for n in baselines]
    log.info("benchmark_scenario", scenario=scenario.name, runs=len(runs), duration_s=duration,
             interval_s=s.monitoring_interval, wall_s=round(time.perf_counter() - started, 3))
    return ScenarioBenchmark(scenario=scenario, source=source, duration_s=duration, interval_s=s.monitoring_interval,
                             settings=s, runs=tuple(runs))
