"""``simulate``: replay a scenario in virtual time through the same engine and policy as ``serve``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from optimizer.config import Settings, Strategy, validate_settings
from optimizer.engine import Engine
from optimizer.simulation.backend import SimulatedBackend
from optimizer.policy.types import Snapshot
from optimizer.simulation.link import EngineLink
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.world import Trace, World

MEASURES = ("items", "oracle_items", "safe_oracle_items", "ratio", "safe_ratio", "ooms", "restarts", "cleanups",
            "seconds_down", "batch_changes", "seconds_above_critical")


@dataclass(frozen=True)
class ServiceResult:
    service: str
    gpu: int
    items: float
    oracle_items: float
    safe_oracle_items: float
    ooms: int
    batch_changes: int
    seconds_above_critical: float
    final_batch_size: int
    batches: tuple[tuple[float, int], ...]
    restarts: int = 0
    cleanups: int = 0
    seconds_down: float = 0.0

    @property
    def ratio(self) -> float:
        return self.items / self.oracle_items if self.oracle_items else 0.0

    @property
    def safe_ratio(self) -> float:
        return self.items / self.safe_oracle_items if self.safe_oracle_items else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": round(self.items, 1),
            "oracle_items": round(self.oracle_items, 1),
            "safe_oracle_items": round(self.safe_oracle_items, 1),
            "ratio": round(self.ratio, 4),
            "safe_ratio": round(self.safe_ratio, 4),
            "ooms": self.ooms,
            "restarts": self.restarts,
            "cleanups": self.cleanups,
            "seconds_down": round(self.seconds_down, 1),
            "batch_changes": self.batch_changes,
            "seconds_above_critical": round(self.seconds_above_critical, 1),
            "gpu": self.gpu,
            "final_batch_size": self.final_batch_size,
        }


@dataclass(frozen=True)
class GpuResult:
    """Per GPU: co-tenant arrivals that did not fit (each attempt counts), seconds throttled by heat."""

    gpu: int
    cotenant_failures: int
    seconds_throttled: float
    seconds_above_bound: float = 0.0  # the GPU's memory used above the safety bound

    def to_dict(self) -> dict[str, Any]:
        return {"cotenant_failures": self.cotenant_failures, "seconds_throttled": round(self.seconds_throttled, 1),
                "seconds_above_bound": round(self.seconds_above_bound, 1)}


@dataclass(frozen=True)
class SimulationResult:
    scenario: str
    strategy: str
    duration_s: float
    services: tuple[ServiceResult, ...]
    engine: Engine
    trace: Trace | None = None  # memory used and OOMs over time, when simulate(record=True)
    gpus: tuple[GpuResult, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """``simulate --json``: the measures per GPU index, then per service name (one name may run on two GPUs)."""
        gpus: dict[str, Any] = {}
        for g in self.gpus:
            gpus[str(g.gpu)] = {**g.to_dict(), "services": {}}
        for s in self.services:
            gpus.setdefault(str(s.gpu), {"services": {}})["services"][s.service] = s.to_dict()
        return {"scenario": self.scenario, "strategy": self.strategy, "duration_s": self.duration_s, "gpus": gpus}


def with_scenario_profiles(settings: Settings, scenario: Scenario) -> Settings:
    """Add the scenario's declared profiles for services the configuration does not declare."""
    declared = {p.name for p in settings.profiles}
    extra = tuple(p for p in scenario.profiles() if p.name not in declared)
    return dataclasses.replace(settings, profiles=settings.profiles + extra)


def service_results(world: World) -> tuple[ServiceResult, ...]:
    """The measures of every service of a world that has run."""
    return tuple(
        ServiceResult(service=r.spec.name, gpu=r.spec.gpu, items=r.items, oracle_items=r.oracle_items,
                      safe_oracle_items=r.safe_oracle_items, ooms=r.ooms,
                      batch_changes=max(0, len(r.batches) - 1), seconds_above_critical=r.seconds_above_critical,
                      final_batch_size=r.batch, batches=tuple(r.batches), restarts=r.restarts,
                      cleanups=r.cleanups, seconds_down=r.seconds_down)
        for r in world.runs
    )


def gpu_results(world: World) -> tuple[GpuResult, ...]:
    """The per-GPU measures of a world that has run."""
    return tuple(GpuResult(gpu=i, cotenant_failures=g.cotenant_failures, seconds_throttled=g.seconds_throttled,
                           seconds_above_bound=g.seconds_above_bound)
                 for i, g in sorted(world.gpu_runs.items()))


def simulate(scenario: Scenario, settings: Settings, *, strategy: Strategy | None = None,
             duration_s: float | None = None, interval_s: float | None = None,
             record: bool = False) -> SimulationResult:
    """Run ``scenario`` in virtual time; one sample per monitoring interval, the world stepped in between.

    ``duration_s`` and ``interval_s`` (seconds) override the scenario's length and the monitoring
    interval. ``record`` keeps the memory used per GPU at every step and the OOMs (``trace``).
    Raises :class:`~optimizer.config.ConfigError` when ``interval_s`` makes the settings invalid.
    """
    s = settings
    if strategy is not None:
        s = dataclasses.replace(s, strategy=strategy)
    if interval_s is not None:
        s = validate_settings(dataclasses.replace(s, monitoring_interval=interval_s))
    s = with_scenario_profiles(s, scenario)
    engine = Engine(s)
    backend = SimulatedBackend(scenario, s, origin=0.0)
    backend.attach(EngineLink(engine, origin=0.0))
    trace = backend.world.record() if record else None
    duration = scenario.duration_s if duration_s is None else duration_s
    t = 0.0
    k = 0
    while t < duration - 1e-9:
        k += 1
        t = min(duration, k * s.monitoring_interval)
        engine.observe(Snapshot(t, tuple(backend.sample(t))))
    return SimulationResult(scenario=scenario.name, strategy=s.strategy.value, duration_s=duration,
                            services=service_results(backend.world), engine=engine, trace=trace,
                            gpus=gpu_results(backend.world))
