"""Prometheus metrics: names, labels and values built from the engine at scrape time, on a private registry."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.metrics import SEED_METRICS, build_registry, render
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, uuid_of, no_sleep

GIB = 1024**3
TOTAL = 80 * GIB
INTERVAL = Settings().monitoring_interval


class Rig:
    def __init__(self, gpus: int = 1, settings: Settings | None = None) -> None:
        self.clock = FakeClock()
        self.backend = ScriptedBackend(gpus)
        self.engine = Engine(settings or Settings())
        self.sampler = Sampler(self.backend, self.engine, clock=self.clock, sleep=no_sleep)
        self.registry = build_registry(self.engine, self.sampler)

    async def tick(self, advance: float = INTERVAL) -> None:
        if self.sampler.stats.samples or self.sampler.stats.errors:
            self.clock.advance(advance)
        await self.sampler.tick()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    def count(self, name: str, labels: dict[str, str]) -> float:
        """A counter's value; a series not exported yet counts as 0."""
        return self.value(name, labels) or 0.0

    def gpu(self, i: int, **extra: str) -> dict[str, str]:
        return {"gpu": str(i), "uuid": uuid_of(i), "mig_uuid": "", "gpu_instance_id": "", "profile": "", **extra}


def sample_names(registry: CollectorRegistry) -> set[str]:
    text = generate_latest(registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def series(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for fam in registry.collect() for s in fam.samples]


@pytest.fixture
def rig() -> Rig:
    return Rig()


async def busy_rig() -> Rig:
    """One GPU through everything that makes every seed metric appear."""
    r = Rig()
    r.engine.poll("svc-a", 0, r.clock())
    r.backend.used[0] = 70 * GIB  # 87.5 %: over gc_threshold (0.85), below critical
    await r.tick()
    r.engine.report("svc-a", 0, r.clock(), batch_size=4, allocated_bytes=6 * GIB, reserved_bytes=8 * GIB)
    r.engine.report("svc-a", 0, r.clock(), batch_size=4, oom=True)
    r.backend.used[0] = 40 * GIB
    await r.tick()
    return r


# --------------------------------------------------------------------------- names and labels


async def test_every_seed_metric_is_exposed() -> None:
    r = await busy_rig()
    names = sample_names(r.registry)
    missing = [m for m in SEED_METRICS if m not in names]
    assert missing == []
    assert len(SEED_METRICS) == 15
    # counters: the family name has no _total, the samples do
    families = {fam.name: fam.type for fam in r.registry.collect()}
    for m in SEED_METRICS:
        if m.endswith("_total"):
            assert families[m.removesuffix("_total")] == "counter"
        else:
            assert families[m] == "gauge"


async def test_every_seed_metric_is_described_before_any_sample(rig: Rig) -> None:
    text = generate_latest(rig.registry).decode()
    for m in SEED_METRICS:
        assert f"# TYPE {m} " in text


async def test_label_names() -> None:
    r = await busy_rig()
    labels_of: dict[str, set[frozenset[str]]] = {}
    for name, labels, _ in series(r.registry):
        labels_of.setdefault(name, set()).add(frozenset(labels))
    gpu = frozenset({"gpu", "uuid", "mig_uuid", "gpu_instance_id", "profile"})  # MIG labels empty on a whole GPU
    gpu_service = gpu | {"service"}
    gpu_trigger = gpu | {"trigger"}
    for m in ("vlm_memory_usage_percent", "vlm_memory_total_bytes", "vlm_memory_used_bytes", "vlm_memory_free_bytes",
              "vlm_gpu_utilization_percent", "vlm_gpu_temperature_celsius", "vlm_gpu_power_usage_watts",
              "vlm_memory_fragmentation_percent", "vlm_memory_freed_bytes_total", "vlm_gpu_up",
              "vlm_memory_pressure_level", "vlm_cleanup_epoch"):
        assert labels_of[m] == {gpu}, m
    for m in ("vlm_current_batch_size", "vlm_optimal_batch_size", "vlm_batch_size_optimizations_total"):
        assert labels_of[m] == {gpu_service}, m
    for m in ("vlm_memory_optimizations_total", "vlm_memory_optimizations_success_total", "vlm_memory_cleanups_total"):
        assert labels_of[m] == {gpu_trigger}, m
    assert labels_of["vlm_optimizer_sample_errors_total"] == {frozenset({"gpu"})}


async def test_render_gives_text_exposition(rig: Rig) -> None:
    await rig.tick()
    payload, content_type = render(rig.registry)
    assert content_type.startswith("text/plain")
    assert (b'vlm_memory_usage_percent{gpu="0",gpu_instance_id="",mig_uuid="",profile="",uuid="'
            + uuid_of(0).encode() + b'"} 25.0') in payload


# --------------------------------------------------------------------------- values


async def test_gpu_values_follow_the_snapshot() -> None:
    r = Rig(gpus=2)
    r.backend.used = {0: 20 * GIB, 1: 50 * GIB}
    await r.tick()
    for i, used in ((0, 20 * GIB), (1, 50 * GIB)):
        labels = r.gpu(i)
        assert r.value("vlm_memory_usage_percent", labels) == pytest.approx(used / TOTAL * 100)
        assert r.value("vlm_memory_total_bytes", labels) == TOTAL
        assert r.value("vlm_memory_used_bytes", labels) == used
        assert r.value("vlm_memory_free_bytes", labels) == TOTAL - used
        assert r.value("vlm_gpu_temperature_celsius", labels) == 50.0 + i
        assert r.value("vlm_gpu_power_usage_watts", labels) == 200.5 + i
        assert r.value("vlm_gpu_utilization_percent", labels) == 60.0 + i
        assert r.value("vlm_gpu_up", labels) == 1.0
        assert r.value("vlm_memory_pressure_level", labels) == 0.0
    r.backend.used[1] = 74 * GIB  # 92.5 %: critical
    await r.tick()
    assert r.value("vlm_memory_usage_percent", r.gpu(1)) == pytest.approx(92.5)
    assert r.value("vlm_memory_used_bytes", r.gpu(1)) == 74 * GIB
    assert r.value("vlm_memory_pressure_level", r.gpu(1)) == 2.0
    assert r.value("vlm_memory_pressure_level", r.gpu(0)) == 0.0


async def test_no_gpu_series_before_the_first_sample(rig: Rig) -> None:
    assert not [s for s in series(rig.registry) if "gpu" in s[1] and s[1]["gpu"] != "all"]


async def test_batch_size_series_follow_the_decisions(rig: Rig) -> None:
    await rig.tick()
    d = rig.engine.poll("svc-a", 0, rig.clock())
    labels = rig.gpu(0, service="svc-a")
    assert rig.value("vlm_current_batch_size", labels) == d.batch_size == 4
    assert rig.value("vlm_optimal_batch_size", labels) == d.optimal_batch_size
    d = rig.engine.report("svc-a", 0, rig.clock(), batch_size=4, oom=True)
    assert d.batch_size == 3
    assert rig.value("vlm_current_batch_size", labels) == 3.0
    assert rig.value("vlm_optimal_batch_size", labels) == d.optimal_batch_size


async def test_fragmentation_absent_while_unknown_then_reported(rig: Rig) -> None:
    rig.engine.poll("svc-a", 0, rig.clock())
    await rig.tick()
    await rig.tick()
    labels = rig.gpu(0)
    assert rig.value("vlm_memory_fragmentation_percent", labels) is None
    assert "vlm_memory_fragmentation_percent" not in sample_names(rig.registry)

    rig.engine.report("svc-a", 0, rig.clock(), batch_size=4, allocated_bytes=6 * GIB, reserved_bytes=8 * GIB)
    await rig.tick()
    assert rig.value("vlm_memory_fragmentation_percent", labels) == pytest.approx(25.0)

    # no fresh report for more than 3 intervals: unknown again, and the series goes
    for _ in range(4):
        await rig.tick()
    assert rig.value("vlm_memory_fragmentation_percent", labels) is None
    assert rig.value("vlm_current_batch_size", rig.gpu(0, service="svc-a")) is not None


async def test_fragmentation_weighted_over_the_services_of_a_gpu(rig: Rig) -> None:
    await rig.tick()
    rig.engine.report("svc-a", 0, rig.clock(), allocated_bytes=6 * GIB, reserved_bytes=8 * GIB)  # 2 GiB wasted
    rig.engine.report("svc-b", 0, rig.clock(), allocated_bytes=8 * GIB, reserved_bytes=8 * GIB)  # none
    await rig.tick()
    assert rig.value("vlm_memory_fragmentation_percent", rig.gpu(0)) == pytest.approx(2 / 16 * 100)


# --------------------------------------------------------------------------- counters


async def test_oom_report_counts_an_optimization_and_a_batch_change(rig: Rig) -> None:
    await rig.tick()
    rig.engine.poll("svc-a", 0, rig.clock())
    assert rig.count("vlm_memory_optimizations_total", rig.gpu(0, trigger="oom_report")) == 0.0
    rig.engine.report("svc-a", 0, rig.clock(), batch_size=4, oom=True)
    assert rig.value("vlm_memory_optimizations_total", rig.gpu(0, trigger="oom_report")) == 1.0
    assert rig.value("vlm_batch_size_optimizations_total", rig.gpu(0, service="svc-a")) == 1.0
    # no OOM again over the next sample: the optimization succeeded; it freed nothing by itself
    await rig.tick()
    assert rig.value("vlm_memory_optimizations_success_total", rig.gpu(0, trigger="oom_report")) == 1.0
    assert rig.value("vlm_memory_freed_bytes_total", rig.gpu(0)) == 0.0


async def test_gc_threshold_cleanup_success_and_freed_bytes(rig: Rig) -> None:
    await rig.tick()
    labels = rig.gpu(0, trigger="gc_threshold")
    assert rig.count("vlm_memory_cleanups_total", labels) == 0.0
    assert rig.value("vlm_cleanup_epoch", rig.gpu(0)) == 0.0

    rig.backend.used[0] = 70 * GIB  # 87.5 % >= gc_threshold 0.85
    await rig.tick()
    assert rig.value("vlm_memory_cleanups_total", labels) == 1.0
    assert rig.value("vlm_memory_optimizations_total", labels) == 1.0
    assert rig.value("vlm_cleanup_epoch", rig.gpu(0)) == 1.0
    assert rig.count("vlm_memory_optimizations_success_total", labels) == 0.0
    assert rig.count("vlm_memory_freed_bytes_total", rig.gpu(0)) == 0.0

    rig.backend.used[0] = 45 * GIB  # the services freed 25 GiB
    await rig.tick()
    assert rig.value("vlm_memory_optimizations_success_total", labels) == 1.0
    assert rig.value("vlm_memory_freed_bytes_total", rig.gpu(0)) == 25 * GIB
    assert rig.value("vlm_memory_cleanups_total", labels) == 1.0  # no new cleanup below the threshold


async def test_counters_do_not_move_without_events(rig: Rig) -> None:
    rig.backend.used[0] = 70 * GIB
    await rig.tick()
    rig.backend.used[0] = 45 * GIB
    await rig.tick()
    per_tick = ("vlm_optimizer_sample_errors_total", "vlm_optimizer_samples_total")  # these count ticks
    before = [s for s in series(rig.registry) if s[0].endswith("_total") and s[0] not in per_tick]
    for _ in range(3):
        await rig.tick()
    after = [s for s in series(rig.registry) if s[0].endswith("_total") and s[0] not in per_tick]
    assert before == after
    samples = {name: v for name, _, v in series(rig.registry) if name == "vlm_optimizer_samples_total"}
    assert samples == {"vlm_optimizer_samples_total": 5.0}


# --------------------------------------------------------------------------- series that go away


async def test_series_of_a_gpu_that_disappears_are_dropped() -> None:
    r = Rig(gpus=2)
    await r.tick()
    r.engine.poll("svc-a", 0, r.clock())
    r.engine.poll("svc-b", 1, r.clock())
    r.engine.report("svc-b", 1, r.clock(), batch_size=4, oom=True)
    r.backend.used[1] = 70 * GIB
    await r.tick()
    on_gpu1 = {name for name, labels, _ in series(r.registry) if labels.get("gpu") == "1"}
    assert {"vlm_memory_usage_percent", "vlm_current_batch_size", "vlm_optimal_batch_size",
            "vlm_batch_size_optimizations_total", "vlm_memory_cleanups_total", "vlm_memory_freed_bytes_total",
            "vlm_gpu_up"} <= on_gpu1

    del r.backend.used[1]
    await r.tick()
    assert [s for s in series(r.registry) if s[1].get("gpu") == "1"] == []
    assert [s for s in series(r.registry) if s[1].get("service") == "svc-b"] == []
    assert r.value("vlm_memory_usage_percent", r.gpu(0)) == pytest.approx(25.0)
    assert r.value("vlm_current_batch_size", r.gpu(0, service="svc-a")) == 4.0


async def test_failed_gpu_is_down_without_memory_series() -> None:
    r = Rig(gpus=2)
    await r.tick()
    r.backend.failed = {1}
    await r.tick()
    assert r.value("vlm_gpu_up", r.gpu(0)) == 1.0
    assert r.value("vlm_gpu_up", r.gpu(1)) == 0.0
    gpu1 = {name for name, labels, _ in series(r.registry) if labels.get("gpu") == "1"}
    assert {"vlm_gpu_up", "vlm_optimizer_sample_errors_total"} <= gpu1
    readings = {"vlm_memory_usage_percent", "vlm_memory_total_bytes", "vlm_memory_used_bytes", "vlm_memory_free_bytes",
                "vlm_gpu_utilization_percent", "vlm_gpu_temperature_celsius", "vlm_gpu_power_usage_watts",
                "vlm_memory_fragmentation_percent", "vlm_memory_pressure_level", "vlm_cleanup_epoch"}
    assert gpu1 & readings == set()
    assert readings <= {name for name, labels, _ in series(r.registry) if labels.get("gpu") == "0"} | {
        "vlm_memory_fragmentation_percent"}
    assert r.value("vlm_optimizer_sample_errors_total", {"gpu": "1"}) == 1.0
    r.backend.failed = set()
    await r.tick()
    assert r.value("vlm_gpu_up", r.gpu(1)) == 1.0
    assert r.value("vlm_memory_used_bytes", r.gpu(1)) == 20 * GIB


# --------------------------------------------------------------------------- the optimizer's own health


async def test_self_health_metrics(rig: Rig) -> None:
    assert rig.value("vlm_optimizer_sample_duration_seconds_count") == 0.0
    assert rig.value("vlm_optimizer_last_sample_timestamp_seconds") == 0.0
    assert rig.value("vlm_optimizer_sample_errors_total", {"gpu": "all"}) == 0.0
    assert rig.value("vlm_optimizer_monitoring_interval_seconds") == INTERVAL

    for _ in range(3):
        await rig.tick()
    last_good = rig.clock()
    assert rig.value("vlm_optimizer_sample_duration_seconds_count") == 3.0
    assert rig.value("vlm_optimizer_sample_duration_seconds_bucket", {"le": "+Inf"}) == 3.0
    assert rig.value("vlm_optimizer_last_sample_timestamp_seconds") == last_good

    rig.backend.error = RuntimeError("NVML gone")
    await rig.tick()
    await rig.tick()
    assert rig.value("vlm_optimizer_sample_errors_total", {"gpu": "all"}) == 2.0
    assert rig.value("vlm_optimizer_sample_duration_seconds_count") == 3.0
    assert rig.value("vlm_optimizer_last_sample_timestamp_seconds") == last_good

    rig.backend.error = None
    await rig.tick()
    assert rig.value("vlm_optimizer_sample_duration_seconds_count") == 4.0
    assert rig.value("vlm_optimizer_last_sample_timestamp_seconds") == rig.clock()
    assert rig.value("vlm_optimizer_sample_errors_total", {"gpu": "all"}) == 2.0


async def test_duration_histogram_is_cumulative(rig: Rig) -> None:
    for _ in range(2):
        await rig.tick()
    buckets = [(labels["le"], v) for name, labels, v in series(rig.registry)
               if name == "vlm_optimizer_sample_duration_seconds_bucket"]
    values = [v for _, v in buckets]
    assert values == sorted(values)
    assert buckets[-1] == ("+Inf", 2.0)
    total = rig.value("vlm_optimizer_sample_duration_seconds_sum")
    assert total is not None and total >= 0.0


# --------------------------------------------------------------------------- registry isolation


async def test_registry_is_private() -> None:
    r = await busy_rig()
    assert r.registry is not REGISTRY
    assert r.value("vlm_memory_usage_percent", r.gpu(0)) is not None
    assert REGISTRY.get_sample_value("vlm_memory_usage_percent", r.gpu(0)) is None
    assert b"vlm_" not in generate_latest(REGISTRY)


async def test_two_registries_are_independent() -> None:
    a, b = Rig(), Rig()
    a.backend.used[0] = 10 * GIB
    b.backend.used[0] = 30 * GIB
    await a.tick()
    await b.tick()
    assert a.value("vlm_memory_used_bytes", a.gpu(0)) == 10 * GIB
    assert b.value("vlm_memory_used_bytes", b.gpu(0)) == 30 * GIB


async def test_first_events_are_visible_to_increase() -> None:
    """Per-service batch changes and per-GPU sample errors start at 0, so increase() sees the first one."""
    r = Rig(gpus=2)
    r.engine.poll("svc", 0, r.clock())
    await r.tick()
    assert r.registry.get_sample_value("vlm_batch_size_optimizations_total",
                                       r.gpu(0, service="svc")) == 0.0
    for gpu in ("0", "1"):
        assert r.registry.get_sample_value("vlm_optimizer_sample_errors_total", {"gpu": gpu}) == 0.0
    r.backend.failed.add(1)
    await r.tick()
    assert r.registry.get_sample_value("vlm_optimizer_sample_errors_total", {"gpu": "1"}) == 1.0


async def test_monitoring_enabled_follows_the_sampler() -> None:
    r = Rig()
    await r.tick()
    assert r.registry.get_sample_value("vlm_optimizer_monitoring_enabled") == 1.0
    r.sampler.running = False
    assert r.registry.get_sample_value("vlm_optimizer_monitoring_enabled") == 0.0
