"""Run the read API and the admin API in one process until SIGTERM or SIGINT.

Both listeners are bound before either serves and before the sampler, the persister and discovery
start (:func:`listening`): a port in use, an address that does not resolve or the two APIs on one
port is a :class:`StartupError` (one line, exit code 2), and nothing was served: ``/ready`` never
answered 200 from a process that then died. Connections get the read timeouts of
:mod:`optimizer.api.timeouts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from optimizer.api.keys import BODY_TIMEOUT
from optimizer.api.timeouts import KEEPALIVE_S, ConnectionTracker, ReadTimeouts

log = structlog.get_logger(__name__)


class StartupError(Exception):
    """The service cannot start; the message is the one line ``serve`` prints before exiting with code 2."""


@dataclass(frozen=True)
class Listener:
    """One API's application and where it listens."""

    what: str  # "read API", "admin API": named in errors
    app: web.Application
    host: str
    port: int


class _BoundSite(web.BaseSite):
    """A site over a server whose sockets were bound (not yet listening) before the runner was set up."""

    def __init__(self, runner: web.BaseRunner, server: asyncio.Server, name: str) -> None:
        super().__init__(runner)
        self._server = server
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        assert isinstance(self._server, asyncio.Server)
        await self._server.start_serving()


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _bind(listener: Listener, runner: web.BaseRunner, tracker: ConnectionTracker) -> asyncio.Server:
    """Bind (resolve the host, bind every address it has) without accepting yet. Raises :class:`StartupError`."""
    loop = asyncio.get_running_loop()
    where = _where(listener.host, listener.port)
    try:
        return await loop.create_server(tracker.protocol_factory(runner), listener.host, listener.port,
                                        backlog=128, start_serving=False)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {where} for the {listener.what}: the address {listener.host!r} "
                           f"does not resolve ({exc.strerror or exc})") from None
    except OSError as exc:  # asyncio's message repeats the address: the system's words for the errno suffice
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupError(f"cannot listen on {where} for the {listener.what}: {reason}") from None


def _addresses(server: asyncio.Server) -> list[str]:
    return [_where(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in server.sockets]


@contextlib.asynccontextmanager
async def listening(api: Listener, admin: Listener,
                    timeouts: ReadTimeouts = ReadTimeouts()) -> AsyncIterator[dict[str, list[str]]]:
    """Bind both listeners, then set up both applications (this starts their background tasks), then serve.

    Yields the bound addresses by API (``"api"``, ``"admin"``); on exit stops serving and cleans up
    (the sampler stops, the state is saved). Raises :class:`StartupError` before anything started.
    """
    if api.port != 0 and api.port == admin.port:
        raise StartupError(f"server.admin_port: must differ from server.port, both are {api.port} "
                           "(the admin API needs its own port)")
    tracker = ConnectionTracker(timeouts.header_s)
    runners: list[web.AppRunner] = []
    servers: list[asyncio.Server] = []
    set_up: list[web.AppRunner] = []
    try:
        for listener in (api, admin):
            listener.app[BODY_TIMEOUT] = timeouts.body_s
            runner = web.AppRunner(listener.app, access_log=None, keepalive_timeout=KEEPALIVE_S)
            servers.append(await _bind(listener, runner, tracker))
            runners.append(runner)
        for runner in runners:
            await runner.setup()  # the read API's starts the sampler (and the persister, discovery)
            assert runner.server is not None
            tracker.track(runner.server)  # the header clock, below the application (no middleware)
            set_up.append(runner)
        for listener, runner, server in zip((api, admin), runners, servers):
            await _BoundSite(runner, server, f"{listener.what} on {_where(listener.host, listener.port)}").start()
        yield {"api": _addresses(servers[0]), "admin": _addresses(servers[1])}
    finally:
        for runner in reversed(set_up):
            await runner.cleanup()  # stops its site: no new connections, open ones finish; then cleanup_ctx
        for server in servers:
            server.close()  # one bound but never started (a bind or a set-up failed) is closed here


async def serve_until_signalled(app: web.Application, host: str, port: int, admin: web.Application,
                                admin_host: str, admin_port: int, timeouts: ReadTimeouts = ReadTimeouts(),
                                on_listening: Callable[[int], None] | None = None) -> None:
    """Serve both APIs until SIGTERM or SIGINT, then shut down gracefully. Raises :class:`StartupError`.

    ``on_listening`` runs once both listen, with the port the admin API bound (``admin_port`` 0 picks a
    free one): ``serve`` publishes a generated admin token's file, named for that port, there.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # a signal during start-up stops the service once it serves
    async with listening(Listener("read API", app, host, port), Listener("admin API", admin, admin_host, admin_port),
                         timeouts) as addresses:
        log.info("listening", api=_where(host, port), admin=_where(admin_host, admin_port), bound=addresses,
                 header_timeout_s=timeouts.header_s, body_timeout_s=timeouts.body_s)
        if on_listening is not None:
            on_listening(int(addresses["admin"][0].rsplit(":", 1)[1]))
        await stop.wait()
        log.info("shutting_down")
