"""Request validation and response shapes of the read API."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any, Protocol

from optimizer import fields
from optimizer.fields import FieldError
from optimizer.gpu.types import MAX_GPU_INDEX, MIG_SELECTOR_RE, GpuSample
from optimizer.policy.types import Event

MAX_REPORT_BYTES = 64 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0  # serve sets server.body_timeout (optimizer.api.timeouts)
MAX_BYTES_FIELD = 1 << 50  # 1 PiB: anything above is a client bug, not a GPU


#: A request parameter (``kind="parameter"``) or body field (``kind="field"``) is invalid; ``name`` says which.
#: The one "bad field" error, :class:`~optimizer.fields.FieldError`; its ``body()`` is the 400 answer.
InvalidInput = FieldError


def parse_service(value: Any, name: str = "service", kind: str = "parameter") -> str:
    return fields.as_service(name, value, kind=kind)


POD_RE = re.compile(r"([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
POD_RULE = "a pod name (lower-case letters, digits, '-' and '.'), optionally namespace/name"


def parse_pod(value: Any, name: str = "pod", kind: str = "parameter") -> str | None:
    """The pod a poll or report comes from (``None`` when absent): how discovery learns its GPU."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 317 or not POD_RE.fullmatch(value):
        raise InvalidInput(name, f"must be {POD_RULE}, got {str(value)[:64]!r}", kind=kind)
    return value


GPU_RULE = ("a GPU index (0, 1, ...), a UUID (GPU-..., MIG-...) or a MIG device as parent:instance "
            "(e.g. 0:1: GPU 0, GPU instance 1)")


def parse_gpu(value: Any, name: str = "gpu", kind: str = "parameter") -> int | str | None:
    """A GPU index, a UUID (``GPU-...``/``MIG-...``) or ``parent:gi[:ci]`` (a MIG device); ``None`` when absent.

    Indexes go up to :data:`MAX_GPU_INDEX`: a MIG device's index (docs/architecture.md, "MIG") is
    what ``/batch-size`` answers, and a service may send it back.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInput(name, f"must be {GPU_RULE}", kind=kind)
    if isinstance(value, int):
        if value < 0 or value > MAX_GPU_INDEX:
            raise InvalidInput(name, f"must be a GPU index in [0, {MAX_GPU_INDEX}], got {value}", kind=kind)
        return value
    if isinstance(value, str):
        if re.fullmatch(r"[0-9]{1,5}", value):
            return parse_gpu(int(value), name, kind)
        if re.fullmatch(r"(GPU|MIG)-[A-Za-z0-9-]{1,100}", value) or MIG_SELECTOR_RE.fullmatch(value):
            return value
    raise InvalidInput(name, f"must be {GPU_RULE}, got {str(value)[:64]!r}", kind=kind)


def _opt_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    return None if v is None else fields.as_int(key, v, lo, hi, text=False)


REPORT_FIELDS = ("service", "gpu", "pod", "batch_size", "peak_bytes", "allocated_bytes", "reserved_bytes",
                 "inactive_split_bytes", "oom")


@dataclass(frozen=True)
class ReportIn:
    service: str
    gpu: int | str | None
    batch_size: int | None
    peak_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    oom: bool
    pod: str | None = None
    inactive_split_bytes: int | None = None


def parse_report(body: Any) -> ReportIn:
    """Validate a ``POST /reports`` body; raises :class:`InvalidInput` naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object", kind="field")
    unknown = sorted(set(body) - set(REPORT_FIELDS))
    if unknown:
        raise fields.unknown_key(unknown[0], REPORT_FIELDS, noun="field")
    oom = body.get("oom", False)
    oom = fields.as_bool("oom", oom, text=False)
    report = ReportIn(
        service=parse_service(body.get("service"), kind="field"),
        gpu=parse_gpu(body.get("gpu"), kind="field"),
        batch_size=_opt_int(body, "batch_size", 1, 1 << 20),
        peak_bytes=_opt_int(body, "peak_bytes", 0, MAX_BYTES_FIELD),
        allocated_bytes=_opt_int(body, "allocated_bytes", 0, MAX_BYTES_FIELD),
        reserved_bytes=_opt_int(body, "reserved_bytes", 0, MAX_BYTES_FIELD),
        oom=oom,
        pod=parse_pod(body.get("pod"), kind="field"),
        inactive_split_bytes=_opt_int(body, "inactive_split_bytes", 0, MAX_BYTES_FIELD),
    )
    if oom and report.batch_size is None:
        raise InvalidInput("batch_size", "is required when oom is true (the batch size that ran out of memory)",
                           kind="field")
    return report


