"""How the management commands print GPUs and services for people (``status``, ``monitor``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from optimizer.manage.client import GIB


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
    mig = gpu.get("mig")
    if isinstance(mig, Mapping):  # a MIG device: its place on the parent
        head += (f"  MIG {mig.get('profile') or '?'} {mig.get('selector') or ''} on GPU {mig.get('parent_index')}"
                 f" ({mig.get('parent_uuid') or 'no uuid'})")
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
    lines = ["optimizer: " + ", ".join(flags), "policy:    " + ", ".join(policy), runtime_line(status)]
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


def runtime_line(status: Mapping[str, Any]) -> str:
    """Which settings are pinned at runtime (admin API), over the config file, environment and flags."""
    pinned = status.get("runtime_settings")
    if not isinstance(pinned, dict):
        return "pinned:    unknown (the service does not say)"
    if not pinned:
        return "pinned:    nothing (every setting follows the config file, environment and flags)"
    items = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(pinned.items()))
    return f"pinned:    {items} (configure --reset KEY or --reset-all unpins)"


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


def change_lines(changes: list[Any]) -> list[str]:
    """Batch changes (``{service, gpu, old, new}``, or ``batch_changed`` events), one indented line each."""
    return [f"  {c.get('service')} on GPU {c.get('gpu')}: {c.get('old')} -> {c.get('new')}"
            for c in changes if isinstance(c, dict)]


def deferred_lines(deferred: list[Any]) -> list[str]:
    """The optimizations that wait (``deferred`` of optimize and enable): one line per GPU with its
    services, and when and why (the service's own words)."""
    by_gpu: dict[Any, tuple[list[str], str]] = {}
    for d in deferred:
        if isinstance(d, dict):
            names, _ = by_gpu.setdefault(d.get("gpu"), ([], str(d.get("reason", ""))))
            names.append(str(d.get("service")))
    return [f"  GPU {gpu} ({', '.join(names)}): {why}" for gpu, (names, why) in by_gpu.items()]


def _services(n: int) -> str:
    return f"{n} service{'' if n == 1 else 's'}"


def optimize_lines(changes: list[Any], deferred: list[Any], *, head: str) -> list[str]:
    """What an optimization did (``head``: what ran) and what it deferred; never silent."""
    lines = [f"{head}: {'no batch size changed' if not changes else _count(len(changes), 'batch size') + ' changed'}"]
    lines += change_lines(changes)
    if deferred:
        lines.append(f"optimization deferred for {_services(len(deferred))}:")
        lines += deferred_lines(deferred)
    return lines


def now_stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def emit(out: TextIO, lines: list[str]) -> None:
    out.write("\n".join(lines) + "\n")
    out.flush()
