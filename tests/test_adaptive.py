"""``adaptive``: the memory model, the other tenants, the plan, and the guarantees it keeps in the world.

The pure parts (optimizer/policy/adaptive/) are driven with hand-made figures; the guarantees
(docs/policy.md, "What adaptive guarantees") with the simulated world in virtual time.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from optimizer.benchmark.generate import generate
from optimizer.config import Settings, Strategy
from optimizer.policy.adaptive import controller
from optimizer.policy.adaptive import plan as plan_module
from optimizer.policy.adaptive.controller import (
    CLEANUP_MIN_INTERVALS,
    NEWCOMER_S,
    Member,
    grants,
    members,
    observe_tenants,
    plan,
    volatility_reserve,
    want_cleanup,
)
from optimizer.policy.adaptive.memory import (
    FLOOR_TTL,
    OBSERVATION_TTL,
    PRIOR_JITTER,
    UNMEASURED_FACTOR,
    Fit,
    MemoryModel,
    fit,
    forget_oom_region,
    observe,
    raise_floor,
)
from optimizer.policy.adaptive.tenants import VOLATILITY_WINDOW, Tenants, assume_at_least, confirm_arrival, update
from optimizer.policy.types import GpuState, ServiceState
from optimizer.simulation.run import ServiceResult, simulate
from optimizer.simulation.scenario import Background, SimService, Thermal, load_scenario
from tests.policy_helpers import GIB, MIB, ROOT, Harness, WorldRun, gpu, one_service

ADAPTIVE = Settings(strategy=Strategy.ADAPTIVE, max_batch_size=64)


def measured(per_item: float, *, fixed: float = 10 * GIB, batches: tuple[int, ...] = (4, 4, 5, 5, 6, 6),
             jitter: tuple[float, ...] = (0.0,), t0: float = 0.0, waste: float = 0.0) -> MemoryModel:
    """A model after reports at ``batches``, per-item memory ``per_item * (1 + jitter[i % len])``."""
    m = MemoryModel()
    for i, b in enumerate(batches):
        act = b * per_item * (1 + jitter[i % len(jitter)])
        m = observe(m, t0 + 5.0 * i, b, peak=int(fixed + act), allocated=int(fixed),
                    reserved=int(fixed + act + waste), inactive_split=int(waste))
    return m


# ----------------------------------------------------------------------------- the memory model


def test_fixed_memory_is_what_stays_allocated_and_per_item_memory_the_peak_beyond_it() -> None:
    m = measured(GIB, jitter=(0.0, 0.1))
    f = fit(m, declared_per_item=3 * GIB, now=30.0, current_batch=6)
    assert f.measured and f.fixed == 10 * GIB
    assert f.mean_per_item == pytest.approx(1.05 * GIB, rel=1e-6)
    top, mean, n = 1.1 * GIB, 1.05 * GIB, 6
    # The worst is the highest seen plus an allowance for jitter not seen yet, shrinking with the reports.
    assert f.worst_per_item == pytest.approx(top + (top - mean + top * PRIOR_JITTER) / n, rel=1e-6)
    assert f.worst(8) == pytest.approx(10 * GIB + 8 * f.worst_per_item)


def test_the_jitter_allowance_shrinks_as_reports_come_but_never_below_the_worst_seen() -> None:
    few = fit(measured(GIB, jitter=(0.0, 0.1), batches=(4, 4)), 0.0, 10.0, 4)
    many = fit(measured(GIB, jitter=(0.0, 0.1), batches=(4,) * 60), 0.0, 300.0, 4)
    assert few.worst_per_item > many.worst_per_item >= 1.1 * GIB


def test_the_worst_per_item_memorys_error_is_the_spacing_of_the_observations_and_shrinks_as_they_come() -> None:
    few = fit(measured(GIB, jitter=(0.0, 0.1), batches=(4,) * 4), 0.0, 20.0, 4)
    many = fit(measured(GIB, jitter=(0.0, 0.1), batches=(4,) * 60), 0.0, 300.0, 4)
    # n draws between 1 and 1.1 GiB per item: the bound may lie one spacing, 0.1 GiB / (n + 1), above the highest
    assert few.error == pytest.approx(0.1 * GIB / 5, rel=1e-6)
    assert many.error == pytest.approx(0.1 * GIB / 61, rel=1e-6)
    assert fit(measured(GIB, batches=(4,) * 10), 0.0, 50.0, 4).error == 0.0  # no jitter seen: nothing to keep


def test_without_allocated_bytes_the_fixed_memory_is_the_intercept_of_peaks_at_two_batch_sizes() -> None:
    m = MemoryModel()
    m = observe(m, 0.0, 4, peak=int(10 * GIB + 4 * GIB), allocated=None, reserved=None, inactive_split=None)
    f = fit(m, declared_per_item=GIB, now=0.0, current_batch=4)
    # One batch size says nothing of the split: unmeasured, the declared figure doubled, two items of trust.
    assert not f.measured and f.worst_per_item == UNMEASURED_FACTOR * GIB and f.trust_cap == 6
    m = observe(m, 5.0, 6, peak=int(10 * GIB + 6 * GIB), allocated=None, reserved=None, inactive_split=None)
    f = fit(m, declared_per_item=GIB, now=5.0, current_batch=6)
    assert f.measured and f.fixed == pytest.approx(10 * GIB) and f.mean_per_item == pytest.approx(GIB)


def test_per_item_memory_that_changes_is_followed_and_the_old_figures_forgotten() -> None:
    m = measured(GIB, batches=(4,) * 20)
    m = dataclasses.replace(m)  # reports at 0..95 s of 1 GiB per item, then 1.5 GiB per item from 700 s
    for i in range(20):
        act = 4 * 1.5 * GIB
        m = observe(m, 700.0 + 5 * i, 4, peak=int(10 * GIB + act), allocated=10 * GIB, reserved=int(10 * GIB + act),
                    inactive_split=0)
    f = fit(m, 0.0, 800.0, 4)
    assert f.mean_per_item == pytest.approx(1.5 * GIB)  # the 1 GiB reports are older than OBSERVATION_TTL
    assert 800.0 - 95.0 > OBSERVATION_TTL


def test_a_leak_moves_the_fixed_memory_with_the_latest_report() -> None:
    m = MemoryModel()
    for i in range(10):
        fixed = 10 * GIB + i * 64 * MIB
        m = observe(m, 5.0 * i, 4, peak=fixed + 4 * GIB, allocated=fixed, reserved=fixed + 4 * GIB, inactive_split=0)
    f = fit(m, 0.0, 45.0, 4)
    assert f.fixed == 10 * GIB + 9 * 64 * MIB and f.mean_per_item == pytest.approx(GIB)


def test_fragmentation_waste_is_measured_against_the_services_own_activations() -> None:
    m = measured(GIB, batches=(4,), waste=GIB)
    f = fit(m, 0.0, 0.0, 4)
    assert f.waste == GIB and f.waste_fraction == pytest.approx(0.25)  # 1 GiB lost of 4 GiB of activations
    assert f.worst(4) == pytest.approx(10 * GIB + 4 * f.worst_per_item * 1.25)


def test_a_report_from_a_process_that_ran_no_batch_teaches_nothing_of_what_a_batch_holds() -> None:
    m = measured(GIB, batches=(4,))
    idle = observe(m, 10.0, 4, peak=None, allocated=10 * GIB, reserved=10 * GIB, inactive_split=0)
    assert idle.held == m.held and idle.observations == m.observations


def test_the_trust_region_grows_with_every_batch_reached_and_shrinks_below_an_oom() -> None:
    m = measured(GIB, batches=(1,))
    assert fit(m, 0.0, 0.0, 1).trust_cap == 3  # at least two items beyond the largest batch run
    m = measured(GIB, batches=(1, 3, 6))
    assert fit(m, 0.0, 10.0, 6).trust_cap == 12  # twice the largest batch run
    assert forget_oom_region(m, failed_batch=5).largest_ok == 4


def test_an_unexplained_oom_floor_holds_for_a_while_then_lapses() -> None:
    m = raise_floor(measured(GIB), 1.5 * GIB, now=100.0)
    assert fit(m, 0.0, 100.0 + FLOOR_TTL - 1, 6).worst_per_item == 1.5 * GIB
    assert fit(m, 0.0, 100.0 + FLOOR_TTL + 1, 6).worst_per_item < 1.5 * GIB


# ----------------------------------------------------------------------------- the other tenants


def settle(t: Tenants, samples: list[tuple[float, float, float]], tol: float = 64 * MIB) -> Tenants:
    for now, lo, hi in samples:
        t = update(t, now, lo, hi, tol, 5.0)
    return t


def test_the_level_is_the_tightest_upper_bound_seen_and_the_floor_the_highest_lower_one() -> None:
    t = settle(Tenants(), [(5.0, 9 * GIB, 12 * GIB), (10.0, 9.5 * GIB, 11 * GIB), (15.0, 9 * GIB, 11.5 * GIB)])
    assert t.level == pytest.approx(11 * GIB) and t.floor == pytest.approx(9.5 * GIB) and t.confirmed
    assert t.changes == ()


def test_an_arrival_restarts_the_window_and_is_recorded_with_the_level_it_reached() -> None:
    t = settle(Tenants(), [(5.0, 9 * GIB, 10 * GIB), (10.0, 9 * GIB, 10 * GIB)])
    t = settle(t, [(15.0, 19 * GIB, 20 * GIB)])
    assert t.level == pytest.approx(20 * GIB) and t.since == 15.0 and not t.confirmed
    ((at, delta, after),) = t.changes
    assert at == 15.0 and delta == pytest.approx(10 * GIB) and after == pytest.approx(20 * GIB)
    # A departure: an upper bound below the floor.
    t = settle(t, [(20.0, 19 * GIB, 20 * GIB), (25.0, 4 * GIB, 5 * GIB)])
    assert t.level == pytest.approx(5 * GIB) and t.changes[-1][1] == pytest.approx(-15 * GIB)


def test_a_ramp_is_seen_coming_as_a_trend() -> None:
    rate = 100 * MIB  # per second
    t = settle(Tenants(), [(5.0 * i, 5 * GIB + rate * 5 * i - 128 * MIB, 5 * GIB + rate * 5 * i + 128 * MIB)
                           for i in range(1, 9)], tol=2 * GIB)
    assert t.trend == pytest.approx(rate, rel=0.01)
    assert t.level == pytest.approx(5 * GIB + rate * 40 + 128 * MIB, rel=0.01)


def test_arrivals_that_come_back_set_a_rate() -> None:
    samples = []
    for k in range(4):  # a 10 GiB tenant for 20 s every 100 s
        start = 100.0 * k + 5
        samples += [(start, 0.0, 0.1 * GIB), (start + 5, 0.0, 0.1 * GIB), (start + 10, 10 * GIB, 10.1 * GIB),
                    (start + 15, 10 * GIB, 10.1 * GIB), (start + 30, 0.0, 0.1 * GIB), (start + 35, 0.0, 0.1 * GIB)]
    t = settle(Tenants(), samples)
    assert t.peaks(340.0) == [pytest.approx(10.1 * GIB)]
    assert t.arrival_rate(340.0, reaching=10 * GIB) == pytest.approx(1 / 100.0)
    assert t.arrival_rate(340.0 + 2 * VOLATILITY_WINDOW, reaching=10 * GIB) == 0.0  # forgotten


def test_the_sample_that_shows_an_arrival_an_oom_recorded_makes_it_one_arrival_at_the_ooms_time() -> None:
    """Recorded twice (what the OOM proved, then what the sample shows), one burst would look like two
    arrivals seconds apart: a rate far above its own, and no period."""
    t = settle(Tenants(), [(5.0, 0.0, 0.1 * GIB), (10.0, 0.0, 0.1 * GIB)])
    t = assume_at_least(t, 3 * GIB, 12.0)
    t = settle(t, [(25.0, 9.5 * GIB, 9.6 * GIB)])  # 2.6 intervals later: past a ramp's merging
    ((at, delta, after),) = t.changes
    assert at == 12.0 and delta == pytest.approx(9.5 * GIB) and after == pytest.approx(9.6 * GIB)


def test_an_arrival_is_recorded_at_the_level_its_window_settles_to_not_its_first_samples() -> None:
    """The first sample's upper bound holds the services' jitter too: what a return would bring is the
    least the samples since showed."""
    t = settle(Tenants(), [(5.0, 0.0, 0.1 * GIB), (10.0, 0.0, 0.1 * GIB), (15.0, 10 * GIB, 14 * GIB)])
    assert t.changes[-1][2] == pytest.approx(14 * GIB)
    t = settle(t, [(20.0, 10 * GIB, 11 * GIB), (25.0, 10 * GIB, 12 * GIB)])
    at, delta, after = t.changes[-1]
    assert at == 15.0 and after == pytest.approx(11 * GIB) and delta == pytest.approx(10.9 * GIB)
    assert t.peaks(30.0) == [pytest.approx(11 * GIB)]


def test_a_tenant_that_left_comes_back_on_top_of_what_arrived_since() -> None:
    """A 10 GiB burst came and went; a 20 GiB stay arrived since: the burst's return would bring 30 GiB,
    not the 10 GiB it reached before. While a tenant of its size is there, it is not counted twice."""
    burst = ((100.0, 10 * GIB, 10 * GIB), (150.0, -10 * GIB, 0.0))
    t = Tenants(level=20 * GIB, changes=(*burst, (300.0, 20 * GIB, 20 * GIB)))
    assert t.peaks(310.0) == [pytest.approx(30 * GIB), pytest.approx(20 * GIB)]
    again = Tenants(level=10 * GIB, changes=(*burst, (250.0, 10 * GIB, 10 * GIB)))  # it is back now
    assert again.peaks(260.0) == [pytest.approx(10 * GIB)]


def test_arrivals_that_keep_a_period_are_due_only_around_the_next_one() -> None:
    every = 150.0
    t = Tenants(changes=tuple((100.0 + every * k, 10 * GIB, 10 * GIB) for k in (0, 1, 3, 4)))  # one went unseen
    assert t.period(710.0, 10 * GIB, 5.0) == pytest.approx(every)
    lead = 15.0  # the next is due at 850, seen within 12.5 s (2.5 intervals)
    assert not t.due(760.0, 10 * GIB, 5.0, lead)
    assert t.due(825.0, 10 * GIB, 5.0, lead) and t.due(860.0, 10 * GIB, 5.0, lead)
    assert not t.due(880.0, 10 * GIB, 5.0, lead)  # it did not come: until the one after
    early = dataclasses.replace(t, changes=(*t.changes, (790.0, 10 * GIB, 10 * GIB)))  # off its schedule
    assert early.period(800.0, 10 * GIB, 5.0) is None and early.due(800.0, 10 * GIB, 5.0, lead)
    irregular = Tenants(changes=tuple((at, 10 * GIB, 10 * GIB) for at in (100.0, 230.0, 300.0, 400.0)))
    assert irregular.period(450.0, 10 * GIB, 5.0) is None and irregular.due(450.0, 10 * GIB, 5.0, lead)
    stray = Tenants(changes=tuple((at, 4 * GIB, 4 * GIB) for at in (1095.0, 1205.0, 1680.0)))  # every 586 s
    assert stray.period(1700.0, 4 * GIB, 5.0) is None  # not four periods of 117 s in 475
    two = Tenants(changes=tuple((at, 10 * GIB, 10 * GIB) for at in (100.0, 250.0)))
    assert two.period(300.0, 10 * GIB, 5.0) is None  # two arrivals set a rate, not a period


def test_a_tenant_seen_once_may_come_back_as_soon_as_it_came_and_is_held_room_for_while_that_pays() -> None:
    """A burst seen once, 100 s ago: it may be back within about as long. In crash mode (an OOM costs a
    restart) its second coming is not ridden; the longer ago it came, the less its room is worth."""
    ms = [member("a", GIB)]
    t = Tenants(level=0.0, changes=((100.0, 10 * GIB, 10 * GIB), (130.0, -10 * GIB, 0.0)))
    assert t.arrival_rate(200.0, reaching=10 * GIB) == pytest.approx(1 / 100.0)
    crash = Settings(oom_cost_s=120.0)  # the room costs 10 of 60 items: worth it while the rate > 1/720 s
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, 200.0, crash) == 10 * GIB
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, 1000.0, crash) == 0.0


def test_room_for_a_periodic_tenant_is_kept_only_while_its_next_arrival_is_due() -> None:
    ms = [member("a", GIB)]
    t = Tenants(level=0.0, changes=tuple((100.0 * k, 10 * GIB, 10 * GIB) for k in range(1, 5)))
    dear = Settings(oom_cost_s=600.0)
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, 450.0, dear) == 0.0  # the next comes at 500
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, 480.0, dear) == 10 * GIB  # within 3 intervals and 12.5 s of it


def test_a_change_seen_while_a_service_came_or_went_is_not_recorded() -> None:
    t = settle(Tenants(), [(5.0, 9 * GIB, 10 * GIB), (10.0, 9 * GIB, 10 * GIB)])
    t = update(t, 15.0, 19 * GIB, 20 * GIB, 64 * MIB, 5.0, record=False)
    assert t.level == pytest.approx(20 * GIB) and t.changes == ()


def test_what_an_oom_proves_is_planned_for_until_the_next_settled_sample() -> None:
    t = settle(Tenants(), [(5.0, 9 * GIB, 10 * GIB), (10.0, 9 * GIB, 10 * GIB)])
    t = assume_at_least(t, 14 * GIB, 12.0)
    assert t.planned() == 14 * GIB and t.changes[-1][2] == 14 * GIB
    assert settle(t, [(15.0, 9 * GIB, 10 * GIB)]).planned() == pytest.approx(10 * GIB)


def test_an_arrival_an_oom_recorded_is_raised_to_the_level_a_settled_sample_confirms() -> None:
    t = settle(Tenants(), [(5.0, 0.0, 0.1 * GIB), (10.0, 0.0, 0.1 * GIB)])
    t = assume_at_least(t, 3 * GIB, 12.0)  # the OOM proved 3 GiB: the free memory it took
    t = confirm_arrival(t, 12.0, 9.6 * GIB)  # the next settled sample shows 9.6 GiB
    at, delta, after = t.changes[-1]
    assert at == 12.0 and delta == pytest.approx(9.5 * GIB) and after == pytest.approx(9.6 * GIB)
    assert confirm_arrival(t, 11.0, 20 * GIB).changes == t.changes  # no arrival recorded then: nothing to raise


# ----------------------------------------------------------------------------- the plan


def member(name: str, per_item: float, *, fixed: float = 10 * GIB, cur: int = 4, share: float = 1.0,
           hi: int = 64, trust: int = 1000, waste: float = 0.0, error: float = 0.0) -> Member:
    f = Fit(measured=True, fixed=fixed, worst_per_item=per_item, mean_per_item=per_item, waste_fraction=0.0,
            waste=waste, held_low=per_item, held_high=per_item, trust_cap=trust, jitter=0.0, error=error)
    svc = ServiceState(service=name, gpu=0, batch_size=cur, optimal=cur, reason="", changed_at=0.0, updated_at=0.0,
                       last_seen=0.0, memory=MemoryModel(fixed=fixed, largest_ok=cur))
    return Member(svc=svc, fit=f, cur=cur, lo=1, hi=hi, share=share)


def test_the_target_is_the_largest_batch_whose_worst_footprint_fits_the_bound() -> None:
    p = plan([member("a", 2 * GIB)], bound=70 * GIB, other=15 * GIB)
    assert p.targets == {"a": math.floor((70 - 15 - 10) / 2)}


def test_memory_is_divided_by_weight_and_a_capped_service_leaves_the_rest_to_the_others() -> None:
    a, b = member("a", GIB, share=2 / 3), member("b", GIB, share=1 / 3)
    assert plan([a, b], 50 * GIB, 0.0).targets == {"a": 20, "b": 10}  # 30 GiB for batches, 2:1
    capped = plan([dataclasses.replace(a, hi=8), b], 50 * GIB, 0.0)
    assert capped.targets == {"a": 8, "b": 22} and capped.capped == {"a": "max_batch_size"}
    # A trust region holds a service back for now: its part stays its own.
    trusted = plan([a, member("b", GIB, share=1 / 3, trust=6)], 50 * GIB, 0.0)
    assert trusted.targets == {"a": 20, "b": 6} and trusted.capped == {"b": "trust region"}



def test_what_the_parts_whole_items_leave_over_goes_to_whoever_it_holds_one_more_item_of() -> None:
    # 12 GiB for batches, split 6 / 3 / 3: "big" (2.5 GiB an item) holds 2 in its 6, the small ones
    # (1.25 GiB) 2 each in their 3. Left over: 12 - 5 - 2.5 - 2.5 = 2 GiB, which holds one more small
    # item (not a big one): it goes to the small service that runs it already, not to the other.
    big = member("big", 2.5 * GIB, share=0.5, cur=2)
    s1, s2 = member("s1", 1.25 * GIB, share=0.25, cur=2), member("s2", 1.25 * GIB, share=0.25, cur=3)
    p = plan([big, s1, s2], 30 * GIB + 12 * GIB, 0.0)
    assert p.targets == {"big": 2, "s1": 2, "s2": 3}
    assert 2 * 2.5 + 2 * 1.25 + 3 * 1.25 <= 12  # what fits together
    # and it may grow into it: its fits hold the item with the growth margin to spare
    assert grants([big, s1, dataclasses.replace(s2, cur=2)], p, room=12 * GIB, now=0.0) == {"s2": 1}
    # Where neither runs it yet, it takes the margin of a new item and goes to the lower share's fill.
    fresh = plan([big, s1, dataclasses.replace(s2, cur=2)], 30 * GIB + 12 * GIB, 0.0)
    assert sorted(fresh.targets.values()) == [2, 2, 3]
    # Too little left over for any item: nobody gets one.
    assert plan([big, s1, s2], 30 * GIB + 10.5 * GIB, 0.0).targets == {"big": 2, "s1": 2, "s2": 2}


def test_a_remainder_item_is_kept_while_it_fits_by_the_service_that_runs_it_and_taken_only_with_a_margin() -> None:
    # 11.26 GiB for batches: parts of 2, 2 and 2 items leave 1.26 GiB, one small item (1.25 GiB) and 0.01 GiB.
    big = member("big", 2.5 * GIB, share=0.5, cur=2)
    s1, s2 = member("s1", 1.25 * GIB, share=0.25, cur=2), member("s2", 1.25 * GIB, share=0.25, cur=3)
    p = plan([big, s1, s2], 30 * GIB + 11.26 * GIB, 0.0)
    # s2 runs that item: it keeps it while it fits, as an item of its own part (no share of an item to spare) ...
    assert p.targets == {"big": 2, "s1": 2, "s2": 3} and p.remainder == {"s2": 1}
    assert p.fits["s2"] == pytest.approx(3 + 0.01 / 1.25)
    # ... where a service that does not run it yet needs a quarter of an item to spare: nobody takes it.
    fresh = plan([big, s1, dataclasses.replace(s2, cur=2)], 30 * GIB + 11.26 * GIB, 0.0)
    assert fresh.targets == {"big": 2, "s1": 2, "s2": 2} and fresh.remainder == {}


def test_growth_into_the_remainder_comes_after_every_parts_own_growth() -> None:
    # The plan of the test above, none running the remainder's item yet: it goes to s1 (a tie with s2,
    # broken by name), whose target is then 3, one of them the remainder's.
    big = member("big", 2.5 * GIB, share=0.5, cur=1)
    s1, s2 = member("s1", 1.25 * GIB, share=0.25, cur=2), member("s2", 1.25 * GIB, share=0.25, cur=2)
    p = plan([big, s1, s2], 30 * GIB + 12 * GIB, 0.0)
    assert (p.targets, p.remainder) == ({"big": 2, "s1": 3, "s2": 2}, {"s1": 1})
    # Room for big's next item but not both: big grows into its own part first, s1 waits.
    assert grants([big, s1, s2], p, room=2.6 * GIB, now=0.0) == {"big": 1}
    assert grants([big, s1, s2], p, room=4 * GIB, now=0.0) == {"big": 1, "s1": 1}
    # The volatility reserve weighs the parts' items: the remainder's are not counted.
    assert plan_module._parts_items([big, s1, s2], p) == 2 + 2 + 2

def test_growth_shares_the_room_free_now_by_weight() -> None:
    a, b = member("a", GIB, share=0.5), member("b", GIB, share=0.5)
    p = plan([a, b], 60 * GIB, 0.0)  # targets 20 each, running 4 each
    assert grants([a, b], p, room=40 * GIB, now=0.0) == {"a": 16, "b": 16}  # up to target (no error to keep)
    assert grants([a, b], p, room=6 * GIB, now=0.0) == {"a": 3, "b": 3}


def test_growth_keeps_the_models_error_to_spare_and_grows_once_the_reports_narrow_it() -> None:
    # 24.1 GiB for a 6 GiB item: the part holds 4 items and 0.1 GiB, which the next reports may take back
    # while the worst per-item memory may still be 30 MiB short (4 items: 120 MiB), not once it is 20 MiB.
    unsure = member("a", 6 * GIB, cur=3, error=30 * MIB)
    p = plan([unsure], 10 * GIB + 24.1 * GIB, 0.0)
    assert p.targets == {"a": 4} and grants([unsure], p, room=7 * GIB, now=0.0) == {}
    surer = member("a", 6 * GIB, cur=3, error=20 * MIB)
    assert grants([surer], plan([surer], 10 * GIB + 24.1 * GIB, 0.0), room=7 * GIB, now=0.0) == {"a": 1}
    # a part that holds the item by less than a fixed fiftieth of it still grows, once the error is small
    assert 24.1 / 6 - 4 < 0.02


def test_a_tenant_that_keeps_coming_back_is_held_room_for_when_an_oom_costs_enough() -> None:
    ms = [member("a", GIB)]
    t = Tenants(level=0.0, changes=tuple((at, 10 * GIB, 10 * GIB) for at in (100.0, 230.0, 300.0, 400.0)))
    now = 450.0  # no period: it may come at any time
    assert t.period(now, 10 * GIB, 5.0) is None
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, now, Settings(oom_cost_s=600.0)) == 10 * GIB
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, now, Settings(oom_cost_s=0.0)) == 0.0


def test_holding_a_lower_level_than_a_tenant_keeps_coming_back_to_saves_nothing_of_its_ooms() -> None:
    """Arrivals to 10 GiB every 100 s, one to 3 GiB: holding 3 GiB is cheaper but every 10 GiB arrival
    still OOMs beside it; 10 GiB is the level worth holding."""
    ms = [member("a", GIB)]
    tens = tuple((100.0 * k, 10 * GIB, 10 * GIB) for k in range(1, 5))
    t = Tenants(level=0.0, changes=(*tens, (440.0, 3 * GIB, 3 * GIB)))
    assert volatility_reserve(t, ms, 70 * GIB, 0.0, 450.0, Settings(oom_cost_s=100.0)) == 10 * GIB


def test_a_newcomer_that_has_not_reported_is_assumed_to_load_weights_like_the_others() -> None:
    s = ADAPTIVE
    old = ServiceState(service="old", gpu=0, batch_size=8, optimal=8, reason="", changed_at=0.0, updated_at=0.0,
                       last_seen=0.0, memory=measured(GIB, fixed=12 * GIB))
    new = ServiceState(service="new", gpu=0, batch_size=1, optimal=1, reason="", changed_at=500.0, updated_at=500.0,
                       last_seen=500.0, registered_at=500.0)
    running = {"old": 8, "new": 1}
    early = {m.name: m for m in members([old, new], {"old": 0.5, "new": 0.5}, s, 500.0 + NEWCOMER_S - 1, running)}
    assert early["new"].assumed_fixed == pytest.approx(12 * GIB) and early["old"].assumed_fixed == 0.0
    late = {m.name: m for m in members([old, new], {"old": 0.5, "new": 0.5}, s, 500.0 + NEWCOMER_S + 1, running)}
    assert late["new"].assumed_fixed == 0.0
    # A cold start (nobody measured yet): what loads shows in the samples, nobody to make room.
    cold = members([new], {"new": 1.0}, s, 510.0, {"new": 1})
    assert cold[0].assumed_fixed == 0.0


def test_a_service_whose_reports_stopped_counts_with_the_other_tenants() -> None:
    s = ADAPTIVE
    fresh = member("a", GIB, fixed=10 * GIB, cur=4)
    fresh = dataclasses.replace(fresh, svc=dataclasses.replace(fresh.svc, reported_at=100.0))
    stale = dataclasses.replace(fresh, svc=dataclasses.replace(fresh.svc, reported_at=0.0))
    used = int(30 * GIB)  # 14 GiB the service's, 16 GiB someone else's
    counted = observe_tenants(GpuState(0, "u", "g"), used, [fresh], 100.0, s).tenants
    uncounted = observe_tenants(GpuState(0, "u", "g"), used, [stale], 100.0, s).tenants
    assert counted.level == pytest.approx(16 * GIB) and uncounted.level == pytest.approx(30 * GIB)


def test_a_late_starter_loading_its_weights_is_not_taken_for_a_volatile_tenant() -> None:
    """Its weights show as other tenants' memory until its first report; that arrival and the drop at its
    first report are the service's own, so no room is kept for them coming back."""
    base = one_service(noise=0.03)
    late = SimService(name="late", gpu=0, base_mb=12000, per_item_mb=800, item_ms=30, overhead_ms=100, noise=0.03,
                      start_s=300, load_s=40)
    run = WorldRun(dataclasses.replace(base, services=(*base.services, late)), dataclasses.replace(ADAPTIVE, oom_cost_s=600.0))
    run.run_until(600)
    tenants = run.engine.state.gpus[0].tenants
    assert tenants.peaks(run.t) == [] and tenants.level < 2 * GIB
    assert run.engine.state.services[(0, "late")].memory.measured


