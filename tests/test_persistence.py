"""Durable state: the atomic state file, what survives a restart, corrupt files, failed saves, kill -9."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from optimizer.api import build_app
from optimizer.config import RUNTIME_KEYS, ServiceProfile, Settings, Strategy, apply_settings, settings_to_dict
from optimizer.engine import Engine
from optimizer.persistence import STATE_VERSION, Persister, StateFile, dump, restore
from optimizer.policy.types import Snapshot
from optimizer.sampler import Sampler
from tests import state_writer
from tests.fakes import FakeClock, ScriptedBackend
from tests.logcapture import LogList, events_named
from tests.policy_helpers import GIB, ROOT, gpu

T0 = 1_000.0
ASIDE_RE = re.compile(r"state\.json\.corrupt-\d{8}T\d{6}Z")


def snap(t: float, used_gib: float = 20.0) -> Snapshot:
    return Snapshot(t, (gpu(used_gib, t=t),))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- StateFile


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    doc = {"version": STATE_VERSION, "settings": {"strategy": "aggressive", "memory_threshold_warning": 0.7},
           "services": [{"service": "svc-σ", "gpu": 0, "peaks": [[4, 30 * GIB], [8, 34 * GIB]], "override": None}],
           "saved_at": 1234.5}
    state.save(doc)
    assert state.load() == doc
    doc["services"] = []
    state.save(doc)  # replaces the previous one
    assert state.load() == doc


def test_load_without_a_file_is_none_and_moves_nothing(tmp_path: Path, logs: LogList) -> None:
    assert StateFile(tmp_path / "state.json").load() is None
    assert listing(tmp_path) == []
    assert [e for e in logs if e["log_level"] != "debug"] == []


def test_an_unreadable_path_is_none_and_not_moved(tmp_path: Path, logs: LogList) -> None:
    (tmp_path / "state.json").mkdir()
    assert StateFile(tmp_path / "state.json").load() is None
    assert listing(tmp_path) == ["state.json"]
    assert len(events_named(logs, "state_unreadable")) == 1


def test_save_creates_the_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "state.json"
    StateFile(path).save({"version": STATE_VERSION})
    assert json.loads(path.read_bytes()) == {"version": STATE_VERSION}


def test_saves_leave_no_temporary_files_behind(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    for n in range(25):
        state.save({"version": STATE_VERSION, "counter": n, "padding": "x" * 10_000})
    assert listing(tmp_path) == ["state.json"]
    assert (state.load() or {})["counter"] == 24


def test_a_failed_replace_removes_its_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(OSError):
        StateFile(tmp_path / "state.json").save({"version": STATE_VERSION})
    assert listing(tmp_path) == ["state.json"]
    assert (tmp_path / "state.json").is_dir()


# --------------------------------------------------------------------------- restart survival


def learned_engine() -> Engine:
    """An engine that learned things and was told things: runtime settings, peaks, OOMs, an override."""
    e = Engine(Settings())
    e.observe(snap(T0, 60.0))  # memory high enough that the samples do not contradict the OOMs below
    e.update_settings({"max_batch_size": 12, "optimization_interval": 30.0})
    e.report("svc-a", 0, T0 + 1, batch_size=4, peak_bytes=30 * GIB, allocated_bytes=26 * GIB,
             reserved_bytes=31 * GIB, inactive_split_bytes=GIB // 2)
    e.report("svc-a", 0, T0 + 2, batch_size=6, peak_bytes=31 * GIB, allocated_bytes=25 * GIB)
    e.report("svc-a", 0, T0 + 3, batch_size=8, oom=True)
    e.report("svc-a", 0, T0 + 6, batch_size=7, oom=True)  # past the OOM rate limit: a second strike
    e.set_override("svc-b", 0, 5, 600.0, T0 + 5)
    return e


LEARNED_FIELDS = ("batch_size", "optimal", "ceiling", "ceiling_until", "strikes", "last_oom_at", "memory", "override",
                  "override_until")


def test_state_survives_a_restart_through_the_engine(tmp_path: Path, logs: LogList) -> None:
    old = learned_engine()
    a, b = old.state.services[(0, "svc-a")], old.state.services[(0, "svc-b")]
    assert a.memory.fixed == 25 * GIB and a.memory.observations == ((T0 + 1, GIB), (T0 + 2, GIB))
    assert (a.memory.held, a.memory.waste, a.memory.largest_ok) == (((T0 + 1, 5 * GIB / 4),), GIB // 2, 6)
    assert (a.ceiling, a.strikes, a.last_oom_at) == (7, 2, T0 + 6)
    assert a.ceiling_until == T0 + 6 + 30 * 10 * 2  # 10 optimization intervals, doubled on the second strike
    assert (b.override, b.override_until, b.batch_size) == (5, T0 + 605, 5)
    path = tmp_path / "state" / "state.json"
    assert Persister(old, StateFile(path)).save() is True

    config = Settings(memory_reserve_mb=2048)  # the restarted process's own configuration
    fresh = Engine(config)
    assert Persister(fresh, StateFile(path)).load(T0 + 10) is True
    assert fresh.settings == dataclasses.replace(config, max_batch_size=12, optimization_interval=30.0)
    assert fresh.runtime == {"max_batch_size": 12, "optimization_interval": 30.0}
    assert set(fresh.state.services) == {(0, "svc-a"), (0, "svc-b")}
    for key, before in old.state.services.items():
        after = fresh.state.services[key]
        assert {f: getattr(after, f) for f in LEARNED_FIELDS} == {f: getattr(before, f) for f in LEARNED_FIELDS}
        assert after.reason == "restored from the state file"
    [restored] = events_named(logs, "state_restored")
    assert restored["services"] == 2 and restored["settings"] == ["max_batch_size", "optimization_interval"]

    # the restored engine decides with what it restored; a control without the state file does not
    control = Engine(fresh.settings)
    for e in (fresh, control):
        e.observe(snap(T0 + 10))
        manual = e.poll("svc-b", 0, T0 + 10)
        e.poll("svc-a", 0, T0 + 10)
        e.observe(snap(T0 + 40))  # one optimization interval (30 s, restored) later: a periodic optimization
    assert manual.batch_size == 4  # the control's svc-b: no override
    b_now = fresh.poll("svc-b", 0, T0 + 40)
    assert b_now.batch_size == 5 and "manual override" in b_now.reason
    a_now = fresh.poll("svc-a", 0, T0 + 40)
    assert a_now.batch_size == 6  # below the OOM bar at 7
    assert "OOM seen at batch 7" in a_now.reason
    assert control.poll("svc-a", 0, T0 + 40).batch_size == 12  # max_batch_size (12, restored)

    # the override's expiry survived too
    fresh.poll("svc-b", 0, T0 + 600)
    events = fresh.observe(snap(T0 + 610))
    assert [(e.kind, e.service, e.detail) for e in events if e.kind == "override_cleared"] == [
        ("override_cleared", "svc-b", "expired")]
    assert fresh.state.services[(0, "svc-b")].override is None


def test_a_restored_batch_is_clamped_into_the_new_limits(tmp_path: Path) -> None:
    old = Engine(Settings())
    old.observe(snap(T0))
    old.poll("svc", 0, T0)
    old.optimize_now()
    assert old.state.services[(0, "svc")].batch_size == 16
    path = tmp_path / "state.json"
    assert Persister(old, StateFile(path)).save()
    fresh = Engine(Settings(max_batch_size=8))
    assert Persister(fresh, StateFile(path)).load(T0 + 1)
    assert fresh.state.services[(0, "svc")].batch_size == 8
    assert fresh.settings.max_batch_size == 8  # nobody changed it at runtime: the configuration holds


def test_dump_is_json_and_restore_of_an_empty_engine_is_a_no_op() -> None:
    e = Engine(Settings())
    doc = dump(e)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["version"] == STATE_VERSION and doc["settings"] == {} and doc["services"] == []
    fresh = Engine(Settings(strategy=Strategy.ADAPTIVE))
    restore(fresh, doc, T0)
    assert fresh.settings == Settings(strategy=Strategy.ADAPTIVE)
    assert dict(fresh.state.services) == {}


# --------------------------------------------------------------------------- corrupt files

VALID = json.dumps(dump(learned_engine())).encode()
CORRUPT: list[tuple[str, bytes]] = [
    ("garbage", b"\x00\x13\x37garbage \xfe\xff not json at all"),
    ("truncated", VALID[: len(VALID) // 2]),
    ("empty", b""),
    ("whitespace", b"  \n"),
    ("array", b"[1, 2, 3]"),
    ("string", b'"state"'),
    ("null", b"null"),
    ("no version", b'{"settings": {}, "services": []}'),
    ("version 2", b'{"version": 2, "settings": {}, "services": []}'),
    ("version as a string", b'{"version": "1", "settings": {}, "services": []}'),
    ("non-UTF-8", b'{"version": 1, "settings": {}, "services": [], "note": "\xff\xfe\xfa"}'),
    ("latin-1", '{"version": 1, "services": [{"service": "caf\u00e9"}]}'.encode("latin-1")),
    ("nested too deep", b"[" * 100_000),
]


@pytest.mark.parametrize("raw", [raw for _, raw in CORRUPT], ids=[name for name, _ in CORRUPT])
def test_a_corrupt_file_is_moved_aside_and_the_service_starts_from_its_config(tmp_path: Path, logs: LogList,
                                                                              raw: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(raw)
    config = Settings(strategy=Strategy.CONSERVATIVE)
    engine = Engine(config)
    persister = Persister(engine, StateFile(path))
    assert persister.load(T0) is False
    assert not path.exists()
    [aside] = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert ASIDE_RE.fullmatch(aside.name), aside.name
    assert aside.read_bytes() == raw
    [warning] = events_named(logs, "state_corrupt_moved_aside")
    assert warning["log_level"] == "warning"
    assert warning["path"] == str(path) and warning["moved_to"] == str(aside)
    assert warning["error"]
    # the service starts from its configuration, and goes on saving
    assert engine.settings == config and engine.runtime == {}
    assert dict(engine.state.services) == {}
    engine.observe(snap(T0))
    assert engine.poll("svc", 0, T0).batch_size == 4
    assert persister.save() is True
    assert (StateFile(path).load() or {})["services"][0]["service"] == "svc"
    assert aside.read_bytes() == raw  # the moved-aside file is kept for a post-mortem


def test_state_file_load_of_a_corrupt_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"{not json")
    assert StateFile(path).load() is None
    assert listing(tmp_path)[0].startswith("state.json.corrupt-") and len(listing(tmp_path)) == 1


WRONG_SHAPES: list[Any] = [
    pytest.param({"version": 1, "services": "abc"}, id="services a string"),
    pytest.param({"version": 1, "services": {"svc": {}}}, id="services an object"),
    pytest.param({"version": 1, "services": [1, None, "x", []]}, id="services of junk"),
    pytest.param({"version": 1, "settings": {"strategy": "turbo"}, "services": []}, id="settings invalid"),
    pytest.param({"version": 1, "services": [{"service": "a", "gpu": 0, "batch_size": 4, "optimal": 4,
                                              "memory": 7}]}, id="memory not an object"),
    pytest.param({"version": 1, "services": [{"service": "a", "gpu": 0, "batch_size": 4, "optimal": 4,
                                              "memory": {"observations": [[4]]}}]}, id="observations not pairs"),
    pytest.param({"version": 1, "services": [{"service": "a", "gpu": 0, "batch_size": 4, "optimal": 4,
                                              "memory": {"fixed": "lots"}}]}, id="fixed not a number"),
    pytest.param({"version": 1, "services": 5}, id="services a number"),
    pytest.param({"version": 1, "services": True}, id="services true"),
    pytest.param({"version": 1, "services": [{"service": "a", "gpu": 0, "batch_size": 1e999, "optimal": 4}]},
                 id="batch_size infinite"),
    pytest.param({"version": 1, "services": [{"service": "a", "gpu": 0, "batch_size": 4, "optimal": 4,
                                              "memory": {"observations": [[4, 1e999]]}}]}, id="observation infinite"),
]


@pytest.mark.parametrize("doc", WRONG_SHAPES)
def test_a_document_of_the_wrong_shape_never_raises(tmp_path: Path, logs: LogList, doc: Any) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))  # json.dumps writes 1e999 as Infinity, which json.loads reads back
    config = Settings(strategy=Strategy.CONSERVATIVE)
    engine = Engine(config)
    Persister(engine, StateFile(path)).load(T0)  # must not raise, whatever it returns
    assert engine.settings == config
    assert dict(engine.state.services) == {}
    assert any(e["log_level"] == "warning" for e in logs)


def test_bad_entries_are_skipped_and_the_rest_restored(tmp_path: Path, logs: LogList) -> None:
    doc = dump(learned_engine())
    good = doc["services"]
    doc["services"] = [good[0], {"service": "no-batch", "gpu": 0}, {"service": "bad-gpu", "gpu": "x",
                                                                     "batch_size": 4, "optimal": 4},
                       "not an object", {"service": "bad-strikes", "gpu": 0, "batch_size": 4, "optimal": 4,
                                         "strikes": "many"}, good[1]]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    engine = Engine(Settings())
    assert Persister(engine, StateFile(path)).load(T0 + 10) is True
    assert set(engine.state.services) == {(0, "svc-a"), (0, "svc-b")}
    assert engine.state.services[(0, "svc-a")].ceiling == 7
    assert engine.state.services[(0, "svc-b")].override == 5
    skipped = events_named(logs, "state_service_ignored")
    assert len(skipped) == 4 and all(e["log_level"] == "warning" for e in skipped)
    assert engine.settings.max_batch_size == 12  # the valid runtime settings were applied
    assert path.exists() and listing(tmp_path) == ["state.json"]  # a partly bad file is not corrupt


GOOD_ENTRY: dict[str, Any] = {"service": "hand-written", "gpu": 0, "batch_size": 6, "optimal": 8, "ceiling": 9,
                              "ceiling_until": T0 + 100, "strikes": 1, "last_oom_at": T0 - 5, "override": None,
                              "override_until": None, "memory": {"fixed": 20.0 * GIB, "observations": [[T0, GIB]],
                                                                 "reports": 3, "largest_ok": 8}}
# (what is wrong, the field the warning must name, the entry's changes)
BAD_ENTRIES: list[tuple[str, str, dict[str, Any]]] = [
    ("negative optimal", "optimal", {"optimal": -9}),
    ("zero batch", "batch_size", {"batch_size": 0}),
    ("batch above 4096", "batch_size", {"batch_size": 5000}),
    ("batch a string", "batch_size", {"batch_size": "6"}),
    ("batch a float", "batch_size", {"batch_size": 6.5}),
    ("batch true", "batch_size", {"batch_size": True}),
    ("override negative", "override", {"override": -1}),
    ("override above 4096", "override", {"override": 4097}),
    ("ceiling zero", "ceiling", {"ceiling": 0}),
    ("negative gpu", "gpu", {"gpu": -1}),
    ("gpu a float", "gpu", {"gpu": 0.5}),
    ("gpu a string", "gpu", {"gpu": "0"}),
    ("infinite bar", "ceiling_until", {"ceiling_until": float("inf")}),
    ("NaN oom time", "last_oom_at", {"last_oom_at": float("nan")}),
    ("override_until a string", "override_until", {"override": 5, "override_until": "soon"}),
    ("negative strikes", "strikes", {"strikes": -2}),
    ("service with a space", "service", {"service": "bad name"}),
    ("service too long", "service", {"service": "s" * 129}),
    ("service empty", "service", {"service": ""}),
    ("service a number", "service", {"service": 7}),
    ("service missing", "service", {"service": None}),
    ("negative fixed memory", "memory.fixed", {"memory": {"fixed": -1.0}}),
    ("negative per-item memory", "memory.observations", {"memory": {"observations": [[T0, -GIB]]}}),
    ("observation not a pair", "memory.observations", {"memory": {"observations": [[T0]]}}),
    ("waste fraction above its bound", "memory.waste_fraction", {"memory": {"waste_fraction": 50}}),
    ("negative reports", "memory.reports", {"memory": {"reports": -1}}),
    ("bare peak at batch 0", "memory.bare_peaks", {"memory": {"bare_peaks": [[0, GIB]]}}),
    ("memory a list", "memory", {"memory": [1, 2]}),
]


@pytest.mark.parametrize(("field", "change"), [(f, c) for _, f, c in BAD_ENTRIES], ids=[n for n, _, _ in BAD_ENTRIES])
def test_a_hand_written_bad_entry_is_skipped_naming_its_field_and_the_others_restored(
        tmp_path: Path, logs: LogList, field: str, change: dict[str, Any]) -> None:
    bad = {**GOOD_ENTRY, "service": "bad-one", **change}
    if change.get("service", "") is None:
        del bad["service"]
    doc = {"version": STATE_VERSION, "saved_at": T0, "settings": {},
           "services": [GOOD_ENTRY, bad, {**GOOD_ENTRY, "service": "after-it", "gpu": 1}]}
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))  # NaN and Infinity as Python's json writes them (and reads them back)
    engine = Engine(Settings())
    assert Persister(engine, StateFile(path)).load(T0 + 10) is True
    assert set(engine.state.services) == {(0, "hand-written"), (1, "after-it")}
    kept = engine.state.services[(0, "hand-written")]
    assert (kept.batch_size, kept.optimal, kept.ceiling, kept.strikes, kept.memory.fixed) == (6, 8, 9, 1, 20.0 * GIB)
    [warning] = events_named(logs, "state_service_ignored")
    assert warning["log_level"] == "warning"
    assert (warning["entry"], warning["field"]) == (1, field)
    assert warning["error"].startswith(f"{field}: ")
    assert warning["service"] == (bad.get("service") if isinstance(bad.get("service"), str) else None)
    [restored] = events_named(logs, "state_restored")
    assert restored["services"] == 2


def test_a_restored_batch_above_the_configured_limit_is_clamped_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": STATE_VERSION, "settings": {},
                                "services": [{**GOOD_ENTRY, "batch_size": 4000, "optimal": 4000}]}))
    engine = Engine(Settings(max_batch_size=16))
    assert Persister(engine, StateFile(path)).load(T0) is True
    assert engine.state.services[(0, "hand-written")].batch_size == 16

@pytest.mark.parametrize(("settings", "kept", "skipped"), [
    ({"strategy": "turbo"}, {}, ["strategy"]),
    ({"min_batch_size": 20}, {}, ["min_batch_size"]),  # above the configuration's maximum (16)
    ({"no_such_key": 1, "gc_threshold": 0.7}, {"gc_threshold": 0.7}, ["no_such_key"]),
    ({"max_batch_size": 12, "memory_threshold_warning": 5}, {"max_batch_size": 12}, ["memory_threshold_warning"]),
    ({"profiles": [], "strategy": "adaptive"}, {"strategy": "adaptive"}, ["profiles"]),  # file-only
    # a pinned minimum above the new file's maximum fits once the pinned maximum is back, whatever the order
    ({"min_batch_size": 20, "max_batch_size": 32}, {"min_batch_size": 20, "max_batch_size": 32}, []),
])
def test_saved_runtime_settings_are_reapplied_key_by_key(tmp_path: Path, logs: LogList, settings: dict[str, Any],
                                                         kept: dict[str, Any], skipped: list[str]) -> None:
    doc = dump(learned_engine())
    doc["settings"] = settings
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    config = Settings(max_batch_size=16, strategy=Strategy.AGGRESSIVE,
                      profiles=(ServiceProfile("svc-a", per_item_mb=100.0),))
    engine = Engine(config)
    assert Persister(engine, StateFile(path)).load(T0 + 10) is True
    assert engine.runtime == kept
    assert engine.settings == apply_settings(config, kept)  # the others: the configuration's
    assert engine.settings.profiles == config.profiles
    warnings = events_named(logs, "state_setting_ignored")
    assert sorted(w["key"] for w in warnings) == skipped
    assert all(w["log_level"] == "warning" and w["error"] for w in warnings)
    assert set(engine.state.services) == {(0, "svc-a"), (0, "svc-b")}  # the services are restored all the same


def test_an_old_state_file_that_pins_every_key_is_read(tmp_path: Path, logs: LogList) -> None:
    """Files written when an import pinned every key (profiles included) stay readable; profiles are the file's."""
    doc = dump(learned_engine())
    doc["settings"] = settings_to_dict(Settings(strategy=Strategy.CONSERVATIVE))
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    config = Settings(max_batch_size=24, profiles=(ServiceProfile("svc-a", per_item_mb=100.0),))
    engine = Engine(config)
    assert Persister(engine, StateFile(path)).load(T0 + 10) is True
    assert set(engine.runtime) == set(RUNTIME_KEYS)
    assert engine.settings == dataclasses.replace(Settings(strategy=Strategy.CONSERVATIVE), profiles=config.profiles)
    assert [w["key"] for w in events_named(logs, "state_setting_ignored")] == ["profiles"]
    engine.reset_runtime()  # what configure --reset-all does: the configuration holds again
    assert engine.settings == config and engine.runtime == {}


