"""What the optimizer answers: a decision (``GET /batch-size``, the reply to ``POST /reports``).

:func:`parse_decision` checks one; :class:`BadAnswer` is what an answer that is not one raises. Both
faces of the follower and the reporter read answers through here.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Callable, Mapping
from typing import Any, Final

from vlm_optimizer_client.validate import is_int, is_number

__all__ = ["BadAnswer", "parse_decision"]


class BadAnswer(ValueError):
    """The optimizer answered, but not with a decision (a non-JSON body, a missing or mistyped field,
    an HTTP error status)."""



def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _natural_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _string(v: object) -> bool:
    return isinstance(v, str)


def _object_or_null(v: object) -> bool:
    return v is None or isinstance(v, dict)


# field -> (check, what it must be): batch_size is required, the others are checked when present
_REQUIRED: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "batch_size": (_positive_int, "an integer >= 1"),
}
_OPTIONAL: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "cleanup_epoch": (_natural_int, "an integer >= 0"),
    "optimal_batch_size": (_positive_int, "an integer >= 1"),
    "service": (_string, "a string"),
    "strategy": (_string, "a string"),
    "pressure": (_string, "a string"),
    "reason": (_string, "a string"),
    "updated_at": (is_number, "a number"),
    "gpu": (_object_or_null, "an object or null"),
}


def parse_decision(body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """A decision of the optimizer (the body of ``GET /batch-size`` or of the reply to ``POST /reports``).

    ``body`` is the raw body (bytes, UTF-8) or the already decoded JSON object. Returns a new dict.
    ``batch_size`` is required (an integer >= 1); the other documented fields are checked when present
    (``cleanup_epoch`` an integer >= 0, ``optimal_batch_size`` an integer >= 1, ``service``,
    ``strategy``, ``pressure``, ``reason`` strings, ``updated_at`` a number, ``gpu`` an object or
    null). Unknown fields are kept. Raises :class:`BadAnswer` (a :class:`ValueError`) otherwise.
    """
    if isinstance(body, (bytes, str)):
        try:
            obj: object = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadAnswer(f"not JSON ({exc})") from None
    else:
        obj = body
    if not isinstance(obj, Mapping):
        raise BadAnswer(f"not a JSON object: {type(obj).__name__}")
    for key, (ok, what) in _REQUIRED.items():
        if key not in obj:
            raise BadAnswer(f"no {key}")
        if not ok(obj[key]):
            raise BadAnswer(f"{key} must be {what}, got {obj[key]!r:.64}")
    for key, (ok, what) in _OPTIONAL.items():
        if key in obj and not ok(obj[key]):
            raise BadAnswer(f"{key} must be {what}, got {obj[key]!r:.64}")
    return dict(obj)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by name, whatever the case of the mapping's keys."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for k, v in headers.items():
        if k.lower() == lower:
            return v
    return None


def _error_of(status: int, body: bytes) -> str:
    """A one-line description of an HTTP error answer, with the server's message when it sent one."""
    detail = ""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            detail = f": {obj['error']}"
    except (ValueError, RecursionError):
        pass
    return f"HTTP {status}{detail}"[:300]


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason  # "URLError: <urlopen error [Errno 111] ...>" says less than its reason
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _gpu_identity(decision: Mapping[str, Any]) -> object:
    """What tells the GPU a decision is about apart: its UUID, else its index (``None`` without GPU)."""
    gpu = decision.get("gpu")
    if not isinstance(gpu, dict):
        return None
    return gpu.get("uuid") or gpu.get("index")
