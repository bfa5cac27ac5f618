"""The management commands: steer a running optimizer through its admin API (default port 8081).

The seed's ``manage_vlm_gpu_memory.py`` commands (``status``, ``monitor``, ``optimize``,
``set-batch-size``, ``enable``/``disable``, ``start-monitoring``/``stop-monitoring``, ``configure``,
``export-config``/``import-config``), as HTTP calls to the service. HTTP uses only the standard
library (:mod:`urllib.request`), so these commands run no event loop.

Every failure is raised as a :class:`ManageError` whose ``exit_code`` says what went wrong
(:data:`EXIT_SERVICE`, :data:`EXIT_USAGE`, :data:`EXIT_AUTH`, :data:`EXIT_UNREACHABLE`);
:func:`run` turns it into one line on stderr and that exit code.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from optimizer import __version__

PROG = "vlm-gpu-optimizer"
DEFAULT_URL = "http://127.0.0.1:8081"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_SERVICE = "vlm"
URL_ENV = "VLM_OPTIMIZER_ADMIN_URL"
TOKEN_ENV = "VLM_OPTIMIZER_ADMIN_TOKEN"
GIB = 1024**3

EXIT_OK = 0
EXIT_SERVICE = 1  # the service refused the request (4xx) or failed (5xx), or answered something unexpected
EXIT_USAGE = 2  # bad arguments, or a file that cannot be read, parsed or written
EXIT_AUTH = 3  # the admin API answered 401/403: the token is missing or wrong
EXIT_UNREACHABLE = 4  # no connection to the admin API, or no answer within --timeout
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 the service refused the request or failed (its error is printed, naming the "
    "field); 2 usage error (bad arguments, a file that cannot be read, parsed or written); 3 the admin API "
    f"rejected the token (missing or wrong: --token, --token-file or {TOKEN_ENV}); 4 the admin API cannot be "
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


class AdminClient:
    """A blocking client of the admin API. Every method raises :class:`ManageError` subclasses only:
    :class:`Unreachable`, :class:`AuthError` or :class:`ServiceError`.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Raises :class:`UsageError` when ``url`` is not an http(s) URL or ``timeout`` is not positive."""
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

    def request(self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON answer of a 2xx response."""
        target = self.url + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": f"{PROG}/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(target, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            with exc:
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
        if status in (401, 403):
            if self.token is None:
                return AuthError(f"the admin API at {self.url} refused the request (HTTP {status}): no token "
                                 f"given; pass --token or --token-file, or set {TOKEN_ENV}")
            return AuthError(f"the admin API at {self.url} refused the token (HTTP {status}): it is wrong; "
                             f"check --token, --token-file or {TOKEN_ENV}")
        text = error if isinstance(error, str) and error else reason
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


# --------------------------------------------------------------------------- rendering


def _num(value: Any, fmt: str = "g", unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:{fmt}}{unit}"


def _gib(value: Any) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value / GIB:.2f}"


def _usage_percent(gpu: Mapping[str, Any]) -> Any:
    pct = gpu.get("memory_usage_percent")
    used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
    if pct is None and isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0:
        pct = used / total * 100
    return pct


def gpu_lines(gpu: Mapping[str, Any]) -> list[str]:
    """A GPU as a block: memory used/total GiB and %, pressure, temperature, utilisation, cleanup epoch."""
    head = f"GPU {gpu.get('index')}  {gpu.get('name') or 'unknown'}  ({gpu.get('uuid') or 'no uuid'})"
    if gpu.get("failed"):
        return [head, f"  FAILED: {gpu.get('error') or 'no reading'}"]
    return [
        head,
        f"  memory         {_gib(gpu.get('memory_used_bytes'))} / {_gib(gpu.get('memory_total_bytes'))} GiB"
        f" ({_num(_usage_percent(gpu), '.1f', ' %')})",
        f"  pressure       {gpu.get('pressure', 'n/a')}",
        f"  temperature    {_num(gpu.get('temperature_celsius'), '.0f', ' C')}",
        f"  utilisation    {_num(gpu.get('utilization_percent'), '.0f', ' %')}",
        f"  cleanup epoch  {gpu.get('cleanup_epoch', 'n/a')}",
    ]


