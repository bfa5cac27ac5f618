"""The simulated world's rules: who gets memory, what an OOM costs, restarts, cleanups, heat, leaks, pools."""

from __future__ import annotations

import dataclasses
import math

import pytest

from optimizer.simulation.physics import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    Demand,
    allocate,
    backoff_s,
    clock_fraction,
    compute_share,
    temperature_c,
    throughput_per_ms,
)
from optimizer.simulation.scenario import Background, Scenario, SimGpu, SimService, Thermal
from optimizer.simulation.world import Start, World

BASE = 10_000.0
ITEM = 1_000.0


def service(name: str = "vlm", **kw: object) -> SimService:
    fields: dict[str, object] = dict(name=name, gpu=0, base_mb=BASE, per_item_mb=ITEM, item_ms=40, overhead_ms=100,
                                     load_s=0.0)
    fields.update(kw)
    return SimService(**fields)  # type: ignore[arg-type]


def world(*services: SimService, total_mb: float = 30_000, background: tuple[Background, ...] = (),
          thermal: tuple[Thermal, ...] = (), gpu: SimGpu | None = None, **scenario: object) -> World:
    sc = Scenario(name="world-test", seed=3, duration_s=3600, step_s=1.0,
                  gpus=(gpu or SimGpu(index=0, name="Simulated GPU", total_mb=total_mb),),
                  services=services or (service(),), background=background, thermal=thermal)
    return World(dataclasses.replace(sc, **scenario), poll_interval=5.0)  # type: ignore[arg-type]


class Link:
    """A fixed batch per service; records every report, start and poll."""

    def __init__(self, batch: int = 10, *, start: Start | None = None, after_oom: int | None = None) -> None:
        self.batch = batch
        self.after_oom = after_oom
        self.start = start
        self.epoch = 0
        self.ooms: list[tuple[float, str, int]] = []
        self.reports: list[tuple[float, str, int, int | None, int | None, int | None]] = []
        self.starts: list[tuple[float, str, float]] = []

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        return self.batch, self.epoch

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool,
               inactive_split_bytes: int | None = None) -> int:
        if oom:
            self.ooms.append((t, service, batch_size))
            if self.after_oom is not None:
                self.batch = self.after_oom
        else:
            self.reports.append((t, service, batch_size, peak_bytes, allocated_bytes, reserved_bytes))
        return self.batch

    def started(self, service: str, gpu: int, t: float, *, free_mb: float, total_mb: float) -> Start | None:
        self.starts.append((t, service, free_mb))
        return self.start


# --------------------------------------------------------------------------- the allocation rule


def test_held_memory_stays_and_the_increment_that_does_not_fit_fails() -> None:
    # 100 MiB: a service holds 60 and wants 70; a co-tenant arrives asking 35: only 40 is free.
    demands = [Demand("svc", 60, 70, arriving=False), Demand("cotenant", 0, 35, arriving=True)]
    assert allocate(100, demands) == ["svc"]  # the arrival is served first; the batch's 10 more no longer fit
    demands = [Demand("svc", 60, 70, arriving=False), Demand("cotenant", 0, 45, arriving=True)]
    assert allocate(100, demands) == ["cotenant"]  # 45 does not fit in 40; the service's 10 more then do


def test_the_smaller_arrival_goes_first_and_a_failure_frees_what_it_held() -> None:
    demands = [Demand("big", 0, 30, arriving=True), Demand("small", 0, 20, arriving=True)]
    assert allocate(40, demands) == ["big"]
    # A service whose batch fails releases its batch memory for the increments after it.
    demands = [Demand("a", 20, 30, arriving=False), Demand("b", 10, 25, arriving=False),
               Demand("c", 0, 5, arriving=True)]
    assert allocate(40, demands) == ["a"]  # held 30, c takes 5: 5 free; a asks 10 (fails, frees 20); b gets 15


def test_a_demand_fails_with_what_it_needs() -> None:
    demands = [Demand("w", 0, 50, arriving=True), Demand("act", 0, 1, arriving=False, needs="w")]
    assert allocate(40, demands) == ["w", "act"]


def test_shrinking_frees_memory_at_once() -> None:
    assert allocate(100, [Demand("svc", 90, 40, arriving=False), Demand("co", 0, 55, arriving=True)]) == []


