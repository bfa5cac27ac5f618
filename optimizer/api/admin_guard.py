"""The admin API's guards: the middlewares every admin request passes before a route sees it.

No web page can drive the admin API, whatever browser it runs in and whatever name it resolves: a request is
answered only when its ``Host`` names this API (421 otherwise: DNS rebinding), when it carries no
``Origin`` (403: a page's own requests always do), with ``Authorization: Bearer <token>`` (compared
in constant time; 401 otherwise), and, for a write, with ``Content-Type: application/json`` (415
otherwise: no cross-origin "simple request" a page can send without asking first). A refused request
changes nothing and is logged as a warning with the client's address. The routes are in
:mod:`optimizer.api.admin`.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import structlog
from aiohttp import web

from optimizer.admin_access import is_loopback_name, parse_host_name, same_host
from optimizer.api.app import Handler
from optimizer.api.keys import ADMIN_ALLOWED_HOSTS, ADMIN_TOKEN

log = structlog.get_logger("optimizer.api.admin")  # the admin API's events, wherever they are logged from


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPE = "application/json"


def _printable(value: str, limit: int = 200) -> str:
    """A header value as it can be logged and echoed: ASCII, non-UTF-8 bytes escaped, cut at ``limit``."""
    text = value.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    return text if len(text) <= limit else text[:limit] + "..."


def _refuse(request: web.Request, status: int, header: str, value: str | None, error: str,
            **extra: Any) -> web.Response:
    shown = None if value is None else _printable(value)
    log.warning("admin_refused", client=request.remote, method=request.method, path=request.path,
                status=status, header=header, value=shown)
    return _json({"error": error, "header": header, **extra}, status=status)


def _answers_for(request: web.Request, name: str) -> bool:
    """Whether ``name`` (a normalised ``Host``) names this admin API: a loopback name, the address the
    connection arrived on, or a configured name. Ports are not compared (see docs/admin.md)."""
    if is_loopback_name(name):
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if isinstance(sockname, tuple) and sockname and same_host(name, str(sockname[0])):
        return True
    return any(same_host(name, allowed) for allowed in request.app[ADMIN_ALLOWED_HOSTS])


@web.middleware
async def browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what only a browser sends: a ``Host`` that is not this API's (a DNS-rebinding page names its
    own domain) with 421, and any ``Origin`` (a page's fetch, form or preflight) with 403."""
    hosts = request.headers.getall("Host", [])
    name = parse_host_name(hosts[0]) if len(hosts) == 1 else None
    if name is None or not _answers_for(request, name):
        given = ", ".join(hosts) if hosts else None
        return _refuse(request, 421, "Host", given,
                       f"Host {_printable(given) if given is not None else '(none)'} does not name this admin "
                       "API: use the address it listens on, localhost, 127.0.0.1 or [::1], or add the name "
                       "to server.admin_allowed_hosts")
    origin = request.headers.get("Origin")
    if origin is not None:
        return _refuse(request, 403, "Origin", origin,
                       "requests from web pages (with an Origin header) are refused: the admin API is for "
                       "the management CLI and other programs, not browsers")
    return await handler(request)


def _offered_token(request: web.Request) -> bytes | None:
    """The bearer token offered, as the bytes sent (aiohttp decodes header values as UTF-8 with
    ``surrogateescape``, so encoding back the same way gives them exactly, valid UTF-8 or not)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    try:
        return given.strip().encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    offered = _offered_token(request)
    if offered is None or not hmac.compare_digest(offered, request.app[ADMIN_TOKEN]):
        log.warning("admin_unauthorized", client=request.remote, method=request.method, path=request.path)
        return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="vlm-gpu-optimizer admin"'})
    return await handler(request)


@web.middleware
async def json_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write must say ``Content-Type: application/json``, with a body or without one: a browser sends
    that type across origins only after a preflight (which carries ``Origin``), never in a form."""
    given = request.headers.get("Content-Type")
    if request.method in WRITE_METHODS and (given is None or request.content_type != JSON_TYPE):
        return _refuse(request, 415, "Content-Type", given,
                       f"{request.method} needs Content-Type: {JSON_TYPE}, got "
                       f"{_printable(given) if given is not None else 'none'}", allowed=[JSON_TYPE])
    return await handler(request)
