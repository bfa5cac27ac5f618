"""Durable state: what an operator set and what the policy learned survive a restart.

Saved as one JSON document, written atomically (a temporary file in the same directory, fsync,
``os.replace``, fsync of the directory), so a kill -9 at any moment leaves the old or the new
state, never a torn file. A file that cannot be read or parsed never stops the service: it is
moved aside as ``<path>.corrupt-<UTC timestamp>`` and the service starts from its configuration.

Saved: the settings pinned at runtime (by key; re-applied key by key on top of the configuration at
start, so a key nobody pinned follows the file, and a saved key that no longer fits is skipped), manual
overrides, and per (GPU, service) the learned figures: its memory model (fixed memory, per-item
observations, footprint, fragmentation and its history since the last cleanup, trust region, an
OOM's floor), the OOM bar and strikes, the last published batch and optimum. (Files written before the memory model kept ``peaks``; they are
read, and the peaks ignored.)

Restored entries are checked field by field (a hand-edited file is input like any other): batch
sizes, optima and overrides within [1, 4096] (OOM bars and the trust region within what a report
may carry), GPU indexes and counts non-negative integers, times finite, service names by the
service-name rule, memory figures non-negative. A bad entry is skipped with a warning naming the
entry and its field; the others are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from optimizer.engine import Engine
from optimizer.policy.adaptive.memory import MAX_WASTE_FRACTION, MemoryModel
from optimizer.policy.types import ServiceState
from optimizer.values import SERVICE_RE, SERVICE_RULE

log = structlog.get_logger(__name__)

STATE_VERSION = 1


class StateFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved document, or ``None`` (no file, or a corrupt one, which is moved aside).

        Also removes temporary files a killed writer left behind (one process writes this file).
        """
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                log.info("state_temp_removed", path=str(stale))
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state_unreadable", path=str(self.path), error=str(exc))
            return None
        try:
            data = json.loads(raw)
            version = data.get("version") if isinstance(data, dict) else None
            if type(version) is not int or version != STATE_VERSION:  # noqa: E721 - true/1.0 are not version 1
                raise ValueError(f"not a version {STATE_VERSION} state document")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
            try:
                os.replace(self.path, aside)
            except OSError as move_exc:
                log.warning("state_corrupt_not_moved", path=str(self.path), error=str(move_exc))
                aside = self.path
            log.warning("state_corrupt_moved_aside", path=str(self.path), moved_to=str(aside), error=str(exc))
            return None
        document: dict[str, Any] = data
        return document

    def save(self, data: dict[str, Any]) -> None:
        """Write ``data`` atomically. Raises :class:`OSError` when the directory is not writable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_LEARNED = ("batch_size", "optimal", "ceiling", "ceiling_until", "strikes", "last_oom_at", "override", "override_until")


def _memory_dump(m: MemoryModel) -> dict[str, Any]:
    return {"fixed": m.fixed, "observations": [list(o) for o in m.observations], "held": [list(h) for h in m.held],
            "waste": m.waste, "waste_fraction": m.waste_fraction, "largest_ok": m.largest_ok, "floor": m.floor,
            "floor_until": None if m.floor_until == float("-inf") else m.floor_until, "reports": m.reports,
            "bare_peaks": [list(b) for b in m.bare_peaks], "wastes": [list(w) for w in m.wastes]}


MAX_BATCH = 4096  # the largest batch published or set by an operator (PUT /admin/batch-size)
MAX_REPORTED_BATCH = 1 << 20  # the largest batch a report may carry (POST /reports): OOM bars, the trust region


class BadEntry(ValueError):
    """A saved service entry whose ``field`` holds a value no running optimizer could have written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _finite(v: Any, field: str = "value") -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadEntry(field, f"must be a finite number, got {v!r}")
    return float(v)