def test_a_cleanup_is_raised_when_the_waste_costs_an_item_and_not_for_less_than_half_of_one() -> None:
    s = ADAPTIVE
    gs = GpuState(0, "u", "g", last_cleanup_at=0.0)
    now = CLEANUP_MIN_INTERVALS * s.monitoring_interval + 100.0
    costly = dataclasses.replace(member("a", GIB, cur=20, waste=3 * GIB), fit=dataclasses.replace(
        member("a", GIB).fit, waste=3 * GIB, waste_fraction=3 / 20))
    p = plan([costly], 36 * GIB, 0.0)  # 26 GiB for batches: 22 items with the waste, 26 without
    assert want_cleanup([costly], p, gs, now, s, utilization=60.0) is costly
    assert want_cleanup([costly], p, dataclasses.replace(gs, last_cleanup_at=now - 1), now, s, 60.0) is None
    small = dataclasses.replace(costly, fit=dataclasses.replace(costly.fit, waste=0.2 * GIB, waste_fraction=0.01))
    roomy = plan([small], 80 * GIB, 0.0)
    assert want_cleanup([dataclasses.replace(small, hi=20)], roomy, gs, now, s, 60.0) is None
    # The same small waste on a GPU above its safety bound: worth clearing (still once per interval).
    assert want_cleanup([dataclasses.replace(small, hi=20)], roomy, gs, now, s, 60.0, over_bound=True) is not None
    spaced = dataclasses.replace(gs, last_cleanup_at=now - 1)
    assert want_cleanup([dataclasses.replace(small, hi=20)], roomy, spaced, now, s, 60.0, over_bound=True) is None


