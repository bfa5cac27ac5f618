"""Helpers for driving the policy: hand-made GPU samples, and a world run in virtual time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.simulation.backend import SimulatedBackend
from optimizer.gpu.types import GpuSample
from optimizer.policy.types import Event, Snapshot
from optimizer.simulation.link import EngineLink
from optimizer.simulation.run import with_scenario_profiles
from optimizer.simulation.scenario import Background, Scenario, SimGpu, SimService, Thermal

GIB = 1024**3
MIB = 1024**2
ROOT = Path(__file__).resolve().parent.parent


def gpu(used_gib: float, *, total_gib: float = 80.0, index: int = 0, temp: float | None = 50.0,
        util: float | None = 90.0, t: float = 0.0) -> GpuSample:
    total = int(total_gib * GIB)
    used = int(used_gib * GIB)
    return GpuSample(index=index, uuid=f"GPU-test-{index}", name="Test GPU", timestamp=t,
                     memory_total_bytes=total, memory_used_bytes=used, memory_free_bytes=total - used,
                     memory_reserved_bytes=0, temperature_celsius=temp, power_usage_watts=300.0,
                     power_limit_watts=700.0, utilization_percent=util)


class Harness:
    """An engine fed hand-made snapshots, one monitoring interval apart."""

    def __init__(self, settings: Settings) -> None:
        self.engine = Engine(settings)
        self.t = 0.0

    def tick(self, *samples: GpuSample) -> tuple[Event, ...]:
        self.t += self.engine.settings.monitoring_interval
        stamped = tuple(dataclasses.replace(s, timestamp=self.t) for s in samples)
        return self.engine.observe(Snapshot(self.t, stamped))

    def batch(self, service: str = "vlm", gpu_index: int = 0) -> int:
        return self.engine.state.services[(gpu_index, service)].batch_size


def one_service(*, total_mb: float = 81559, base_mb: float = 18000, per_item_mb: float = 3200,
                noise: float = 0.05, seed: int = 1, duration_s: float = 3600,
                background: tuple[Background, ...] = (), thermal: tuple[Thermal, ...] = (),
                declared_per_item_mb: float | None = None) -> Scenario:
    return Scenario(
        name="test", seed=seed, duration_s=duration_s, step_s=1.0,
        gpus=(SimGpu(index=0, name="Simulated H100", total_mb=total_mb),),
        services=(SimService(name="vlm", gpu=0, base_mb=base_mb, per_item_mb=per_item_mb, item_ms=45,
                             overhead_ms=120, noise=noise, declared_per_item_mb=declared_per_item_mb),),
        background=background, thermal=thermal,
    )


class WorldRun:
    """A scenario's world and an engine, stepped one monitoring interval at a time (virtual time)."""

    def __init__(self, scenario: Scenario, settings: Settings) -> None:
        self.settings = with_scenario_profiles(settings, scenario)
        self.engine = Engine(self.settings)
        self.backend = SimulatedBackend(scenario, self.settings, origin=0.0)
        self.backend.attach(EngineLink(self.engine, origin=0.0))
        self.t = 0.0

    def tick(self) -> Snapshot:
        self.t += self.settings.monitoring_interval
        snapshot = Snapshot(self.t, tuple(self.backend.sample(self.t)))
        self.engine.observe(snapshot)
        return snapshot

    def run_until(self, t_end: float, each: Callable[[Snapshot], None] | None = None) -> None:
        while self.t + self.settings.monitoring_interval <= t_end + 1e-9:
            snap = self.tick()
            if each is not None:
                each(snap)

    def batch(self, service: str = "vlm") -> int:
        return self.engine.state.services[(0, service)].batch_size
