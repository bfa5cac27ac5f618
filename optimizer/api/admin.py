"""The admin API (its own port, default 8081): steer a running optimizer.

No web page can drive it: every request passes the guards of :mod:`optimizer.api.admin_guard` first
(``Host``, ``Origin``, bearer token, JSON content type on writes). There is always a token: ``serve``
generates one when none is configured (:mod:`optimizer.admin_access`). Every change is logged
as an ``admin_audit`` event: who (client address), what, old and new values. Changes are saved to the
state file at once when one is configured; a change that cannot be saved answers 503 (applied in
memory, not saved, with the file and the OS error).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web

from optimizer import fields
from optimizer.admin_access import is_unspecified, parse_host_name
from optimizer.api.admin_guard import _json, bearer_auth, browser_guard, json_writes
from optimizer.api.app import errors_as_json
from optimizer.api.decisions import decision_dict
from optimizer.api.keys import ADMIN_ALLOWED_HOSTS, ADMIN_TOKEN, ENGINE, PERSISTER, SAMPLER
from optimizer.api.routes import status_body
from optimizer.api.schemas import (
    MAX_REPORT_BYTES,
    InvalidInput,
    event_dict,
    parse_gpu,
    parse_limit,
    parse_service,
    read_limited,
)
from optimizer.api.timeouts import body_timeout
from optimizer.config import FILE_ONLY_KEYS, RUNTIME_KEYS, ConfigError, apply_settings, settings_to_dict
from optimizer.engine import Engine, SettingsChange, UnknownGpu

log = structlog.get_logger(__name__)

admin_routes = web.RouteTableDef()
EXPORT_FORMAT = "vlm-gpu-optimizer-config"
MAX_TTL_S = 7 * 86400
HISTORY_KINDS = ("batch_changed", "cleanup_raised", "optimization_started", "optimization_succeeded",
                 "optimization_failed", "override_set", "override_cleared")


def _bad(exc: InvalidInput) -> web.Response:
    return _json(exc.body(), status=400)  # a ConfigError is the same class, named as a body field


def _audit(request: web.Request, action: str, **fields: Any) -> None:
    """Log the change and save it. Raises a 503 (JSON) when it could not be saved: the change is
    applied in memory, but a restart would lose it, and the operator must know."""
    log.info("admin_audit", client=request.remote, action=action, **fields)
    persister = request.app[PERSISTER]
    if persister is None or persister.save(force=True):
        return
    failure = persister.failure
    path = failure.path if failure is not None else str(persister.file.path)
    error = failure.error if failure is not None else "unknown error"
    log.error("admin_change_not_saved", client=request.remote, action=action, path=path, error=error)
    body = {"error": f"{action}: the change is applied in memory but not saved to the state file {path} "
                     f"({error}); a restart would lose it. Free or fix the disk; the next save writes it",
            "applied": True, "saved": False, "state_file": path, "os_error": error}
    raise web.HTTPServiceUnavailable(text=json.dumps(body, separators=(",", ":")), content_type="application/json")


def _deferred(engine: Engine) -> list[dict[str, Any]]:
    """The operator's optimizations that wait, per service: what, until when (Unix time; null: until
    the GPU answers again), and why."""
    return [{"service": d.service, "gpu": d.gpu, "deferred": "optimization", "until": d.until, "reason": d.why}
            for d in engine.deferred_optimizations()]


def _batches(engine: Engine) -> dict[tuple[int, str], int]:
    return {k: v.batch_size for k, v in engine.state.services.items()}


def _batch_changes(engine: Engine, before: dict[tuple[int, str], int]) -> list[dict[str, Any]]:
    """The published batches that moved since ``before``."""
    return [{"service": name, "gpu": gpu, "old": before.get((gpu, name)), "new": svc.batch_size}
            for (gpu, name), svc in sorted(engine.state.services.items())
            if before.get((gpu, name)) != svc.batch_size]


async def _body(request: web.Request) -> Any:
    raw = await read_limited(request.content, timeout=body_timeout(request.app))
    if raw is None:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_REPORT_BYTES, actual_size=MAX_REPORT_BYTES + 1)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput("body", f"not valid JSON ({exc})", kind="field") from None


@admin_routes.get("/admin/status")
async def status(request: web.Request) -> web.Response:
    return _json(status_body(request.app[ENGINE], request.app[SAMPLER]))


@admin_routes.get("/admin/history")
async def history(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        limit = parse_limit(request.query.get("limit"), default=100, hi=10_000)
    except InvalidInput as exc:
        return _bad(exc)
    events = [e for e in engine.events if e.kind in HISTORY_KINDS]
    return _json({"events": [event_dict(e) for e in events[-limit:]]})


@admin_routes.post("/admin/optimize")
async def optimize(request: web.Request) -> web.Response:
    """Optimize every GPU now; a GPU whose samples do not show its last batch change yet is deferred
    to its first settled sample, and ``deferred`` says which services wait, until when and why."""
    engine = request.app[ENGINE]
    events = engine.optimize_now()
    deferred = _deferred(engine)
    _audit(request, "optimize", changes=[event_dict(e) for e in events if e.kind == "batch_changed"],
           deferred=[(d["service"], d["gpu"], d["until"]) for d in deferred])
    return _json({"events": [event_dict(e) for e in events], "services": [decision_dict(d) for d in engine.decisions()],
                  "deferred": deferred})


@admin_routes.put("/admin/batch-size")
async def set_batch_size(request: web.Request) -> web.Response:
    engine, sampler = request.app[ENGINE], request.app[SAMPLER]
    try:
        body = await _body(request)
        if not isinstance(body, dict):
            raise InvalidInput("body", "must be a JSON object", kind="field")
        unknown = sorted(set(body) - {"service", "gpu", "batch_size", "ttl_s"})
        if unknown:
            raise InvalidInput(unknown[0], "unknown field; allowed: service, gpu, batch_size, ttl_s", kind="field")
        service = parse_service(body.get("service"), kind="field")
        gpu = parse_gpu(body.get("gpu"), kind="field")
        batch = fields.as_int("batch_size", body.get("batch_size"), 1, 4096, text=False)
        ttl = body.get("ttl_s")
        ttl = None if ttl is None else fields.as_float("ttl_s", ttl, 0.0, MAX_TTL_S, lo_open=True, text=False)
        before = engine.resolve_gpu(service, gpu)
        old = engine.state.services.get((before, service)) if before is not None else None
        d = engine.set_override(service, gpu, batch, None if ttl is None else float(ttl), sampler.clock())
    except InvalidInput as exc:
        return _bad(exc)
    except UnknownGpu as exc:
        return _json({"error": f"gpu: {exc}", "field": "gpu", "available": exc.available,
                      "selectors": exc.selectors}, status=400)
    _audit(request, "set_batch_size", service=service, gpu=d.gpu_index, ttl_s=ttl,
           old=None if old is None else old.override, new=batch, published=d.batch_size)
    return _json(decision_dict(d))


@admin_routes.delete("/admin/batch-size")
async def clear_batch_size(request: web.Request) -> web.Response:
    engine, sampler = request.app[ENGINE], request.app[SAMPLER]
    try:
        service = parse_service(request.query.get("service"))
        gpu = parse_gpu(request.query.get("gpu"))
        index = engine.resolve_gpu(service, gpu)
        known = engine.state.services.get((index, service)) if index is not None else None
        old = known.override if known is not None else None
        d = engine.clear_override(service, gpu, sampler.clock())
    except InvalidInput as exc:
        return _bad(exc)
    except UnknownGpu as exc:
        return _json({"error": f"gpu: {exc}", "parameter": "gpu", "available": exc.available,
                      "selectors": exc.selectors}, status=400)
    if d is None:
        return _json({"error": f"service: {service!r} is not known on that GPU", "parameter": "service"}, status=404)
    _audit(request, "clear_batch_size", service=service, gpu=d.gpu_index, old=old, new=None)
    return _json(decision_dict(d))


async def _set(request: web.Request, action: str, key: str, value: Any) -> web.Response:
    """Enable or disable: the reply lists the batches that moved at once and, when enabled, the
    optimizations that wait for a settled sample (``deferred``)."""
    engine = request.app[ENGINE]
    before = _batches(engine)
    changed = engine.update_settings({key: value}, request.app[SAMPLER].clock())
    body = {key: value, "changed": key in changed, "batch_changes": _batch_changes(engine, before),
            "deferred": _deferred(engine)}
    _audit(request, action, key=key, old=changed.get(key, (value, value))[0], new=value,
           batch_changes=body["batch_changes"])
    return _json(body)


@admin_routes.post("/admin/enable")
async def enable(request: web.Request) -> web.Response:
    return await _set(request, "enable", "enabled", True)


@admin_routes.post("/admin/disable")
async def disable(request: web.Request) -> web.Response:
    return await _set(request, "disable", "enabled", False)


async def _monitoring(request: web.Request, on: bool) -> web.Response:
    sampler = request.app[SAMPLER]
    old = sampler.running
    sampler.running = on
    _audit(request, "start_monitoring" if on else "stop_monitoring", old=old, new=on)
    return _json({"monitoring": on, "changed": old != on})


@admin_routes.post("/admin/monitoring/start")
async def start_monitoring(request: web.Request) -> web.Response:
    return await _monitoring(request, True)


@admin_routes.post("/admin/monitoring/stop")
async def stop_monitoring(request: web.Request) -> web.Response:
    return await _monitoring(request, False)


@admin_routes.get("/admin/config")
async def get_config(request: web.Request) -> web.Response:
    return _json(settings_to_dict(request.app[ENGINE].settings))


def _config_reply(engine: Engine, change: SettingsChange, **extra: Any) -> web.Response:
    """The effective settings after a change, what moved, and which keys are now pinned at runtime."""
    return _json({"settings": settings_to_dict(engine.settings), "changed": sorted(change.changed), **extra,
                  "pinned": sorted(engine.runtime)})


def _changes(change: SettingsChange) -> dict[str, dict[str, Any]]:
    return {k: {"old": o, "new": n} for k, (o, n) in change.changed.items()}


@admin_routes.patch("/admin/config")
async def patch_config(request: web.Request) -> web.Response:
    """A partial update, validated like the config file; all-or-nothing: a bad field changes nothing.

    Pins only the keys whose value differs from the effective one; ``profiles`` are refused (file only).
    """
    engine = request.app[ENGINE]
    try:
        body = await _body(request)
        if not isinstance(body, dict) or not body:
            raise InvalidInput("body", "must be a non-empty JSON object of settings", kind="field")
        change = engine.set_runtime(body, request.app[SAMPLER].clock())
    except (InvalidInput, ConfigError) as exc:
        return _bad(exc)
    _audit(request, "configure", changes=_changes(change), pinned=list(change.pinned),
           unchanged=list(change.unchanged))
    return _config_reply(engine, change, unchanged=list(change.unchanged))


@admin_routes.get("/admin/config/export")
async def export_config(request: web.Request) -> web.Response:
    """The effective settings, and which of them are pinned at runtime (what an import re-pins)."""
    engine = request.app[ENGINE]
    return _json({"format": EXPORT_FORMAT, "version": 1, "settings": settings_to_dict(engine.settings),
                  "pinned": sorted(engine.runtime)})


def _import_layer(engine: Engine, body: Any) -> dict[str, Any]:
    """The runtime layer an import document stands for. Raises :class:`InvalidInput` or :class:`ConfigError`.

    A plain mapping is the runtime layer itself. An export document is a snapshot of the effective
    settings: its ``pinned`` keys, and every key whose value differs from this server's base, are pinned;
    the rest follow the file. ``profiles`` are not imported: they must be the file's (or be left out).
    """
    pinned: set[str] = set()
    exported = isinstance(body, dict) and "settings" in body
    if exported:
        unknown = sorted(set(body) - {"format", "version", "settings", "pinned"})
        if unknown:
            raise InvalidInput(unknown[0], "unknown field; allowed: format, version, settings, pinned", kind="field")
        if body.get("format", EXPORT_FORMAT) != EXPORT_FORMAT or body.get("version", 1) != 1:
            raise InvalidInput("format", f"must be {EXPORT_FORMAT!r} version 1", kind="field")
        listed = body.get("pinned", [])
        if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
            raise InvalidInput("pinned", "must be a list of setting names", kind="field")
        pinned = set(listed)
        body = body["settings"]
    if not isinstance(body, dict):
        raise InvalidInput("settings", "must be a JSON object of settings", kind="field")
    full = settings_to_dict(apply_settings(engine.base_settings, body))  # every value checked, all-or-nothing
    stray = sorted(pinned - set(body))
    if stray:
        raise InvalidInput("pinned", f"{stray[0]!r} is not among the document's settings", kind="field")
    base = settings_to_dict(engine.base_settings)
    for key in FILE_ONLY_KEYS:
        if key in body and full[key] != base[key]:
            raise ConfigError(key, "profiles are set only in the config file (--config) and differ from the "
                                   "file's: leave them out of the document, or change the file and restart")
    keys = [k for k in body if k not in FILE_ONLY_KEYS]
    if exported:
        keys = [k for k in keys if k in pinned or full[k] != base[k]]
    return {k: full[k] for k in keys}


@admin_routes.post("/admin/config/import")
async def import_config(request: web.Request) -> web.Response:
    """Replace the runtime layer with the document's (keys left out follow the file); all-or-nothing."""
    engine = request.app[ENGINE]
    try:
        layer = _import_layer(engine, await _body(request))
        change = engine.replace_runtime(layer, request.app[SAMPLER].clock())
    except (InvalidInput, ConfigError) as exc:
        return _bad(exc)
    _audit(request, "import_config", changes=_changes(change), pinned=sorted(layer), unpinned=list(change.unpinned))
    return _config_reply(engine, change, unpinned=list(change.unpinned))


