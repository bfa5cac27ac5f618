"""Operator actions in the policy core: manual overrides and optimizing now."""

from __future__ import annotations

import dataclasses

from optimizer.config import Settings
from tests.policy_helpers import Harness, gpu

PER_ITEM_1G = dataclasses.replace(Settings().default_profile, per_item_mb=1024)


def settled(s: Settings | None = None) -> Harness:
    h = Harness(s or Settings(max_batch_size=64, default_profile=PER_ITEM_1G))
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(30):
        h.tick(gpu(30.0))
    return h


def test_override_is_published_at_once_and_survives_optimizations() -> None:
    h = settled()
    optimum = h.engine.state.services[(0, "vlm")].optimal
    d = h.engine.set_override("vlm", 0, 5, None, h.t)
    assert d.batch_size == 5 and "manual override" in d.reason
    assert d.optimal_batch_size == optimum  # operators still see what the policy would do
    for _ in range(40):  # several optimization intervals with plenty of headroom
        h.tick(gpu(30.0))
    assert h.batch() == 5
    kinds = [e.kind for e in h.engine.events]
    assert "override_set" in kinds


def test_override_above_the_safety_bound_is_held_at_the_bound() -> None:
    h = settled(Settings(max_batch_size=4096, default_profile=PER_ITEM_1G))
    # 30 GiB used of 80; bound 0.95*80 - 1 = 75 GiB: 45 items of 1 GiB more than the batch in force
    cur = h.batch()
    d = h.engine.set_override("vlm", 0, 4000, None, h.t)
    assert d.batch_size == cur + 45
    assert "held at" in d.reason and "safety bound" in d.reason


def test_override_outside_the_batch_limits_is_held_within_them() -> None:
    h = settled()
    d = h.engine.set_override("vlm", 0, 4000, None, h.t)
    assert d.batch_size == 64 and "batch limits [1, 64]" in d.reason
    for _ in range(15):
        h.tick(gpu(30.0))
    assert h.batch() == 64  # held across periodic optimizations, not moved later


def test_critical_memory_clears_the_override_and_lowers() -> None:
    h = settled()
    h.engine.set_override("vlm", 0, 20, None, h.t)
    h.tick(gpu(30.0))
    h.tick(gpu(30.0))
    events = h.tick(gpu(73.0))  # 91 %: critical
    assert h.batch() < 20
    cleared = [e for e in events if e.kind == "override_cleared"]
    assert cleared and "critical" in (cleared[0].detail or "")
    assert h.engine.state.services[(0, "vlm")].override is None


def test_oom_report_clears_the_override() -> None:
    h = settled()
    h.tick(gpu(60.0))  # memory the OOM could have run out of (not contradicted by the sample)
    h.engine.set_override("vlm", 0, 20, None, h.t)
    reply = h.engine.report("vlm", 0, h.t, batch_size=20, oom=True)
    assert reply.batch_size < 20
    assert h.engine.state.services[(0, "vlm")].override is None


def test_override_expires_and_the_policy_resumes() -> None:
    h = settled()
    h.engine.set_override("vlm", 0, 3, 30.0, h.t)
    assert h.batch() == 3
    expired = []
    for _ in range(8):  # 40 s: past the 30 s ttl
        expired += [e for e in h.tick(gpu(30.0)) if e.kind == "override_cleared"]
    assert [e.detail for e in expired] == ["expired"]
    for _ in range(13):  # the next periodic optimization takes over again
        h.tick(gpu(30.0))
    assert h.batch() > 3
    assert "manual" not in h.engine.state.services[(0, "vlm")].reason


def test_clear_override_hands_back_to_the_policy() -> None:
    h = settled()
    h.engine.set_override("vlm", 0, 3, None, h.t)
    d = h.engine.clear_override("vlm", 0, h.t)
    assert d is not None and "cleared" in d.reason
    assert h.engine.clear_override("nobody", 0, h.t) is None
    assert h.engine.optimize_now()
    assert h.batch() > 3


def test_override_is_published_even_while_disabled() -> None:
    h = settled(Settings(enabled=False, default_profile=PER_ITEM_1G))
    assert h.batch() == 4
    h.engine.set_override("vlm", 0, 7, None, h.t)
    h.tick(gpu(30.0))
    assert h.batch() == 7


def test_optimize_now_does_not_wait_for_the_interval_and_takes_no_sample() -> None:
    s = Settings(max_batch_size=64, optimization_interval=600, default_profile=PER_ITEM_1G)
    h = Harness(s)
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(5):
        h.tick(gpu(30.0))
    assert h.batch() == 4  # the periodic optimization is 10 minutes away
    gs = h.engine.state.gpus[0]
    events = h.engine.optimize_now()
    assert [e.kind for e in events] == ["batch_changed"]
    assert h.batch() > 4
    after = h.engine.state.gpus[0]
    assert after.pending == gs.pending and after.pressure == gs.pressure
    assert after.optimized_at == h.t


def test_optimize_now_before_any_sample_does_nothing() -> None:
    h = Harness(Settings())
    assert h.engine.optimize_now() == ()


def test_disabling_publishes_the_default_at_once_and_enabling_optimizes_at_once() -> None:
    h = settled()
    grown = h.batch()
    assert grown > 4
    events = []
    h.engine.update_settings({"enabled": False}, h.t)
    assert h.batch() == 4  # no sample needed
    assert "disabled" in h.engine.state.services[(0, "vlm")].reason
    h.tick(gpu(30.0))
    h.tick(gpu(30.0))  # the services adopt, a fresh window forms
    h.engine.update_settings({"enabled": True}, h.t)
    events = [e for e in h.engine.events if e.kind == "batch_changed"]
    assert h.batch() > 4 and events[-1].trigger == "optimization"