@pytest.mark.parametrize("settings", [["strategy", "turbo"], "aggressive", 5])
def test_runtime_settings_that_are_not_an_object_are_ignored_with_a_warning(tmp_path: Path, logs: LogList,
                                                                            settings: Any) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "settings": settings, "services": []}))
    engine = Engine(Settings())
    Persister(engine, StateFile(path)).load(T0)
    assert engine.settings == Settings()
    assert len(events_named(logs, "state_settings_ignored")) == 1


# --------------------------------------------------------------------------- saving


def test_a_failed_save_is_logged_and_never_raises(tmp_path: Path, logs: LogList) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the state directory should be")
    path = blocker / "state.json"
    engine = learned_engine()
    persister = Persister(engine, StateFile(path))
    assert persister.save() is False
    assert persister.save(force=True) is False
    failed = events_named(logs, "state_save_failed")
    assert len(failed) == 2
    assert all(e["log_level"] == "error" and e["path"] == str(path) and e["error"] for e in failed)
    assert blocker.read_bytes() == b"a file where the state directory should be"
    assert listing(tmp_path) == ["not-a-dir"]
    # once the directory can be written, the next (unforced) save writes what was not saved
    blocker.unlink()
    assert persister.save() is True
    assert (StateFile(path).load() or {})["settings"] == {"max_batch_size": 12, "optimization_interval": 30.0}