def wasting(name: str, *, cur: int, per_item: float = GIB, history: tuple[tuple[float, float], ...],
            hi: int = 64, share: float = 1.0) -> Member:
    """A measured member whose reports since the last cleanup showed the waste fractions ``history``."""
    base = member(name, per_item, cur=cur, hi=hi, share=share)
    t, w = history[-1]
    activations = cur * per_item
    return dataclasses.replace(base, fit=dataclasses.replace(base.fit, waste=w * activations, waste_fraction=w,
                                                             wastes=history))


def test_observe_keeps_the_waste_since_it_was_last_cleared() -> None:
    m = MemoryModel()
    for i, waste in enumerate((0.1 * GIB, 0.2 * GIB, 0.3 * GIB, 0.01 * GIB, 0.05 * GIB)):
        m = observe(m, 5.0 * i, 4, peak=int(14 * GIB), allocated=int(10 * GIB), reserved=int(14 * GIB + waste),
                    inactive_split=int(waste))
    # The fourth report's waste fell to a thirtieth of the third's: cleared, so its history restarts there.
    assert [t for t, _ in m.wastes] == [15.0, 20.0]
    assert m.wastes[-1][1] == pytest.approx(0.05 / 4)
    assert fit(m, 0.0, 20.0, 4).wastes == m.wastes


