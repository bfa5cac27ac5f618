"""Scenario files: reading and checking the GPUs, services and other tenants a simulated run replays
(see docs/scenarios.md). The value types are in :mod:`optimizer.simulation.scenario_types`, writing in
:mod:`optimizer.simulation.scenario_write`; both are importable from here."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from optimizer.gpu.types import MIG_ID_LIMIT, MIG_MAX_PARENTS, MIG_SELECTOR_RE, mig_index
from optimizer.simulation.scenario_types import (
    _MIG_INTERNAL,
    OOM_MODES,
    Background,
    HealthEvent,
    Scenario,
    SimGpu,
    SimService,
    Thermal,
    ramped,
)
from optimizer.simulation.scenario_write import scenario_to_dict

__all__ = ["DEFAULT_SCENARIO", "MIG_PROFILE_RE", "OOM_MODES", "Background", "HealthEvent", "Scenario", "ScenarioError",
           "SimGpu", "SimService", "Thermal", "load_scenario", "parse_scenario", "ramped", "scenario_to_dict"]


class ScenarioError(ValueError):
    """A scenario file is invalid; ``field`` names the offending field (e.g. ``services[0].per_item_mb``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _num(field: str, raw: dict[str, Any], key: str, *, lo: float = 0.0, hi: float = math.inf,
         lo_open: bool = False, default: Any = dataclasses.MISSING) -> Any:
    name = f"{field}.{key}" if field else key
    if key not in raw or raw[key] is None:
        if default is dataclasses.MISSING:
            raise ScenarioError(name, "is required")
        return default
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScenarioError(name, f"must be a number, got {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ScenarioError(name, f"must be in {rng}, got {v!r}")
    return v


def _index(field: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1023:
        raise ScenarioError(field, f"must be an integer in [0, 1023], got {v!r}")
    return v


def _mapping_list(raw: Any, key: str, field: str | None = None) -> list[dict[str, Any]]:
    items = raw.get(key) or []
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ScenarioError(field or key, "must be a list of mappings")
    return items


def _batch_limit(field: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
        raise ScenarioError(field, f"must be an integer in [1, 4096], got {v!r}")
    return v


def _per_item_changes(field: str, raw: dict[str, Any]) -> tuple[tuple[float, float], ...]:
    changes = []
    for i, c in enumerate(_mapping_list(raw, "per_item_changes", f"{field}.per_item_changes")):
        f = f"{field}.per_item_changes[{i}]"
        unknown = sorted(set(c) - {"at_s", "per_item_mb"})
        if unknown:
            raise ScenarioError(f"{f}.{unknown[0]}", "unknown field; allowed: at_s, per_item_mb")
        changes.append((float(_num(f, c, "at_s")), float(_num(f, c, "per_item_mb", lo_open=True))))
    if [at for at, _ in changes] != sorted(at for at, _ in changes):
        raise ScenarioError(f"{field}.per_item_changes", "must be in increasing order of at_s")
    return tuple(changes)


def _check_keys(field: str, raw: dict[str, Any], cls: type) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    if cls is SimGpu:  # the MIG fields are filled from ``mig:``, not written
        allowed = (allowed - _MIG_INTERNAL) | {"mig"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ScenarioError(f"{field}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(allowed))}")


_MIG_KEYS = ("profile", "memory_gb", "gpu_instance_id", "uuid")
MIG_PROFILE_RE = re.compile(r"(?:[0-9]+c\.)?[0-9]+g\.([0-9]+)gb")


def _mig_instances(f: str, g: dict[str, Any], whole: SimGpu) -> list[SimGpu]:
    """The MIG instances a scenario GPU declares (``mig: [{profile: 1g.10gb, memory_gb: 10}, ...]``)."""
    items = _mapping_list(g, "mig", f"{f}.mig")
    if not items:
        raise ScenarioError(f"{f}.mig", "must list at least one MIG instance (leave it out for a whole GPU)")
    if whole.index >= MIG_MAX_PARENTS:
        raise ScenarioError(f"{f}.index", f"a GPU with MIG instances must have an index in [0, {MIG_MAX_PARENTS - 1}]")
    out: list[SimGpu] = []
    seen: set[int] = set()
    for j, m in enumerate(items):
        mf = f"{f}.mig[{j}]"
        unknown = sorted(set(m) - set(_MIG_KEYS))
        if unknown:
            raise ScenarioError(f"{mf}.{unknown[0]}", f"unknown field; allowed: {', '.join(_MIG_KEYS)}")
        profile = m.get("profile")
        match = MIG_PROFILE_RE.fullmatch(profile) if isinstance(profile, str) else None
        if match is None:
            raise ScenarioError(f"{mf}.profile", f"must be a MIG profile such as 1g.10gb or 3g.40gb, got {profile!r}")
        memory_gb = _num(mf, m, "memory_gb", lo=0, hi=whole.total_mb / 1024, lo_open=True,
                         default=float(match.group(1)))
        gi = m.get("gpu_instance_id", j + 1)
        if isinstance(gi, bool) or not isinstance(gi, int) or not 0 <= gi < MIG_ID_LIMIT or gi in seen:
            raise ScenarioError(f"{mf}.gpu_instance_id", f"must be an integer in [0, {MIG_ID_LIMIT - 1}], unique "
                                f"on the GPU, got {gi!r}")
        seen.add(gi)
        uuid = m.get("uuid")
        if uuid is not None and not (isinstance(uuid, str) and uuid.startswith("MIG-")):
            raise ScenarioError(f"{mf}.uuid", f"must be a MIG UUID (MIG-...), got {uuid!r}")
        out.append(dataclasses.replace(whole, index=mig_index(whole.index, gi, 0), total_mb=memory_gb * 1024,
                                       uuid=uuid, parent_index=whole.index, parent_uuid=whole.uuid,
                                       parent_total_mb=whole.total_mb, gpu_instance_id=gi, mig_profile=profile))
    if sum(i.total_mb for i in out) > whole.total_mb:
        raise ScenarioError(f"{f}.mig", f"the instances' memory ({sum(i.total_mb for i in out) / 1024:g} GB) exceeds "
                            f"the GPU's total_mb ({whole.total_mb:g} MiB)")
    return out


def parse_scenario(raw: Any) -> Scenario:
    if not isinstance(raw, dict):
        raise ScenarioError("scenario", "must be a mapping")
    _check_keys("scenario", raw, Scenario)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError("name", "is required and must be a string")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ScenarioError("seed", f"must be an integer, got {seed!r}")
    duration = _num("", raw, "duration_s", lo=0, hi=30 * 86400, lo_open=True)
    step = _num("", raw, "step_s", lo=0, hi=60, lo_open=True, default=1.0)
    oom_mode = raw.get("oom_mode", "recover")
    if oom_mode not in OOM_MODES:
        raise ScenarioError("oom_mode", f"must be one of {', '.join(OOM_MODES)}, got {oom_mode!r}")
    oom_recovery = _num("", raw, "oom_recovery_s", hi=3600, default=3.0)
    restart = _num("", raw, "restart_s", hi=3600, default=60.0)
    stall = _num("", raw, "cleanup_stall_s", hi=600, default=1.0)
    gpus = []
    parents: list[int] = []
    for i, g in enumerate(_mapping_list(raw, "gpus")):
        f = f"gpus[{i}]"
        _check_keys(f, g, SimGpu)
        whole = SimGpu(
            index=_index(f"{f}.index", g.get("index", i)),
            name=str(g.get("name", "Simulated GPU")),
            total_mb=_num(f, g, "total_mb", lo=0, hi=1 << 22, lo_open=True),
            idle_temperature_c=_num(f, g, "idle_temperature_c", hi=150, default=35.0),
            power_limit_w=_num(f, g, "power_limit_w", lo=0, hi=5000, lo_open=True, default=700.0),
            load_temperature_rise_c=_num(f, g, "load_temperature_rise_c", hi=100, default=30.0),
            uuid=g.get("uuid"),
            slowdown_temperature_c=_num(f, g, "slowdown_temperature_c", lo=0, hi=150, lo_open=True, default=90.0),
            min_clock_fraction=_num(f, g, "min_clock_fraction", lo=0, hi=1, lo_open=True, default=0.5),
        )
        if "mig" in g:
            gpus.extend(_mig_instances(f, g, whole))
            parents.append(whole.index)
        else:
            gpus.append(whole)
    if not gpus:
        raise ScenarioError("gpus", "at least one GPU is required")
    indexes = [g.index for g in gpus]
    if len(set(indexes + parents)) != len(indexes) + len(parents):
        raise ScenarioError("gpus", f"GPU indexes must be unique, got {sorted(indexes + parents)}")
    selectors = {f"{g.parent_index}:{g.gpu_instance_id}": g.index for g in gpus if g.parent_index is not None}

    def gpu_ref(f: str, d: dict[str, Any]) -> int:
        v = d.get("gpu", indexes[0])
        if isinstance(v, str) and MIG_SELECTOR_RE.fullmatch(v) and v in selectors:
            return selectors[v]
        if isinstance(v, bool) or not isinstance(v, int) or v not in indexes:
            names = f" or a MIG instance as parent:instance {sorted(selectors)}" if selectors else ""
            raise ScenarioError(f"{f}.gpu", f"must be one of the GPU indexes {indexes}{names}, got {v!r}")
        return int(v)

    services = []
    for i, s in enumerate(_mapping_list(raw, "services")):
        f = f"services[{i}]"
        _check_keys(f, s, SimService)
        if not isinstance(s.get("name"), str) or not s["name"]:
            raise ScenarioError(f"{f}.name", "is required and must be a string")
        declared = s.get("declared_per_item_mb")
        services.append(SimService(
            name=s["name"], gpu=gpu_ref(f, s),
            base_mb=_num(f, s, "base_mb"),
            per_item_mb=_num(f, s, "per_item_mb", lo_open=True),
            item_ms=_num(f, s, "item_ms", lo_open=True),
            overhead_ms=_num(f, s, "overhead_ms", default=0.0),
            noise=_num(f, s, "noise", hi=0.5, default=0.0),
            fragmentation_growth_per_min=_num(f, s, "fragmentation_growth_per_min", hi=0.5, default=0.0),
            declared_per_item_mb=None if declared is None else _num(f, s, "declared_per_item_mb", lo_open=True),
            start_s=_num(f, s, "start_s", default=0.0),
            weight=_num(f, s, "weight", lo_open=True, default=1.0),
            max_batch_size=_batch_limit(f"{f}.max_batch_size", s.get("max_batch_size")),
            load_s=_num(f, s, "load_s", hi=3600, default=10.0),
            leak_mb_per_min=_num(f, s, "leak_mb_per_min", hi=1 << 20, default=0.0),
            per_item_changes=_per_item_changes(f, s),
        ))
    names = [(s.gpu, s.name) for s in services]
    if len(set(names)) != len(names):
        raise ScenarioError("services", "a service name may appear once per GPU")
    background = []
    for i, b in enumerate(_mapping_list(raw, "background")):
        f = f"background[{i}]"
        _check_keys(f, b, Background)
        for_s = b.get("for_s")
        every = b.get("every_s")
        bg = Background(gpu=gpu_ref(f, b), at_s=_num(f, b, "at_s", default=0.0), mb=_num(f, b, "mb"),
                        for_s=None if for_s is None else _num(f, b, "for_s", lo_open=True),
                        ramp_s=_num(f, b, "ramp_s", default=0.0),
                        every_s=None if every is None else _num(f, b, "every_s", lo_open=True))
        if bg.every_s is not None and (bg.for_s is None or bg.for_s >= bg.every_s):
            raise ScenarioError(f"{f}.every_s", f"needs for_s shorter than every_s (got for_s {bg.for_s!r}, "
                                                f"every_s {bg.every_s!r})")
        background.append(bg)
    thermal = []
    for i, t in enumerate(_mapping_list(raw, "thermal")):
        f = f"thermal[{i}]"
        _check_keys(f, t, Thermal)
        for_s = t.get("for_s")
        thermal.append(Thermal(gpu=gpu_ref(f, t), at_s=_num(f, t, "at_s", default=0.0),
                               celsius=_num(f, t, "celsius", lo=-100, hi=100),
                               for_s=None if for_s is None else _num(f, t, "for_s", lo_open=True),
                               ramp_s=_num(f, t, "ramp_s", default=0.0)))
    health = [_health_event(f"health[{i}]", h, gpu_ref) for i, h in enumerate(_mapping_list(raw, "health"))]
    return Scenario(name=name, seed=seed, duration_s=float(duration), step_s=float(step), gpus=tuple(gpus),
                    services=tuple(services), background=tuple(background), thermal=tuple(thermal),
                    health=tuple(health),
                    oom_mode=oom_mode, oom_recovery_s=float(oom_recovery), restart_s=float(restart),
                    cleanup_stall_s=float(stall))


def _count(field: str, raw: dict[str, Any], key: str, hi: int) -> int:
    v = raw.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise ScenarioError(f"{field}.{key}", f"must be an integer in [0, {hi}], got {v!r}")
    return v


def _health_event(f: str, raw: dict[str, Any], gpu_ref: Callable[[str, dict[str, Any]], int]) -> HealthEvent:
    _check_keys(f, raw, HealthEvent)
    xid = raw.get("xid")
    if xid is not None and (isinstance(xid, bool) or not isinstance(xid, int) or not 1 <= xid <= 1000):
        raise ScenarioError(f"{f}.xid", f"must be an Xid code, an integer in [1, 1000], got {xid!r}")
    event = HealthEvent(gpu=gpu_ref(f, raw), at_s=_num(f, raw, "at_s", default=0.0), xid=xid,
                        ecc_corrected=_count(f, raw, "ecc_corrected", 10**9),
                        ecc_uncorrected=_count(f, raw, "ecc_uncorrected", 10**9))
    if event.xid is None and not event.ecc_corrected and not event.ecc_uncorrected:
        raise ScenarioError(f, "needs xid, ecc_corrected or ecc_uncorrected")
    return event


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError("scenario", f"cannot read {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError("scenario", f"{p} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError("scenario", f"{p} is not valid YAML: {exc}") from exc
    except RecursionError:  # the YAML parser recurses once per level of nesting
        raise ScenarioError("scenario", f"{p} is nested too deeply to be a scenario") from None
    return parse_scenario(raw)


DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "default.yaml"
