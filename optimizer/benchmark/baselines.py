"""The baselines the strategies are measured against, each a :class:`~optimizer.simulation.world.ServiceLink`.

A baseline stands where the optimizer stands: the simulated services poll it for their batch size
and report their OOMs to it, in the same world (:mod:`optimizer.simulation.world`) as the
strategies, so items, OOMs and the oracle measures are computed the same way for both. Each keeps
a small state machine per (GPU, service). None of them looks at the telemetry reports.

Cleanups: every baseline empties the allocator cache after an OOM (it raises the service's
cleanup epoch, which frees the fragmentation waste in the world). accelerate and Lightning do
it explicitly (``clear_device_cache(garbage_collection=True)``, ``garbage_collection_cuda()``);
for a plain fixed-size service it stands for PyTorch's caching allocator, which releases its
cached blocks and retries before it raises an OOM. No baseline cleans up otherwise.

- ``fixed-4`` / ``fixed-max``: one batch size for good (4 is seed 003's baseline; max is the
  service's ``max_batch_size``). An OOM loses the batch; the next one has the same size.
- ``accelerate``: HuggingFace accelerate's ``find_executable_batch_size``
  (``accelerate/utils/memory.py``): start at ``starting_batch_size`` (here the service's
  ``max_batch_size``), and on each OOM empty the cache and go on with
  ``int(batch_size * 0.9)`` (the default ``reduce_batch_size_fn`` since accelerate 1.x;
  earlier releases halved). It never grows again. At 0 accelerate raises "No executable batch
  size found, reached zero": the service stops (batch 0, no items).
- ``lightning``: PyTorch Lightning's ``BatchSizeFinder(mode="binsearch")``
  (``lightning/pytorch/tuner/batch_size_scaling.py``, ``_run_binary_scaling``), run once when the
  service starts, in the live world (Lightning runs real trial steps, so its trial OOMs count):
  start at ``init_val`` = 2 (Lightning's default), double after each successful trial until
  an OOM or ``max_val`` (here ``max_batch_size``), then bisect between the last success and the
  failure until they are 1 apart, then keep ``int(found * (1 - margin))`` with ``margin`` = 0.05
  (Lightning 2.6's default; at least 1 here, Lightning has no such floor) for good. A trial
  runs ``steps_per_trial`` = 3 world steps; the service's polls are where it is judged, so a
  trial that does not fail lasts until the first poll at least 3 steps after it began (one
  polling interval with the defaults). An OOM during a trial fails it at once.
- ``oracle``: each step, the largest batch that fits (the world's own ``oracle_items``
  computation, :meth:`~optimizer.simulation.world.World.oracle_batch`), with a cleanup at every
  poll (cleanups cost nothing in the world model, so the ceiling takes them). It needs the world
  to poll every step (``World(poll_interval=scenario.step_s)``); its ``items`` then equal its
  own ``oracle_items`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optimizer.config import Settings
from optimizer.simulation.world import World

#: Baseline names, in the order tables list them.
BASELINES: tuple[str, ...] = ("fixed-4", "fixed-max", "accelerate", "lightning", "oracle")

FIXED_BATCH = 4  # seed 003's baseline: "Fixed batch size 4"
ACCELERATE_FACTOR = 0.9  # accelerate's default reduce_batch_size_fn: int(batch_size * 0.9)
LIGHTNING_INIT_VAL = 2  # BatchSizeFinder(init_val=2)
LIGHTNING_MAX_TRIALS = 25  # BatchSizeFinder(max_trials=25)
LIGHTNING_STEPS_PER_TRIAL = 3  # BatchSizeFinder(steps_per_trial=3)
LIGHTNING_MARGIN = 0.05  # BatchSizeFinder(margin=0.05), Lightning 2.6

Key = tuple[int, str]  # (GPU index, service name)


class _PerService:
    """The part every baseline shares: a state per (GPU, service) and a cleanup epoch per service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.epochs: dict[Key, int] = {}

    def max_batch(self, service: str) -> int:
        """The service's ``max_batch_size`` (its profile's, else the global setting)."""
        return self.settings.batch_limits(self.settings.profile(service))[1]

    def empty_cache(self, key: Key) -> None:
        self.epochs[key] = self.epochs.get(key, 0) + 1

    def epoch(self, key: Key) -> int:
        return self.epochs.get(key, 0)


class FixedLink(_PerService):
    """A fixed batch size: ``size`` items, or the service's ``max_batch_size`` when ``size`` is ``None``."""

    def __init__(self, settings: Settings, size: int | None) -> None:
        super().__init__(settings)
        self.size = size

    def _batch(self, service: str) -> int:
        return self.max_batch(service) if self.size is None else self.size

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        return self._batch(service), self.epoch((gpu, service))

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool) -> int:
        if oom:
            self.empty_cache((gpu, service))
        return self._batch(service)


