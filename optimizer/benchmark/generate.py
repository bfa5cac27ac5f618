"""Scenario families: many random scenarios drawn from one documented distribution.

``generate(n, seed)`` draws scenarios ``gen-<seed>-0000`` to ``gen-<seed>-<n-1>``. Scenario ``i``
is drawn from its own ``random.Random(f"{seed}-{i}")`` alone, so the same ``(seed, i)`` gives the
same scenario whatever ``n``. The distribution (also in docs/benchmarks.md, "Scenario families");
``U(a, b)`` is uniform, memory is MiB, times are whole seconds unless said otherwise:

- **Scenario.** ``duration_s`` 3600, ``step_s`` 1.0, the world's ``seed`` drawn from the scenario's
  generator (``randrange(2**31)``). ``oom_mode`` as asked (``recover`` or ``crash``); with ``crash``,
  ``restart_s`` U(30, 120). ``oom_recovery_s`` and ``cleanup_stall_s`` at their defaults.
- **GPUs.** 1 (70 %) or 2 (30 %) of one model (a node's GPUs are alike), drawn uniformly from
  :data:`GPU_CATALOG` (24 GB to 141 GB, the names and the memory nvidia-smi reports, " (simulated)"
  added), each with its own ``idle_temperature_c`` U(30, 40) (0.1 °C) and ``load_temperature_rise_c``
  U(25, 35) (0.1 °C), the board's ``power_limit_w``.
- **Services per GPU.** 1 (50 %), 2 (35 %), 3 (15 %), names drawn from :data:`SERVICE_NAMES`, unique per
  GPU. With 2 GPUs, in 50 % of the scenarios one service runs on both (at a random position on GPU 1):
  the same model, so the same numbers on both but for ``start_s``; otherwise the two GPUs share no name.
- **Per service.** ``weight`` 1 (70 %) or 2 (30 %); ``max_batch_size`` one of 16, 32, 64, 128;
  ``base_mb`` U(15 %, 45 %) of ``total_mb / k`` (``k`` services on the GPU, whole MiB); ``noise``
  U(0, 0.15) (3 decimals); a target batch ``b*`` log-uniform in [3, 96] (an integer), a slack ``u``
  U(0, 1), and ``per_item_mb = share / ((b* + u) * (1 + noise))`` (0.1 MiB, rounded down) where
  ``share`` is the safety bound (``total_mb * 0.95 - 1024``) less every base on the GPU, times
  ``weight / sum of weights``: ``b*`` is the largest batch that fits the service's share by weight with
  the jitter at its worst and no co-tenant, with ``u`` of an item to spare (not none: a share that
  holds its batch exactly is a knife edge no estimate can match).
  ``declared_per_item_mb = per_item_mb * U(0.6, 1.4)`` (0.1 MiB); ``item_ms`` U(10, 80) and
  ``overhead_ms`` U(30, 200) (0.1 ms); ``fragmentation_growth_per_min`` 0 (40 %) else U(0, 0.03)
  (4 decimals); ``load_s`` U(5, 60) (its weights load over it at every start).
- **Drift.** 20 % of services leak: ``leak_mb_per_min`` U(5, 50) (0.1). Independently 20 % change their
  per-item memory once: ``per_item_changes`` one change at U(600, 3000) s to ``per_item_mb * U(0.7, 1.4)``.
- **Late starters.** Each service after the first on a GPU starts at ``start_s`` U(60, 1800) with
  probability 30 %, else at 0.
- **Co-tenants** (``background``). Per GPU 0 (30 %), 1 (50 %) or 2 (20 %), each of one kind (25 % each),
  ``mb`` U(5 %, 40 %) of ``total_mb`` (whole MiB), arriving at ``at_s`` U(0, 3000) except the resident:
  ``sudden`` (``ramp_s`` 0; stays, or leaves after ``for_s`` U(120, 1200), 50 % each), ``ramped``
  (``ramp_s`` U(30, 300); ``for_s`` as sudden), ``bursting`` (``every_s`` U(60, 600), ``for_s`` U(10 %,
  40 %) of ``every_s``, ``ramp_s`` 0), ``resident`` (there from ``at_s`` 0 for good, ``ramp_s`` 0).
- **Heat.** 20 % of GPUs get a thermal event: ``celsius`` U(15, 35) (0.1 °C) from ``at_s`` U(300, 2400)
  for ``for_s`` U(300, 900), ``ramp_s`` U(0, 120).
- **Feasible at batch 1.** On every GPU the services at batch 1, each ``base_mb`` + its largest leak over
  the hour (from its start) + its largest per-item memory times ``1 + noise``, plus the largest sum of
  co-tenant memory that can be there at once (every stay counted at its full ``mb`` from its arrival
  to its end), fit the safety bound ``total_mb * 0.95 - 1024`` (the defaults of
  ``memory_threshold_oom`` and ``memory_reserve_mb``). A draw that does not fit has its co-tenants
  shrunk (all by one factor; one shrunk to 0 MiB is dropped) and, when the services alone do not
  fit, its co-tenants dropped and its bases shrunk by one factor. So a co-tenant may end up below
  5 % of ``total_mb`` and a base below 15 % of its share.

**Unavoidable OOMs** (:func:`unavoidable_ooms`): a sudden arrival of memory costs each service already
running on that GPU one OOM whatever the policy does. Sudden arrivals are a co-tenant's arrivals with
``ramp_s`` < 10 s (every occurrence of a bursting one), and the start of a service. A service counts as
running at ``t`` when its ``start_s`` < ``t``: a co-tenant there at 0 next to services starting at 0
counts 0, a service starting at 900 next to one running counts 1. Arrivals at or after the run's end
do not count.

This module stays one file of about 400 lines on purpose: a fifth of it is the distribution above, which
must stay next to the code that draws it, checks it and counts its unavoidable OOMs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from optimizer.config import Settings
from optimizer.simulation.scenario import OOM_MODES, Background, Scenario, SimGpu, SimService, Thermal, scenario_to_dict

DURATION_S = 3600.0  # every generated scenario's length; feasibility is always checked over it
STEP_S = 1.0
_DEFAULTS = Settings()
SAFE_FRACTION = _DEFAULTS.memory_threshold_oom  # the bound the distribution assumes: the defaults' (0.95 ...
RESERVE_MB = float(_DEFAULTS.memory_reserve_mb)  # ... and 1024 MiB)
SUDDEN_RAMP_S = 10.0  # an arrival that ramps over less than this is sudden
MAX_SCENARIOS = 10_000


@dataclass(frozen=True)
class GpuModel:
    """A board of the catalog: its name, the memory nvidia-smi reports (MiB), its power limit (W)."""

    name: str
    total_mb: float
    power_limit_w: float


#: The GPUs drawn from, 24 GB to 141 GB.
GPU_CATALOG: tuple[GpuModel, ...] = (
    GpuModel("NVIDIA L4", 23034, 72),
    GpuModel("NVIDIA A10", 23028, 150),
    GpuModel("NVIDIA GeForce RTX 4090", 24564, 450),
    GpuModel("NVIDIA A100-SXM4-40GB", 40960, 400),
    GpuModel("NVIDIA L40S", 46068, 350),
    GpuModel("NVIDIA A100-SXM4-80GB", 81920, 400),
    GpuModel("NVIDIA H100 80GB HBM3", 81559, 700),
    GpuModel("NVIDIA H200", 143771, 700),
)
#: The service names drawn from (unique per GPU).
SERVICE_NAMES: tuple[str, ...] = ("captioner", "vqa", "ocr", "grounding", "chart-qa", "doc-reader",
                                  "video-caption", "visual-search")
MAX_BATCH_SIZES: tuple[int, ...] = (16, 32, 64, 128)
COTENANT_KINDS: tuple[str, ...] = ("sudden", "ramped", "bursting", "resident")


@dataclass(frozen=True)
class GeneratedScenario:
    """A drawn scenario and the OOMs no policy can avoid in it (in all, and per GPU index)."""

    scenario: Scenario
    unavoidable_ooms: int
    unavoidable_by_gpu: dict[int, int]


@dataclass
class _Draft:
    """One service while it is drawn: what is known before the GPU's per-item shares are."""

    name: str
    weight: float
    max_batch_size: int
    base_mb: float
    target_batch: int
    slack: float  # the fraction of one more item the service's share holds beyond its target batch
    noise: float
    item_ms: float
    overhead_ms: float
    fragmentation: float
    start_s: float
    leak_mb_per_min: float
    change: tuple[float, float] | None  # (at_s, factor on per_item_mb)
    declared_factor: float
    load_s: float


