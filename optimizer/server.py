"""Run the read API and the admin API in one process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)


async def serve_until_signalled(app: web.Application, host: str, port: int, admin: web.Application,
                                admin_host: str, admin_port: int,
                                on_listening: Callable[[], None] | None = None) -> None:
    """Serve both APIs until a signal; ``on_listening`` runs once both listen, before any request is
    handled (``serve`` publishes a generated admin token's file there)."""
    runner = web.AppRunner(app, access_log=None)
    admin_runner = web.AppRunner(admin, access_log=None)
    await runner.setup()  # starts the sampler (and the persister) through cleanup_ctx
    await admin_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await web.TCPSite(admin_runner, admin_host, admin_port).start()
        if on_listening is not None:
            on_listening()
        log.info("listening", api=f"{host}:{port}", admin=f"{admin_host}:{admin_port}")
        await stop.wait()
        log.info("shutting_down")
    finally:
        await admin_runner.cleanup()
        await runner.cleanup()
