"""Builds the read API's application; the sampler runs as a background task of its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from optimizer.api.encoded import EncodedDecisions
from optimizer.api.keys import DISCOVERY, ENCODED, ENGINE, PERSISTER, REGISTRY, SAMPLER
from optimizer.api.routes import routes
from optimizer.api.schemas import MAX_REPORT_BYTES, BodyTimeout
from optimizer.api.timeouts import close_after
from optimizer.engine import Engine
from optimizer.metrics import build_registry
from optimizer.persistence import Persister
from optimizer.sampler import Sampler

if TYPE_CHECKING:
    from optimizer.kube.discovery import Discovery

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors answer JSON; an unexpected exception is logged and answers 500, the server goes on.

    A body that did not arrive in time answers 408 and closes the connection.
    """
    try:
        return await handler(request)
    except BodyTimeout as exc:
        log.info("request_body_timeout", client=request.remote, method=request.method, path=request.path)
        return await close_after(request, web.json_response({"error": str(exc), "field": "body"}, status=408))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json" and exc.text:  # a handler's own JSON error: kept
            return web.json_response(text=exc.text, status=exc.status)
        return web.json_response({"error": exc.reason}, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - never let one request take the server down
        log.exception("request_failed", method=request.method, path=request.path)
        return web.json_response({"error": "internal error"}, status=500)


def build_app(engine: Engine, sampler: Sampler, *, run_sampler: bool = True,
              persister: Persister | None = None, discovery: Discovery | None = None) -> web.Application:
    """The read API. With ``run_sampler`` the sampling loop starts and stops with the application;
    with a ``persister`` the state is saved every optimization interval when it changed, and at exit;
    with ``discovery`` the Kubernetes pod watcher (and publisher) run for the application's lifetime.
    """
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_REPORT_BYTES)
    app[ENGINE] = engine
    app[SAMPLER] = sampler
    app[REGISTRY] = build_registry(engine, sampler, discovery.counts if discovery is not None else None,
                                   persister=persister)
    app[PERSISTER] = persister
    app[DISCOVERY] = discovery
    app[ENCODED] = EncodedDecisions(lambda: engine.state.services.keys())
    app.add_routes(routes)

    async def persisting(app: web.Application) -> AsyncIterator[None]:
        assert persister is not None

        async def loop() -> None:
            while True:
                await sampler.sleep(max(1.0, engine.settings.optimization_interval))
                persister.save()

        task = asyncio.create_task(loop(), name="persister")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if persister.save(force=True):
            log.info("state_saved_at_exit", path=str(persister.file.path))
        else:
            failure = persister.failure
            log.error("state_not_saved_at_exit", path=str(persister.file.path),
                      error=failure.error if failure is not None else None,
                      detail="the changes since the last successful save are lost")

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sampler.run(), name="sampler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sampler.close()
        log.info("sampler_stopped", samples=sampler.stats.samples)

    async def discovering(app: web.Application) -> AsyncIterator[None]:
        assert discovery is not None
        task = asyncio.create_task(discovery.run(), name="discovery")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("discovery_stopped")

    if run_sampler:
        app.cleanup_ctx.append(sampling)
    if discovery is not None:
        app.cleanup_ctx.append(discovering)
    if persister is not None:
        app.cleanup_ctx.append(persisting)
    return app