def _u(rng: random.Random, lo: float, hi: float, digits: int = 0) -> float:
    """U(lo, hi) rounded to ``digits`` decimals (whole numbers at 0), as a float."""
    return float(round(rng.uniform(lo, hi), digits))


def _pick(rng: random.Random, choices: Sequence[tuple[float, int]]) -> int:
    """One of ``choices`` ``(probability, value)``: the probabilities add up to 1."""
    x = rng.random()
    for p, value in choices:
        if x < p:
            return value
        x -= p
    return choices[-1][1]


def safe_bound_mb(total_mb: float) -> float:
    """The safety bound of a GPU with the default settings: ``total_mb * 0.95 - 1024`` (MiB)."""
    return total_mb * SAFE_FRACTION - RESERVE_MB


def _gpu(rng: random.Random, index: int, model: GpuModel) -> SimGpu:
    return SimGpu(index=index, name=f"{model.name} (simulated)", total_mb=float(model.total_mb),
                  idle_temperature_c=_u(rng, 30, 40, 1), power_limit_w=float(model.power_limit_w),
                  load_temperature_rise_c=_u(rng, 25, 35, 1))


def _names(rng: random.Random, counts: list[int]) -> list[list[str]]:
    """Service names per GPU: unique per GPU; on two GPUs one name shared in 50 % of the draws."""
    first = rng.sample(SERVICE_NAMES, counts[0])
    if len(counts) == 1:
        return [first]
    rest = [n for n in SERVICE_NAMES if n not in first]
    if rng.random() < 0.5:
        second = rng.sample(rest, counts[1] - 1)
        second.insert(rng.randrange(counts[1]), rng.choice(first))
    else:
        second = rng.sample(rest, counts[1])
    return [first, second]


