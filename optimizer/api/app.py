"""Builds the read API's application; the sampler, persister and discovery run as supervised background
tasks of its lifetime (:mod:`optimizer.tasks`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from optimizer.api.encoded import EncodedDecisions
from optimizer.api.keys import DISCOVERY, ENCODED, ENGINE, PERSISTER, REGISTRY, SAMPLER, TASKS
from optimizer.api.routes import error_answer, hot_routes, json_errors, routes, unrouted
from optimizer.api.schemas import MAX_REPORT_BYTES
from optimizer.engine import Engine
from optimizer.metrics import TaskCounts, build_registry
from optimizer.persistence import Persister
from optimizer.sampler import Sampler
from optimizer.tasks import Policy, Run, Supervisor

if TYPE_CHECKING:
    from optimizer.kube.discovery import Discovery

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How each background task is restarted when it dies (see docs/architecture.md, "Background tasks").
#: Each catches its own expected failures (a backend error, a failed save, an API error), so a death
#: is a bug: restarted after 1 s, doubling to the cap; ``fail_after`` deaths within ``window`` fail
#: ``/health`` (503), so Kubernetes restarts a process that cannot keep the task alive.
TASK_POLICIES: dict[str, Policy] = {
    # /health goes stale anyway after 3 intervals without a sample; a sampler crash-looping fails it sooner.
    "sampler": Policy(backoff_initial=1.0, backoff_max=30.0, fail_after=3, window=600.0),
    # a dead persister saves nothing: restarted; its failed saves show as /health "degraded" (200).
    "persister": Policy(backoff_initial=1.0, backoff_max=60.0, fail_after=5, window=600.0),
    # the watcher retries API errors with its own back-off; a death (watcher or publisher) restarts both.
    "discovery": Policy(backoff_initial=1.0, backoff_max=60.0, fail_after=5, window=600.0),
}


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors answer JSON; an unexpected exception is logged and answers 500, the server goes on.

    A body that did not arrive in time answers 408 and closes the connection (:func:`routes.error_answer`).
    The admin API's middleware; the read API runs none (its routes answer their errors themselves).
    """
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let one request take the server down
        return await error_answer(request, exc)


def build_app(engine: Engine, sampler: Sampler, *, run_sampler: bool = True,
              persister: Persister | None = None, discovery: Discovery | None = None,
              supervisor: Supervisor | None = None) -> web.Application:
    """The read API. With ``run_sampler`` the sampling loop starts and stops with the application;
    with a ``persister`` the state is saved every optimization interval when it changed, and at exit;
    with ``discovery`` the Kubernetes pod watcher (and publisher) run for the application's lifetime.
    Each runs under ``supervisor`` (by default one on the sampler's clock and sleep), restarted if it dies.
    """
    # No middleware: aiohttp's middleware chain (and the one it adds to set request.app) would run on every
    # poll. The hot routes answer their own errors, the others through json_errors, the rest: unrouted.
    app = web.Application(client_max_size=MAX_REPORT_BYTES)
    app[ENGINE] = engine
    app[SAMPLER] = sampler
    tasks = app[TASKS] = supervisor if supervisor is not None else Supervisor(clock=sampler.clock,
                                                                             sleep=sampler.sleep)
    app[REGISTRY] = build_registry(engine, sampler, discovery.counts if discovery is not None else None,
                                   persister=persister, tasks=lambda: task_counts(tasks))
    app[PERSISTER] = persister
    app[DISCOVERY] = discovery
    app[ENCODED] = EncodedDecisions(lambda: engine.state.services.keys())
    app.add_routes(hot_routes)
    for route in routes:
        assert isinstance(route, web.RouteDef)
        web.RouteDef(route.method, route.path, json_errors(route.handler), route.kwargs).register(app.router)
    app.router.add_route("*", "/{path:.*}", unrouted)  # last: what no route takes answers 404 / 405 as JSON

    async def persist_loop() -> None:
        assert persister is not None
        while True:
            await sampler.sleep(max(1.0, engine.settings.optimization_interval))
            persister.save()

    def saved_at_exit() -> None:
        assert persister is not None
        if persister.save(force=True):
            log.info("state_saved_at_exit", path=str(persister.file.path))
        else:
            failure = persister.failure
            log.error("state_not_saved_at_exit", path=str(persister.file.path),
                      error=failure.error if failure is not None else None,
                      detail="the changes since the last successful save are lost")

    def sampler_stopped() -> None:
        sampler.close()
        log.info("sampler_stopped", samples=sampler.stats.samples)

    if run_sampler:
        app.cleanup_ctx.append(supervised(tasks, "sampler", sampler.run, TASK_POLICIES["sampler"], sampler_stopped))
    if discovery is not None:
        # a call in flight when cancelled is waited for up to its own timeout (optimizer/kube/_threads.py)
        stop_within = replace(TASK_POLICIES["discovery"], stop_timeout=discovery.settings.request_timeout + 5.0)
        app.cleanup_ctx.append(supervised(tasks, "discovery", discovery.run, stop_within,
                                          lambda: log.info("discovery_stopped")))
    if persister is not None:
        app.cleanup_ctx.append(supervised(tasks, "persister", persist_loop, TASK_POLICIES["persister"],
                                          saved_at_exit))
    return app


def supervised(tasks: Supervisor, name: str, run: Run, policy: Policy,
               stopped: Callable[[], None]) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry: ``run`` supervised as ``name`` for the application's lifetime, then
    ``stopped()`` (which runs even when the task was stuck on shutdown)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        tasks.start(name, run, policy)
        yield
        await tasks.stop(name)
        stopped()

    return ctx


def task_counts(tasks: Supervisor) -> list[TaskCounts]:
    """The supervised tasks' totals, for the metrics."""
    failing = tasks.failing()
    return [TaskCounts(name, st.failures, st.restarts, name in failing) for name, st in tasks.tasks.items()]
