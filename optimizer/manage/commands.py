"""The management commands themselves, and :func:`run`, which turns failures into one line and an exit code.
Which token they send is :mod:`optimizer.manage.tokens`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from optimizer.manage.client import (
    CONFIGURE_FLAGS,
    DEFAULT_URL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    URL_ENV,
    AdminClient,
    Clock,
    ManageError,
    ServiceError,
    Sleep,
    UsageError,
)
from optimizer.manage.render import change_lines, emit, monitor_line, now_stamp, optimize_lines, status_lines
from optimizer.manage.tokens import generated_token, resolve_token


def cmd_status(client: AdminClient, *, as_json: bool, out: TextIO) -> int:
    """Print the service's status. Raises :class:`ManageError`."""
    status = client.status()
    if as_json:
        emit(out, [json.dumps(status, indent=2)])
    else:
        emit(out, status_lines(status))
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
        stamp = now_stamp()
        if as_json:
            emit(out, [json.dumps({"time": stamp, "poll": k + 1, **status}, separators=(",", ":"))])
        elif tty:
            head = f"{PROG} monitor  {client.url}  {stamp}  poll {k + 1}/{polls} every {interval:g} s  (Ctrl-C stops)"
            out.write(CLEAR_SCREEN)
            emit(out, [head, "", *status_lines(status)])
        else:
            gpus = [g for g in status.get("gpus") or [] if isinstance(g, dict)]
            services = status.get("services") if isinstance(status.get("services"), list) else []
            assert isinstance(services, list)
            emit(out, [monitor_line(stamp, g, services) for g in gpus] or [f"{stamp} no GPU sampled"])
    return EXIT_OK


def cmd_optimize(client: AdminClient, *, as_json: bool, out: TextIO) -> int:
    """Run the optimization now; print the batch sizes it changed and what it deferred, until when and
    why. Raises :class:`ManageError`."""
    result = client.optimize()
    if as_json:
        emit(out, [json.dumps(result, indent=2)])
        return EXIT_OK
    events = [e for e in result.get("events") or [] if isinstance(e, dict)]
    changes = [e for e in events if e.get("kind") == "batch_changed"]
    deferred = result.get("deferred") if isinstance(result.get("deferred"), list) else []
    assert isinstance(deferred, list)
    emit(out, optimize_lines(changes, deferred, head="optimization ran"))
    return EXIT_OK


def _where(d: Mapping[str, Any]) -> str:
    gpu = d.get("gpu")
    return f"{d.get('service')} on GPU {gpu.get('index')}" if isinstance(gpu, dict) else str(d.get("service"))


def cmd_set_batch_size(client: AdminClient, *, service: str, gpu: int | str | None, batch_size: int | None,
                       ttl_s: float | None, clear: bool, out: TextIO) -> int:
    """Fix a service's batch size (``clear``: hand it back to the policy). Raises :class:`ManageError`."""
    if clear:
        d = client.clear_batch_size(service, gpu)
        emit(out, [f"{_where(d)}: manual batch size cleared; publishing {d.get('batch_size')} "
                    f"({d.get('reason')})"])
        return EXIT_OK
    if batch_size is None:
        raise UsageError("set-batch-size needs a batch size N, or --clear")
    d = client.set_batch_size(service, gpu, batch_size, ttl_s)
    until = f" for {ttl_s:g} s" if ttl_s is not None else " until cleared (set-batch-size --clear)"
    emit(out, [f"{_where(d)}: batch size set to {batch_size}{until}; publishing {d.get('batch_size')} "
                f"({d.get('reason')})"])
    return EXIT_OK


def cmd_enable(client: AdminClient, *, on: bool, out: TextIO) -> int:
    """Enable or disable optimization; print the batch sizes that moved and, when enabled, the
    optimizations deferred (until when and why). Raises :class:`ManageError`."""
    result = client.set_enabled(on)
    word = "enabled" if on else "disabled"
    changes = result.get("batch_changes") if isinstance(result.get("batch_changes"), list) else []
    deferred = result.get("deferred") if isinstance(result.get("deferred"), list) else []
    assert isinstance(changes, list) and isinstance(deferred, list)
    head = f"optimization {word}" if result.get("changed") else f"optimization was already {word}"
    if on:
        emit(out, optimize_lines(changes, deferred, head=head))
    elif changes:
        emit(out, [f"{head}: {len(changes)} batch size{'s' if len(changes) != 1 else ''} back to the default",
                   *change_lines(changes)])
    else:
        emit(out, [head])
    return EXIT_OK


def cmd_monitoring(client: AdminClient, *, on: bool, out: TextIO) -> int:
    """Start or stop GPU sampling. Raises :class:`ManageError`."""
    result = client.set_monitoring(on)
    if on:
        msg = "monitoring started" if result.get("changed") else "monitoring was already running"
    else:
        msg = "monitoring stopped" if result.get("changed") else "monitoring was already stopped"
    emit(out, [msg])
    return EXIT_OK


def _flag(key: str) -> str | None:
    for dest, k in CONFIGURE_FLAGS.items():
        if k == key:
            return "--" + dest.replace("_", "-")
    return None


