"""Replay one scenario against every selected strategy and baseline, each in a fresh world.

Strategies run through :func:`optimizer.simulation.run.simulate` (the engine and policy of
``serve``); baselines drive the same :class:`~optimizer.simulation.world.World` through their
own :class:`~optimizer.simulation.world.ServiceLink`. Both record the memory used per GPU at every
step and the OOMs, for the plots (unless asked not to). The same scenario, seed and settings give the
same numbers.

:func:`settings_for` is where callers adjust the settings per scenario before they run it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import structlog

from optimizer.benchmark.baselines import BASELINES, lightning_search, make_link, poll_interval
from optimizer.config import ConfigError, Settings, Strategy, validate_settings
from optimizer.simulation.backend import limits_from
from optimizer.logs import configure_logging
from optimizer.simulation.run import (
    GpuResult,
    ServiceResult,
    gpu_results,
    service_results,
    simulate,
    with_scenario_profiles,
)
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.physics import BACKOFF_INITIAL_S
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


def settings_for(scenario: Scenario, settings: Settings) -> Settings:
    """The settings to benchmark ``scenario`` with, given the configuration's ``settings``.

    In ``oom_mode: crash`` an OOM costs a restart, and the operator of such a deployment sets
    ``oom_cost_s`` to what a restart costs: unless the configuration sets it, the scenario's
    ``restart_s``, the first back-off and the longest load of its services. Otherwise the settings as
    they are. (The command calls it for every scenario, generated or from a file.)
    """
    if scenario.oom_mode != "crash" or settings.oom_cost_s != Settings().oom_cost_s:
        return settings
    load = max((s.load_s for s in scenario.services), default=0.0)
    return dataclasses.replace(settings, oom_cost_s=scenario.restart_s + BACKOFF_INITIAL_S + load)


def run_baseline(name: str, scenario: Scenario, settings: Settings, duration_s: float, *,
                 record: bool = True) -> Run:
    """Run baseline ``name`` (one of :data:`BASELINES`) over ``duration_s`` seconds of ``scenario``.

    ``record``: keep the memory used at every step and the OOMs in ``trace`` (else it is empty).
    """
    interval = poll_interval(name, scenario.step_s, settings.monitoring_interval)
    if name == "oracle":  # a ceiling: its cleanups at every poll cost nothing
        scenario = dataclasses.replace(scenario, cleanup_stall_s=0.0)
    world = World(scenario, initial_batch=settings.default_batch(settings.default_profile),
                  limits=limits_from(settings), poll_interval=interval)
    trace = world.record() if record else Trace()
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


def run_strategy(name: str, scenario: Scenario, settings: Settings, duration_s: float, *,
                 record: bool = True) -> Run:
    """Run strategy ``name`` through :func:`simulate` over ``duration_s`` seconds of ``scenario``.

    ``record`` as for :func:`run_baseline`.
    """
    result = simulate(scenario, settings, strategy=Strategy(name), duration_s=duration_s, record=record)
    return Run(name=name, kind="strategy", services=result.services, trace=result.trace or Trace(),
               poll_interval_s=settings.monitoring_interval, gpus=result.gpus)


def run_scenario(scenario: Scenario, settings: Settings, *, source: str = "",
                 strategies: Sequence[str] = STRATEGIES, baselines: Sequence[str] = BASELINES,
                 duration_s: float | None = None, interval_s: float | None = None,
                 record: bool = True) -> ScenarioBenchmark:
    """Every selected strategy, then every selected baseline, on ``scenario``.

    ``duration_s`` (default: the scenario's) and ``interval_s`` (default: the settings'
    ``monitoring_interval``) are seconds. ``record``: keep each run's trace, for the plots (without
    it, every ``Run.trace`` is empty). Raises :class:`ConfigError` for an interval the settings
    reject, ``ValueError`` for an unknown strategy, ``KeyError`` for an unknown baseline.
    """
    s = benchmark_settings(settings, scenario, interval_s)
    duration = scenario.duration_s if duration_s is None else duration_s
    started = time.perf_counter()
    runs = [run_strategy(n, scenario, s, duration, record=record) for n in strategies]
    runs += [run_baseline(n, scenario, s, duration, record=record) for n in baselines]
    log.info("benchmark_scenario", scenario=scenario.name, runs=len(runs), duration_s=duration,
             interval_s=s.monitoring_interval, wall_s=round(time.perf_counter() - started, 3))
    return ScenarioBenchmark(scenario=scenario, source=source, duration_s=duration, interval_s=s.monitoring_interval,
                             settings=s, runs=tuple(runs))


@dataclass(frozen=True)
class Job:
    """One scenario to benchmark, with everything :func:`run_scenario` needs (picklable, for worker processes).

    ``settings`` are the configuration's: :func:`run_job` passes them through :func:`settings_for`.
    """

    scenario: Scenario
    settings: Settings
    source: str = ""
    strategies: tuple[str, ...] = STRATEGIES
    baselines: tuple[str, ...] = BASELINES
    duration_s: float | None = None
    interval_s: float | None = None
    record: bool = True


def run_job(job: Job) -> ScenarioBenchmark:
    """Benchmark one :class:`Job`: :func:`run_scenario` with the settings :func:`settings_for` gives."""
    return run_scenario(job.scenario, settings_for(job.scenario, job.settings), source=job.source,
                        strategies=job.strategies, baselines=job.baselines, duration_s=job.duration_s,
                        interval_s=job.interval_s, record=job.record)


def run_jobs(jobs: Sequence[Job], *, workers: int = 1, log_format: str = "auto") -> list[ScenarioBenchmark]:
    """Benchmark every job, in order, in ``workers`` processes (1: in this one).

    Every run is deterministic and independent of the others, so the results are the same whatever
    ``workers``. Worker processes log errors only, in ``log_format``, as the command does.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=configure_logging,
                             initargs=(log_format, "error")) as pool:
        return list(pool.map(run_job, jobs))
