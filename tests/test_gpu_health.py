"""GPU health in the NVML backend, against the fake ``pynvml`` of :mod:`tests.test_nvml_backend`.

Xid critical errors through an NVML event set, ECC counts, retired pages, row remapping and clock
reasons, with the real library's names, constants and errors. A fatal Xid marks its GPU failed
(``/status``, ``vlm_gpu_up``) while the other GPUs go on, over a real server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pynvml
import pytest

from optimizer.config import Settings
from optimizer.gpu import nvml as mod
from optimizer.simulation.backend import SimulatedBackend
from optimizer.gpu.nvml import NvmlBackend
from optimizer.gpu.types import FATAL_XIDS, THROTTLE_REASONS
from optimizer.simulation.run import simulate
from optimizer.simulation.scenario import HealthEvent, ScenarioError, parse_scenario, scenario_to_dict
from tests.api_harness import MakeApi
from tests.test_nvml_backend import (
    CLOCK_EVENT_REASONS,
    CLOCK_THROTTLE_REASONS,
    ECC_TOTAL,
    EVENT_SET_CREATE,
    EVENT_SET_FREE,
    EVENT_WAIT,
    GIB,
    HEALTH_FUNCTIONS,
    MEM_V2,
    REGISTER_EVENTS,
    REMAPPED_ROWS,
    RETIRED_PAGES,
    RETIRED_PENDING,
    FakeNvml,
    assert_reads,
    three_gpus,
)

CORR, UNCORR = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
VOLATILE, AGGREGATE = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml(three_gpus())


@pytest.fixture
def backend(fake: FakeNvml) -> Iterator[NvmlBackend]:
    b = NvmlBackend(nvml=fake)
    yield b
    b.close()


def test_health_constants_match_the_real_library() -> None:
    assert mod.NVML_ERROR_TIMEOUT == pynvml.NVML_ERROR_TIMEOUT
    assert mod.NVML_EVENT_TYPE_XID_CRITICAL_ERROR == pynvml.nvmlEventTypeXidCriticalError
    assert mod.NVML_MEMORY_ERROR_TYPE_CORRECTED == CORR and mod.NVML_MEMORY_ERROR_TYPE_UNCORRECTED == UNCORR
    assert mod.NVML_VOLATILE_ECC == VOLATILE and mod.NVML_AGGREGATE_ECC == AGGREGATE
    assert (mod.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
            == pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
    assert mod.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    real = {"gpu_idle": "GpuIdle", "applications_clocks_setting": "ApplicationsClocksSetting",
            "sw_power_cap": "SwPowerCap", "hw_slowdown": "HwSlowdown", "sync_boost": "SyncBoost",
            "sw_thermal_slowdown": "SwThermalSlowdown", "hw_thermal_slowdown": "HwThermalSlowdown",
            "hw_power_brake_slowdown": "HwPowerBrakeSlowdown", "display_clock_setting": "DisplayClockSetting"}
    assert tuple(real) == THROTTLE_REASONS
    for ours, theirs in real.items():
        assert mod.THROTTLE_REASON_BITS[ours] == getattr(pynvml, f"nvmlClocksEventReason{theirs}")
        assert mod.THROTTLE_REASON_BITS[ours] == getattr(pynvml, f"nvmlClocksThrottleReason{theirs}")
    # The real wrappers the backend calls exist under these names.
    for name in (EVENT_SET_CREATE, REGISTER_EVENTS, EVENT_WAIT, "nvmlEventSetWait", EVENT_SET_FREE, *HEALTH_FUNCTIONS,
                 CLOCK_THROTTLE_REASONS):
        assert callable(getattr(pynvml, name)), name


def test_a_healthy_board_reports_zeros_and_no_throttling(fake: FakeNvml, backend: NvmlBackend) -> None:
    samples = backend.sample(1.0)
    assert fake.registered == [(i, pynvml.nvmlEventTypeXidCriticalError) for i in range(3)]
    for i, s in enumerate(samples):
        assert_reads(s, fake.gpus[i], index=i, now=1.0)
        assert s.xid_errors == () and s.last_xid is None and s.last_xid_at is None
        assert (s.ecc_corrected_volatile, s.ecc_uncorrected_volatile) == (0, 0)
        assert (s.ecc_corrected_aggregate, s.ecc_uncorrected_aggregate) == (0, 0)
        assert (s.retired_pages_sbe, s.retired_pages_dbe, s.retired_pages_pending) == (0, 0, False)
        assert (s.remapped_rows_correctable, s.remapped_rows_uncorrectable) == (0, 0)
        assert (s.remapped_rows_pending, s.remapped_rows_failure) == (False, False)
        assert s.throttle_reasons == frozenset()


def test_ecc_pages_rows_and_reasons_are_read(fake: FakeNvml, backend: NvmlBackend) -> None:
    h = fake.health[1]
    h.ecc = {(CORR, VOLATILE): 12, (UNCORR, VOLATILE): 2, (CORR, AGGREGATE): 340, (UNCORR, AGGREGATE): 5}
    h.retired = {pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [0x1000, 0x2000],
                 pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [0x3000]}
    h.retired_pending = pynvml.NVML_FEATURE_ENABLED
    h.remapped = (3, 1, 1, 0)
    h.clock_reasons = pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonSwPowerCap
    s = backend.sample(2.0)[1]
    assert not s.failed
    assert (s.ecc_corrected_volatile, s.ecc_uncorrected_volatile) == (12, 2)
    assert (s.ecc_corrected_aggregate, s.ecc_uncorrected_aggregate) == (340, 5)
    assert (s.retired_pages_sbe, s.retired_pages_dbe, s.retired_pages_pending) == (2, 1, True)
    assert (s.remapped_rows_correctable, s.remapped_rows_uncorrectable) == (3, 1)
    assert (s.remapped_rows_pending, s.remapped_rows_failure) == (True, False)
    assert s.throttle_reasons == frozenset({"hw_thermal_slowdown", "sw_power_cap"})
    # The newer name is used; the deprecated one is not needed.
    assert fake.count(CLOCK_EVENT_REASONS) == 3 and fake.count(CLOCK_THROTTLE_REASONS) == 0


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_NO_PERMISSION,
                                  pynvml.NVML_ERROR_FUNCTION_NOT_FOUND])
def test_unsupported_health_fields_are_none_and_never_fail_the_sample(
        fake: FakeNvml, backend: NvmlBackend, code: int) -> None:
    for function in (ECC_TOTAL, RETIRED_PAGES, RETIRED_PENDING, REMAPPED_ROWS, CLOCK_EVENT_REASONS,
                     CLOCK_THROTTLE_REASONS):
        fake.fail(2, function, code)  # a consumer board: no ECC, no remapper, no reasons
    samples = backend.sample(1.0)
    s = samples[2]
    assert_reads(s, fake.gpus[2], index=2, now=1.0)
    for name in ("ecc_corrected_volatile", "ecc_uncorrected_volatile", "ecc_corrected_aggregate",
                 "ecc_uncorrected_aggregate", "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending",
                 "remapped_rows_correctable", "remapped_rows_uncorrectable", "remapped_rows_pending",
                 "remapped_rows_failure", "throttle_reasons"):
        assert getattr(s, name) is None, name
    assert samples[0].throttle_reasons == frozenset() and samples[0].ecc_uncorrected_volatile == 0


def test_clock_reasons_fall_back_to_the_older_name(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(0, CLOCK_EVENT_REASONS, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)  # a driver older than the new name
    fake.health[0].clock_reasons = pynvml.nvmlClocksThrottleReasonHwSlowdown
    assert backend.sample(1.0)[0].throttle_reasons == frozenset({"hw_slowdown"})
    assert fake.count(CLOCK_THROTTLE_REASONS, 0) == 1


def test_a_lost_gpu_in_a_health_query_fails_that_gpu_only(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(1, REMAPPED_ROWS, pynvml.NVML_ERROR_GPU_IS_LOST)
    samples = backend.sample(1.0)
    assert samples[1].failed and samples[1].error is not None and "GPU is lost" in samples[1].error
    assert not samples[0].failed and not samples[2].failed


def test_an_unexpected_health_error_fails_that_gpu_without_raising(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(0, ECC_TOTAL, pynvml.NVML_ERROR_UNKNOWN)
    samples = backend.sample(1.0)
    assert samples[0].failed and samples[0].error == "Unknown Error"
    assert not samples[1].failed


# -- Xid events --------------------------------------------------------------------------------


def test_xids_are_counted_per_gpu_and_code(fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.sample(1.0)
    fake.xid(2, 63)
    fake.xid(2, 63)
    fake.xid(0, 13)
    samples = backend.sample(2.0)
    assert samples[2].xid_errors == ((63, 2),) and samples[2].last_xid == 63 and samples[2].last_xid_at == 2.0
    assert samples[0].xid_errors == ((13, 1),)
    assert samples[1].xid_errors == ()
    assert not any(s.failed for s in samples)  # 63 and 13 are not fatal
    fake.xid(2, 94)
    later = backend.sample(3.0)[2]
    assert later.xid_errors == ((63, 2), (94, 1)) and later.last_xid == 94 and later.last_xid_at == 3.0
    assert backend.sample(4.0)[2].xid_errors == ((63, 2), (94, 1))  # counts since start, not per sample


def test_the_queue_is_drained_with_one_short_wait(fake: FakeNvml, backend: NvmlBackend) -> None:
    for _ in range(3):
        fake.xid(1, 13)
    backend.sample(1.0)
    # A short first wait, then without waiting until the queue is empty (the Timeout ends it).
    assert fake.wait_timeouts == [mod.XID_WAIT_MS, 0, 0, 0]
    fake.wait_timeouts.clear()
    backend.sample(2.0)
    assert fake.wait_timeouts == [mod.XID_WAIT_MS]


def test_an_xid_storm_does_not_hold_the_sampler(fake: FakeNvml, backend: NvmlBackend) -> None:
    for _ in range(mod.XID_DRAIN_LIMIT + 10):
        fake.xid(0, 13)
    assert backend.sample(1.0)[0].xid_errors == ((13, mod.XID_DRAIN_LIMIT),)
    assert backend.sample(2.0)[0].xid_errors == ((13, mod.XID_DRAIN_LIMIT + 10),)


@pytest.mark.parametrize("xid", sorted(FATAL_XIDS))
def test_a_fatal_xid_fails_that_gpu_until_restart_and_the_others_go_on(
        fake: FakeNvml, backend: NvmlBackend, xid: int) -> None:
    fake.xid(1, xid)
    samples = backend.sample(1.0)
    assert samples[1].failed
    assert samples[1].error is not None and f"fatal Xid {xid}" in samples[1].error
    assert samples[1].memory_total_bytes is None  # no readings: nothing is sized on it
    assert samples[1].xid_errors == ((xid, 1),) and samples[1].last_xid == xid
    assert_reads(samples[0], fake.gpus[0], index=0, now=1.0)
    assert_reads(samples[2], fake.gpus[2], index=2, now=1.0)
    assert backend.sample(2.0)[1].failed  # sticky: the board needs a reset
    assert fake.count(MEM_V2, 1) == 0  # and it is not queried any more


def test_xids_need_an_event_set_else_they_are_unknown(fake: FakeNvml) -> None:
    fake.fail(None, EVENT_SET_CREATE, pynvml.NVML_ERROR_NOT_SUPPORTED)
    backend = NvmlBackend(nvml=fake)
    samples = backend.sample(1.0)
    assert all(s.xid_errors is None and not s.failed for s in samples)
    assert fake.count(EVENT_WAIT) == 0 and fake.registered == []
    backend.close()
    assert fake.event_sets_freed == 0


def test_a_gpu_that_cannot_register_has_unknown_xids(fake: FakeNvml) -> None:
    fake.fail(1, REGISTER_EVENTS, pynvml.NVML_ERROR_NOT_SUPPORTED)
    backend = NvmlBackend(nvml=fake)
    samples = backend.sample(1.0)
    assert [s.xid_errors for s in samples] == [(), None, ()]
    backend.close()


def test_a_failing_wait_does_not_fail_the_sample(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(None, EVENT_WAIT, pynvml.NVML_ERROR_UNKNOWN)
    samples = backend.sample(1.0)
    assert not any(s.failed for s in samples)


def test_close_frees_the_event_set_before_shutdown(fake: FakeNvml) -> None:
    backend = NvmlBackend(nvml=fake)
    backend.close()
    names = [name for name, _ in fake.calls]
    assert names.index(EVENT_SET_FREE) < names.index("nvmlShutdown")
    assert fake.event_sets_freed == 1


# -- over a real server --------------------------------------------------------------------------


async def test_xid_79_on_gpu_1_marks_it_failed_while_gpu_0_goes_on(make_api: MakeApi) -> None:
    fake = FakeNvml(three_gpus()[:2])
    fake.health[0].clock_reasons = pynvml.nvmlClocksEventReasonSwPowerCap
    fake.health[1].ecc = {(UNCORR, VOLATILE): 1}
    a = await make_api(backend=NvmlBackend(nvml=fake))
    try:
        await a.tick()
        first_b = await a.get("/batch-size?service=svc-b&gpu=1")
        await a.get("/batch-size?service=svc-a&gpu=0")
        fake.xid(1, 79)  # GPU 1 has fallen off the bus
        fake.gpus[1].used = 1 * GIB  # and shows plenty of room: nothing must be sized on it
        settings = a.engine.settings
        for _ in range(4):
            await a.tick(advance=settings.optimization_interval)
            await a.get("/batch-size?service=svc-a&gpu=0")
            await a.get("/batch-size?service=svc-b&gpu=1")
        status = await a.get("/status")
        gpus = {g["index"]: g for g in status["gpus"]}
        assert gpus[1]["failed"] is True and "fatal Xid 79" in gpus[1]["error"]
        assert gpus[1]["health"]["xid_errors"] == {"79": 1} and gpus[1]["health"]["last_xid"] == 79
        assert gpus[0]["failed"] is False and gpus[0]["memory_total_bytes"] == 80 * GIB
        assert gpus[0]["health"]["throttle_reasons"] == ["sw_power_cap"]
        assert gpus[0]["health"]["xid_errors"] == {}
        assert status["ready"] is True
        b = await a.get("/batch-size?service=svc-b&gpu=1")
        assert b["batch_size"] == first_b["batch_size"]  # held, never sized up on the failed GPU
        text = await a.metrics()
        assert 'vlm_gpu_up{gpu="1",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-bbbb"} 0.0' in text
        assert 'vlm_gpu_up{gpu="0",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-aaaa"} 1.0' in text
        assert 'vlm_gpu_xid_errors_total{gpu="1",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-bbbb",xid="79"} 1.0' in text
        assert 'vlm_gpu_clock_throttle_reasons{gpu="0",gpu_instance_id="",mig_uuid="",profile="",reason="sw_power_cap",uuid="GPU-aaaa"} 1.0' in text
        assert 'vlm_gpu_throttled{gpu="0",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-aaaa"} 0.0' in text  # a power cap is not heat
        assert 'vlm_memory_total_bytes{gpu="0",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-aaaa"}' in text
        assert 'vlm_memory_total_bytes{gpu="1"' not in text
    finally:
        a.sampler.close()


# -- the simulated backend: health events from a scenario -----------------------------------------


def _scenario(health: list[dict[str, object]] | None = None) -> dict[str, object]:
    raw: dict[str, object] = {
        "name": "health", "duration_s": 120, "step_s": 1,
        "gpus": [{"index": 0, "total_mb": 80000}, {"index": 1, "total_mb": 40000}],
        "services": [{"name": "a", "gpu": 0, "base_mb": 1000, "per_item_mb": 100, "item_ms": 10},
                     {"name": "b", "gpu": 1, "base_mb": 1000, "per_item_mb": 100, "item_ms": 10}],
    }
    if health is not None:
        raw["health"] = health
    return raw


def test_a_scenario_names_its_health_events_and_reads_back_equal() -> None:
    sc = parse_scenario(_scenario([{"gpu": 1, "at_s": 30, "xid": 79},
                                   {"gpu": 0, "at_s": 10, "ecc_corrected": 4, "ecc_uncorrected": 1}]))
    assert sc.health == (HealthEvent(gpu=1, at_s=30, xid=79),
                         HealthEvent(gpu=0, at_s=10, ecc_corrected=4, ecc_uncorrected=1))
    assert parse_scenario(scenario_to_dict(sc)) == sc
    assert parse_scenario(_scenario()).health == ()  # every existing scenario stays valid


@pytest.mark.parametrize(("event", "field", "words"), [
    ({"gpu": 0, "at_s": 1}, "health[0]", "needs xid, ecc_corrected or ecc_uncorrected"),
    ({"gpu": 0, "xid": "79"}, "health[0].xid", "an integer in [1, 1000]"),
    ({"gpu": 0, "xid": 0}, "health[0].xid", "an integer in [1, 1000]"),
    ({"gpu": 0, "xid": True}, "health[0].xid", "an integer in [1, 1000]"),
    ({"gpu": 0, "ecc_uncorrected": -1}, "health[0].ecc_uncorrected", "an integer in [0, "),
    ({"gpu": 0, "ecc_corrected": 1.5}, "health[0].ecc_corrected", "an integer in [0, "),
    ({"gpu": 5, "xid": 79}, "health[0].gpu", ""),
    ({"gpu": 0, "xid": 79, "fatal": True}, "health[0].fatal", "unknown field; allowed: at_s, ecc_corrected"),
    ({"gpu": 0, "at_s": -1, "xid": 13}, "health[0].at_s", "must be in"),
])
def test_a_bad_health_event_is_named(event: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_scenario([event]))
    assert info.value.field == field
    assert words in str(info.value)


def test_the_simulated_backend_injects_xids_and_ecc_and_a_fatal_xid_fails_that_gpu() -> None:
    sc = parse_scenario(_scenario([{"gpu": 0, "at_s": 10, "ecc_corrected": 4}, {"gpu": 0, "at_s": 20, "xid": 13},
                                   {"gpu": 0, "at_s": 25, "ecc_uncorrected": 2, "xid": 48 + 15},
                                   {"gpu": 1, "at_s": 30, "xid": 79}]))
    backend = SimulatedBackend(sc, Settings(), origin=1000.0)
    early = backend.sample(1005.0)
    assert [s.xid_errors for s in early] == [(), ()]
    assert all(s.ecc_uncorrected_volatile == 0 and s.remapped_rows_pending is False for s in early)
    mid = backend.sample(1026.0)
    assert mid[0].xid_errors == ((13, 1), (63, 1)) and mid[0].last_xid == 63 and mid[0].last_xid_at == 1025.0
    assert (mid[0].ecc_corrected_volatile, mid[0].ecc_uncorrected_volatile) == (4, 2)
    assert not mid[0].failed and not mid[1].failed
    late = backend.sample(1031.0)
    assert late[1].failed and late[1].error is not None and "fatal Xid 79" in late[1].error
    assert late[1].xid_errors == ((79, 1),) and late[1].memory_total_bytes is None
    assert not late[0].failed and late[0].memory_total_bytes == 80000 * 1024 * 1024


def test_a_fatal_xid_in_simulate_holds_that_gpus_batches_and_the_other_gpu_goes_on() -> None:
    raw = _scenario([{"gpu": 1, "at_s": 30, "xid": 79}])
    raw["duration_s"] = 1800
    result = simulate(parse_scenario(raw), Settings())
    by_gpu = {s.gpu: s for s in result.services}
    after = [b for t, b in by_gpu[1].batches if t > 30]
    assert after == []  # nothing published for the failed GPU after the Xid
    assert any(t > 30 for t, _ in by_gpu[0].batches)  # GPU 0 is still sized


def test_an_xid_from_a_gpu_that_cannot_say_its_uuid_is_attributed_by_its_handle(
        fake: FakeNvml, backend: NvmlBackend) -> None:
    backend.sample(1.0)
    fake.fail(1, "nvmlDeviceGetUUID", pynvml.NVML_ERROR_GPU_IS_LOST)  # fallen off the bus
    fake.xid(1, 79)
    samples = backend.sample(2.0)
    assert samples[1].failed and samples[1].xid_errors == ((79, 1),)
    assert not samples[0].failed and not samples[2].failed


def test_device_handles_are_matched_by_address() -> None:
    import ctypes

    device = pynvml.struct_c_nvmlDevice_t()
    one = ctypes.pointer(device)
    other = ctypes.pointer(device)  # another pointer object to the same device, as an event carries
    assert one != other  # ctypes compares pointer objects, not addresses
    assert mod._address(one) == mod._address(other) == ctypes.addressof(device)
    assert mod._address(object()) is None


def test_a_driver_without_the_wait_makes_xids_unknown_once(fake: FakeNvml, backend: NvmlBackend) -> None:
    fake.fail(None, EVENT_WAIT, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    samples = backend.sample(1.0)
    assert not any(s.failed for s in samples)
    assert [s.xid_errors for s in samples] == [None, None, None]
    backend.sample(2.0)
    assert fake.count(EVENT_WAIT) == 1  # not tried again on every sample
    assert fake.event_sets_freed == 1