def cmd_configure(client: AdminClient, *, settings: Mapping[str, Any], out: TextIO, reset: Sequence[str] = (),
                  reset_all: bool = False) -> int:
    """Change the given settings, all-or-nothing, or unpin (``reset`` keys, or ``reset_all``). Raises
    :class:`UsageError` when none or both kinds are given and :class:`ManageError` otherwise (a rejected
    value names its setting and flag)."""
    if reset and reset_all:
        raise UsageError("give --reset KEY or --reset-all, not both")
    if (reset or reset_all) and settings:
        raise UsageError("configure either sets settings or unpins them (--reset/--reset-all), not both at once")
    if reset or reset_all:
        return _reset(client, None if reset_all else list(dict.fromkeys(reset)), out)
    if not settings:
        raise UsageError("configure needs at least one setting flag, or --reset KEY / --reset-all "
                         "(see configure --help)")
    try:
        result = client.configure(settings)
    except ServiceError as exc:
        if exc.status is None or not 400 <= exc.status < 500:
            raise
        # a relation between settings may name one that was not given: point at a flag only when it was
        flag = _flag(exc.field) if exc.field is not None and exc.field in settings else None
        hint = f" ({flag})" if flag else ""
        raise ServiceError(f"{exc}{hint}; nothing was changed", exc.status, exc.field) from None
    changed = _names(result.get("changed"))
    unchanged = _names(result.get("unchanged"))
    now = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    assert isinstance(now, dict)
    if not changed:
        emit(out, ["nothing changed: the settings already had these values (nothing pinned)"])
        return EXIT_OK
    lines = ["changed (pinned at runtime; configure --reset KEY unpins):",
             *(f"  {k} = {json.dumps(now.get(k))}" for k in changed)]
    if unchanged:
        lines.append(f"unchanged (already so, not pinned): {', '.join(unchanged)}")
    emit(out, lines)
    return EXIT_OK


def _names(value: Any) -> list[str]:
    return [k for k in value or [] if isinstance(k, str)] if isinstance(value, list) else []


def _reset(client: AdminClient, keys: list[str] | None, out: TextIO) -> int:
    """Unpin ``keys`` (``None``: all); print what was unpinned and the values the settings took."""
    try:
        result = client.reset_config(keys)
    except ServiceError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise ServiceError(f"{exc}; nothing was changed", exc.status, exc.field) from None
        raise
    unpinned = _names(result.get("unpinned"))
    not_pinned = _names(result.get("not_pinned"))
    now = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    assert isinstance(now, dict)
    if not unpinned:
        lines = ["nothing to unpin: " + (f"{', '.join(not_pinned)} {'was' if len(not_pinned) == 1 else 'were'} "
                                         "not pinned" if not_pinned else "no setting was pinned at runtime")]
    else:
        lines = ["unpinned; now from the config file, environment or flags:",
                 *(f"  {k} = {json.dumps(now.get(k))}" for k in unpinned)]
        if not_pinned:
            lines.append(f"not pinned, left as they were: {', '.join(not_pinned)}")
    emit(out, lines)
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
        emit(out, [json.dumps(doc, indent=2)])
        return EXIT_OK
    text = yaml.safe_dump(doc, sort_keys=False) if _is_yaml(output) else json.dumps(doc, indent=2) + "\n"
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    count = len(doc["settings"]) if isinstance(doc.get("settings"), dict) else 0
    emit(out, [f"exported {count} settings to {output} ({'YAML' if _is_yaml(output) else 'JSON'})"])
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
    except RecursionError:  # both parsers recurse once per level of nesting
        raise UsageError(f"{path} is nested too deeply to be a configuration") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of settings (or an export-config document), "
                         f"got {type(data).__name__}")
    try:
        json.dumps(data)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} holds a value JSON cannot carry: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path} is nested too deeply to be a configuration") from None
    return data


def cmd_import_config(client: AdminClient, *, path: str, out: TextIO, stdin: TextIO | None = None) -> int:
    """Replace the runtime layer with a file's (keys left out follow the config file, environment and flags),
    all-or-nothing. Raises :class:`UsageError` for an unreadable file and :class:`ManageError` when the
    service rejects it.
    """
    doc = read_config_document(path, stdin)
    try:
        result = client.import_config(doc)
    except ServiceError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise ServiceError(f"{exc}; nothing was changed", exc.status, exc.field) from None
        raise
    changed = _names(result.get("changed"))
    pinned = _names(result.get("pinned"))
    lines = [f"imported {path}; changed: {', '.join(changed)}" if changed else f"imported {path}; nothing changed"]
    lines.append(f"pinned at runtime: {', '.join(pinned)}" if pinned else
                 "pinned at runtime: nothing (every setting follows the config file, environment and flags)")
    emit(out, lines)
    return EXIT_OK


# --------------------------------------------------------------------------- entry


COMMANDS = ("status", "monitor", "optimize", "set-batch-size", "enable", "disable", "start-monitoring",
            "stop-monitoring", "configure", "export-config", "import-config")


def parse_gpu_selector(value: str | None) -> int | str | None:
    """``--gpu``: an index (digits) or a UUID, passed to the service as given."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def client_from_args(args: argparse.Namespace) -> AdminClient:
    """The token: ``--token``, ``--token-file``, ``VLM_OPTIMIZER_ADMIN_TOKEN``, else the one a local
    ``serve`` generated (:func:`generated_token`). Raises :class:`UsageError` for a bad URL, timeout or
    token file."""
    url = args.url or os.environ.get(URL_ENV, "").strip() or DEFAULT_URL
    token = resolve_token(args.token, args.token_file)
    note = None
    if token is None:
        token, note = generated_token(url)
    return AdminClient(url, token, args.timeout, token_note=note)


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
            return cmd_configure(client, settings=settings, reset=args.reset or (), reset_all=args.reset_all,
                                 out=out)
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