def test_a_cleanup_pays_for_an_item_lost_late_in_the_cycle_and_not_for_one_lost_at_its_start() -> None:
    """The renewal rule: cleaning every T s costs (what the waste cost over T + the stall) / T on average,
    least where T * loss(T) - its integral reaches the stall. An item the waste took only just now
    makes the cycle long and the cleanup worth it; one it took right after the last cleanup (and has
    cost since) would be lost again at once: cleaning it back is not worth the stall."""
    s = ADAPTIVE
    now = 300.0
    gs = GpuState(0, "u", "g", last_cleanup_at=0.0)
    # 22.5 items' worth of memory at 1 GiB each: 22 items with no waste; 2.3 % waste costs one of them.
    ramp = tuple((t, 0.03 * t / now) for t in range(5, 301, 5))  # the item lost at about 227 s
    late = wasting("a", cur=21, history=ramp)
    p = plan([late], 10 * GIB + 22.5 * GIB, 0.0)
    assert p.targets["a"] == 21
    assert want_cleanup([late], p, gs, now, s, utilization=60.0) is late
    early = wasting("a", cur=21, history=tuple((t, 0.03) for t in range(5, 301, 5)))  # lost at 5 s, paid since
    assert want_cleanup([early], p, gs, now, s, utilization=60.0) is None


