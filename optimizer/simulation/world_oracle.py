"""What the oracle measures of :class:`optimizer.simulation.world.World` see: the largest batch per service that
fits with the jitter at its worst, given the co-tenants' scheduled memory and the services started so far."""

from __future__ import annotations

from optimizer.simulation.physics import fits
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.world_types import BackgroundRun, Limits, ServiceRun


class OracleView:
    """A part of :class:`~optimizer.simulation.world.World`: the ceilings its oracle measures credit."""

    scenario: Scenario
    limits: Limits
    runs: list[ServiceRun]
    backgrounds: list[BackgroundRun]

    def _thermal(self, gpu: int, t: float) -> float:
        return sum(x.level(t) for x in self.scenario.thermal if x.gpu == gpu)

    def _base(self, r: ServiceRun) -> float:
        return r.spec.base_mb + r.leak_mb

    def _oracle(self, runs: list[ServiceRun], total_mb: float, background: float, t: float,
                fragmentation: float | None = None) -> dict[str, int]:
        """Largest batch per service that fits ``total_mb`` with the jitter at its worst (shared by weight;
        what the parts' whole items leave over goes to whoever it holds one more item of).

        A service whose share does not hold one item still runs one where it fits (a service cannot
        run at batch 0): that item comes out of the memory first and the rest is shared among the
        others, so the ceilings never credit more than fits together. ``fragmentation`` (a
        fraction) replaces every service's own when given.
        """
        avail = total_mb - background - sum(self._base(r) for r in runs)
        worst: dict[str, float] = {}
        for r in runs:
            frag = (0.0 if r.pool_mb is not None else r.fragmentation) if fragmentation is None else fragmentation
            worst[r.spec.name] = r.spec.per_item_at(t) * (1 + r.spec.noise) / (1 - frag)
        out: dict[str, int] = {}
        sharing = list(runs)
        while sharing:
            weights = sum(r.spec.weight for r in sharing)
            short = [r for r in sharing if avail * r.spec.weight / weights < worst[r.spec.name]]
            if not short:
                break
            for r in sorted(short, key=lambda r: -r.spec.weight):
                out[r.spec.name] = 1 if avail >= worst[r.spec.name] else 0
                avail -= out[r.spec.name] * worst[r.spec.name]
            sharing = [r for r in sharing if r.spec.name not in out]
        weights = sum(r.spec.weight for r in sharing)
        for r in sharing:
            out[r.spec.name] = fits(avail * r.spec.weight / weights, worst[r.spec.name],
                                    self.limits.max_batch(r.spec.name))
        # What the whole items of the weighted parts leave over goes, an item at a time, to whoever it
        # holds one more item of (the one furthest below its weighted share first), as adaptive's plan does.
        left = avail - sum(out[r.spec.name] * worst[r.spec.name] for r in sharing)
        while True:
            takers = [r for r in sharing if 0 < worst[r.spec.name] <= left
                      and out[r.spec.name] < self.limits.max_batch(r.spec.name)]
            if not takers:
                return out
            r = min(takers, key=lambda r: ((out[r.spec.name] + 1) * worst[r.spec.name] / r.spec.weight, r.spec.name))
            out[r.spec.name] += 1
            left -= worst[r.spec.name]

    def _started(self, gpu: int, t: float) -> list[ServiceRun]:
        """The services the ceilings count at ``t``: those whose first start and load are done."""
        return [r for r in self.runs if r.spec.gpu == gpu and t >= r.spec.start_s + r.spec.load_s]

    def oracle_batch(self, service: str, gpu: int, t: float, *, fragmentation: float | None = None) -> int:
        """The batch the ``oracle_items`` measure credits ``service`` with in the step starting at ``t``.

        The same computation as the measure (the GPU's total memory, the co-tenants' memory at
        ``t``, the services started by ``t``); ``fragmentation`` as in :meth:`_oracle`.
        """
        g = self.scenario.gpu(gpu)
        background = self._scheduled(gpu, t) + self._loading(gpu, t)
        return self._oracle(self._started(gpu, t), g.total_mb, background, t, fragmentation).get(service, 0)

    def _scheduled(self, gpu: int, t: float) -> float:
        """What the co-tenants ask for at ``t`` (MiB): the ceilings leave them that, whether or not a run let them in."""
        return sum(b.spec.level(t) for b in self.backgrounds if b.spec.gpu == gpu)

    def _loading(self, gpu: int, t: float) -> float:
        """The weights of services loading for the first time (MiB): not yet credited, but coming, whole."""
        return sum(self._base(r) for r in self.runs
                   if r.spec.gpu == gpu and r.alive and t < r.spec.start_s + r.spec.load_s)
