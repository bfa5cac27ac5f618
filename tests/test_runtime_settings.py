"""The engine's settings layers: the base (file < environment < flags) and the runtime layer (admin API).

Effective settings = the base with the runtime layer applied. PATCH pins only what changes, an import
replaces the runtime layer, a reset unpins; a saved layer is re-applied key by key at start.
"""

from __future__ import annotations

import dataclasses

import pytest

from optimizer.config import RUNTIME_KEYS, SETTING_KEYS, ConfigError, ServiceProfile, Settings, Strategy
from optimizer.engine import Engine
from tests.policy_helpers import Harness, gpu

PER_ITEM_1G = dataclasses.replace(Settings().default_profile, per_item_mb=1024)
BASE = Settings(strategy=Strategy.CONSERVATIVE, max_batch_size=32, memory_reserve_mb=2048,
                profiles=(ServiceProfile("vlm", per_item_mb=1024.0),))


def test_a_fresh_engine_runs_its_base_and_pins_nothing() -> None:
    e = Engine(BASE)
    assert e.settings == e.base_settings == BASE and e.runtime == {}


def test_set_runtime_pins_only_values_that_differ_from_the_effective_ones() -> None:
    e = Engine(BASE)
    change = e.set_runtime({"strategy": "Aggressive ", "max_batch_size": 32, "gc_threshold": "0.7"})
    assert change.changed == {"strategy": ("conservative", "aggressive"), "gc_threshold": (0.85, 0.7)}
    assert change.pinned == ("gc_threshold", "strategy") and change.unchanged == ("max_batch_size",)
    assert e.runtime == {"strategy": "aggressive", "gc_threshold": 0.7}  # normalised, JSON-ready
    assert e.settings == dataclasses.replace(BASE, strategy=Strategy.AGGRESSIVE, gc_threshold=0.7)
    assert e.base_settings == BASE

    revision = e.revision
    again = e.set_runtime({"strategy": "aggressive"})
    assert again.changed == {} and again.pinned == () and again.unchanged == ("strategy",)
    assert e.revision == revision  # nothing to save
    assert e.runtime == {"strategy": "aggressive", "gc_threshold": 0.7}


def test_set_runtime_is_all_or_nothing_and_refuses_profiles() -> None:
    e = Engine(BASE)
    e.set_runtime({"strategy": "aggressive"})
    for bad, key in (({"gc_threshold": 0.7, "min_batch_size": 33}, "min_batch_size"),
                     ({"turbo": 1}, "turbo"),
                     ({"gc_threshold": 0.7, "profiles": []}, "profiles")):
        with pytest.raises(ConfigError) as exc:
            e.set_runtime(bad)
        assert exc.value.key == key
        assert e.runtime == {"strategy": "aggressive"}
        assert e.settings == dataclasses.replace(BASE, strategy=Strategy.AGGRESSIVE)
    with pytest.raises(ConfigError, match="set only in the config file"):
        e.set_runtime({"profiles": [{"name": "vlm", "per_item_mb": 1024}]})


def test_replace_runtime_falls_back_to_the_base_not_the_defaults() -> None:
    e = Engine(BASE)
    e.set_runtime({"max_batch_size": 8, "gc_threshold": 0.7})
    change = e.replace_runtime({"strategy": "adaptive"})
    assert e.runtime == {"strategy": "adaptive"}
    assert e.settings == dataclasses.replace(BASE, strategy=Strategy.ADAPTIVE)  # 32, 2048 MiB, the profiles
    assert change.unpinned == ("gc_threshold", "max_batch_size") and change.pinned == ("strategy",)
    assert set(change.changed) == {"strategy", "max_batch_size", "gc_threshold"}
    # a key the layer names is pinned even at its base value
    e.replace_runtime({"max_batch_size": 32})
    assert e.runtime == {"max_batch_size": 32} and e.settings == BASE
    with pytest.raises(ConfigError) as exc:
        e.replace_runtime({"min_batch_size": 40})  # above the base maximum: the whole import is refused
    assert exc.value.key == "min_batch_size" and e.runtime == {"max_batch_size": 32}
    with pytest.raises(ConfigError):
        e.replace_runtime({"profiles": []})