def _draft(rng: random.Random, name: str, total_mb: float, k: int, late_ok: bool,
           profile: tuple[float, int] | None) -> _Draft:
    """Draw one service of ``k`` on a GPU of ``total_mb``; ``profile`` (weight, max batch) forced for a shared name."""
    weight = 2.0 if rng.random() < 0.3 else 1.0
    max_batch = rng.choice(MAX_BATCH_SIZES)
    if profile is not None:
        weight, max_batch = profile
    base = _u(rng, 0.15, 0.45, 6) * total_mb / k
    target = int(round(math.exp(rng.uniform(math.log(3), math.log(96)))))
    noise = _u(rng, 0, 0.15, 3)
    item_ms, overhead_ms = _u(rng, 10, 80, 1), _u(rng, 30, 200, 1)
    fragmentation = 0.0 if rng.random() < 0.4 else _u(rng, 0, 0.03, 4)
    start = _u(rng, 60, 1800) if late_ok and rng.random() < 0.3 else 0.0
    leak = _u(rng, 5, 50, 1) if rng.random() < 0.2 else 0.0
    change = (_u(rng, 600, 3000), rng.uniform(0.7, 1.4)) if rng.random() < 0.2 else None
    return _Draft(name=name, weight=weight, max_batch_size=max_batch, base_mb=float(math.floor(base)),
                  target_batch=min(96, max(3, target)), slack=rng.random(), noise=noise, item_ms=item_ms,
                  overhead_ms=overhead_ms,
                  fragmentation=fragmentation, start_s=start, leak_mb_per_min=leak, change=change,
                  declared_factor=rng.uniform(0.6, 1.4), load_s=_u(rng, 5, 60))