def _count(v: Any, field: str, lo: int = 0, hi: int | None = None) -> int:
    """A JSON integer in [lo, hi] (not a boolean, a float or a numeric string)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BadEntry(field, f"must be an integer {bound}, got {v!r}")
    return v


def _bytes(v: Any, field: str) -> float:
    f = _finite(v, field)
    if f < 0:
        raise BadEntry(field, f"must be a non-negative number of bytes, got {v!r}")
    return f


def _pairs(raw: Any, field: str) -> list[tuple[Any, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise BadEntry(field, "must be a list of [a, b] pairs")
    return [(a, b) for a, b in raw]


def _memory_load(raw: Any) -> MemoryModel:
    """A memory model from its saved form; raises :class:`BadEntry` naming the field of a bad one."""
    if raw is None:
        return MemoryModel()
    if not isinstance(raw, dict):
        raise BadEntry("memory", f"must be an object, got {type(raw).__name__}")

    def opt(key: str) -> float | None:
        return None if raw.get(key) is None else _bytes(raw[key], f"memory.{key}")

    fraction = _finite(raw.get("waste_fraction") or 0.0, "memory.waste_fraction")
    if not 0 <= fraction <= MAX_WASTE_FRACTION:
        raise BadEntry("memory.waste_fraction", f"must be in [0, {MAX_WASTE_FRACTION}], got {fraction!r}")
    return MemoryModel(
        fixed=opt("fixed"),
        observations=tuple((_finite(t, "memory.observations"), _bytes(x, "memory.observations"))
                           for t, x in _pairs(raw.get("observations"), "memory.observations")),
        held=tuple((_finite(t, "memory.held"), _bytes(x, "memory.held"))
                   for t, x in _pairs(raw.get("held"), "memory.held")),
        waste=_bytes(raw.get("waste") or 0.0, "memory.waste"),
        waste_fraction=fraction,
        largest_ok=_count(raw.get("largest_ok") or 0, "memory.largest_ok", 0, MAX_REPORTED_BATCH),
        floor=_bytes(raw.get("floor") or 0.0, "memory.floor"),
        floor_until=float("-inf") if raw.get("floor_until") is None else _finite(raw["floor_until"],
                                                                                 "memory.floor_until"),
        reports=_count(raw.get("reports") or 0, "memory.reports"),
        bare_peaks=tuple((_count(b, "memory.bare_peaks", 1, MAX_REPORTED_BATCH), _bytes(p, "memory.bare_peaks"))
                         for b, p in _pairs(raw.get("bare_peaks"), "memory.bare_peaks")),
        wastes=tuple((_finite(t, "memory.wastes"), _fraction(w, "memory.wastes"))
                     for t, w in _pairs(raw.get("wastes"), "memory.wastes")),
    )


def _fraction(value: Any, field: str) -> float:
    """A waste fraction, in ``[0, MAX_WASTE_FRACTION]``; raises :class:`BadEntry` naming ``field`` otherwise."""
    fraction = _finite(value, field)
    if not 0 <= fraction <= MAX_WASTE_FRACTION:
        raise BadEntry(field, f"must be in [0, {MAX_WASTE_FRACTION}], got {fraction!r}")
    return fraction


def _service_load(item: Any, now: float) -> ServiceState:
    """One saved service entry, checked field by field; raises :class:`BadEntry` naming the bad field."""
    if not isinstance(item, dict):
        raise BadEntry("entry", f"must be an object, got {type(item).__name__}")
    for key in ("service", "gpu", "batch_size", "optimal"):
        if key not in item:
            raise BadEntry(key, "missing")
    name = item["service"]
    if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
        raise BadEntry("service", f"must be {SERVICE_RULE}, got {name!r}")

    def batch(key: str, hi: int = MAX_BATCH) -> int | None:
        return None if item.get(key) is None else _count(item[key], key, 1, hi)

    def when(key: str) -> float | None:
        return None if item.get(key) is None else _finite(item[key], key)

    ceiling_until = when("ceiling_until")
    return ServiceState(
        service=name, gpu=_count(item["gpu"], "gpu"), batch_size=_count(item["batch_size"], "batch_size", 1, MAX_BATCH),
        optimal=_count(item["optimal"], "optimal", 1, MAX_BATCH), reason="restored from the state file",
        changed_at=now, updated_at=now, last_seen=now, registered_at=now,
        ceiling=batch("ceiling", MAX_REPORTED_BATCH),
        ceiling_until=float("-inf") if ceiling_until is None else ceiling_until,
        strikes=_count(item.get("strikes") or 0, "strikes"), last_oom_at=when("last_oom_at"),
        memory=_memory_load(item.get("memory")), override=batch("override"), override_until=when("override_until"),
    )


def dump(engine: Engine) -> dict[str, Any]:
    services = []
    for (gpu, name), svc in sorted(engine.state.services.items()):
        item: dict[str, Any] = {"service": name, "gpu": gpu, "memory": _memory_dump(svc.memory)}
        item.update({k: getattr(svc, k) for k in _LEARNED})
        if item["ceiling_until"] == float("-inf"):
            item["ceiling_until"] = None
        services.append(item)
    return {"version": STATE_VERSION, "saved_at": time.time(), "settings": engine.runtime, "services": services}


def restore(engine: Engine, data: dict[str, Any], now: float) -> None:
    """Load a saved document into a fresh engine. Bad parts are logged and skipped, never fatal."""
    runtime = data.get("settings") or {}
    if not isinstance(runtime, dict):
        log.warning("state_settings_ignored", error=f"settings must be an object, got {type(runtime).__name__}")
        runtime = {}
    if runtime:
        for key, error in engine.restore_runtime(runtime).items():
            log.warning("state_setting_ignored", key=key, error=error)
    items = data.get("services") or []
    if not isinstance(items, list):
        log.warning("state_services_ignored", error=f"services must be a list, got {type(items).__name__}")
        items = []
    restored: dict[tuple[int, str], ServiceState] = {}
    for number, item in enumerate(items):
        try:
            svc = _service_load(item, now)
        except BadEntry as exc:
            name = item.get("service") if isinstance(item, dict) else None
            log.warning("state_service_ignored", entry=number, service=name if isinstance(name, str) else None,
                        field=exc.field, error=str(exc), item=str(item)[:200])
            continue
        lo, hi = engine.settings.batch_limits(engine.settings.profile(svc.service))
        svc = dataclasses.replace(svc, batch_size=max(lo, min(hi, svc.batch_size)))
        restored[(svc.gpu, svc.service)] = svc
    engine.restore_services(restored)
    log.info("state_restored", services=len(restored), settings=sorted(engine.runtime))


@dataclasses.dataclass(frozen=True, slots=True)
class SaveFailure:
    """Why the last save failed: the state file, the OS error, and since when saves fail (Unix time)."""

    path: str
    error: str
    since: float  # the first failure of this run of failures
    at: float  # the latest


class Persister:
    """Saves the engine's state when it changed: at once after operator actions, else periodically.

    A failed save is counted (``errors``, the metric ``vlm_optimizer_state_save_errors_total``) and
    kept (``failure``, shown by ``GET /health``) until a save works again.
    """

    def __init__(self, engine: Engine, file: StateFile, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.file = file
        self.clock = clock
        self.saved_revision = -1
        self.errors = 0
        self.failure: SaveFailure | None = None

    def load(self, now: float) -> bool:
        data = self.file.load()
        if data is None:
            return False
        restore(self.engine, data, now)
        self.saved_revision = self.engine.revision
        return True

    def save(self, *, force: bool = False) -> bool:
        """Save if anything changed since the last save. Never raises: a failed save is logged."""
        if not force and self.engine.revision == self.saved_revision:
            return False
        revision = self.engine.revision
        try:
            self.file.save(dump(self.engine))
        except OSError as exc:
            now = self.clock()
            self.errors += 1
            since = self.failure.since if self.failure is not None else now
            self.failure = SaveFailure(str(self.file.path), str(exc), since, now)
            log.error("state_save_failed", path=str(self.file.path), error=str(exc), failing_since=since,
                      errors=self.errors)
            return False
        if self.failure is not None:
            log.info("state_save_recovered", path=str(self.file.path), failing_since=self.failure.since)
            self.failure = None
        self.saved_revision = revision
        return True