def service_lines(services: list[Any]) -> list[str]:
    """One line per service: its GPU, batch size in force, the optimum, and why."""
    rows = []
    for s in services:
        if not isinstance(s, dict):
            continue
        gpu = s.get("gpu")
        where = f"GPU {gpu.get('index')}" if isinstance(gpu, dict) else "no GPU"
        rows.append((str(s.get("service")), where, f"batch {s.get('batch_size')}",
                     f"optimal {s.get('optimal_batch_size')}", str(s.get("reason", ""))))
    if not rows:
        return ["  (no service has polled yet)"]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + f"  {r[4]}" for r in rows]


def _count(n: Any, noun: str) -> str:
    n = n if isinstance(n, int) else 0
    return f"{n} {noun}{'' if n == 1 else 's'}"


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """The human view of ``GET /admin/status``."""
    settings = status.get("settings") if isinstance(status.get("settings"), dict) else {}
    assert isinstance(settings, dict)
    flags = [
        f"backend {status.get('backend')}",
        "monitoring on" if status.get("monitoring") else "monitoring STOPPED",
        "ready" if status.get("ready") else "not ready",
        "healthy" if status.get("healthy") else "stale",
        _count(status.get("samples"), "sample") + ", " + _count(status.get("sample_errors"), "error"),
    ]
    policy = [
        "optimization enabled" if settings.get("enabled", True) else "optimization DISABLED",
        f"strategy {settings.get('strategy', 'n/a')}",
        f"batch size in [{settings.get('min_batch_size', '?')}, {settings.get('max_batch_size', '?')}]",
    ]
    lines = ["optimizer: " + ", ".join(flags), "policy:    " + ", ".join(policy)]
    gpus = status.get("gpus") if isinstance(status.get("gpus"), list) else []
    assert isinstance(gpus, list)
    if not gpus:
        lines += ["", "no GPU sampled" + (" yet" if not status.get("samples") else "")]
    for g in gpus:
        if isinstance(g, dict):
            lines += ["", *gpu_lines(g)]
    services = status.get("services") if isinstance(status.get("services"), list) else []
    assert isinstance(services, list)
    lines += ["", "services:", *service_lines(services)]
    return lines


def monitor_line(stamp: str, gpu: Mapping[str, Any], services: list[Any]) -> str:
    """One plain line for one GPU in one poll (the non-terminal form of ``monitor``)."""
    if gpu.get("failed"):
        return f"{stamp} gpu={gpu.get('index')} FAILED error={json.dumps(gpu.get('error'))}"
    batches = ",".join(f"{s.get('service')}:{s.get('batch_size')}/{s.get('optimal_batch_size')}"
                       for s in services if isinstance(s, dict) and isinstance(s.get("gpu"), dict)
                       and s["gpu"].get("index") == gpu.get("index"))
    return (f"{stamp} gpu={gpu.get('index')} used_gib={_gib(gpu.get('memory_used_bytes'))}"
            f" total_gib={_gib(gpu.get('memory_total_bytes'))} usage={_num(_usage_percent(gpu), '.1f', '%')}"
            f" pressure={gpu.get('pressure', 'n/a')} temp={_num(gpu.get('temperature_celsius'), '.0f', 'C')}"
            f" util={_num(gpu.get('utilization_percent'), '.0f', '%')} cleanup_epoch={gpu.get('cleanup_epoch')}"
            f" batch={batches or '-'}")


def _stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _emit(out: TextIO, lines: list[str]) -> None:
    out.write("\n".join(lines) + "\n")
    out.flush()


# --------------------------------------------------------------------------- commands