def _services(drafts: list[_Draft], gpu: SimGpu, shared: dict[str, SimService]) -> list[SimService]:
    """The drafts of one GPU as services: each per-item memory from its share of what the bases leave.

    A name in ``shared`` (drawn on the first GPU) is the same model here: its numbers are copied.
    """
    avail = safe_bound_mb(gpu.total_mb) - sum(shared[d.name].base_mb if d.name in shared else d.base_mb
                                              for d in drafts)
    weights = sum(d.weight for d in drafts)
    out = []
    for d in drafts:
        if d.name in shared:
            out.append(dataclasses.replace(shared[d.name], gpu=gpu.index, start_s=d.start_s))
            continue
        share = avail * d.weight / weights
        per_item = math.floor(share / ((d.target_batch + d.slack) * (1 + d.noise)) * 10) / 10
        changes = () if d.change is None else ((d.change[0], round(per_item * d.change[1], 1)),)
        out.append(SimService(
            name=d.name, gpu=gpu.index, base_mb=d.base_mb, per_item_mb=per_item, item_ms=d.item_ms,
            overhead_ms=d.overhead_ms, noise=d.noise, fragmentation_growth_per_min=d.fragmentation,
            declared_per_item_mb=round(per_item * d.declared_factor, 1), start_s=d.start_s, weight=d.weight,
            max_batch_size=d.max_batch_size, leak_mb_per_min=d.leak_mb_per_min, per_item_changes=changes,
            load_s=d.load_s))
    return out


def _cotenant(rng: random.Random, gpu: SimGpu) -> Background:
    kind = rng.choice(COTENANT_KINDS)
    mb = _u(rng, 0.05 * gpu.total_mb, 0.40 * gpu.total_mb)
    if kind == "resident":
        return Background(gpu=gpu.index, at_s=0.0, mb=mb)
    at = _u(rng, 0, 3000)
    if kind == "bursting":
        every = _u(rng, 60, 600)
        return Background(gpu=gpu.index, at_s=at, mb=mb, for_s=max(1.0, _u(rng, 0.1 * every, 0.4 * every)),
                          every_s=every)
    ramp = _u(rng, 30, 300) if kind == "ramped" else 0.0
    for_s = None if rng.random() < 0.5 else _u(rng, 120, 1200)
    return Background(gpu=gpu.index, at_s=at, mb=mb, for_s=for_s, ramp_s=ramp)


def _thermal(rng: random.Random, gpu: SimGpu) -> tuple[Thermal, ...]:
    if rng.random() >= 0.2:
        return ()
    return (Thermal(gpu=gpu.index, celsius=_u(rng, 15, 35, 1), at_s=_u(rng, 300, 2400), for_s=_u(rng, 300, 900),
                    ramp_s=_u(rng, 0, 120)),)


# ---------------------------------------------------------------------------------------------- feasibility


def services_need_mb(services: Sequence[SimService], hour_s: float = DURATION_S) -> float:
    """What services need at batch 1 at worst over ``hour_s`` seconds (MiB).

    Each: ``base_mb`` + its leak from its start to ``hour_s`` + its largest per-item memory times ``1 + noise``.
    """
    return sum(s.base_mb + s.leak_mb_per_min * max(0.0, hour_s - s.start_s) / 60
               + max([s.per_item_mb, *(mb for _, mb in s.per_item_changes)]) * (1 + s.noise) for s in services)


def stays(b: Background, until_s: float) -> list[tuple[float, float]]:
    """A co-tenant's stays ``(start, end)`` that begin before ``until_s`` (seconds; end ``inf``: for good)."""
    end = math.inf if b.for_s is None else b.for_s
    if b.every_s is None:
        return [(b.at_s, b.at_s + end)] if b.at_s < until_s else []
    count = max(0, math.ceil((until_s - b.at_s) / b.every_s))
    return [(b.at_s + k * b.every_s, b.at_s + k * b.every_s + end) for k in range(count)]


