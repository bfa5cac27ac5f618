"""The admin API client of the management commands: HTTP over urllib, and the errors it raises."""

from __future__ import annotations

import http.client
import json
import math
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optimizer import __version__


PROG = "vlm-gpu-optimizer"
DEFAULT_URL = "http://127.0.0.1:8081"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SERVICE = "vlm"
URL_ENV = "VLM_OPTIMIZER_ADMIN_URL"
TOKEN_ENV = "VLM_OPTIMIZER_ADMIN_TOKEN"
STATE_PATH_ENV = "VLM_OPTIMIZER_STATE_PATH"  # where a local serve keeps its state, and so its generated token
JSON_TYPE = "application/json"
GIB = 1024**3

EXIT_OK = 0
EXIT_SERVICE = 1  # the service refused the request (4xx) or failed (5xx), or answered something unexpected
EXIT_USAGE = 2  # bad arguments, or a file that cannot be read, parsed or written
EXIT_AUTH = 3  # the admin API answered 401/403: the token is missing or wrong
EXIT_UNREACHABLE = 4  # no connection to the admin API, or no answer within --timeout
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 the service refused the request or failed (its error is printed, naming the "
    "field, or a redirect, which is never followed); 2 usage error (bad arguments, a file that cannot be read, "
    "parsed or written); 3 the admin API rejected the token (missing or wrong: --token, --token-file, "
    f"{TOKEN_ENV} or the token a local serve generated) or the request (403); 4 the admin API cannot be "
    "reached or did not answer within --timeout; 130 interrupted (Ctrl-C).")

# configure's flags -> the settings keys (the seed's MemoryConfig names) they set
CONFIGURE_FLAGS: dict[str, str] = {
    "strategy": "strategy",
    "warning_threshold": "memory_threshold_warning",
    "critical_threshold": "memory_threshold_critical",
    "oom_threshold": "memory_threshold_oom",
    "max_batch_size": "max_batch_size",
    "min_batch_size": "min_batch_size",
    "monitoring_interval": "monitoring_interval",
    "optimization_interval": "optimization_interval",
    "cleanup_interval": "cleanup_interval",
    "temperature_threshold": "temperature_threshold",
    "gc_threshold": "gc_threshold",
    "fragmentation_threshold": "fragmentation_threshold",
    "memory_reserve_mb": "memory_reserve_mb",
    "target_memory_utilization": "target_memory_utilization",
    "oom_cost_s": "oom_cost_s",
}

Sleep = Callable[[float], None]
Clock = Callable[[], float]


# --------------------------------------------------------------------------- errors


class ManageError(Exception):
    """A command failed; the message is one line for the operator, ``exit_code`` the process status."""

    exit_code = EXIT_SERVICE


class UsageError(ManageError):
    """Bad arguments, or a local file that cannot be read, parsed or written."""

    exit_code = EXIT_USAGE