def test_a_cleanup_stalls_every_service_of_the_gpu_so_its_gain_must_pay_for_each() -> None:
    s = ADAPTIVE
    now = 120.0
    gs = GpuState(0, "u", "g", last_cleanup_at=0.0)
    ramp = tuple((t, 0.03 * t / now) for t in range(5, 121, 5))  # an item of 22 lost at about 91 s
    alone = wasting("a", cur=21, history=ramp)
    p = plan([alone], 10 * GIB + 22.5 * GIB, 0.0)
    assert want_cleanup([alone], p, gs, now, s, utilization=60.0) is alone
    # The same waste next to three services it costs nothing: four stalls are more than the item lost gains.
    quiet = [member(f"q{i}", GIB, share=0.0) for i in range(3)]
    assert want_cleanup([alone, *quiet], p, gs, now, s, utilization=60.0) is None


def test_a_capped_batchs_waste_is_weighed_by_the_memory_it_takes_from_the_others() -> None:
    """A batch at its max_batch_size loses nothing to its own waste; the services held by memory beside it
    lose the memory it takes. Alone on its GPU, nobody does: no cleanup (but above the bound)."""
    s = ADAPTIVE
    now = 600.0
    gs = GpuState(0, "u", "g", last_cleanup_at=0.0)
    ramp = tuple((t, 1.0 * t / now) for t in range(5, 601, 5))  # its waste grew to its whole batch's memory
    capped = wasting("c", cur=16, per_item=0.25 * GIB, history=ramp, hi=16, share=0.5)
    assert want_cleanup([capped], plan([capped], 40 * GIB, 0.0), gs, now, s, utilization=60.0) is None
    bound = member("b", 2 * GIB, fixed=2 * GIB, cur=4, share=0.5)
    p = plan([capped, bound], 12 * GIB + 24 * GIB, 0.0)  # 12 GiB each; 4 of the capped one's go to the other
    assert p.capped.get("c") == "max_batch_size" and "b" not in p.capped
    assert want_cleanup([capped, bound], p, gs, now, s, utilization=60.0) is capped