def test_backoff_doubles_from_ten_seconds_to_five_minutes() -> None:
    assert [backoff_s(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff_s(1) == BACKOFF_INITIAL_S and backoff_s(50) == BACKOFF_MAX_S


# --------------------------------------------------------------------------- co-tenants


def test_a_cotenant_arriving_into_a_full_gpu_fails_and_retries_after_a_back_off() -> None:
    # The service holds 10000 + 10 * 1000 = 20000 of 30000: a 15000 MiB co-tenant does not fit.
    w = world(background=(Background(gpu=0, at_s=100, mb=15_000),))
    trace = w.record()
    w.advance_to(800, Link(batch=10))
    failures = [t for t, _ in trace.cotenant_failures]
    assert failures[:4] == [100, 111, 132, 173]  # after 10 s, 20 s, 40 s (each from the step after the failure)
    assert w.gpu_runs[0].cotenant_failures == len(failures)
    assert w.runs[0].ooms == 0 and max(u for _, u in trace.used_mb[0]) == pytest.approx(20_000)


def test_a_cotenant_that_fits_gets_in_and_the_service_ooms_when_its_batch_asks_for_more() -> None:
    # 8000 MiB fit in the 10000 free; then the jitter asks for more than the 2000 left: an OOM.
    w = world(service(noise=0.3), background=(Background(gpu=0, at_s=100, mb=8_000),))
    trace = w.record()
    link = Link(batch=10, after_oom=6)
    w.advance_to(200, link)
    assert w.gpu_runs[0].cotenant_failures == 0
    assert w.runs[0].ooms == 1 and trace.ooms[0][0] > 100
    assert link.ooms == [(trace.ooms[0][0], "vlm", 10)]
    assert w.runs[0].batch == 6


def test_a_bursting_cotenant_comes_back_every_period() -> None:
    b = Background(gpu=0, at_s=100, mb=5_000, for_s=30, every_s=120)
    assert [b.level(t) for t in (99, 100, 129, 130, 219, 220, 249, 250)] == [0, 5000, 5000, 0, 0, 5000, 5000, 0]
    w = world(background=(b,))
    w.advance_to(500, Link(batch=10))
    assert w.used_mb[0] == pytest.approx(20_000)  # gone at 490-500 (stays 460-490)


# --------------------------------------------------------------------------- what an OOM costs


def test_an_oom_costs_the_step_and_the_recovery_time_with_the_weights_still_held() -> None:
    w = world(service(), total_mb=15_000, oom_recovery_s=3.0)  # batch 10 needs 20000: never fits
    trace = w.record()
    w.advance_to(20, Link(batch=10))
    assert [t for t, _, _ in trace.ooms] == [0, 4, 8, 12, 16]  # each OOM, then 3 s of recovery
    assert w.runs[0].items == 0 and w.runs[0].seconds_down == 20
    assert all(used == BASE for _, used in trace.used_mb[0])


def test_after_an_oom_the_next_report_carries_the_peak_of_the_new_batch_only() -> None:
    # Batch 12 runs (22 000 MiB) until a co-tenant takes 9 000 MiB at 3 s; its next ask fails, the
    # reply lowers it to 5 mid-interval, and the report at the next poll is of batch 5's peak alone
    # (the client library keeps only the peaks measured at its latest batch size).
    jitter = Background(gpu=0, at_s=3, mb=9_000)
    w = world(service(noise=0.1), total_mb=31_000, background=(jitter,))
    link = Link(batch=12, after_oom=5)
    w.advance_to(12, link)
    assert link.ooms, "the co-tenant should have cost an OOM"
    oom_t = link.ooms[0][0]
    after = [(t, b, peak) for t, _, b, peak, _, _ in link.reports if t > oom_t]
    assert after and all(b == 5 and peak is not None and peak <= (BASE + 5 * ITEM * 1.1) * 2**20 + 1
                         for t, b, peak in after)


def test_in_crash_mode_an_oom_kills_the_process_which_restarts_after_the_back_off() -> None:
    w = world(service(), total_mb=15_000, oom_mode="crash", restart_s=30.0)
    trace = w.record()
    link = Link(batch=10)
    w.advance_to(400, link)
    crashes = [t for t, _, _ in trace.ooms]
    # Up at 0, crash; back after 10 + 30 s; crash; 20 + 30 s; crash; 40 + 30 s; ...
    assert crashes == [0, 41, 92, 163, 274]
    assert [t for t, _, _ in link.starts] == [0, 41, 92, 163, 274]
    assert w.runs[0].restarts == 5 and w.runs[0].ooms == 5
    down = [u for t, u in trace.used_mb[0] if 1 <= t < 41]
    assert down and all(u == 0 for u in down)  # a dead process holds nothing


def test_the_crash_back_off_resets_after_ten_minutes_up() -> None:
    # Batch 20 needs 30000 of 25000: a crash at once; then 10 runs for more than ten minutes, until 20 again.
    w = world(service(), total_mb=25_000, oom_mode="crash", restart_s=0.0)
    trace = w.record()
    link = Link(batch=20, after_oom=10)
    w.advance_to(700, link)
    assert [t for t, _, _ in trace.ooms] == [0]
    link.batch = 20
    w.advance_to(800, link)
    second = [t for t, _, _ in trace.ooms][1]
    assert [t for t, _, _ in link.starts] == [0, 11, second + 1 + BACKOFF_INITIAL_S]  # 10 s again, not 20


def test_a_service_that_cannot_load_its_weights_fails_to_start_and_retries() -> None:
    # The first service fills the GPU; the second (starting at 60 s) needs 10000 MiB of weights.
    w = world(service("a"), service("b", start_s=60), total_mb=25_000, restart_s=5.0)
    link = Link(batch=10)
    w.advance_to(100, link)
    a, b = w.runs
    assert a.ooms == 0 and b.ooms >= 1 and b.restarts >= 1 and b.items == 0
    assert not any(s == "b" for _, s, _ in link.ooms)  # a process that could not start reports nothing


# --------------------------------------------------------------------------- cleanups


def test_a_cleanup_frees_the_waste_and_costs_a_stall() -> None:
    w = world(service(fragmentation_growth_per_min=0.05), cleanup_stall_s=2.0)
    link = Link(batch=10)
    w.advance_to(60, link)
    wasted = w.runs[0].reserved_mb - w.runs[0].allocated_mb
    assert wasted > 0
    items = w.runs[0].items
    link.epoch = 1
    w.advance_to(70, link)
    run = w.runs[0]
    assert run.cleanups == 1 and run.seconds_down == 2.0
    per_second = throughput_per_ms(10, run.spec) * 1000
    assert run.items - items == pytest.approx(per_second * 8)
    assert run.fragmentation < 0.05 * 10 / 60 + 1e-9


# --------------------------------------------------------------------------- heat


def test_throttled_throughput_is_set_by_the_heat_budget_not_the_batch() -> None:
    gpu = SimGpu(index=0, name="hot", total_mb=80_000, idle_temperature_c=40, load_temperature_rise_c=40,
                 slowdown_temperature_c=85, min_clock_fraction=0.2)
    spec = service()
    thermal = 30.0  # 40 + 30 + 40 * util: above 85 C from util 0.375
    rates = []
    for b in (4, 8, 16):
        util = compute_share(b, spec)
        clock = clock_fraction(gpu, util, thermal)
        assert clock < 1
        assert temperature_c(gpu, util, thermal, clock) == pytest.approx(85)
        rates.append(throughput_per_ms(b, spec) * clock)
    assert rates == pytest.approx([rates[0]] * 3)
    assert clock_fraction(gpu, compute_share(1, spec), thermal) == 1.0  # cool enough at batch 1
    assert clock_fraction(gpu, 0.5, 60.0) == gpu.min_clock_fraction  # no budget left at all


def test_a_throttled_gpu_runs_fewer_items_and_counts_the_time() -> None:
    hot = Thermal(gpu=0, at_s=100, celsius=40, for_s=100)
    w = world(service(), total_mb=80_000, thermal=(hot,))
    w.advance_to(300, Link(batch=16))
    cool = world(service(), total_mb=80_000)
    cool.advance_to(300, Link(batch=16))
    assert w.gpu_runs[0].seconds_throttled == 100
    assert w.runs[0].items < cool.runs[0].items
    assert w.temperature[0] < 36 + 30 + 1e-9  # after the event: idle + full load
    assert w.runs[0].safe_oracle_items < cool.runs[0].safe_oracle_items  # the ceiling is throttled too


def test_the_sample_reports_thermal_throttling_while_the_world_throttles() -> None:
    hot = Thermal(gpu=0, at_s=100, celsius=40, for_s=100)
    w = world(service(), total_mb=80_000, thermal=(hot,))
    w.advance_to(50, Link(batch=16))
    assert w.sample(50.0)[0].throttle_reasons == frozenset()  # reported, and nothing active
    w.advance_to(150, Link(batch=16))
    assert w.clock[0] < 1.0
    assert w.sample(150.0)[0].throttle_reasons == frozenset({"sw_thermal_slowdown"})
    w.advance_to(250, Link(batch=16))
    assert w.sample(250.0)[0].throttle_reasons == frozenset()


# --------------------------------------------------------------------------- drift


def test_a_leak_grows_the_fixed_memory_until_the_process_restarts() -> None:
    w = world(service(leak_mb_per_min=600), total_mb=80_000)
    w.advance_to(600, Link(batch=10))
    assert w.runs[0].leak_mb == pytest.approx(6000)
    assert w.used_mb[0] == pytest.approx(BASE + 6000 + 10 * ITEM, rel=1e-3)


def test_per_item_memory_changes_at_the_times_given() -> None:
    spec = service(per_item_changes=((100.0, 1500.0), (200.0, 800.0)))
    assert [spec.per_item_at(t) for t in (0, 99, 100, 199, 200, 1e6)] == [1000, 1000, 1500, 1500, 800, 800]
    w = world(spec, total_mb=80_000)
    w.advance_to(150, Link(batch=10))
    assert w.used_mb[0] == pytest.approx(BASE + 10 * 1500)


# --------------------------------------------------------------------------- static pools (vLLM-style)


def test_a_static_pool_is_held_whole_and_runs_as_many_items_as_fit() -> None:
    w = world(service(noise=0.1), total_mb=30_000)
    w.advance_to(100, Link(batch=64, start=Start(pool_mb=27_000)))
    run = w.runs[0]
    assert w.used_mb[0] == 27_000 and run.ooms == 0
    full = throughput_per_ms(17, run.spec) * 1000 * 100  # (27000 - 10000) / 1000 items at the mean
    assert run.items == pytest.approx(full, rel=0.06)


def test_a_start_that_fails_its_check_is_retried_after_the_back_off() -> None:
    link = Link(start=Start(failed=True))
    w = world(service(), restart_s=0.0)
    w.advance_to(100, link)
    assert [t for t, _, _ in link.starts] == [0, 10, 30, 70]
    assert w.runs[0].items == 0 and w.runs[0].restarts == 4


# --------------------------------------------------------------------------- the measures


def test_the_ceilings_count_every_started_service_even_while_it_is_down() -> None:
    w = world(service(), total_mb=15_000, oom_mode="crash")
    w.advance_to(100, Link(batch=10))
    run = w.runs[0]
    fit = math.floor((15_000 * 0.95 - 1024 - BASE) / ITEM)
    assert run.safe_oracle_items == pytest.approx(throughput_per_ms(fit, run.spec) * 1000 * 100)
    assert run.items < run.safe_oracle_items


def test_a_service_whose_share_holds_no_item_is_credited_one_and_the_others_share_the_rest() -> None:
    # Room for batches: 30 000 - 2 * 10 000 = 10 000 MiB, shared 5 000 / 5 000 by weight. "big"
    # needs 6 000 per item: its share holds none, but one item fits, so the ceiling credits it one
    # and "small" the 4 000 left (4 items of 1 000), never more than fits together.
    w = world(service("big", per_item_mb=6_000.0), service("small"), total_mb=30_000)
    ceilings = {name: w.oracle_batch(name, 0, 10.0) for name in ("big", "small")}
    assert ceilings == {"big": 1, "small": 4}
    assert 2 * BASE + 6_000 * ceilings["big"] + ITEM * ceilings["small"] <= 30_000
    # Where one item does not fit either, the ceiling is 0 for it and the other keeps the whole room.
    w = world(service("huge", per_item_mb=12_000.0), service("small"), total_mb=30_000)
    assert (w.oracle_batch("huge", 0, 10.0), w.oracle_batch("small", 0, 10.0)) == (0, 10)



def test_what_the_shares_whole_items_leave_over_is_credited_to_whoever_it_holds_one_more_item_of() -> None:
    # Room for batches: 31 000 - 2 * 10 000 = 11 000 MiB, 5 500 each by weight: "big" (2 000 an item)
    # holds 2 of its share, "small" (1 000) 5. Left over: 11 000 - 4 000 - 5 000 = 2 000: one more big
    # item (it is the furthest below its share), never more than fits together.
    w = world(service("big", per_item_mb=2_000.0), service("small"), total_mb=31_000)
    ceilings = {name: w.oracle_batch(name, 0, 10.0) for name in ("big", "small")}
    assert ceilings == {"big": 3, "small": 5}
    assert 2 * BASE + 2_000 * ceilings["big"] + ITEM * ceilings["small"] <= 31_000

def test_the_time_above_the_safety_bound_is_counted_per_gpu() -> None:
    # Bound: 30 000 * 0.95 - 1024 = 27 476 MiB. Batch 17 holds 27 000 (below), batch 18 28 000 (above).
    below, above = world(), world()
    below.advance_to(60, Link(batch=17))
    above.advance_to(60, Link(batch=18))
    assert below.gpu_runs[0].seconds_above_bound == 0.0
    assert above.gpu_runs[0].seconds_above_bound == pytest.approx(60.0, abs=1.0)
    assert above.runs[0].ooms == 0  # above the bound is not out of memory
