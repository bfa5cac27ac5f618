"""The simulated backend: GPUs from a scenario file, run in real time (``serve --backend simulated``).

The scenario's services run inside the backend and reach the engine in process through a
:class:`~optimizer.simulation.world.ServiceLink`; VLM services outside can poll the same
decisions over HTTP. Sampling advances the world to the sampler's clock; it does not block.
"""

from __future__ import annotations

from types import MappingProxyType

from optimizer.config import Settings
from optimizer.gpu.types import GpuSample
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.world import Limits, ServiceLink, World


def limits_from(settings: Settings) -> Limits:
    """The oracle measures' limits from the settings: the thresholds, and every profile's largest batch."""
    service_max = {p.name: settings.batch_limits(p)[1] for p in settings.profiles}
    return Limits(max_batch_size=settings.max_batch_size, safe_fraction=settings.memory_threshold_oom,
                  reserve_mb=settings.memory_reserve_mb, critical_fraction=settings.memory_threshold_critical,
                  service_max=MappingProxyType(service_max))


class SimulatedBackend:
    name = "simulated"
    blocking = False

    def __init__(self, scenario: Scenario, settings: Settings, *, origin: float) -> None:
        self.scenario = scenario
        self.origin = origin  # clock time at scenario time 0
        self.world = World(scenario, initial_batch=settings.default_batch(settings.default_profile), limits=limits_from(settings),
                           poll_interval=settings.monitoring_interval)
        self.link: ServiceLink | None = None

    def attach(self, link: ServiceLink) -> None:
        """Let the scenario's services poll and report (without a link they keep their first batch)."""
        self.link = link

    def sample(self, now: float) -> list[GpuSample]:
        self.world.advance_to(max(0.0, now - self.origin), self.link)
        return self.world.sample(now)

    def close(self) -> None:
        return None