def cotenant_peak_mb(backgrounds: Sequence[Background], until_s: float = DURATION_S) -> float:
    """The most co-tenant memory there at once before ``until_s`` (MiB), each stay at its full ``mb`` (an upper bound)."""
    spans = [(start, end, b.mb) for b in backgrounds for start, end in stays(b, until_s)]
    return max((sum(mb for s, e, mb in spans if s <= t < e) for t, _, _ in spans), default=0.0)


def gpu_feasible(gpu: SimGpu, services: Sequence[SimService], backgrounds: Sequence[Background]) -> bool:
    """Whether the GPU's services at batch 1 and its co-tenants' peak fit its safety bound (see the module docstring)."""
    return services_need_mb(services) + cotenant_peak_mb(backgrounds) <= safe_bound_mb(gpu.total_mb) + 1e-6


def feasible(scenario: Scenario) -> bool:
    """Whether every GPU of ``scenario`` is feasible at batch 1 (:func:`gpu_feasible`)."""
    return all(gpu_feasible(g, [s for s in scenario.services if s.gpu == g.index],
                            [b for b in scenario.background if b.gpu == g.index]) for g in scenario.gpus)


def _make_feasible(gpu: SimGpu, services: list[SimService],
                   backgrounds: list[Background]) -> tuple[list[SimService], list[Background]]:
    """Shrink the co-tenants, then (when the services alone do not fit) drop them and shrink the bases."""
    safe = safe_bound_mb(gpu.total_mb)
    need = services_need_mb(services)
    peak = cotenant_peak_mb(backgrounds)
    if need + peak <= safe:
        return services, backgrounds
    if need < safe:
        scale = (safe - need) / peak
        shrunk = [dataclasses.replace(b, mb=float(math.floor(b.mb * scale))) for b in backgrounds]
        backgrounds = [b for b in shrunk if b.mb > 0]
    else:
        bases = sum(s.base_mb for s in services)
        scale = max(0.0, (bases - (need - safe)) / bases) if bases else 0.0
        services = [dataclasses.replace(s, base_mb=float(math.floor(s.base_mb * scale))) for s in services]
        backgrounds = []
    if not gpu_feasible(gpu, services, backgrounds):
        raise RuntimeError(f"GPU {gpu.index}: the drawn services do not fit at batch 1 even without bases")
    return services, backgrounds


# ---------------------------------------------------------------------------------------------- unavoidable OOMs


def _running(services: Sequence[SimService], t: float) -> int:
    return sum(1 for s in services if s.start_s < t)


def unavoidable_ooms(scenario: Scenario, duration_s: float | None = None) -> dict[int, int]:
    """Per GPU index, the OOMs sudden arrivals cost the services already running (see the module docstring).

    ``duration_s`` (default: the scenario's) ends the count: later arrivals do not count.
    """
    until = scenario.duration_s if duration_s is None else duration_s
    out = {}
    for g in scenario.gpus:
        services = [s for s in scenario.services if s.gpu == g.index]
        count = sum(_running(services, s.start_s) for s in services if s.start_s < until)
        for b in scenario.background:
            if b.gpu == g.index and b.ramp_s < SUDDEN_RAMP_S:
                count += sum(_running(services, start) for start, _ in stays(b, until))
        out[g.index] = count
    return out


# ---------------------------------------------------------------------------------------------- the family