def test_a_save_onto_a_directory_fails_cleanly(tmp_path: Path, logs: LogList) -> None:
    (tmp_path / "state.json").mkdir()
    persister = Persister(learned_engine(), StateFile(tmp_path / "state.json"))
    assert persister.save() is False
    assert len(events_named(logs, "state_save_failed")) == 1
    assert listing(tmp_path) == ["state.json"]  # no temporary file left behind


def test_save_writes_only_when_the_revision_moved(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    engine = Engine(Settings())
    engine.observe(snap(T0))
    persister = Persister(engine, StateFile(path))
    assert persister.save() is True
    assert path.exists()
    path.unlink()
    assert persister.save() is False  # nothing changed: nothing written
    assert not path.exists()
    engine.report("svc", 0, T0 + 1, batch_size=4, peak_bytes=30 * GIB, allocated_bytes=26 * GIB)
    assert persister.save() is True
    assert (StateFile(path).load() or {})["services"][0]["memory"]["observations"] == [[T0 + 1, GIB]]
    path.unlink()
    assert persister.save() is False
    assert persister.save(force=True) is True  # the admin API forces a save after every change
    assert path.exists()
    engine.update_settings({"strategy": "aggressive"})
    assert persister.save() is True
    assert (StateFile(path).load() or {})["settings"] == {"strategy": "aggressive"}


def test_load_counts_as_saved(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert Persister(learned_engine(), StateFile(path)).save()
    before = path.read_bytes()
    fresh = Engine(Settings())
    persister = Persister(fresh, StateFile(path))
    assert persister.load(T0 + 10)
    assert persister.save() is False  # what was just loaded is not written back
    assert path.read_bytes() == before


class Gate:
    """A sleep that returns only when the test lets it: one step of the persister's loop at a time."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.sleeping = asyncio.Event()
        self._go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self.sleeping.set()
        await self._go.get()

    async def step(self) -> None:
        """Wake the sleeper once and wait until it sleeps again (its work in between is done)."""
        self.sleeping.clear()
        self._go.put_nowait(None)
        await asyncio.wait_for(self.sleeping.wait(), timeout=10)


async def test_the_app_saves_every_optimization_interval_when_changed_and_at_exit(
        aiohttp_client: AiohttpClient, tmp_path: Path, logs: LogList) -> None:
    path = tmp_path / "state.json"
    clock = FakeClock(T0)
    engine = Engine(Settings(optimization_interval=30.0))
    gate = Gate()
    backend = ScriptedBackend(1)
    sampler = Sampler(backend, engine, clock=clock, sleep=gate.sleep)
    client = await aiohttp_client(build_app(engine, sampler, run_sampler=False,
                                            persister=Persister(engine, StateFile(path))))
    await asyncio.wait_for(gate.sleeping.wait(), timeout=10)
    assert gate.delays == [30.0]
    assert not path.exists()  # nothing before the first interval

    assert await sampler.tick() is not None
    resp = await client.post("/reports", json={"service": "svc", "gpu": 0, "batch_size": 4, "peak_bytes": 30 * GIB,
                                               "allocated_bytes": 26 * GIB})
    assert resp.status == 200
    await gate.step()
    assert (StateFile(path).load() or {})["services"][0]["memory"]["observations"] == [[clock(), GIB]]

    path.unlink()
    await gate.step()  # nothing changed in this interval: nothing written
    assert not path.exists()

    engine.update_settings({"strategy": "aggressive"})
    await gate.step()
    assert (StateFile(path).load() or {})["settings"] == {"strategy": "aggressive"}

    backend.used[0] = 60 * GIB  # memory high enough that the samples do not contradict the OOM
    assert await sampler.tick() is not None
    engine.report("svc", 0, clock(), batch_size=8, oom=True)  # between two intervals
    await client.close()  # the exit save
    saved = StateFile(path).load() or {}
    assert saved["services"][0]["ceiling"] == 8
    assert len(events_named(logs, "state_saved_at_exit")) == 1


async def test_a_failed_exit_save_is_an_error_not_state_saved_at_exit(
        aiohttp_client: AiohttpClient, tmp_path: Path, logs: LogList) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the state directory should be")
    engine = Engine(Settings())
    gate = Gate()
    sampler = Sampler(ScriptedBackend(1), engine, clock=FakeClock(T0), sleep=gate.sleep)
    persister = Persister(engine, StateFile(blocker / "state.json"), clock=FakeClock(T0 + 7))
    client = await aiohttp_client(build_app(engine, sampler, run_sampler=False, persister=persister))
    await asyncio.wait_for(gate.sleeping.wait(), timeout=10)
    assert await sampler.tick() is not None
    await client.close()
    assert events_named(logs, "state_saved_at_exit") == []
    [failed] = events_named(logs, "state_not_saved_at_exit")
    assert failed["log_level"] == "error" and failed["path"] == str(blocker / "state.json") and failed["error"]
    assert persister.errors == 1 and persister.failure is not None and persister.failure.since == T0 + 7


# --------------------------------------------------------------------------- kill -9 at random points


class LineReader:
    """Reads a child's stdout in whole lines, each wait bounded by a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def lines(self) -> list[bytes]:
        return self.buffer.split(b"\n")[:-1]  # complete lines only

    def until(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"the writer printed only {len(self.lines())} lines"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, "the writer exited early"
                self.buffer += chunk

    def to_end(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.buffer += chunk


def test_a_kill_9_at_any_moment_leaves_a_whole_state_file(tmp_path: Path) -> None:
    rng = random.Random(20240917)
    runs = 20
    for run in range(runs):
        path = tmp_path / f"run{run}" / "state.json"
        proc = subprocess.Popen([sys.executable, "-m", "tests.state_writer", str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = LineReader(proc)
        try:
            reader.until(rng.randint(1, 30))  # synchronise on the saves it reported, never on time
            # Not a synchronisation: a random pause of up to about two save cycles (a save takes a
            # millisecond or two) so that the kill lands anywhere in the next save: while it
            # serialises, writes the temporary file, fsyncs, replaces, or prints.
            time.sleep(rng.uniform(0.0, 0.003))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            reader.to_end()
        finally:
            if proc.poll() is None:  # pragma: no cover - only when an assertion above failed
                proc.kill()
                proc.wait()
            assert proc.stdout is not None and proc.stderr is not None
            err = proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
        assert b"Traceback" not in err, err.decode(errors="replace")
        printed = [int(line) for line in reader.lines()]
        assert printed == list(range(1, len(printed) + 1))
        last = printed[-1]
        data = StateFile(path).load()
        assert isinstance(data, dict), f"run {run}: the state file does not parse after kill -9"
        assert data["counter"] in (last, last + 1), (run, last, data["counter"])  # the last reported, or the one in flight
        assert data["padding"] == state_writer.padding(data["counter"])  # one whole document, not a mix
        leftovers = [n for n in listing(path.parent) if n != "state.json"]
        assert not any(".corrupt-" in n for n in leftovers)
        assert len(leftovers) <= 1 and all(n.startswith(".state.json.") and n.endswith(".tmp") for n in leftovers)


def test_the_state_writer_saves_and_reports_each_counter(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    done = subprocess.run([sys.executable, "-m", "tests.state_writer", str(path), "3"], cwd=ROOT,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"1", b"2", b"3"]
    data = StateFile(path).load()
    assert data is not None and data["counter"] == 3 and len(data["padding"]) == 200_000
    assert listing(tmp_path) == ["state.json"]


def test_a_file_from_before_the_memory_model_is_read_and_its_peaks_ignored(tmp_path: Path, logs: LogList) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "settings": {}, "services": [
        {"service": "old", "gpu": 0, "batch_size": 6, "optimal": 6, "peaks": [[4, 30 * GIB], [6, 31 * GIB]]}]}))
    engine = Engine(Settings())
    assert Persister(engine, StateFile(path)).load(T0) is True
    svc = engine.state.services[(0, "old")]
    assert svc.batch_size == 6 and not svc.memory.measured
