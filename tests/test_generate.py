"""Scenario families (optimizer/benchmark/generate.py): determinism, the documented ranges, feasibility
at batch 1, the unavoidable OOM count, and the files written."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from optimizer.benchmark.generate import (
    GPU_CATALOG,
    MAX_BATCH_SIZES,
    SERVICE_NAMES,
    GeneratedScenario,
    cotenant_peak_mb,
    feasible,
    generate,
    safe_bound_mb,
    services_need_mb,
    unavoidable_ooms,
    write_scenarios,
)
from optimizer.simulation.physics import fits
from optimizer.simulation.scenario import Background, Scenario, SimGpu, SimService, load_scenario

FAMILY_SIZE = 300


@cache
def family(seed: int = 11, oom_mode: str = "recover") -> tuple[GeneratedScenario, ...]:
    return tuple(generate(FAMILY_SIZE, seed, oom_mode=oom_mode))


def services_of(sc: Scenario, gpu: int) -> list[SimService]:
    return [s for s in sc.services if s.gpu == gpu]


def cotenants_of(sc: Scenario, gpu: int) -> list[Background]:
    return [b for b in sc.background if b.gpu == gpu]


def kind(b: Background) -> str:
    if b.every_s is not None:
        return "bursting"
    if b.ramp_s >= 30:
        return "ramped"
    if b.at_s == 0 and b.for_s is None:
        return "resident"
    return "sudden"


def within(x: float, lo: float, hi: float, slack: float = 1e-9) -> bool:
    return lo - slack <= x <= hi + slack


# --------------------------------------------------------------------------- determinism


def test_the_same_n_and_seed_give_the_same_scenarios() -> None:
    assert generate(6, 3) == generate(6, 3)
    assert [g.scenario.name for g in generate(3, 3)] == ["gen-3-0000", "gen-3-0001", "gen-3-0002"]


def test_scenario_i_does_not_depend_on_n_and_seeds_differ() -> None:
    assert generate(3, 5) == generate(9, 5)[:3]
    ours, theirs = generate(4, 5), generate(4, 6)
    assert all(a.scenario.services != b.scenario.services for a, b in zip(ours, theirs))
    assert len({g.scenario.seed for g in generate(50, 5)}) == 50  # each world its own jitter


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 10000\], got 0"):
        generate(0, 1)
    with pytest.raises(ValueError, match="n must be"):
        generate(10_001, 1)
    with pytest.raises(ValueError, match="oom_mode must be one of recover, crash, got 'explode'"):
        generate(3, 1, oom_mode="explode")
    for duration in (0.0, 7200.0):
        with pytest.raises(ValueError, match=r"duration_s must be in \(0, 3600\]"):
            generate(3, 1, duration_s=duration)


def test_a_shorter_duration_gives_the_same_scenarios_and_counts_only_earlier_arrivals() -> None:
    full, short = generate(40, 2), generate(40, 2, duration_s=600.0)
    for a, b in zip(full, short):
        assert dataclasses.replace(a.scenario, duration_s=600.0) == b.scenario
        assert b.unavoidable_by_gpu == unavoidable_ooms(a.scenario, 600.0)
        assert all(b.unavoidable_by_gpu[g] <= a.unavoidable_by_gpu[g] for g in a.unavoidable_by_gpu)
    assert sum(g.unavoidable_ooms for g in short) < sum(g.unavoidable_ooms for g in full)


# --------------------------------------------------------------------------- the distribution


def test_scenario_fields_are_within_their_ranges() -> None:
    for g in family():
        sc = g.scenario
        assert (sc.duration_s, sc.step_s, sc.oom_mode, sc.restart_s) == (3600.0, 1.0, "recover", 60.0)
        assert (sc.oom_recovery_s, sc.cleanup_stall_s) == (3.0, 1.0)
        assert 1 <= len(sc.gpus) <= 2 and [x.index for x in sc.gpus] == list(range(len(sc.gpus)))
        assert g.unavoidable_by_gpu == unavoidable_ooms(sc) and g.unavoidable_ooms == sum(g.unavoidable_by_gpu.values())
    for g in family(12, "crash"):
        assert g.scenario.oom_mode == "crash" and within(g.scenario.restart_s, 30, 120)


def test_gpus_come_from_the_catalog() -> None:
    catalog = {f"{m.name} (simulated)": m for m in GPU_CATALOG}
    seen: Counter[str] = Counter()
    for g in family():
        for gpu in g.scenario.gpus:
            model = catalog[gpu.name]
            seen[model.name] += 1
            assert (gpu.total_mb, gpu.power_limit_w) == (model.total_mb, model.power_limit_w)
            assert within(gpu.idle_temperature_c, 30, 40) and within(gpu.load_temperature_rise_c, 25, 35)
    assert set(seen) == {m.name for m in GPU_CATALOG}
    assert min(m.total_mb for m in GPU_CATALOG) < 24 * 1024 and max(m.total_mb for m in GPU_CATALOG) > 140 * 1024


def test_services_are_within_their_ranges() -> None:
    weights: Counter[float] = Counter()
    caps: Counter[int | None] = Counter()
    leaks = changes = late = fragmenting = 0
    for g in family():
        for gpu in g.scenario.gpus:
            mine = services_of(g.scenario, gpu.index)
            assert 1 <= len(mine) <= 3 and len({s.name for s in mine}) == len(mine)
            assert mine[0].start_s == 0  # the first on a GPU never starts late
            for s in mine:
                assert s.name in SERVICE_NAMES
                assert within(s.item_ms, 10, 80) and within(s.overhead_ms, 30, 200) and within(s.noise, 0, 0.15)
                assert s.fragmentation_growth_per_min == 0 or within(s.fragmentation_growth_per_min, 0, 0.03)
                assert within(s.declared / s.per_item_mb, 0.6, 1.4, slack=0.1 / s.per_item_mb + 1e-6)
                assert s.start_s == 0 or within(s.start_s, 60, 1800)
                assert s.leak_mb_per_min == 0 or within(s.leak_mb_per_min, 5, 50)
                assert len(s.per_item_changes) <= 1
                for at, mb in s.per_item_changes:
                    assert within(at, 600, 3000) and within(mb / s.per_item_mb, 0.7, 1.4, slack=0.06 / s.per_item_mb)
                weights[s.weight] += 1
                caps[s.max_batch_size] += 1
                leaks += s.leak_mb_per_min > 0
                changes += bool(s.per_item_changes)
                late += s.start_s > 0
                fragmenting += s.fragmentation_growth_per_min > 0
    total = sum(weights.values())
    assert set(weights) == {1.0, 2.0} and 0.2 < weights[2.0] / total < 0.4
    assert set(caps) == set(MAX_BATCH_SIZES)
    assert 0.12 < leaks / total < 0.28 and 0.12 < changes / total < 0.28
    assert 0.45 < fragmenting / total < 0.75
    assert late > 0


def test_memory_is_sized_to_the_gpu() -> None:
    targets: list[int] = []
    capped = uncapped = 0
    for g in family():
        sc = g.scenario
        for gpu in sc.gpus:
            mine = services_of(sc, gpu.index)
            k, total = len(mine), gpu.total_mb
            shrunk = not cotenants_of(sc, gpu.index) and services_need_mb(mine) >= safe_bound_mb(total) - k - 1
            first = {s.name for s in services_of(sc, sc.gpus[0].index)} if gpu.index != sc.gpus[0].index else set()
            for s in mine:
                if s.name not in first:  # a model shared with the first GPU was drawn there
                    assert s.base_mb <= 0.45 * total / k
                    assert shrunk or s.base_mb >= 0.15 * total / k - 1
            avail = safe_bound_mb(total) - sum(s.base_mb for s in mine)
            for s in mine:
                if s.name in first:
                    continue  # the same model as on the first GPU: sized there
                share = avail * s.weight / sum(x.weight for x in mine)
                b = fits(share, s.per_item_mb * (1 + s.noise), 10_000)  # the target batch, b*
                assert b >= 3 and (shrunk or b <= 96)
                targets.append(b)
                assert s.max_batch_size is not None
                capped += s.max_batch_size < b
                uncapped += s.max_batch_size >= b
    assert min(targets) == 3 and max(targets) >= 90
    assert capped > 0 and uncapped > 0  # the cap binds for some services, not for others


def test_cotenants_and_heat_are_within_their_ranges() -> None:
    kinds: Counter[str] = Counter()
    per_gpu: Counter[int] = Counter()
    shrunk = thermal_gpus = gpus = 0
    for g in family():
        sc = g.scenario
        for gpu in sc.gpus:
            gpus += 1
            bgs = cotenants_of(sc, gpu.index)
            per_gpu[len(bgs)] += 1
            full = services_need_mb(services_of(sc, gpu.index)) + cotenant_peak_mb(bgs)
            at_bound = full >= safe_bound_mb(gpu.total_mb) - 2 * len(bgs)  # shrunk to fit, no further
            shrunk += bool(bgs) and at_bound
            for b in bgs:
                kinds[kind(b)] += 1
                assert 0 < b.mb <= 0.40 * gpu.total_mb + 0.5
                assert at_bound or b.mb >= 0.05 * gpu.total_mb - 0.5
                assert within(b.at_s, 0, 3000)
                if kind(b) == "bursting":
                    assert b.every_s is not None and b.for_s is not None and b.ramp_s == 0
                    assert within(b.every_s, 60, 600) and within(b.for_s / b.every_s, 0.1, 0.4, slack=0.5 / b.every_s)
                elif kind(b) in ("sudden", "ramped"):
                    assert b.for_s is None or within(b.for_s, 120, 1200)
                    assert b.ramp_s == 0 if kind(b) == "sudden" else within(b.ramp_s, 30, 300)
            events = [t for t in sc.thermal if t.gpu == gpu.index]
            assert len(events) <= 1
            thermal_gpus += len(events)
            for t in events:
                assert within(t.celsius, 15, 35) and within(t.at_s, 300, 2400)
                assert t.for_s is not None and within(t.for_s, 300, 900) and within(t.ramp_s, 0, 120)
    assert set(kinds) == {"sudden", "ramped", "bursting", "resident"}
    assert set(per_gpu) <= {0, 1, 2} and per_gpu[0] > 0 and per_gpu[2] > 0
    assert any(b.for_s is None for g in family() for b in g.scenario.background if kind(b) == "sudden")
    assert 0.1 < thermal_gpus / gpus < 0.3
    assert shrunk > 0  # some draws did not fit and had their co-tenants shrunk


def test_one_or_two_gpus_and_a_name_shared_between_them() -> None:
    counts = Counter(len(g.scenario.gpus) for g in family())
    assert set(counts) == {1, 2} and 0.2 < counts[2] / FAMILY_SIZE < 0.4
    shared = 0
    for g in family():
        if len(g.scenario.gpus) == 2:
            one, two = g.scenario.gpus
            assert (one.name, one.total_mb, one.power_limit_w) == (two.name, two.total_mb, two.power_limit_w)
            first, second = ({s.name for s in services_of(g.scenario, i)} for i in (0, 1))
            common = first & second
            assert len(common) <= 1
            shared += bool(common)
            for name in common:  # the same model on both GPUs: the same numbers, but for when it starts
                a, b = (next(s for s in services_of(g.scenario, i) if s.name == name) for i in (0, 1))
                assert dataclasses.replace(a, gpu=b.gpu, start_s=b.start_s, base_mb=b.base_mb) == b
                assert a.base_mb == b.base_mb or not cotenants_of(g.scenario, 1)  # unless feasibility shrank it
    assert 0.3 < shared / counts[2] < 0.7


# --------------------------------------------------------------------------- feasibility


def world_peak_cotenant_mb(bgs: list[Background], duration_s: float) -> float:
    """What the co-tenants ask for at once at the worst world step (each at its level, as the world asks)."""
    return max((sum(b.level(float(t)) for b in bgs) for t in range(int(duration_s))), default=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_every_scenario_is_feasible_at_batch_one(seed: int) -> None:
    for g in generate(250, seed, oom_mode="crash" if seed % 2 else "recover"):
        assert feasible(g.scenario)
        for gpu in g.scenario.gpus:
            mine = services_of(g.scenario, gpu.index)
            worst = sum(s.base_mb + s.leak_mb_per_min * (3600 - s.start_s) / 60
                        + max([s.per_item_mb, *(mb for _, mb in s.per_item_changes)]) * (1 + s.noise) for s in mine)
            peak = world_peak_cotenant_mb(cotenants_of(g.scenario, gpu.index), 3600) if seed == 0 else 0.0
            assert worst + peak <= gpu.total_mb * 0.95 - 1024 + 1e-6


def test_the_cotenant_peak_adds_only_what_can_be_there_at_once() -> None:
    a = Background(gpu=0, at_s=100, mb=1000, for_s=200)
    b = Background(gpu=0, at_s=250, mb=3000)  # arrives while a is there
    c = Background(gpu=0, at_s=400, mb=5000, for_s=100)  # after a left, while b stays
    assert cotenant_peak_mb([a]) == 1000
    assert cotenant_peak_mb([a, b]) == 4000
    assert cotenant_peak_mb([a, c]) == 5000
    assert cotenant_peak_mb([a, b, c]) == 8000
    burst = Background(gpu=0, at_s=1000, mb=2000, for_s=30, every_s=300)
    late = Background(gpu=0, at_s=3500, mb=700, for_s=50)
    assert cotenant_peak_mb([burst, late]) == 2000  # 3400-3430 and 3500-3550 do not meet
    assert cotenant_peak_mb([burst, dataclasses.replace(late, at_s=3410)]) == 2700
    assert cotenant_peak_mb([burst, late], until_s=3000) == 2000  # late arrives after the end


# --------------------------------------------------------------------------- unavoidable OOMs


def hand_made(services: list[SimService], background: list[Background], *, gpus: int = 1) -> Scenario:
    return Scenario(name="hand", seed=1, duration_s=3600, step_s=1.0,
                    gpus=tuple(SimGpu(index=i, name="GPU", total_mb=80000) for i in range(gpus)),
                    services=tuple(services), background=tuple(background))


def svc(name: str, start_s: float = 0.0, gpu: int = 0) -> SimService:
    return SimService(name=name, gpu=gpu, base_mb=1000, per_item_mb=100, item_ms=10, overhead_ms=50, start_s=start_s)


def test_a_sudden_cotenant_costs_every_running_service_one_oom() -> None:
    sudden = Background(gpu=0, at_s=900, mb=10000)
    assert unavoidable_ooms(hand_made([svc("a"), svc("b")], [sudden])) == {0: 2}
    assert unavoidable_ooms(hand_made([svc("a"), svc("b", start_s=1200)], [sudden])) == {0: 1 + 1}  # + b's start
    assert unavoidable_ooms(hand_made([svc("a"), svc("b")], [dataclasses.replace(sudden, ramp_s=9)])) == {0: 2}


def test_a_ramped_cotenant_costs_nothing() -> None:
    ramped = Background(gpu=0, at_s=900, mb=10000, ramp_s=60, for_s=300)
    assert unavoidable_ooms(hand_made([svc("a"), svc("b")], [ramped])) == {0: 0}
    assert unavoidable_ooms(hand_made([svc("a")], [dataclasses.replace(ramped, ramp_s=10)])) == {0: 0}


def test_each_occurrence_of_a_bursting_cotenant_counts() -> None:
    burst = Background(gpu=0, at_s=3000, mb=5000, for_s=60, every_s=200)  # 3000, 3200, 3400: three before 3600
    assert unavoidable_ooms(hand_made([svc("a")], [burst])) == {0: 3}
    assert unavoidable_ooms(hand_made([svc("a")], [burst]), duration_s=3300) == {0: 2}


def test_a_late_starter_costs_the_services_already_running() -> None:
    assert unavoidable_ooms(hand_made([svc("a"), svc("b", start_s=600)], [])) == {0: 1}
    assert unavoidable_ooms(hand_made([svc("a"), svc("b", 600), svc("c", 900)], [])) == {0: 1 + 2}
    assert unavoidable_ooms(hand_made([svc("a"), svc("b", 600)], []), duration_s=600) == {0: 0}  # at the end: not run


def test_a_cotenant_there_from_the_start_costs_nothing_and_gpus_count_apart() -> None:
    resident = Background(gpu=0, at_s=0, mb=10000)
    assert unavoidable_ooms(hand_made([svc("a"), svc("b")], [resident])) == {0: 0}
    sc = hand_made([svc("a"), svc("b", gpu=1), svc("c", gpu=1)], [Background(gpu=1, at_s=100, mb=500)], gpus=2)
    assert unavoidable_ooms(sc) == {0: 0, 1: 2}


# --------------------------------------------------------------------------- files


def test_written_scenarios_read_back_equal(tmp_path: Path) -> None:
    drawn = list(family()[:15]) + generate(5, 12, oom_mode="crash")
    folder = tmp_path / "out" / "gen"
    paths = write_scenarios(drawn, folder)
    assert [p.name for p in paths] == [f"{g.scenario.name}.yaml" for g in drawn]
    for path, g in zip(paths, drawn):
        assert load_scenario(path) == g.scenario
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(f"# {g.scenario.name}: {g.unavoidable_ooms} unavoidable OOM(s) (GPU 0: ")
    assert len(list(folder.iterdir())) == len(drawn)


def test_services_that_do_not_fit_alone_lose_their_cotenants_then_part_of_their_bases() -> None:
    from optimizer.benchmark.generate import _make_feasible

    gpu = SimGpu(index=0, name="GPU", total_mb=24000)  # safety bound 21776 MiB
    heavy = [dataclasses.replace(svc("a"), base_mb=12000, leak_mb_per_min=50),  # + 3000 leaked over the hour
             dataclasses.replace(svc("b"), base_mb=6000, per_item_mb=1000, noise=0.1)]
    bgs = [Background(gpu=0, at_s=100, mb=3000)]
    services, left = _make_feasible(gpu, heavy, bgs)
    assert left == [] and feasible(hand_made(services, []))
    assert all(s.base_mb < h.base_mb for s, h in zip(services, heavy))
    assert services[0].base_mb / services[1].base_mb == pytest.approx(2, abs=1e-3)  # by one factor
    assert services_need_mb(services) == pytest.approx(safe_bound_mb(24000), abs=2)  # down to the bound only
    fitting = [svc("a"), svc("b")]
    # 2 x 1100 MiB at batch 1 leave 19576 of the bound for co-tenants of 23000 at once: shrunk by 19576 / 23000.
    services, left = _make_feasible(gpu, fitting, [Background(gpu=0, at_s=0, mb=20000), *bgs])
    assert services == fitting and [b.mb for b in left] == [math.floor(20000 * 19576 / 23000),
                                                            math.floor(3000 * 19576 / 23000)]
    assert feasible(hand_made(services, left))