# ----------------------------------------------------------------------------- OOM reports


def harness_with_measured_service(per_item: float = 3 * GIB) -> Harness:
    h = Harness(ADAPTIVE)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(12):
        b = h.batch()
        used = 18 * GIB + b * per_item
        h.engine.report("vlm", 0, h.t, batch_size=b, peak_bytes=int(used), allocated_bytes=18 * GIB,
                        reserved_bytes=int(used), inactive_split_bytes=0)
        h.tick(gpu(used / GIB))
    return h


def test_an_oom_report_cuts_the_batch_at_once_by_ten_percent_at_least() -> None:
    h = harness_with_measured_service()
    before = h.batch()
    assert before >= 10
    decision = h.engine.report("vlm", 0, h.t + 1, batch_size=before, oom=True)
    assert decision.batch_size <= math.floor(before * 0.9)
    assert h.engine.state.services[(0, "vlm")].oom_pending is not None


def test_an_oom_the_model_cannot_explain_raises_its_per_item_memory_so_that_size_is_not_published_again() -> None:
    h = harness_with_measured_service()
    failed = h.batch()
    h.engine.report("vlm", 0, h.t + 1, batch_size=failed, oom=True)
    for _ in range(40):  # the same conditions: nothing else on the GPU, the same per-item memory
        b = h.batch()
        used = 18 * GIB + b * 3 * GIB
        h.engine.report("vlm", 0, h.t, batch_size=b, peak_bytes=int(used), allocated_bytes=18 * GIB,
                        reserved_bytes=int(used), inactive_split_bytes=0)
        h.tick(gpu(used / GIB))
        assert h.batch() < failed
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.oom_pending is None and svc.memory.floor > 3 * GIB


