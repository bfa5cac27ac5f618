"""The baselines the strategies are measured against, each a :class:`~optimizer.simulation.world.ServiceLink`.

A baseline stands where the optimizer stands: the simulated services poll it for their batch size
and report their OOMs to it, in the same world (:mod:`optimizer.simulation.world`) as the
strategies, so items, OOMs and the oracle measures are computed the same way for both. Each keeps
a small state machine per (GPU, service), which is lost when the service's process restarts
(``started``: a crash in ``oom_mode: crash``, or a start-up that failed). None of them looks at the
telemetry reports.

Cleanups: every baseline empties the allocator cache after an OOM (it raises the service's
cleanup epoch, which frees the fragmentation waste in the world, at the world's cleanup stall).
accelerate and Lightning do it explicitly (``clear_device_cache(garbage_collection=True)``,
``garbage_collection_cuda()``); for a plain fixed-size service it stands for PyTorch's caching
allocator, which releases its cached blocks and retries before it raises an OOM. No baseline
cleans up otherwise.

- ``fixed-4`` / ``fixed-max``: one batch size for good (4 is seed 003's baseline; max is the
  service's ``max_batch_size``). An OOM loses the batch; the next one has the same size.
- ``accelerate``: HuggingFace accelerate's ``find_executable_batch_size``
  (``src/accelerate/utils/memory.py``): start at ``starting_batch_size`` (its default 128, here at
  most the service's ``max_batch_size``), and on each OOM empty the cache and go on with
  ``int(batch_size * 0.9)`` (the default ``reduce_batch_size_fn`` since accelerate 1.x; earlier
  releases halved). It never grows again. At 0 accelerate raises "No executable batch size found,
  reached zero": the service stops (batch 0, no items). A restarted process starts at 128 again.
- ``lightning`` and ``lightning-binsearch``: PyTorch Lightning's ``BatchSizeFinder`` in its
  default ``mode="power"`` and in ``mode="binsearch"`` (``src/lightning/pytorch/tuner/
  batch_size_scaling.py``, ``_run_power_scaling`` and ``_run_binary_scaling``), run when the
  service starts, in the live world (Lightning runs real trial steps, so its trial OOMs count).
  Both start at ``init_val`` = 2 and double after each successful trial, up to ``max_val`` (here
  ``max_batch_size``). ``power`` stops at the first OOM and keeps half the size that failed (the
  last success). ``binsearch`` bisects between the last success and the failure until they are 1
  apart, then keeps ``int(found * (1 - margin))`` with ``margin`` = 0.05 (Lightning 2.6; the
  margin applies to binsearch only; at least 1 here, Lightning has no such floor). A trial runs
  ``steps_per_trial`` = 3 world steps; the service's polls are where it is judged, so a trial that
  does not fail lasts until the first poll at least 3 steps after it began. An OOM during a trial
  fails it at once. The size found is kept for good; a restarted process searches again.
- ``vllm``: a vLLM-style static reservation (``gpu_memory_utilization`` = 0.9, vLLM's default:
  ``determine_available_memory`` in ``vllm/v1/worker/gpu_worker.py`` sizes the KV cache to
  ``total * gpu_memory_utilization`` minus the profiled peak, and the engine refuses to start when
  less than that is free: "Free memory on device ... on startup is less than desired GPU memory
  utilization"). At start the service reserves 0.9 of the whole GPU's memory (split by weight
  when several services share the GPU, as their operator would configure them) and holds it for
  good. Its batch is sized once, at start, to what fits in the reservation at the worst per-item
  memory (vLLM's profiling run uses the largest inputs), up to ``max_batch_size`` (its
  ``max_num_seqs``); it never grows or shrinks. The services of this world run fixed batches, so
  vLLM's continuous batching, which admits requests step by step as blocks free up, is not
  modelled; if the items outgrow the reservation (per-item memory that changes), it runs as many
  as fit, as preemption would. If less than its reservation is free at start, the start fails
  and is retried after the back-off.
- ``oracle``: each step, the largest batch that fits (the world's own ``oracle_items``
  computation, :meth:`~optimizer.simulation.world.World.oracle_batch`), with a cleanup at every
  poll that costs nothing (the benchmark runs it with ``cleanup_stall_s`` 0: it is a ceiling, not a
  policy). It needs the world to poll every step (``World(poll_interval=scenario.step_s)``); its
  ``items`` then equal its own ``oracle_items`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from optimizer.config import Settings
from optimizer.simulation.world import Start, World

#: Baseline names, in the order tables list them.
BASELINES: tuple[str, ...] = ("fixed-4", "fixed-max", "accelerate", "lightning", "lightning-binsearch", "vllm",
                              "oracle")

FIXED_BATCH = 4  # seed 003's baseline: "Fixed batch size 4"
ACCELERATE_START = 128  # find_executable_batch_size(starting_batch_size=128)
ACCELERATE_FACTOR = 0.9  # accelerate's default reduce_batch_size_fn: int(batch_size * 0.9)
VLLM_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
LIGHTNING_INIT_VAL = 2  # BatchSizeFinder(init_val=2)
LIGHTNING_MAX_TRIALS = 25  # BatchSizeFinder(max_trials=25)
LIGHTNING_STEPS_PER_TRIAL = 3  # BatchSizeFinder(steps_per_trial=3)
LIGHTNING_MARGIN = 0.05  # BatchSizeFinder(margin=0.05), Lightning 2.6

Key = tuple[int, str]  # (GPU index, service name)


class _PerService:
    """The part every baseline shares: a state per (GPU, service) and a cleanup epoch per service.

    A poll answers :meth:`current`; an OOM report empties the cache, then :meth:`on_oom` reacts, and
    the reply is :meth:`current` again.
    """

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

    def started(self, service: str, gpu: int, t: float, *, free_mb: float, total_mb: float) -> Start | None:
        """A (re)started process: what it kept in memory is gone."""
        self.forget((gpu, service))
        return None

    def forget(self, key: Key) -> None:
        """Drop what the service's process decided (nothing for a fixed batch)."""

    def current(self, key: Key) -> int:
        """The batch the service's process runs now."""
        raise NotImplementedError

    def on_oom(self, key: Key, t: float) -> None:
        """What the baseline does on an OOM, after emptying the cache (nothing: the same batch again)."""

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        key = (gpu, service)
        return self.current(key), self.epoch(key)

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool,
               inactive_split_bytes: int | None = None) -> int:
        key = (gpu, service)
        if oom:
            self.empty_cache(key)
            self.on_oom(key, t)
        return self.current(key)


