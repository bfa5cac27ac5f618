"""The six properties the batch-size policy must hold (issue: core service, 'The loop and the policy')."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from optimizer.config import Settings, Strategy
from optimizer.policy import core
from optimizer.policy.model import hold_optimum, safety_bytes
from optimizer.policy.strategies import apply_strategy
from optimizer.policy.types import PolicyState, Snapshot
from optimizer.simulation.run import simulate
from optimizer.simulation.scenario import Background, Thermal, load_scenario
from tests.policy_helpers import GIB, MIB, ROOT, Harness, WorldRun, gpu, one_service

# ----------------------------------------------------------------------------- 1. safety


@pytest.mark.parametrize("strategy", [s for s in Strategy if s is not Strategy.ADAPTIVE])
def test_safety_bound_holds_on_random_states(strategy: Strategy) -> None:
    """No published batch is predicted to exceed total*oom - reserve for its share, except min_batch_size.

    (adaptive predicts from what it learned, not from the declared figure: tests/test_adaptive.py.)
    """
    rng = random.Random(f"safety-{strategy.value}")
    checked = binding = 0
    for case in range(150):
        total_gib = rng.choice([24.0, 40.0, 48.0, 80.0])
        names = [f"svc{i}" for i in range(rng.randint(1, 3))]
        profiles = tuple(
            dataclasses.replace(Settings().default_profile, name=n, per_item_mb=rng.uniform(200, 6000),
                                weight=rng.choice([1.0, 2.0]))
            for n in names)
        s = Settings(strategy=strategy, max_batch_size=64, profiles=profiles, monitoring_interval=5,
                     optimization_interval=rng.choice([5.0, 15.0, 60.0]))
        state = PolicyState()
        now = 0.0
        for n in names:
            state, _ = core.touch(state, n, 0, now, s, None)
        used = rng.uniform(0.1, 0.9) * total_gib
        for _ in range(40):
            now += 5.0
            used = min(total_gib, max(0.0, used + rng.gauss(0, 0.04) * total_gib))
            sample = gpu(used, total_gib=total_gib, t=now)
            before = state
            ready = before.gpus.get(0) is None or now >= before.gpus[0].adopt_after
            state = core.decide(Snapshot(now, (sample,)), state, s).state
            assert sample.memory_total_bytes is not None and sample.memory_used_bytes is not None
            head = safety_bytes(sample.memory_total_bytes, s) - sample.memory_used_bytes
            weights = sum(p.weight for p in profiles)
            for p in profiles:
                old = before.services[(0, p.name)].batch_size
                new = state.services[(0, p.name)].batch_size
                if new == s.min_batch_size or (new == old and not ready):
                    continue
                checked += 1
                allowed = head * p.weight / weights
                growth = (new - old) * p.per_item_mb * MIB
                assert growth <= allowed + 1, (case, p.name, old, new, growth / GIB, allowed / GIB)
                if growth > allowed - p.per_item_mb * MIB:
                    binding += 1
    assert checked > 1000
    if strategy is Strategy.AGGRESSIVE:
        assert binding > 0  # the bound was actually the limit in some cases, not trivially far away


def test_aggressive_is_capped_by_the_safety_bound() -> None:
    # target 0.85 of 80 GiB less 1 GiB = 67 GiB; at batch 4 the GPU uses 10 GiB; 1 GiB per item:
    # optimum 4 + 57 = 61, aggressive 120% = 73, but the bound 0.95*80 - 1 = 75 GiB allows 4 + 65 = 69.
    s = Settings(strategy=Strategy.AGGRESSIVE, target_memory_utilization=0.85, max_batch_size=128,
                 default_profile=dataclasses.replace(Settings().default_profile, per_item_mb=1024))
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(13):
        h.tick(gpu(10.0))
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.optimal == 61
    assert apply_strategy(Strategy.AGGRESSIVE, 61) == 73
    assert svc.batch_size == 69
    assert "safety bound" in svc.reason


def test_min_batch_size_is_published_even_when_it_does_not_fit() -> None:
    s = Settings(min_batch_size=2, default_profile=dataclasses.replace(Settings().default_profile, per_item_mb=8192))
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(20):
        h.tick(gpu(79.0))
    assert h.batch() == 2


# ----------------------------------------------------------------------------- 2. convergence


@pytest.mark.parametrize(("total_mb", "base_mb", "per_item_mb", "noise"), [
    (81559, 18000, 3200, 0.0),
    (81559, 18000, 3200, 0.05),
    (81559, 30000, 1100, 0.05),
    (24576, 9000, 700, 0.03),
    (46068, 14000, 1700, 0.05),
])
def test_balanced_converges_within_three_optimization_intervals(
        total_mb: float, base_mb: float, per_item_mb: float, noise: float) -> None:
    s = Settings(max_batch_size=64)
    run = WorldRun(one_service(total_mb=total_mb, base_mb=base_mb, per_item_mb=per_item_mb, noise=noise), s)
    budget = total_mb * s.target_memory_utilization - s.memory_reserve_mb - base_mb
    best = min(s.max_batch_size, math.floor(budget / (per_item_mb * (1 + noise))))  # fits with the worst jitter
    first = s.monitoring_interval
    run.run_until(first + 3 * s.optimization_interval)
    assert abs(run.batch() - best) <= 1, (run.batch(), best)
    seen = set()
    run.run_until(1800, lambda _: seen.add(run.batch()))
    assert all(abs(b - best) <= 1 for b in seen), (seen, best)


def test_hold_optimum_band() -> None:
    assert hold_optimum(10, 10.9) == 10
    assert hold_optimum(10, 11.49) == 10
    assert hold_optimum(10, 11.5) == 11
    assert hold_optimum(10, 14.2) == 14
    assert hold_optimum(10, 9.5) == 10
    assert hold_optimum(10, 9.49) == 9
    assert hold_optimum(10, 3.7) == 3


@pytest.mark.parametrize(("strategy", "factor"), [(Strategy.CONSERVATIVE, 0.7), (Strategy.BALANCED, 1.0),
                                                  (Strategy.AGGRESSIVE, 1.2), (Strategy.ADAPTIVE, 1.0)])
def test_strategy_factors(strategy: Strategy, factor: float) -> None:
    for optimal in range(1, 40):
        assert apply_strategy(strategy, optimal) == math.floor(optimal * factor + 1e-9)


# ----------------------------------------------------------------------------- 3. reaction


def test_critical_memory_lowers_the_batch_on_the_next_sample() -> None:
    scenario = one_service(background=(Background(gpu=0, at_s=600, mb=16000),))
    run = WorldRun(scenario, Settings())
    run.run_until(595)
    settled = run.batch()
    crit = run.settings.memory_threshold_critical
    while True:
        before = run.batch()
        snap = run.tick()
        usage = snap.gpus[0].usage_fraction
        assert usage is not None
        if usage >= crit:
            break
        assert run.t < 700, "the spike never reached critical"
    assert run.batch() < before <= settled
    assert run.engine.state.gpus[0].pressure.value in ("critical", "oom")


def test_oom_report_lowers_at_once_and_the_next_poll_sees_it() -> None:
    h = Harness(Settings())
    h.tick(gpu(30.0))
    b = h.engine.poll("vlm", 0, h.t).batch_size
    reply = h.engine.report("vlm", 0, h.t, batch_size=b, oom=True)
    assert reply.batch_size < b
    assert "OOM" in reply.reason
    assert h.engine.poll("vlm", 0, h.t + 0.1).batch_size == reply.batch_size


def test_oom_bars_the_failed_batch_size_while_headroom_says_grow() -> None:
    s = Settings(optimization_interval=10, max_batch_size=64,
                 default_profile=dataclasses.replace(Settings().default_profile, per_item_mb=1024))
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(10):
        h.tick(gpu(20.0))
    grown = h.batch()
    assert grown > 8
    h.engine.report("vlm", 0, h.t, batch_size=8, oom=True)
    assert h.batch() <= 7
    barred_until = h.engine.state.services[(0, "vlm")].ceiling_until
    while h.t < barred_until - s.monitoring_interval:
        h.tick(gpu(20.0))  # plenty of headroom, yet 8 stays barred
        assert h.batch() <= 7
    for _ in range(5):
        h.tick(gpu(20.0))
    assert h.batch() > 8  # the bar expires


def test_a_retried_oom_is_one_strike_and_a_later_one_doubles_the_bar() -> None:
    h = Harness(Settings())
    h.tick(gpu(60.0))  # memory the OOMs could have run out of (not contradicted by the sample)
    h.engine.report("vlm", 0, h.t, batch_size=8, oom=True)
    h.engine.report("vlm", 0, h.t + 1.0, batch_size=8, oom=True)  # a retry within the rate limit: no effect
    h.engine.report("vlm", 0, h.t + 4.0, batch_size=8, oom=True)  # the client's same-size retry, past it
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.strikes == 1 and svc.ceiling == 8
    assert svc.ceiling_until == h.t + 4.0 + 600  # 10 optimization intervals: not doubled
    assert h.engine.oom_reports == {"counted": 2, "rate_limited": 1}
    later = h.t + 120.0
    h.engine.report("vlm", 0, later, batch_size=7, oom=True)  # a new incident
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.strikes == 2 and svc.ceiling == 7 and svc.ceiling_until == later + 1200


# ----------------------------------------------------------------------------- 4. stability


@pytest.mark.parametrize("seed", range(6))
def test_steady_noisy_load_changes_at_most_once_per_ten_minutes_after_settling(seed: int) -> None:
    scenario = dataclasses.replace(load_scenario(ROOT / "examples/scenarios/steady-h100.yaml"), seed=seed,
                                   duration_s=7200)
    result = simulate(scenario, Settings())
    changes = [t for t, _ in result.services[0].batches[1:] if t > 4 * 60]
    assert all(b - a >= 600 for a, b in zip(changes, changes[1:])), result.services[0].batches
    assert result.services[0].ooms == 0


# ----------------------------------------------------------------------------- 5. heat


def test_hot_gpu_never_grows_and_steps_down_while_hot() -> None:
    scenario = one_service(thermal=(Thermal(gpu=0, at_s=900, celsius=40, for_s=600),), noise=0.0)
    s = Settings()
    run = WorldRun(scenario, s)
    run.run_until(895)
    hot_batches: list[int] = []
    steps: list[float] = []
    prev = run.batch()
    while run.t < 1500:
        snap = run.tick()
        temp = snap.gpus[0].temperature_celsius
        assert temp is not None
        if temp >= s.temperature_threshold:
            assert run.batch() <= prev
            hot_batches.append(run.batch())
            if run.batch() < prev:
                steps.append(run.t)
        prev = run.batch()
    assert hot_batches, "the GPU never got hot"
    # One item per optimization interval while hot (a smaller batch also cools the simulated GPU).
    assert len(steps) >= 3
    assert all(b - a >= s.optimization_interval for a, b in zip(steps, steps[1:]))
    assert [e for e in run.engine.events if e.trigger == "temperature" and e.kind.startswith("optimization")] == []


def test_first_hot_sample_steps_down() -> None:
    h = Harness(Settings())
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(30):
        h.tick(gpu(40.0, temp=60.0))
    before = h.batch()
    h.tick(gpu(40.0, temp=85.0))
    assert h.batch() == before - 1
    assert "stepping down while hot" in h.engine.state.services[(0, "vlm")].reason


def _settled(h: Harness) -> int:
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(30):
        h.tick(dataclasses.replace(gpu(40.0, temp=60.0), throttle_reasons=frozenset()))
    return h.batch()


@pytest.mark.parametrize("reason", ["sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown",
                                    "hw_power_brake_slowdown"])
def test_a_board_that_reports_throttling_steps_down_whatever_its_temperature(reason: str) -> None:
    h = Harness(Settings())
    before = _settled(h)
    h.tick(dataclasses.replace(gpu(40.0, temp=60.0), throttle_reasons=frozenset({reason, "sw_power_cap"})))
    assert h.batch() == before - 1
    assert h.engine.state.gpus[0].hot
    assert f"GPU throttling ({reason})" in h.engine.state.services[(0, "vlm")].reason


@pytest.mark.parametrize("reasons", [frozenset(), frozenset({"sw_power_cap"}), frozenset({"gpu_idle", "sync_boost"})])
def test_a_hot_board_that_reports_no_heat_throttling_is_not_stepped_down(reasons: frozenset[str]) -> None:
    h = Harness(Settings())
    before = _settled(h)
    h.tick(dataclasses.replace(gpu(40.0, temp=95.0), throttle_reasons=reasons))
    assert h.batch() == before
    assert not h.engine.state.gpus[0].hot


def test_temperature_stands_for_throttling_only_where_the_reasons_are_unknown() -> None:
    s = Settings()
    hot = dataclasses.replace(gpu(40.0, temp=85.0), throttle_reasons=None)
    assert core.heat_of(hot, s)[0] is True
    assert core.heat_of(dataclasses.replace(hot, temperature_celsius=None), s)[0] is False
    assert core.heat_of(dataclasses.replace(hot, throttle_reasons=frozenset()), s)[0] is False


# ----------------------------------------------------------------------------- 6. disabled


def test_disabled_publishes_the_default_batch_and_keeps_monitoring() -> None:
    s = Settings(enabled=False, default_batch_size=6)
    run = WorldRun(one_service(), s)
    run.run_until(900)
    assert run.batch() == 6
    assert "disabled" in run.engine.state.services[(0, "vlm")].reason
    assert len(run.engine.history[0]) == s.history_size  # still sampling
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    events = h.tick(gpu(79.0))  # critical memory: still no reduction or cleanup while disabled
    assert h.batch() == 6
    assert not [e for e in events if e.kind in ("cleanup_raised", "batch_changed")]
    assert h.engine.state.gpus[0].pressure.value == "oom"