def test_an_oom_explained_by_an_arrival_leaves_the_model_alone() -> None:
    h = harness_with_measured_service()
    failed = h.batch()
    h.engine.report("vlm", 0, h.t + 1, batch_size=failed, oom=True)
    for _ in range(3):  # a 20 GiB tenant arrived: the samples show it
        b = h.batch()
        used = 18 * GIB + b * 3 * GIB + 20 * GIB
        h.engine.report("vlm", 0, h.t, batch_size=b, peak_bytes=int(18 * GIB + b * 3 * GIB), allocated_bytes=18 * GIB,
                        reserved_bytes=int(18 * GIB + b * 3 * GIB), inactive_split_bytes=0)
        h.tick(gpu(used / GIB))
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.oom_pending is None and svc.memory.floor == 0.0
    assert "explained" in " ".join(e.detail or "" for e in h.engine.events if e.trigger == "oom_model")


def oom_after(last_sample: float, now: float = 101.0) -> tuple[int, Tenants]:
    """The batch after an OOM at ``now`` of a service at 65 items of 1 GiB (10 GiB fixed) on an 80 GiB
    GPU whose tenants held nothing at the last settled sample, at ``last_sample``: it proves 5 GiB."""
    a = member("a", GIB, cur=65)
    t = settle(Tenants(), [(last_sample - 5.0, 0.0, 0.0), (last_sample, 0.0, 0.0)])
    s = Settings(strategy=Strategy.ADAPTIVE, max_batch_size=128)
    batch, t = controller.oom_cut([a], a, math.floor(65 * controller.OOM_CUT), 80 * GIB, 75 * GIB, t, s, now)
    return batch, t


def test_an_oom_plans_for_what_arrived_carried_on_at_its_pace_until_a_settled_sample_can_act() -> None:
    """The OOM proves only the free memory taken (5 GiB). Right after a sample, that came within a
    second: a sudden arrival, likely larger; four times it still fits after one cut (a cut to what
    the OOM proves alone, 60 items, or of 10 %, 58, would OOM again at once). After a longer quiet
    the pace is slower (a ramp), and the cut holds while it goes on over the horizon."""
    sudden, t = oom_after(last_sample=100.0)
    assert 10 * GIB + sudden * GIB + 4 * 5 * GIB <= 80 * GIB
    assert t.changes[-1][2] == pytest.approx(5 * GIB)  # the volatility judgement records what it proved
    ramp, _ = oom_after(last_sample=91.0)
    pace = 5 * GIB / 10.0
    horizon = controller.OOM_HORIZON_INTERVALS * 5.0
    assert sudden < ramp < 58
    assert 10 * GIB + ramp * GIB + 5 * GIB + pace * horizon <= 80 * GIB


# ----------------------------------------------------------------------------- the guarantees, in the world

QUIET = ("steady-h100", "declared-too-low", "two-services", "heat", "cotenant-at-startup")


@pytest.mark.parametrize("name", QUIET)
def test_safety_no_oom_without_an_arrival_and_the_bound_held_almost_always(name: str) -> None:
    """Safety for adaptive: the worst footprint its model predicts fits the bound, so a scenario without
    a sudden arrival has no OOM, and the GPU is above the bound (a jitter beyond every one seen) for
    well under 1 % of the run."""
    sc = load_scenario(ROOT / f"examples/scenarios/{name}.yaml")
    r = simulate(sc, ADAPTIVE, strategy=Strategy.ADAPTIVE)
    assert [s.ooms for s in r.services] == [0] * len(r.services)
    assert all(g.seconds_above_bound <= 0.01 * sc.duration_s for g in r.gpus)


def test_safety_on_generated_scenarios_the_ooms_stay_within_the_unavoidable_ones() -> None:
    drawn = [g for g in generate(12, seed=2024, duration_s=1800)]
    excess = []
    for g in drawn:
        r = simulate(g.scenario, ADAPTIVE, strategy=Strategy.ADAPTIVE)
        excess.append(sum(s.ooms for s in r.services) - g.unavoidable_ooms)
    assert max(excess) <= 1 and sum(x > 0 for x in excess) <= 1, excess


@pytest.mark.parametrize("name", ["steady-h100", "declared-too-low", "rtx4090-small-vlm"])
def test_convergence_within_two_minutes_to_within_one_item_of_where_it_settles(name: str) -> None:
    sc = load_scenario(ROOT / f"examples/scenarios/{name}.yaml")
    r = simulate(sc, ADAPTIVE, strategy=Strategy.ADAPTIVE)
    svc = r.services[0]
    at_two_minutes = [b for t, b in svc.batches if t <= 120][-1]
    assert abs(at_two_minutes - svc.final_batch_size) <= 1, svc.batches
    assert svc.safe_ratio >= 0.97