class ServiceError(ManageError):
    """The admin API refused the request (4xx), failed (5xx), or answered something that is not its JSON.

    ``status`` is the HTTP status (``None`` when the answer was not understood); ``field`` names the
    request field or parameter the service rejected, when it said.
    """

    exit_code = EXIT_SERVICE

    def __init__(self, message: str, status: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class AuthError(ManageError):
    """The admin API answered 401 or 403: the bearer token is missing or wrong."""

    exit_code = EXIT_AUTH


class Unreachable(ManageError):
    """No connection to the admin API, or no answer within the timeout."""

    exit_code = EXIT_UNREACHABLE


# --------------------------------------------------------------------------- HTTP


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: a 3xx reaches :meth:`AdminClient.request` as an error (and the token never
    travels to another address)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


class AdminClient:
    """A blocking client of the admin API. Every method raises :class:`ManageError` subclasses only:
    :class:`Unreachable`, :class:`AuthError` or :class:`ServiceError`.

    It talks to ``url`` directly: no proxy (``http_proxy`` and the like are ignored; a proxy would see
    the token) and no redirect followed (a 3xx is a :class:`ServiceError` naming its ``Location``).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, *,
                 token_note: str | None = None) -> None:
        """Raises :class:`UsageError` when ``url`` is not an http(s) URL or ``timeout`` is not positive.
        ``token_note`` is added to the message of a refused (or missing) token: where it was looked for."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"--url must be an http:// or https:// URL of the admin API, got {url!r}")
        if parsed.query or parsed.fragment:
            raise UsageError(f"--url must not have a query or fragment, got {url!r}")
        if not timeout > 0 or not math.isfinite(timeout):
            raise UsageError(f"--timeout must be a positive number of seconds, got {timeout:g}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.token_note = token_note
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())

    def request(self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON answer of a 2xx response."""
        target = self.url + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": JSON_TYPE, "User-Agent": f"{PROG}/{__version__}"}
        data = None
        if method not in ("GET", "HEAD"):  # the admin API takes a write only as JSON, even without a body
            data = b"" if body is None else json.dumps(body).encode()
            headers["Content-Type"] = JSON_TYPE
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(target, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            with exc:
                if 300 <= exc.code < 400:
                    raise self._redirected(method, path, exc.code, exc.headers.get("Location")) from None
                raise self._http_error(method, path, exc.code, exc.reason, _read(exc)) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except (TimeoutError, socket.timeout, OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ServiceError(f"{method} {path} answered HTTP {status} but not JSON; is {self.url} the admin "
                               "API (default port 8081)?", status) from None

    def _unreachable(self, reason: object) -> Unreachable:
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return Unreachable(f"the admin API at {self.url} did not answer within {self.timeout:g} s "
                               "(raise --timeout, or check that the service is not stuck)")
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = f"unknown host ({reason.strerror or reason})"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror.lower()
        else:
            why = str(reason) or type(reason).__name__
        return Unreachable(f"cannot reach the admin API at {self.url}: {why} "
                           f"(is the service running? check --url or {URL_ENV})")

    def _redirected(self, method: str, path: str, status: int, location: str | None) -> ServiceError:
        shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in location or "")[:300]
        where = f"to {shown}" if shown else "without a Location"
        return ServiceError(f"{method} {path} at {self.url} answered a redirect (HTTP {status}) {where}; "
                            "redirects are not followed and the token is not sent there: give --url the "
                            "admin API's own address", status)

    def _http_error(self, method: str, path: str, status: int, reason: str, raw: bytes) -> ManageError:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        field = None
        if isinstance(body, dict):
            named = body.get("field", body.get("parameter"))
            field = named if isinstance(named, str) else None
        text = error if isinstance(error, str) and error else reason
        note = f" ({self.token_note})" if self.token_note else ""
        if status == 403:
            return AuthError(f"the admin API at {self.url} refused {method} {path} (HTTP 403): {text}")
        if status == 401:
            if self.token is None:
                return AuthError(f"the admin API at {self.url} refused the request (HTTP 401): no token "
                                 f"given; pass --token or --token-file, or set {TOKEN_ENV}{note}")
            return AuthError(f"the admin API at {self.url} refused the token (HTTP 401): it is wrong; "
                             f"check --token, --token-file or {TOKEN_ENV}{note}")
        if 400 <= status < 500:
            msg = f"the service rejected {method} {path} (HTTP {status}): {text}"
            if status in (404, 405) and field is None:
                msg += f"; is {self.url} the admin API (default port 8081)?"
            return ServiceError(msg, status, field)
        return ServiceError(f"the service failed on {method} {path} (HTTP {status}): {text}", status, field)

    # the admin API, one method per endpoint

    def status(self) -> dict[str, Any]:
        return _object(self.request("GET", "/admin/status"), "/admin/status")

    def optimize(self) -> dict[str, Any]:
        return _object(self.request("POST", "/admin/optimize"), "/admin/optimize")

    def set_batch_size(self, service: str, gpu: int | str | None, batch_size: int,
                       ttl_s: float | None) -> dict[str, Any]:
        body: dict[str, Any] = {"service": service, "batch_size": batch_size}
        if gpu is not None:
            body["gpu"] = gpu
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return _object(self.request("PUT", "/admin/batch-size", body), "/admin/batch-size")

    def clear_batch_size(self, service: str, gpu: int | str | None) -> dict[str, Any]:
        query = {"service": service}
        if gpu is not None:
            query["gpu"] = str(gpu)
        return _object(self.request("DELETE", "/admin/batch-size", query=query), "/admin/batch-size")

    def set_enabled(self, on: bool) -> dict[str, Any]:
        path = "/admin/enable" if on else "/admin/disable"
        return _object(self.request("POST", path), path)

    def set_monitoring(self, on: bool) -> dict[str, Any]:
        path = "/admin/monitoring/start" if on else "/admin/monitoring/stop"
        return _object(self.request("POST", path), path)

    def configure(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        return _object(self.request("PATCH", "/admin/config", dict(settings)), "/admin/config")

    def reset_config(self, keys: Sequence[str] | None) -> dict[str, Any]:
        """Unpin ``keys`` (``None``: every key)."""
        body: dict[str, Any] = {"all": True} if keys is None else {"keys": list(keys)}
        return _object(self.request("POST", "/admin/config/reset", body), "/admin/config/reset")

    def export_config(self) -> dict[str, Any]:
        return _object(self.request("GET", "/admin/config/export"), "/admin/config/export")

    def import_config(self, document: Mapping[str, Any]) -> dict[str, Any]:
        return _object(self.request("POST", "/admin/config/import", dict(document)), "/admin/config/import")


def _read(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except (OSError, http.client.HTTPException):
        return b""


def _object(data: Any, path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ServiceError(f"{path} answered {type(data).__name__}, not a JSON object")
    return data