@admin_routes.post("/admin/config/reset")
async def reset_config(request: web.Request) -> web.Response:
    """Unpin runtime keys (``{"keys": [...]}`` or ``{"all": true}``): each takes its file/env/flag value again."""
    engine = request.app[ENGINE]
    try:
        body = await _body(request)
        if not isinstance(body, dict):
            raise InvalidInput("body", 'must be a JSON object: {"keys": [...]} or {"all": true}', kind="field")
        unknown = sorted(set(body) - {"keys", "all"})
        if unknown:
            raise InvalidInput(unknown[0], "unknown field; allowed: keys, all", kind="field")
        if ("keys" in body) == ("all" in body):
            raise InvalidInput("body", 'give exactly one of "keys" (a list of settings) and "all": true',
                               kind="field")
        if "all" in body and body["all"] is not True:
            raise InvalidInput("all", f"must be true, got {body['all']!r}", kind="field")
        keys = body.get("keys")
        if keys is not None and (not isinstance(keys, list) or not keys
                                 or not all(isinstance(k, str) for k in keys)):
            raise InvalidInput("keys", f"must be a non-empty list of settings; allowed keys are "
                                       f"{', '.join(RUNTIME_KEYS)}", kind="field")
        before = engine.runtime
        change = engine.reset_runtime(keys, request.app[SAMPLER].clock())
    except (InvalidInput, ConfigError) as exc:
        return _bad(exc)
    not_pinned = sorted({k for k in keys or () if k not in before})
    _audit(request, "reset_config", keys="all" if keys is None else sorted(set(keys)),
           unpinned=list(change.unpinned), changes=_changes(change))
    return _config_reply(engine, change, unpinned=list(change.unpinned), not_pinned=not_pinned)


def build_admin_app(base: web.Application, token: bytes, *, allowed_hosts: Iterable[str] = ()) -> web.Application:
    """The admin API over the same engine, sampler and persister as ``base`` (the read API).

    ``token`` is required (there is no token-less mode). ``allowed_hosts``: the ``Host`` names it answers
    for besides loopback names and the address a connection arrives on (``server.admin_allowed_hosts``
    and ``admin_host``); wildcard addresses and entries that are no host name are left out.
    """
    if not token:
        raise ValueError("the admin API needs a non-empty token")
    names = (parse_host_name(h) for h in allowed_hosts)
    app = web.Application(middlewares=[errors_as_json, browser_guard, bearer_auth, json_writes],
                          client_max_size=MAX_REPORT_BYTES)
    app[ENGINE] = base[ENGINE]
    app[SAMPLER] = base[SAMPLER]
    app[PERSISTER] = base[PERSISTER]
    app[ADMIN_TOKEN] = token
    app[ADMIN_ALLOWED_HOSTS] = tuple(dict.fromkeys(n for n in names if n is not None and not is_unspecified(n)))
    app.add_routes(admin_routes)
    return app