class AccelerateLink(_PerService):
    """accelerate's ``find_executable_batch_size``: from ``max_batch_size``, ``int(b * 0.9)`` per OOM, never up."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batch: dict[Key, int] = {}

    def _current(self, key: Key) -> int:
        return self.batch.setdefault(key, self.max_batch(key[1]))

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        key = (gpu, service)
        return self._current(key), self.epoch(key)

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool) -> int:
        key = (gpu, service)
        if oom:
            self.empty_cache(key)
            self.batch[key] = int(self._current(key) * ACCELERATE_FACTOR)  # 0: accelerate gives up
        return self._current(key)


@dataclass
class _Search:
    """One service's binsearch, as in Lightning's ``_run_binary_scaling`` (sizes in items, times in s)."""

    size: int
    started_at: float
    low: int = 1
    high: int | None = None
    count: int = 0
    found: int | None = None  # set when the search is over: the size kept for good (margin applied)
    trials: list[tuple[float, int, bool]] = field(default_factory=list)  # (t, size, succeeded) per trial


class LightningLink(_PerService):
    """Lightning's ``BatchSizeFinder(mode="binsearch")``, searched once at the service's start, then fixed."""

    def __init__(self, settings: Settings, *, step_s: float) -> None:
        super().__init__(settings)
        self.trial_s = LIGHTNING_STEPS_PER_TRIAL * step_s
        self.searches: dict[Key, _Search] = {}

    def _finish(self, s: _Search, found: int) -> None:
        s.found = max(1, int(found * (1 - LIGHTNING_MARGIN)))

    def _succeeded(self, s: _Search, service: str, t: float) -> None:
        s.trials.append((t, s.size, True))
        s.count += 1
        if s.count > LIGHTNING_MAX_TRIALS:
            self._finish(s, s.size)
            return
        s.low = s.size
        if s.high is not None:
            if s.high - s.low <= 1:
                self._finish(s, s.low)
                return
            new = (s.high + s.low) // 2
        else:
            new = min(s.size * 2, self.max_batch(service))  # max_val
        if new == s.size:  # not changed: at max_val
            self._finish(s, s.size)
            return
        s.size, s.started_at = new, t

    def _failed(self, s: _Search, t: float) -> None:
        s.trials.append((t, s.size, False))
        s.high = s.size
        s.size, s.started_at = (s.high + s.low) // 2, t
        if s.high - s.low <= 1:
            self._finish(s, s.size)

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        key = (gpu, service)
        s = self.searches.get(key)
        if s is None:
            s = self.searches[key] = _Search(size=min(LIGHTNING_INIT_VAL, self.max_batch(service)), started_at=t)
        elif s.found is None and t - s.started_at >= self.trial_s - 1e-9:
            self._succeeded(s, service, t)
        return (s.size if s.found is None else s.found), self.epoch(key)

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool) -> int:
        key = (gpu, service)
        s = self.searches[key]  # a service polls before it runs anything
        if oom:
            self.empty_cache(key)
            if s.found is None:
                self._failed(s, t)
        return s.size if s.found is None else s.found


class OracleLink(_PerService):
    """The ceiling: at every poll, the largest batch that fits, after a cleanup (see the module docstring)."""

    def __init__(self, settings: Settings, world: World) -> None:
        super().__init__(settings)
        self.world = world

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        key = (gpu, service)
        self.empty_cache(key)
        return self.world.oracle_batch(service, gpu, t, fragmentation=0.0), self.epoch(key)

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool) -> int:
        if oom:  # not expected: the oracle's batch fits the jitter at its worst
            self.empty_cache((gpu, service))
        return self.world.oracle_batch(service, gpu, t)


Link = FixedLink | AccelerateLink | LightningLink | OracleLink


def make_link(name: str, settings: Settings, world: World) -> Link:
    """The baseline called ``name`` (one of :data:`BASELINES`) for ``world``; ``KeyError`` for others."""
    makers: dict[str, Callable[[], Link]] = {
        "fixed-4": lambda: FixedLink(settings, FIXED_BATCH),
        "fixed-max": lambda: FixedLink(settings, None),
        "accelerate": lambda: AccelerateLink(settings),
        "lightning": lambda: LightningLink(settings, step_s=world.scenario.step_s),
        "oracle": lambda: OracleLink(settings, world),
    }
    return makers[name]()


def poll_interval(name: str, world_step_s: float, interval_s: float) -> float:
    """How often the services poll under baseline ``name`` (seconds): every step for the oracle."""
    return world_step_s if name == "oracle" else interval_s


def lightning_search(link: Link, gpu: int, service: str) -> tuple[int | None, list[tuple[float, int, bool]]]:
    """The size a :class:`LightningLink` kept for a service (``None`` while searching) and its trials."""
    if not isinstance(link, LightningLink) or (gpu, service) not in link.searches:
        return None, []
    s = link.searches[(gpu, service)]
    return s.found, list(s.trials)