def parse_limit(value: str | None, default: int, hi: int) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", value) or not 1 <= int(value) <= hi:
        raise InvalidInput("limit", f"must be an integer in [1, {hi}], got {value[:32]!r}", kind="parameter")
    return int(value)


def parse_positive(value: str | None, name: str, *, hi: float, integer: bool = False) -> float:
    """A required positive number from a query parameter (ASCII digits, optionally one decimal point)."""
    what = "an integer" if integer else "a number"
    pattern = r"[0-9]{1,9}" if integer else r"[0-9]{1,9}(\.[0-9]{1,6})?"
    if value is None or not re.fullmatch(pattern, value) or not 0 < float(value) <= hi:
        raise InvalidInput(name, f"must be {what} in (0, {hi:g}], got {str(value)[:32]!r}", kind="parameter")
    return float(value)


class StreamReaderLike(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class BodyTimeout(Exception):
    """The request body did not arrive within its read timeout (answered 408, the connection closed)."""


async def read_limited(content: StreamReaderLike, limit: int = MAX_REPORT_BYTES, *,
                       timeout: float = DEFAULT_BODY_TIMEOUT_S) -> bytes | None:
    """The whole request body, or ``None`` when it is longer than ``limit`` bytes.

    A body may arrive in pieces (chunked, or split by the network): read to its end or past the limit,
    all within ``timeout`` seconds, else :class:`BodyTimeout` (a client sending a byte at a time
    must not hold a handler forever).
    """
    raw = b""
    try:
        async with asyncio.timeout(timeout):
            while len(raw) <= limit:
                chunk = await content.read(limit + 1 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except TimeoutError:
        raise BodyTimeout(f"body: not received within {timeout:g} s ({len(raw)} bytes came)") from None
    return None if len(raw) > limit else raw


def sample_dict(g: GpuSample) -> dict[str, Any]:
    return {
        "index": g.index,
        "uuid": g.uuid,
        "name": g.name,
        "timestamp": g.timestamp,
        "failed": g.failed,
        "error": g.error,
        "memory_total_bytes": g.memory_total_bytes,
        "memory_used_bytes": g.memory_used_bytes,
        "memory_free_bytes": g.memory_free_bytes,
        "memory_reserved_bytes": g.memory_reserved_bytes,
        "memory_usage_percent": None if g.usage_fraction is None else round(g.usage_fraction * 100, 2),
        "temperature_celsius": g.temperature_celsius,
        "power_usage_watts": g.power_usage_watts,
        "power_limit_watts": g.power_limit_watts,
        "utilization_percent": g.utilization_percent,
        "processes": [{"pid": p.pid, "used_memory_bytes": p.used_memory_bytes} for p in g.processes],
        # MIG (null on a whole GPU): the parent, the instance IDs, the profile, the parent:instance selector
        "mig": None if not g.is_mig else {
            "parent_index": g.parent_index, "parent_uuid": g.parent_uuid, "gpu_instance_id": g.gpu_instance_id,
            "compute_instance_id": g.compute_instance_id, "profile": g.mig_profile, "selector": g.mig_selector},
        "health": health_dict(g),
    }


def health_dict(g: GpuSample) -> dict[str, Any]:
    """A GPU's health fields (``null`` where the board cannot tell); see docs/api.md."""
    return {
        "xid_errors": None if g.xid_errors is None else {str(code): n for code, n in g.xid_errors},
        "last_xid": g.last_xid,
        "last_xid_at": g.last_xid_at,
        "ecc_errors": {
            "volatile": {"corrected": g.ecc_corrected_volatile, "uncorrected": g.ecc_uncorrected_volatile},
            "aggregate": {"corrected": g.ecc_corrected_aggregate, "uncorrected": g.ecc_uncorrected_aggregate},
        },
        "retired_pages": {"single_bit_ecc": g.retired_pages_sbe, "double_bit_ecc": g.retired_pages_dbe,
                          "pending": g.retired_pages_pending},
        "remapped_rows": {"correctable": g.remapped_rows_correctable, "uncorrectable": g.remapped_rows_uncorrectable,
                          "pending": g.remapped_rows_pending, "failure": g.remapped_rows_failure},
        "throttle_reasons": None if g.throttle_reasons is None else sorted(g.throttle_reasons),
    }


def event_dict(e: Event) -> dict[str, Any]:
    return {k: v for k, v in (("kind", e.kind), ("gpu", e.gpu), ("timestamp", e.timestamp), ("service", e.service),
                              ("trigger", e.trigger), ("old", e.old), ("new", e.new),
                              ("freed_bytes", e.freed_bytes), ("detail", e.detail)) if v is not None}
