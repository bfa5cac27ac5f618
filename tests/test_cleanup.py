"""Cleanup: triggers, rate limits, the emergency path, fragmentation, and freed-memory accounting."""

from __future__ import annotations

import dataclasses

from optimizer.config import Settings
from optimizer.simulation.run import simulate
from optimizer.simulation.scenario import load_scenario
from tests.policy_helpers import GIB, MIB, ROOT, Harness, WorldRun, gpu, one_service


def kinds(events: tuple[object, ...], kind: str) -> list[object]:
    return [e for e in events if getattr(e, "kind") == kind]


def test_gc_threshold_raises_one_cleanup_per_interval() -> None:
    s = Settings()
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    h.tick(gpu(40.0))
    assert h.engine.state.gpus[0].cleanup_epoch == 0
    events = h.tick(gpu(69.0))  # 86 % >= gc_threshold 85 %, below critical
    raised = [e for e in events if e.kind == "cleanup_raised"]
    assert [(e.trigger, e.new) for e in raised] == [("gc_threshold", 1)]
    assert h.engine.poll("vlm", 0, h.t).cleanup_epoch == 1
    first = h.t
    while h.t < first + s.cleanup_interval - s.monitoring_interval:
        assert not kinds(h.tick(gpu(69.0)), "cleanup_raised")
    events = h.tick(gpu(69.0))  # cleanup_interval later: again
    assert [e.trigger for e in events if e.kind == "cleanup_raised"] == ["gc_threshold"]
    assert h.engine.state.gpus[0].cleanup_epoch == 2


def test_freed_memory_is_measured_from_the_following_samples_and_counts_success() -> None:
    h = Harness(Settings())
    h.engine.poll("vlm", 0, 0.0)
    h.tick(gpu(69.0))  # cleanup raised at 69 GiB used
    events = h.tick(gpu(60.5))  # the services emptied their caches: 8.5 GiB came back
    done = [e for e in events if e.kind == "optimization_succeeded"]
    assert len(done) == 1 and done[0].trigger == "gc_threshold"
    assert done[0].freed_bytes == int(69.0 * GIB) - int(60.5 * GIB)
    c = h.engine.counters[0]
    assert c.cleanups["gc_threshold"] == 1
    assert c.optimizations["gc_threshold"] == 1
    assert c.successes["gc_threshold"] == 1
    assert c.freed_bytes == int(69.0 * GIB) - int(60.5 * GIB)


def test_cleanup_that_does_not_relieve_pressure_fails_after_three_samples() -> None:
    h = Harness(Settings())
    h.engine.poll("vlm", 0, 0.0)
    h.tick(gpu(69.0))
    assert not kinds(h.tick(gpu(68.8)), "optimization_failed")
    assert not kinds(h.tick(gpu(68.7)), "optimization_failed")
    failed = [e for e in h.tick(gpu(68.9)) if e.kind == "optimization_failed"]
    assert len(failed) == 1 and failed[0].trigger == "gc_threshold"
    assert failed[0].freed_bytes == int(69.0 * GIB) - int(68.7 * GIB)  # still measured, not assumed
    assert h.engine.counters[0].failures["gc_threshold"] == 1
    assert h.engine.counters[0].successes["gc_threshold"] == 0


def test_unknown_fragmentation_is_not_zero_and_raises_nothing() -> None:
    h = Harness(Settings())
    h.engine.poll("vlm", 0, 0.0)
    events = h.tick(gpu(40.0))
    assert h.engine.state.gpus[0].fragmentation is None
    assert not kinds(events, "cleanup_raised")


def test_fragmentation_is_weighted_by_reserved_bytes_and_raises_cleanup() -> None:
    s = Settings()
    h = Harness(s)
    h.tick(gpu(40.0))
    # a: 10 GiB reserved, 9 allocated (10 %); b: 30 GiB reserved, 15 allocated (50 %).
    h.engine.report("a", 0, h.t, batch_size=4, allocated_bytes=9 * GIB, reserved_bytes=10 * GIB)
    h.engine.report("b", 0, h.t, batch_size=4, allocated_bytes=15 * GIB, reserved_bytes=30 * GIB)
    events = h.tick(gpu(40.0))
    frag = h.engine.state.gpus[0].fragmentation
    assert frag is not None and abs(frag - 16 / 40) < 1e-9  # not the plain mean (30 %)
    raised = [e for e in events if e.kind == "cleanup_raised"]
    assert [e.trigger for e in raised] == ["fragmentation"]


def test_stale_reports_do_not_count_for_fragmentation() -> None:
    s = Settings()
    h = Harness(s)
    h.tick(gpu(40.0))
    h.engine.report("a", 0, h.t, batch_size=4, allocated_bytes=5 * GIB, reserved_bytes=10 * GIB)
    h.tick(gpu(40.0))
    assert h.engine.state.gpus[0].fragmentation == 0.5
    for _ in range(3):  # more than 3 monitoring intervals after the report
        h.tick(gpu(40.0))
    assert h.engine.state.gpus[0].fragmentation is None


def test_oom_threshold_raises_an_emergency_cleanup_and_cuts_at_once() -> None:
    s = Settings()
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    h.tick(gpu(69.0))  # an ordinary cleanup: the cleanup interval starts now
    for _ in range(3):
        h.tick(gpu(60.0))
    before = h.batch()
    events = h.tick(gpu(77.0))  # 96 % >= memory_threshold_oom 95 %
    assert [e.trigger for e in events if e.kind == "cleanup_raised"] == ["oom"]
    assert h.batch() <= before - max(1, -(-before // 4))
    assert h.engine.state.gpus[0].pressure.value == "oom"
    assert h.engine.state.gpus[0].cleanup_epoch == 2


def test_sustained_oom_pressure_raises_one_emergency_cleanup_at_a_time() -> None:
    s = Settings()
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    raised: list[float] = []
    for _ in range(12):  # nothing can be cut any more, yet the GPU stays at 96 %
        events = h.tick(gpu(77.0))
        raised += [e.timestamp for e in events if e.kind == "cleanup_raised"]
    assert h.batch() == s.min_batch_size
    # raised, resolved as failed on the 3rd sample after, raised again then: every 3rd sample, not every one
    assert len(raised) == 4
    assert all(b - a == 3 * s.monitoring_interval for a, b in zip(raised, raised[1:]))
    assert h.engine.counters[0].failures["oom"] == 3


def test_fragmentation_drift_scenario_cleans_up_and_recovers_memory() -> None:
    scenario = load_scenario(ROOT / "examples/scenarios/fragmentation-drift.yaml")
    result = simulate(scenario, Settings())
    c = result.engine.counters[0]
    assert c.cleanups["fragmentation"] >= 2
    assert c.successes["fragmentation"] >= 1
    assert c.freed_bytes > 1 * GIB
    assert result.services[0].ooms == 0