class FixedLink(_PerService):
    """A fixed batch size: ``size`` items, or the service's ``max_batch_size`` when ``size`` is ``None``."""

    def __init__(self, settings: Settings, size: int | None) -> None:
        super().__init__(settings)
        self.size = size

    def current(self, key: Key) -> int:
        return self.max_batch(key[1]) if self.size is None else self.size


class AccelerateLink(_PerService):
    """accelerate's ``find_executable_batch_size``: from 128 (at most ``max_batch_size``), ``int(b * 0.9)`` per OOM."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batch: dict[Key, int] = {}

    def current(self, key: Key) -> int:
        return self.batch.setdefault(key, min(ACCELERATE_START, self.max_batch(key[1])))

    def forget(self, key: Key) -> None:
        self.batch.pop(key, None)

    def on_oom(self, key: Key, t: float) -> None:
        self.batch[key] = int(self.current(key) * ACCELERATE_FACTOR)  # 0: accelerate gives up


@dataclass
class _Search:
    """One service's search, as in Lightning's ``_run_power_scaling`` / ``_run_binary_scaling`` (items, s)."""

    size: int
    started_at: float
    any_success: bool = False  # power mode: a trial succeeded before
    low: int = 1
    high: int | None = None
    count: int = 0
    found: int | None = None  # set when the search is over: the size kept for good (margin applied)
    trials: list[tuple[float, int, bool]] = field(default_factory=list)  # (t, size, succeeded) per trial


class LightningLink(_PerService):
    """Lightning's ``BatchSizeFinder`` (``mode`` ``power`` or ``binsearch``), searched at the service's start, then fixed."""

    def __init__(self, settings: Settings, *, step_s: float, mode: str = "power") -> None:
        super().__init__(settings)
        if mode not in ("power", "binsearch"):
            raise ValueError(f"mode must be power or binsearch, got {mode!r}")
        self.mode = mode
        self.trial_s = LIGHTNING_STEPS_PER_TRIAL * step_s
        self.searches: dict[Key, _Search] = {}

    def forget(self, key: Key) -> None:
        self.searches.pop(key, None)

    def _finish(self, s: _Search, found: int) -> None:
        margin = LIGHTNING_MARGIN if self.mode == "binsearch" else 0.0
        s.found = max(1, int(found * (1 - margin)))

    def _succeeded(self, s: _Search, service: str, t: float) -> None:
        s.trials.append((t, s.size, True))
        s.count += 1
        if self.mode == "power":  # _run_power_scaling: double until an OOM, at most max_trials trials
            new = min(s.size * 2, self.max_batch(service))  # max_val
            if new == s.size:  # not changed: at max_val
                self._finish(s, s.size)
                return
            s.any_success = True
            s.size, s.started_at = new, t
            if s.count >= LIGHTNING_MAX_TRIALS:
                self._finish(s, s.size)
            return
        if s.count > LIGHTNING_MAX_TRIALS:  # _run_binary_scaling
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
        if self.mode == "power":  # half the size that failed; stop if anything succeeded before
            s.count += 1
            half = max(1, int(s.size * 0.5))
            if s.any_success or s.count >= LIGHTNING_MAX_TRIALS or half == s.size:
                self._finish(s, half)
            else:
                s.size, s.started_at = half, t
            return
        s.high = s.size
        s.size, s.started_at = (s.high + s.low) // 2, t
        if s.high - s.low <= 1:
            self._finish(s, s.size)

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        key = (gpu, service)
        s = self.searches.get(key)
        if s is None:
            self.searches[key] = _Search(size=min(LIGHTNING_INIT_VAL, self.max_batch(service)), started_at=t)
        elif s.found is None and t - s.started_at >= self.trial_s - 1e-9:
            self._succeeded(s, service, t)
        return super().poll(service, gpu, t)

    def current(self, key: Key) -> int:
        s = self.searches[key]  # a service polls before it runs anything
        return s.size if s.found is None else s.found

    def on_oom(self, key: Key, t: float) -> None:
        s = self.searches[key]
        if s.found is None:
            self._failed(s, t)


class VllmLink(_PerService):
    """A vLLM-style static reservation: 0.9 of the GPU reserved at start, the batch sized once to fit it."""

    def __init__(self, settings: Settings, world: World) -> None:
        super().__init__(settings)
        self.world = world
        self.batch: dict[Key, int] = {}

    def forget(self, key: Key) -> None:
        self.batch.pop(key, None)

    def _share(self, service: str, gpu: int) -> float:
        on_gpu = [s for s in self.world.scenario.services if s.gpu == gpu]
        mine = sum(s.weight for s in on_gpu if s.name == service)
        return mine / sum(s.weight for s in on_gpu) if on_gpu else 1.0

    def started(self, service: str, gpu: int, t: float, *, free_mb: float, total_mb: float) -> Start | None:
        key = (gpu, service)
        self.forget(key)
        pool = total_mb * VLLM_GPU_MEMORY_UTILIZATION * self._share(service, gpu)
        if free_mb < pool:  # "Free memory on device ... on startup is less than desired GPU memory utilization"
            return Start(failed=True)
        # The profiling run measures the largest items: the batch is what fits at the worst per-item memory.
        spec = next(s for s in self.world.scenario.services if s.gpu == gpu and s.name == service)
        worst = spec.per_item_at(t) * (1 + spec.noise)
        self.batch[key] = max(0, min(self.max_batch(service), int((pool - spec.base_mb) // worst)))
        return Start(pool_mb=pool)

    def current(self, key: Key) -> int:
        return self.batch.get(key, 0)


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
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool,
               inactive_split_bytes: int | None = None) -> int:
        if oom:  # not expected: the oracle's batch fits the jitter at its worst
            self.empty_cache((gpu, service))
        return self.world.oracle_batch(service, gpu, t)


Link = FixedLink | AccelerateLink | LightningLink | VllmLink | OracleLink


def make_link(name: str, settings: Settings, world: World) -> Link:
    """The baseline called ``name`` (one of :data:`BASELINES`) for ``world``; ``KeyError`` for others."""
    makers: dict[str, Callable[[], Link]] = {
        "fixed-4": lambda: FixedLink(settings, FIXED_BATCH),
        "fixed-max": lambda: FixedLink(settings, None),
        "accelerate": lambda: AccelerateLink(settings),
        "lightning": lambda: LightningLink(settings, step_s=world.scenario.step_s, mode="power"),
        "lightning-binsearch": lambda: LightningLink(settings, step_s=world.scenario.step_s, mode="binsearch"),
        "vllm": lambda: VllmLink(settings, world),
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