def cmd_status(client: AdminClient, *, as_json: bool, out: TextIO) -> int:
    """Print the service's status. Raises :class:`ManageError`."""
    status = client.status()
    if as_json:
        _emit(out, [json.dumps(status, indent=2)])
    else:
        _emit(out, status_lines(status))
    return EXIT_OK


CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cmd_monitor(client: AdminClient, *, duration: float, interval: float, as_json: bool, out: TextIO,
                sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> int:
    """Poll the status every ``interval`` seconds for ``duration`` seconds: ``ceil(duration / interval)``
    polls (at least one), the first at once, each ``interval`` after the previous one started. On a terminal the view is redrawn in place; otherwise one
    timestamped line per GPU per poll; with ``as_json`` one JSON object per poll and line.

    ``sleep`` and ``clock`` are injectable (tests). Raises :class:`ManageError` on the first failed poll,
    and :class:`UsageError` for a non-positive or non-finite duration or interval.
    """
    for name, value in (("--duration", duration), ("--interval", interval)):
        if not value > 0 or not math.isfinite(value):
            raise UsageError(f"{name} must be a positive number of seconds, got {value:g}")
    polls = max(1, math.ceil(duration / interval - 1e-9))
    tty = not as_json and out.isatty()
    polled_at = clock()
    for k in range(polls):
        if k:  # the poll's own time counts towards the interval
            sleep(max(0.0, interval - (clock() - polled_at)))
            polled_at = clock()
        status = client.status()
        stamp = _stamp()
        if as_json:
            _emit(out, [json.dumps({"time": stamp, "poll": k + 1, **status}, separators=(",", ":"))])
        elif tty:
            head = f"{PROG} monitor  {client.url}  {stamp}  poll {k + 1}/{polls} every {interval:g} s  (Ctrl-C stops)"
            out.write(CLEAR_SCREEN)
            _emit(out, [head, "", *status_lines(status)])
        else:
            gpus = [g for g in status.get("gpus") or [] if isinstance(g, dict)]
            services = status.get("services") if isinstance(status.get("services"), list) else []
            assert isinstance(services, list)
            _emit(out, [monitor_line(stamp, g, services) for g in gpus] or [f"{stamp} no GPU sampled"])
    return EXIT_OK


def cmd_optimize(client: AdminClient, *, as_json: bool, out: TextIO) -> int:
    """Run the optimization now; print the batch sizes it changed. Raises :class:`ManageError`."""
    result = client.optimize()
    if as_json:
        _emit(out, [json.dumps(result, indent=2)])
        return EXIT_OK
    events = [e for e in result.get("events") or [] if isinstance(e, dict)]
    changes = [e for e in events if e.get("kind") == "batch_changed"]
    if not changes:
        _emit(out, ["optimization ran: no batch size changed"])
        return EXIT_OK
    lines = [f"optimization ran: {len(changes)} batch size{'s' if len(changes) != 1 else ''} changed"]
    lines += [f"  {e.get('service')} on GPU {e.get('gpu')}: {e.get('old')} -> {e.get('new')}" for e in changes]
    _emit(out, lines)
    return EXIT_OK


def _where(d: Mapping[str, Any]) -> str:
    gpu = d.get("gpu")
    return f"{d.get('service')} on GPU {gpu.get('index')}" if isinstance(gpu, dict) else str(d.get("service"))


def cmd_set_batch_size(client: AdminClient, *, service: str, gpu: int | str | None, batch_size: int | None,
                       ttl_s: float | None, clear: bool, out: TextIO) -> int:
    """Fix a service's batch size (``clear``: hand it back to the policy). Raises :class:`ManageError`."""
    if clear:
        d = client.clear_batch_size(service, gpu)
        _emit(out, [f"{_where(d)}: manual batch size cleared; publishing {d.get('batch_size')} "
                    f"({d.get('reason')})"])
        return EXIT_OK
    if batch_size is None:
        raise UsageError("set-batch-size needs a batch size N, or --clear")
    d = client.set_batch_size(service, gpu, batch_size, ttl_s)
    until = f" for {ttl_s:g} s" if ttl_s is not None else " until cleared (set-batch-size --clear)"
    _emit(out, [f"{_where(d)}: batch size set to {batch_size}{until}; publishing {d.get('batch_size')} "
                f"({d.get('reason')})"])
    return EXIT_OK


def cmd_enable(client: AdminClient, *, on: bool, out: TextIO) -> int:
    """Enable or disable optimization. Raises :class:`ManageError`."""
    result = client.set_enabled(on)
    word = "enabled" if on else "disabled"
    _emit(out, [f"optimization {word}" if result.get("changed") else f"optimization was already {word}"])
    return EXIT_OK


def cmd_monitoring(client: AdminClient, *, on: bool, out: TextIO) -> int:
    """Start or stop GPU sampling. Raises :class:`ManageError`."""
    result = client.set_monitoring(on)
    if on:
        msg = "monitoring started" if result.get("changed") else "monitoring was already running"
    else:
        msg = "monitoring stopped" if result.get("changed") else "monitoring was already stopped"
    _emit(out, [msg])
    return EXIT_OK


def _flag(key: str) -> str | None:
    for dest, k in CONFIGURE_FLAGS.items():
        if k == key:
            return "--" + dest.replace("_", "-")
    return None


def cmd_configure(client: AdminClient, *, settings: Mapping[str, Any], out: TextIO) -> int:
    """Change the given settings, all-or-nothing. Raises :class:`UsageError` when none is given and
    :class:`ManageError` otherwise (a rejected value names its setting and flag)."""
    if not settings:
        raise UsageError("configure needs at least one setting flag (see configure --help)")
    try:
        result = client.configure(settings)
    except ServiceError as exc:
        if exc.status is None or not 400 <= exc.status < 500:
            raise
        # a relation between settings may name one that was not given: point at a flag only when it was
        flag = _flag(exc.field) if exc.field is not None and exc.field in settings else None
        hint = f" ({flag})" if flag else ""
        raise ServiceError(f"{exc}{hint}; nothing was changed", exc.status, exc.field) from None
    changed = [k for k in result.get("changed") or [] if isinstance(k, str)]
    now = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    assert isinstance(now, dict)
    if not changed:
        _emit(out, ["nothing changed: the settings already had these values"])
        return EXIT_OK
    _emit(out, ["changed:", *(f"  {k} = {json.dumps(now.get(k))}" for k in changed)])
    return EXIT_OK


def _is_yaml(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def cmd_export_config(client: AdminClient, *, output: str | None, out: TextIO) -> int:
    """Write the configuration (``{format, version, settings}``) as JSON to ``output`` (stdout for
    ``None`` or ``-``), or as YAML when the file ends in ``.yaml``/``.yml``.

    Raises :class:`ManageError`; :class:`UsageError` when the file cannot be written.
    """
    doc = client.export_config()
    if output is None or output == "-":
        _emit(out, [json.dumps(doc, indent=2)])
        return EXIT_OK
    text = yaml.safe_dump(doc, sort_keys=False) if _is_yaml(output) else json.dumps(doc, indent=2) + "\n"
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    count = len(doc["settings"]) if isinstance(doc.get("settings"), dict) else 0
    _emit(out, [f"exported {count} settings to {output} ({'YAML' if _is_yaml(output) else 'JSON'})"])
    return EXIT_OK


def read_config_document(path: str, stdin: TextIO | None = None) -> dict[str, Any]:
    """A configuration file (JSON, or YAML unless it ends in ``.json``; ``-`` reads stdin) as a mapping:
    the export format ``{format, version, settings}`` or plain settings. Raises :class:`UsageError`.
    """
    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        if path.lower().endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.lower().endswith(".json") else "YAML or JSON"
        detail = " ".join(str(exc).split())
        raise UsageError(f"{path} is not valid {kind}: {detail}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings (or an export-config document), "
                         f"got {type(data).__name__}")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} holds a value JSON cannot carry: {exc}") from None
    return data


def cmd_import_config(client: AdminClient, *, path: str, out: TextIO, stdin: TextIO | None = None) -> int:
    """Replace the whole configuration with a file's (keys left out take their defaults), all-or-nothing.
    Raises :class:`UsageError` for an unreadable file and :class:`ManageError` when the service rejects it.
    """
    doc = read_config_document(path, stdin)
    try:
        result = client.import_config(doc)
    except ServiceError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise ServiceError(f"{exc}; nothing was changed", exc.status, exc.field) from None
        raise
    changed = [k for k in result.get("changed") or [] if isinstance(k, str)]
    if changed:
        _emit(out, [f"imported {path}; changed: {', '.join(changed)}"])
    else:
        _emit(out, [f"imported {path}; nothing changed"])
    return EXIT_OK


# --------------------------------------------------------------------------- entry


COMMANDS = ("status", "monitor", "optimize", "set-batch-size", "enable", "disable", "start-monitoring",
            "stop-monitoring", "configure", "export-config", "import-config")


def resolve_token(token: str | None, token_file: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--token``, else the first line of ``--token-file``, else ``VLM_OPTIMIZER_ADMIN_TOKEN``; ``None``
    when none is set. Raises :class:`UsageError` for an unreadable or empty token file."""
    if token is not None and token_file is not None:
        raise UsageError("give --token or --token-file, not both")
    if token is not None:
        token = token.strip()
        if not token:
            raise UsageError("--token is empty")
        return token
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --token-file {token_file}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        if not text:
            raise UsageError(f"--token-file {token_file} is empty")
        return text
    value = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return value or None


def parse_gpu_selector(value: str | None) -> int | str | None:
    """``--gpu``: an index (digits) or a UUID, passed to the service as given."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def client_from_args(args: argparse.Namespace) -> AdminClient:
    """Raises :class:`UsageError` for a bad URL, timeout or token file."""
    url = args.url or os.environ.get(URL_ENV, "").strip() or DEFAULT_URL
    return AdminClient(url, resolve_token(args.token, args.token_file), args.timeout)


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None,
        sleep: Sleep = time.sleep, clock: Clock = time.monotonic) -> int:
    """Run one management command from parsed arguments; never raises (except ``SystemExit``).

    Any :class:`ManageError` becomes one line ``vlm-gpu-optimizer: ...`` on ``err`` and its exit code.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        client = client_from_args(args)
        cmd = args.command
        if cmd == "status":
            return cmd_status(client, as_json=args.json, out=out)
        if cmd == "monitor":
            return cmd_monitor(client, duration=args.duration, interval=args.interval, as_json=args.json,
                               out=out, sleep=sleep, clock=clock)
        if cmd == "optimize":
            return cmd_optimize(client, as_json=args.json, out=out)
        if cmd == "set-batch-size":
            if args.clear and (args.batch_size is not None or args.ttl is not None):
                raise UsageError("set-batch-size --clear takes no batch size and no --ttl")
            return cmd_set_batch_size(client, service=args.service, gpu=parse_gpu_selector(args.gpu),
                                      batch_size=args.batch_size, ttl_s=args.ttl, clear=args.clear, out=out)
        if cmd in ("enable", "disable"):
            return cmd_enable(client, on=cmd == "enable", out=out)
        if cmd in ("start-monitoring", "stop-monitoring"):
            return cmd_monitoring(client, on=cmd == "start-monitoring", out=out)
        if cmd == "configure":
            settings = {key: getattr(args, dest) for dest, key in CONFIGURE_FLAGS.items()
                        if getattr(args, dest, None) is not None}
            return cmd_configure(client, settings=settings, out=out)
        if cmd == "export-config":
            return cmd_export_config(client, output=args.output, out=out)
        if cmd == "import-config":
            return cmd_import_config(client, path=args.file, out=out)
        raise UsageError(f"unknown command {cmd!r}")
    except ManageError as exc:
        print(f"{PROG}: {exc}", file=err)
        err.flush()
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return EXIT_INTERRUPTED