def generate_one(seed: int, i: int, *, oom_mode: str = "recover", duration_s: float = DURATION_S) -> GeneratedScenario:
    """Scenario ``i`` of family ``seed`` (the distribution in the module docstring).

    ``duration_s`` (seconds, at most 3600) shortens the run: the scenario is the same but for its
    ``duration_s``, and only arrivals before it count as unavoidable.
    """
    rng = random.Random(f"{seed}-{i}")
    world_seed = rng.randrange(1 << 31)
    model = rng.choice(GPU_CATALOG)
    gpus = [_gpu(rng, index, model) for index in range(1 if rng.random() < 0.7 else 2)]
    counts = [_pick(rng, ((0.5, 1), (0.35, 2), (0.15, 3))) for _ in gpus]
    services: list[SimService] = []
    background: list[Background] = []
    thermal: list[Thermal] = []
    profiles: dict[str, tuple[float, int]] = {}
    shared: dict[str, SimService] = {}
    for gpu, names in zip(gpus, _names(rng, counts)):
        drafts = [_draft(rng, name, gpu.total_mb, len(names), position > 0, profiles.get(name))
                  for position, name in enumerate(names)]
        profiles.update({d.name: (d.weight, d.max_batch_size) for d in drafts})
        mine = _services(drafts, gpu, {n: s for n, s in shared.items() if n in names})
        bgs = [_cotenant(rng, gpu) for _ in range(_pick(rng, ((0.3, 0), (0.5, 1), (0.2, 2))))]
        mine, bgs = _make_feasible(gpu, mine, bgs)
        shared.update({s.name: s for s in mine if not shared})
        services += mine
        background += bgs
        thermal += _thermal(rng, gpu)
    restart = _u(rng, 30, 120) if oom_mode == "crash" else 60.0
    sc = Scenario(name=f"gen-{seed}-{i:04d}", seed=world_seed, duration_s=float(duration_s), step_s=STEP_S,
                  gpus=tuple(gpus), services=tuple(services), background=tuple(background), thermal=tuple(thermal),
                  oom_mode=oom_mode, restart_s=restart)
    by_gpu = unavoidable_ooms(sc)
    return GeneratedScenario(scenario=sc, unavoidable_ooms=sum(by_gpu.values()), unavoidable_by_gpu=by_gpu)


def generate(n: int, seed: int, *, oom_mode: str = "recover", duration_s: float = DURATION_S) -> list[GeneratedScenario]:
    """``n`` scenarios (1 to 10,000) of family ``seed``; the same arguments always give the same scenarios.

    Raises ``ValueError`` for ``n`` out of range, an ``oom_mode`` other than recover or crash, or a
    ``duration_s`` (seconds) outside (0, 3600].
    """
    if isinstance(n, bool) or not 1 <= n <= MAX_SCENARIOS:
        raise ValueError(f"n must be an integer in [1, {MAX_SCENARIOS}], got {n!r}")
    if oom_mode not in OOM_MODES:
        raise ValueError(f"oom_mode must be one of {', '.join(OOM_MODES)}, got {oom_mode!r}")
    if not 0 < duration_s <= DURATION_S:
        raise ValueError(f"duration_s must be in (0, {DURATION_S:g}], got {duration_s!r}")
    return [generate_one(seed, i, oom_mode=oom_mode, duration_s=duration_s) for i in range(n)]


def _header(g: GeneratedScenario) -> str:
    per_gpu = ", ".join(f"GPU {k}: {v}" for k, v in sorted(g.unavoidable_by_gpu.items()))
    return (f"# {g.scenario.name}: {g.unavoidable_ooms} unavoidable OOM(s) ({per_gpu}); drawn by "
            f"optimizer/benchmark/generate.py (docs/benchmarks.md, Scenario families)\n")


def write_scenarios(generated: Sequence[GeneratedScenario], folder: str | Path) -> list[Path]:
    """Write each scenario to ``folder/<name>.yaml`` (the folder is created) and return the paths.

    A file starts with a comment giving its unavoidable OOMs; ``load_scenario`` reads it back equal.
    Raises ``OSError`` when the folder or a file cannot be written.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in generated:
        path = out / f"{g.scenario.name}.yaml"
        body = yaml.safe_dump(scenario_to_dict(g.scenario), sort_keys=False, default_flow_style=None, width=1000)
        path.write_text(_header(g) + body, encoding="utf-8")
        paths.append(path)
    return paths
