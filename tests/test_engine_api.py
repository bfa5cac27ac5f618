"""The engine's API: its state is changed only through its methods and read through read-only views.

Other modules used to assign the engine's fields (the persister its state, serve ``has_gpus``, discovery
``discovery``); these tests pin that no field is public and writable, that the views cannot change the
engine, and that the methods that replaced those assignments do what the assignments did.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from optimizer import decision, gpu_lookup, runtime_settings, trust
from optimizer.config import ServiceProfile, Settings
from optimizer.engine import Decision, Engine, Refused, SettingsChange, UnknownGpu
from optimizer.pods import PodInfo
from optimizer.policy.types import Snapshot
from tests.fakes import ScriptedBackend

VIEWS = ("state", "snapshot", "history", "events", "counters", "refused", "oom_reports", "has_gpus", "revision",
         "discovery", "pods", "ever_ready", "pod_gpus", "pod_devices", "settings", "base_settings", "runtime",
         "policy_settings", "known")


def sampled(engine: Engine, t: float = 1.0, gpus: int = 1) -> Snapshot:
    snap = Snapshot(t, tuple(ScriptedBackend(gpus).sample(t)))
    engine.observe(snap)
    return snap


def test_no_field_of_the_engine_is_public() -> None:
    engine = Engine(Settings())
    sampled(engine)
    engine.poll("svc", None, 1.0)
    assert [k for k in vars(engine) if not k.startswith("_")] == []


@pytest.mark.parametrize("name", VIEWS)
def test_every_view_is_read_only(name: str) -> None:
    engine = Engine(Settings())
    with pytest.raises(AttributeError):
        setattr(engine, name, getattr(engine, name))


def test_the_views_cannot_change_the_engine() -> None:
    engine = Engine(Settings())
    sampled(engine)
    engine.poll("svc", 0, 1.0)
    engine.optimize_now()
    assert isinstance(engine.events, tuple) and engine.events
    assert isinstance(engine.history[0], tuple) and len(engine.history[0]) == 1
    counted = engine.counters[0].optimizations["operator"]
    engine.counters[0].optimizations["operator"] += 5  # a copy: the engine's totals do not move
    assert engine.counters[0].optimizations["operator"] == counted
    for view in (engine.pods, engine.pod_gpus, engine.pod_devices, engine.refused, engine.oom_reports,
                 engine.history, engine.counters):
        assert isinstance(view, MappingProxyType)
        with pytest.raises(TypeError):
            view["x"] = 1  # type: ignore[index]
    runtime = engine.runtime
    runtime["max_batch_size"] = 1
    assert engine.runtime == {}
    assert isinstance(engine.ever_ready, frozenset)


def test_a_cpu_only_host_is_said_at_construction() -> None:
    gpu_host, cpu_host = Engine(Settings()), Engine(Settings(), has_gpus=False)
    assert gpu_host.has_gpus and not cpu_host.has_gpus
    assert gpu_host.poll("svc", None, 1.0).gpu_index == 0  # before the first sample: the usual first GPU
    d = cpu_host.poll("svc", None, 1.0)
    assert (d.gpu_index, d.batch_size) == (None, Settings().max_batch_size)


def test_attach_discovery_makes_the_pods_count() -> None:
    engine = Engine(Settings(register_unknown=False))
    assert not engine.discovery
    assert "discovered pod" not in engine.poll("stranger", 0, 1.0).reason
    engine.attach_discovery()
    assert engine.discovery and engine.pods == {}
    d = engine.poll("stranger", 0, 1.0)
    assert not d.registered and "nor a discovered pod on this node" in d.reason


def test_a_pod_named_by_a_poll_from_its_own_ip_sets_its_gpu() -> None:
    engine = Engine(Settings())
    sampled(engine, gpus=2)
    pod = PodInfo(namespace="ns", name="p", uid="u1", node="n", service="svc", phase="Running", ready=True,
                  deleting=False, resource_version="1", ips=("10.0.0.5",))
    engine.set_pods({"ns/p": pod}, now=1.0)
    engine.poll("svc", 1, 1.0, peer="10.0.0.5")  # registered from its pod's address
    engine.poll("svc", 1, 1.0, pod="p", peer="10.0.0.6")  # another address: answered, but not that pod's GPU
    assert "p" not in engine.pod_gpus
    with pytest.raises(Refused):
        engine.report("svc", 1, 1.0, pod="p", peer="10.0.0.6")
    assert engine.refused["not_pod_ip"] >= 1
    engine.poll("svc", 1, 1.0, pod="p", peer="::ffff:10.0.0.5")
    assert engine.pod_gpus == {"p": 1}
    assert engine.ever_ready == {"u1"}


def test_restore_services_puts_saved_services_back_without_a_new_revision() -> None:
    source = Engine(Settings())
    sampled(source)
    source.poll("svc", 0, 1.0)
    svc = dataclasses.replace(source.state.services[(0, "svc")], batch_size=3, reason="restored")
    fresh = Engine(Settings())
    fresh.poll("other", 0, 1.0)
    revision = fresh.revision
    fresh.restore_services({(0, "svc"): svc})
    assert fresh.revision == revision
    assert sorted(fresh.state.services) == [(0, "other"), (0, "svc")]
    assert (fresh.poll("svc", 0, 2.0).batch_size, fresh.decisions()[1].reason) == (3, "restored")


def test_the_runtime_layer_moves_the_revision_only_when_it_changes() -> None:
    engine = Engine(Settings(max_batch_size=32))
    start = engine.revision
    change = engine.set_runtime({"max_batch_size": 32})
    assert (change, engine.revision) == (SettingsChange(changed={}, unchanged=("max_batch_size",)), start)
    change = engine.set_runtime({"max_batch_size": 16})
    assert change.changed == {"max_batch_size": (32, 16)} and engine.revision == start + 1
    assert engine.reset_runtime().unpinned == ("max_batch_size",) and engine.settings.max_batch_size == 32
    assert engine.revision == start + 2


def test_a_decision_is_a_plain_value_and_the_old_names_still_import() -> None:
    assert not hasattr(Decision, "to_dict") and not hasattr(Decision, "etag")
    assert Decision is decision.Decision and UnknownGpu is gpu_lookup.UnknownGpu
    assert Refused is trust.Refused and SettingsChange is runtime_settings.SettingsChange


def test_a_profile_declared_in_the_settings_is_known() -> None:
    engine = Engine(Settings(profiles=(ServiceProfile(name="vlm"),), register_unknown=False))
    assert engine.known.declared == {"vlm"}
    assert engine.poll("vlm", 0, 1.0).registered
