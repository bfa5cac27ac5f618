"""Handlers of the read API. Each validates its input, asks the engine, and answers JSON.

The application runs no middleware (docs/architecture.md, "The hot paths"): the hot routes (``GET
/batch-size``, ``POST /reports``) answer their own errors (:func:`error_answer`, what the other routes
get from :func:`json_errors`), and :func:`unrouted` answers the requests no route takes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from optimizer.api.keys import DISCOVERY, ENCODED, ENGINE, PERSISTER, REGISTRY, SAMPLER, TASKS
from optimizer.api.schemas import (
    MAX_REPORT_BYTES,
    BodyTimeout,
    InvalidInput,
    event_dict,
    parse_gpu,
    parse_limit,
    parse_pod,
    parse_positive,
    parse_report,
    parse_service,
    read_limited,
    sample_dict,
)
from optimizer.api.decisions import decision_dict
from optimizer.api.encoded import Encoded, KeptAnswer
from optimizer.api.services import services_body
from optimizer.api.timeouts import body_timeout, close_after
from optimizer.config import settings_to_dict
from optimizer.engine import Decision, Engine, Refused, UnknownGpu
from optimizer.sampler import Sampler
from optimizer.workers import default_cores, plan_workers

hot_routes = web.RouteTableDef()  # GET /batch-size, POST /reports: each answers its own errors
routes = web.RouteTableDef()  # every other route: each answers its errors through json_errors

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer to a handler's exception: HTTP errors answer JSON; an unexpected exception is logged and
    answers 500, the server goes on. A body that did not arrive in time answers 408 and closes the
    connection. An HTTP exception below 400 (a redirect) is raised again."""
    if isinstance(exc, BodyTimeout):
        log.info("request_body_timeout", client=request.remote, method=request.method, path=request.path)
        return await close_after(request, web.json_response({"error": str(exc), "field": "body"}, status=408))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        if exc.content_type == "application/json" and exc.text:  # a handler's own JSON error: kept
            return web.json_response(text=exc.text, status=exc.status)
        return web.json_response({"error": exc.reason}, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    log.exception("request_failed", method=request.method, path=request.path, exc_info=exc)
    return web.json_response({"error": "internal error"}, status=500)


def json_errors(handler: Handler) -> Handler:
    """``handler`` answering its errors as :func:`error_answer` says (what a middleware did for every route)."""

    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let one request take the server down
            return await error_answer(request, exc)

    answered.__name__ = getattr(handler, "__name__", "handler")
    answered.__doc__ = handler.__doc__
    return answered


async def unrouted(request: web.Request) -> web.StreamResponse:
    """The requests no route takes (the last route, on every path and method): 405 naming the methods the
    path takes (``Allow``), else 404, both JSON, as the router's own errors answered through a middleware."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    exc = web.HTTPMethodNotAllowed(request.method, allowed) if allowed else web.HTTPNotFound()
    return await error_answer(request, exc)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _unknown_gpu(exc: UnknownGpu, kind: str = "parameter") -> web.Response:
    return _json({"error": f"gpu: {exc}", kind: "gpu", "available": exc.available, "selectors": exc.selectors},
                 status=400)


def _decision_response(request: web.Request, d: Decision, kept: bool = False) -> web.Response:
    """The decision's body, ETag and headers, encoded once per change of the decision (not once per poll).

    ``kept``: the answer of a poll, kept for the next one with the same query string from the same peer
    while the engine's inputs stay as they are (:meth:`EncodedDecisions.keep`): a registered service's only.
    """
    # An unknown name's answer is not kept: made-up names must not fill the store of the registered ones.
    store = request.app[ENCODED]
    encoded = store.get(d) if d.registered else Encoded.of(d)
    engine = request.app[ENGINE]
    ok, not_modified = encoded.headers(max(1, math.floor(engine.settings.monitoring_interval)))
    if kept and d.registered and d.gpu_index is not None:  # (no GPU: a fresh answer each time, never kept)
        store.keep(request.rel_url.raw_query_string, request.remote,
                   KeptAnswer(engine.changes, (d.gpu_index, d.service), encoded, ok, not_modified))
    return _answer(request, encoded, ok, not_modified)


def _answer(request: web.Request, encoded: Encoded, ok: CIMultiDictProxy[str],
            not_modified: CIMultiDictProxy[str]) -> web.Response:
    inm = request.headers.get("If-None-Match")
    if inm is not None and encoded.matches(inm):
        return web.Response(status=304, headers=not_modified)
    return web.Response(body=encoded.body, headers=ok)


@hot_routes.get("/batch-size")
async def batch_size(request: web.Request) -> web.StreamResponse:
    """``GET /batch-size``, a hot route: no middleware, its own errors answered (:func:`error_answer`).

    A repeat poll (the same query string, from the same peer, nothing changed since: the engine's
    ``changes``) is answered from the kept answer, noting its service's liveness as a poll does; any
    other takes the whole path (:func:`_poll`). docs/architecture.md, "The hot paths".
    """
    try:
        app = request.app
        engine = app[ENGINE]
        kept = app[ENCODED].kept(request.rel_url.raw_query_string, request.remote, engine.changes)
        if kept is None:
            return _poll(request)
        engine.seen(kept.key, app[SAMPLER].clock())
        return _answer(request, kept.encoded, kept.ok, kept.not_modified)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let one request take the server down
        return await error_answer(request, exc)


#: A poll's parameters by its raw query string (a service sends the same one every time): parsing and
#: checking them is a pure function of that string, so it is done once. Only valid ones are kept, at
#: most :data:`MAX_QUERIES` (then the table starts over: made-up queries cannot grow it).
_QUERIES: dict[str, tuple[str, int | str | None, str | None]] = {}
MAX_QUERIES = 4096


def poll_query(request: web.Request) -> tuple[str, int | str | None, str | None]:
    """``service``, ``gpu`` and ``pod`` of a poll, checked (raises :class:`InvalidInput`)."""
    raw = request.rel_url.raw_query_string
    kept = _QUERIES.get(raw)
    if kept is not None:
        return kept
    query = request.query
    parsed = (parse_service(query.get("service")), parse_gpu(query.get("gpu")), parse_pod(query.get("pod")))
    if len(_QUERIES) >= MAX_QUERIES:
        _QUERIES.clear()
    _QUERIES[raw] = parsed
    return parsed


def _poll(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        service, gpu, pod = poll_query(request)
        d = engine.poll(service, gpu, request.app[SAMPLER].clock(), pod=pod, peer=request.remote or "")
    except InvalidInput as exc:
        return _json(exc.body(), status=400)
    except UnknownGpu as exc:
        return _unknown_gpu(exc)
    except Refused as exc:
        return _json(exc.body, status=exc.status)
    return _decision_response(request, d, kept=True)


@hot_routes.post("/reports")
async def reports(request: web.Request) -> web.StreamResponse:
    """``POST /reports``, a hot route: no middleware, its own errors answered (:func:`error_answer`)."""
    try:
        return await _report(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let one request take the server down
        return await error_answer(request, exc)


async def _report(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
        return _json({"error": f"body over {MAX_REPORT_BYTES} bytes"}, status=413)
    raw = await read_limited(request.content, timeout=body_timeout(request.app))
    if raw is None:
        return _json({"error": f"body over {MAX_REPORT_BYTES} bytes"}, status=413)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return _json({"error": f"body: not valid JSON ({exc})", "field": "body"}, status=400)
    try:
        r = parse_report(body)
        d = request.app[ENGINE].report(r.service, r.gpu, request.app[SAMPLER].clock(), batch_size=r.batch_size,
                                       peak_bytes=r.peak_bytes, allocated_bytes=r.allocated_bytes,
                                       reserved_bytes=r.reserved_bytes, oom=r.oom, pod=r.pod,
                                       inactive_split_bytes=r.inactive_split_bytes, peer=request.remote or "")
    except InvalidInput as exc:
        return _json(exc.body(), status=400)
    except UnknownGpu as exc:
        return _unknown_gpu(exc, kind="field")
    except Refused as exc:
        return _json(exc.body, status=exc.status)
    return _decision_response(request, d)


def status_body(engine: Engine, sampler: Sampler) -> dict[str, Any]:
    """Everything known, in one document (``GET /status`` and ``GET /admin/status``)."""
    gpus = []
    for g in engine.snapshot.gpus if engine.snapshot else ():
        item = sample_dict(g)
        gs = engine.state.gpus.get(g.index)
        if gs is not None:
            item.update(pressure=gs.pressure.value, cleanup_epoch=gs.cleanup_epoch, hot=gs.hot,
                        fragmentation_percent=None if gs.fragmentation is None else round(gs.fragmentation * 100, 2))
        gpus.append(item)
    return {
        "backend": sampler.backend.name,
        "ready": sampler.ready,
        "not_ready_reason": sampler.not_ready_reason,
        "healthy": sampler.healthy(sampler.clock()),
        "monitoring": sampler.running,
        "paused_since": sampler.paused_since,
        "last_sample_at": sampler.stats.last_sample_at,
        "samples": sampler.stats.samples,
        "sample_errors": sampler.stats.errors,
        "settings": settings_to_dict(engine.settings),
        "runtime_settings": engine.runtime,  # the keys pinned through the admin API (the rest: file, env, flags)
        "gpus": gpus,
        "services": [decision_dict(d) for d in engine.decisions()],
    }


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    return _json(status_body(request.app[ENGINE], request.app[SAMPLER]))


@routes.get("/services")
async def services(request: web.Request) -> web.Response:
    """The pods discovery found on this node, their GPU, share and batch; and the services known only from reports."""
    discovery = request.app[DISCOVERY]
    return _json(services_body(request.app[ENGINE], discovery.status() if discovery is not None else None))


@routes.get("/history")
async def history(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        limit = parse_limit(request.query.get("limit"), default=engine.settings.history_size, hi=100_000)
        gpu = parse_gpu(request.query.get("gpu"))
    except InvalidInput as exc:
        return _json(exc.body(), status=400)
    history = engine.history  # (a copy: taken once)
    indexes = sorted(history)
    if gpu is not None:
        try:
            chosen = engine.resolve_gpu("", gpu)
        except UnknownGpu as exc:
            return _unknown_gpu(exc)
        indexes = [i for i in indexes if i == chosen]
    samples = {str(i): [sample_dict(g) for g in history[i][-limit:]] for i in indexes}
    events = [event_dict(e) for e in engine.events[-limit:] if gpu is None or e.gpu in indexes]
    return _json({"gpus": samples, "events": events})


@routes.get("/workers")
async def workers(request: web.Request) -> web.Response:
    """How many workers a gunicorn-style VLM server should start: min(cores*2+1, GPU memory / gpu_mem_typ)."""
    engine = request.app[ENGINE]
    try:
        typ = parse_positive(request.query.get("gpu_mem_typ_mb"), "gpu_mem_typ_mb", hi=1 << 24)
        cores = None
        if request.query.get("cores") is not None:
            cores = int(parse_positive(request.query.get("cores"), "cores", hi=4096, integer=True))
        gpu = parse_gpu(request.query.get("gpu"))
        index = engine.resolve_gpu("", gpu)
    except InvalidInput as exc:
        return _json(exc.body(), status=400)
    except UnknownGpu as exc:
        return _unknown_gpu(exc)
    sample = engine.gpu_sample(index) if index is not None else None
    total_mb = None
    if sample is not None and sample.memory_total_bytes:
        total_mb = sample.memory_total_bytes / (1024 * 1024)
    plan = plan_workers(cores if cores is not None else default_cores(), total_mb, typ)
    body = plan.as_dict()
    body["gpu"] = None if sample is None else {"index": sample.index, "uuid": sample.uuid, "name": sample.name,
                                               "memory_total_bytes": sample.memory_total_bytes}
    return _json(body)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: 503 only while sampling is stale or a background task keeps dying (a restart may cure either).

    ``status``: ``ok``; ``degraded`` (sampling works, but the state file cannot be saved: a restart
    does not fix a full or read-only disk, so still 200); ``paused`` (an operator paused monitoring:
    200, so Kubernetes does not restart a pod on purpose idle, with ``paused_since``); ``stale``
    (503); ``failing`` (503: a background task died ``fail_after`` times within its window, each
    named in ``failing_tasks``; a restart of the process may cure it). A failing save shows in
    ``degraded.state_save`` whatever the status.
    """
    sampler = request.app[SAMPLER]
    now = sampler.clock()
    last = sampler.stats.last_sample_at
    healthy = sampler.healthy(now)
    body: dict[str, Any] = {"status": "ok" if healthy else "stale", "last_sample_age_s": None if last is None
                            else round(now - last, 3), "max_age_s": 3 * sampler.interval}
    if not sampler.running:
        body["status"] = "paused"
        since = sampler.paused_since
        body["paused_since"] = since
        body["paused_for_s"] = None if since is None else round(now - since, 3)
    persister = request.app[PERSISTER]
    failure = persister.failure if persister is not None else None
    if failure is not None:
        assert persister is not None
        body["degraded"] = {"state_save": {"path": failure.path, "error": failure.error, "since": failure.since,
                                           "last_failed_at": failure.at, "failed_saves": persister.errors}}
        if body["status"] == "ok":
            body["status"] = "degraded"
    failing = request.app[TASKS].failing()
    if failing:
        body["status"] = "failing"
        body["failing_tasks"] = {name: st.to_dict() for name, st in failing.items()}
    return _json(body, status=200 if (healthy or not sampler.running) and not failing else 503)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    sampler = request.app[SAMPLER]
    if sampler.ready:
        return _json({"status": "ready", "backend": sampler.backend.name})
    return _json({"status": "not ready", "backend": sampler.backend.name,
                  "reason": sampler.not_ready_reason or "no sample with a working GPU yet"}, status=503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The text exposition, rendered once per change of what it shows (``optimizer.metrics.MetricsRegistry``)."""
    payload, content_type = request.app[REGISTRY].exposition()
    resp = web.Response(body=payload)
    resp.headers["Content-Type"] = content_type
    return resp