def test_reset_runtime_unpins_keys_at_once() -> None:
    e = Engine(BASE)
    e.set_runtime({"strategy": "aggressive", "max_batch_size": 8, "gc_threshold": 0.7})
    change = e.reset_runtime(["max_batch_size", "cleanup_interval"])  # cleanup_interval was not pinned
    assert change.unpinned == ("max_batch_size",) and change.changed == {"max_batch_size": (8, 32)}
    assert e.runtime == {"strategy": "aggressive", "gc_threshold": 0.7}
    assert e.settings.max_batch_size == 32
    change = e.reset_runtime()
    assert change.unpinned == ("gc_threshold", "strategy") and e.runtime == {} and e.settings == BASE


@pytest.mark.parametrize("key", ["turbo", "profiles"])
def test_reset_of_a_key_that_cannot_be_pinned_names_the_allowed_keys(key: str) -> None:
    e = Engine(BASE)
    e.set_runtime({"strategy": "aggressive"})
    with pytest.raises(ConfigError) as exc:
        e.reset_runtime(["strategy", key])
    assert exc.value.key == "keys" and repr(key) in str(exc.value) and ", ".join(RUNTIME_KEYS) in str(exc.value)
    assert e.runtime == {"strategy": "aggressive"}


def test_a_reset_that_would_leave_the_settings_inconsistent_changes_nothing() -> None:
    e = Engine(BASE)
    e.set_runtime({"max_batch_size": 64, "min_batch_size": 40})
    with pytest.raises(ConfigError) as exc:
        e.reset_runtime(["max_batch_size"])  # the base maximum (32) is below the pinned minimum
    assert exc.value.key == "min_batch_size"
    assert e.runtime == {"max_batch_size": 64, "min_batch_size": 40}
    e.reset_runtime(["max_batch_size", "min_batch_size"])
    assert e.settings == BASE


def test_restore_runtime_keeps_the_valid_keys_and_names_the_rest() -> None:
    e = Engine(BASE)
    skipped = e.restore_runtime({"min_batch_size": 40, "strategy": "turbo", "max_batch_size": 64,
                                 "profiles": [], "nope": 1, "gc_threshold": 0.7})
    assert set(skipped) == {"strategy", "profiles", "nope"}
    assert "turbo" in skipped["strategy"] and "config file" in skipped["profiles"]
    # the minimum fits once the pinned maximum is back, though it comes first
    assert e.runtime == {"min_batch_size": 40, "max_batch_size": 64, "gc_threshold": 0.7}
    assert e.settings == dataclasses.replace(BASE, min_batch_size=40, max_batch_size=64, gc_threshold=0.7)
    assert e.base_settings == BASE


def test_every_setting_key_but_profiles_can_be_pinned() -> None:
    assert set(SETTING_KEYS) - set(RUNTIME_KEYS) == {"profiles"}
    e = Engine(Settings())
    e.restore_runtime({k: v for k, v in dataclasses.asdict(Settings()).items() if k in RUNTIME_KEYS})
    assert set(e.runtime) == set(RUNTIME_KEYS)


def settled() -> Harness:
    h = Harness(Settings(max_batch_size=64, default_profile=PER_ITEM_1G))
    h.engine.poll("vlm", 0, 0.0)
    for _ in range(30):
        h.tick(gpu(30.0))
    return h


def test_unpinning_enabled_acts_at_once_like_setting_it() -> None:
    h = settled()
    grown = h.batch()
    assert grown > 4
    h.engine.set_runtime({"enabled": False}, h.t)
    assert h.batch() == 4 and h.engine.runtime == {"enabled": False}  # the default, published at once
    h.tick(gpu(30.0))
    h.tick(gpu(30.0))
    change = h.engine.reset_runtime(["enabled"], h.t)  # back to the base (enabled): optimizes at once
    assert change.changed == {"enabled": (False, True)}
    assert h.batch() > 4
    assert [e for e in h.engine.events if e.kind == "batch_changed"][-1].trigger == "optimization"
    h.engine.replace_runtime({"enabled": False}, h.t)  # an import that disables publishes the default at once
    assert h.batch() == 4