def test_reaction_a_sudden_arrival_lowers_the_batch_on_the_next_sample_and_its_departure_regrows_it_soon() -> None:
    arrival = Background(gpu=0, at_s=900, mb=6000, for_s=600)  # fits the free memory, not the bound
    run = WorldRun(one_service(background=(arrival,), noise=0.03), ADAPTIVE)
    run.run_until(895)
    settled = run.batch()
    run.run_until(900 + 2 * ADAPTIVE.monitoring_interval)
    assert run.batch() < settled  # the sample that shows it (or the OOM report it causes)
    lowered = run.batch()
    run.run_until(1500 + 4 * ADAPTIVE.monitoring_interval)  # not the next optimization interval: samples
    assert run.batch() > lowered and run.batch() >= settled - 1


@pytest.mark.parametrize(("noise", "seed"), [(n, s) for n in (0.05, 0.1) for s in range(4)])
def test_stability_a_steady_load_changes_at_most_once_per_ten_minutes_after_settling(noise: float, seed: int) -> None:
    base = load_scenario(ROOT / "examples/scenarios/steady-h100.yaml")
    sc = dataclasses.replace(base, seed=seed, duration_s=7200,
                             services=(dataclasses.replace(base.services[0], noise=noise, max_batch_size=64),))
    r = simulate(sc, ADAPTIVE, strategy=Strategy.ADAPTIVE)
    changes = [t for t, _ in r.services[0].batches if t > 600]
    assert all(b - a >= 600 for a, b in zip(changes, changes[1:])), r.services[0].batches
    assert r.services[0].ooms == 0


def test_heat_a_hot_gpu_holds_its_batches_neither_growing_nor_stepping_down() -> None:
    """Adaptive's heat rule: hold. A throttled GPU's items are set by its heat budget, not the batch, so a
    step down only loses items (bench/heat_rule.py measures it); growth waits for the GPU to cool."""
    hot = Thermal(gpu=0, at_s=900, celsius=40, for_s=600)
    leaving = Background(gpu=0, at_s=0, mb=15000, for_s=1000)  # leaves while hot: room to grow, not taken
    run = WorldRun(one_service(thermal=(hot,), background=(leaving,), noise=0.0), ADAPTIVE)
    run.run_until(895)
    seen_hot = 0
    held_back = 0
    prev = run.batch()
    while run.t < 1500:
        snap = run.tick()
        temp = snap.gpus[0].temperature_celsius
        assert temp is not None
        if temp >= ADAPTIVE.temperature_threshold:
            seen_hot += 1
            assert run.batch() == prev
            held_back += "GPU hot: not growing" in run.engine.state.services[(0, "vlm")].reason
        prev = run.batch()
    assert seen_hot > 50 and held_back > 10  # the co-tenant left at 1000 s: room it did not take while hot
    run.run_until(1700)  # cooled: it grows into the room the co-tenant left
    assert run.batch() > prev


def test_disabled_adaptive_publishes_the_default_batch() -> None:
    s = dataclasses.replace(ADAPTIVE, enabled=False, default_batch_size=6)
    run = WorldRun(one_service(), s)
    run.run_until(600)
    assert run.batch() == 6 and "disabled" in run.engine.state.services[(0, "vlm")].reason


def test_a_client_whose_batch_never_changes_still_gets_measured_and_grows() -> None:
    """No deadlock: without allocated_bytes one batch size cannot split fixed from per-item memory;
    the trust region lets it step up by two items, and two sizes measure it."""
    h = Harness(ADAPTIVE)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(30):
        b = h.batch()
        used = 18 * GIB + b * 3 * GIB
        h.engine.report("vlm", 0, h.t, batch_size=b, peak_bytes=int(used))
        h.tick(gpu(used / GIB))
    svc = h.engine.state.services[(0, "vlm")]
    assert svc.memory.fixed == pytest.approx(18 * GIB, rel=0.01)
    assert h.batch() >= math.floor((80 * 0.95 - 1 - 18) / 3) - 2


def test_a_tenant_that_keeps_coming_back_is_kept_room_for_when_an_oom_costs_enough() -> None:
    """oom_cost_s weighs riding a bursting tenant's memory against holding it room: cheap OOMs, ride it
    (grow between bursts, cut when one comes); dear ones, keep its room once its bursts have a rate.
    Its bursts keep a period, so the room is kept from shortly before the next is due, not between."""
    burst = Background(gpu=0, at_s=300, mb=10000, ramp_s=10, for_s=40, every_s=150)
    sc = one_service(background=(burst,), noise=0.03, duration_s=2400)
    cheap = simulate(sc, dataclasses.replace(ADAPTIVE, oom_cost_s=0.0), strategy=Strategy.ADAPTIVE).services[0]
    dear = simulate(sc, dataclasses.replace(ADAPTIVE, oom_cost_s=600.0), strategy=Strategy.ADAPTIVE).services[0]

    def batch_at(r: ServiceResult, t: float) -> int:
        return [b for at, b in r.batches if at <= t][-1]

    for arrival in range(1350, 2400, 150):  # a few bursts in
        assert batch_at(dear, arrival - 1) <= batch_at(cheap, arrival - 1) - 2  # about 10 GiB of 3.2 GiB items free
        assert batch_at(dear, arrival + 90) == batch_at(cheap, arrival + 90)  # grown back between bursts
    assert cheap.ooms == dear.ooms == 0


def test_fragmentation_is_judged_per_service_and_cleanups_are_spaced() -> None:
    sc = load_scenario(ROOT / "examples/scenarios/fragmentation-drift.yaml")
    quiet = SimService(name="quiet", gpu=0, base_mb=20000, per_item_mb=500, item_ms=30, overhead_ms=100, noise=0.02)
    sc = dataclasses.replace(sc, services=(*sc.services, quiet), duration_s=1800)
    r = simulate(sc, ADAPTIVE, strategy=Strategy.ADAPTIVE, record=True)
    cleanups = [e.timestamp for e in r.engine.events if e.kind == "cleanup_raised"]
    assert len(cleanups) >= 3
    assert all(b - a >= CLEANUP_MIN_INTERVALS * ADAPTIVE.monitoring_interval for a, b in zip(cleanups, cleanups[1:]))

