"""One way to check a field, and one error for a bad one: settings (file, environment, flags, the admin
API), Kubernetes settings, and the read and admin APIs' parameters and body fields.

Every check takes the field's ``name`` (as the user wrote it: ``server.port``, ``kubernetes.namespaces``,
``batch_size``) and the raw value, and returns the value in its type or raises :class:`FieldError`,
which names the field, says what is wrong and what is allowed. ``optimizer.config.ConfigError`` and
``optimizer.api.schemas.InvalidInput`` are this same class under the names their callers know.

``text=True`` (the default) accepts a value written as text, as it comes from YAML, an environment
variable or a flag (``"8"``, ``"true"``, ``8.0``); ``text=False`` takes JSON's own types only, as the
HTTP APIs do (``"8"`` is not an integer there).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from optimizer.values import BOOL_RULE, SERVICE_RE, SERVICE_RULE, parse_bool

E = TypeVar("E", bound=enum.Enum)


class FieldError(ValueError):
    """A field is invalid: ``name`` names it, ``message`` says why, ``allowed`` what it takes (or ``None``).

    ``kind`` is how an HTTP answer names it: ``{"error": str(exc), kind: name}`` (``"parameter"`` for a
    query parameter, ``"field"`` for a body field or a setting).
    """

    def __init__(self, name: str, message: str, *, allowed: str | None = None, kind: str = "field") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message
        self.allowed = allowed
        self.kind = kind

    @property
    def key(self) -> str:
        """The field's name (the settings' word for it)."""
        return self.name

    def body(self) -> dict[str, str]:
        """The HTTP 400 body: the message, and the field under ``kind``."""
        return {"error": str(self), self.kind: self.name}


def _fail(name: str, message: str, allowed: str, kind: str) -> FieldError:
    return FieldError(name, message, allowed=allowed, kind=kind)


def as_bool(name: str, value: Any, *, text: bool = True, kind: str = "field") -> bool:
    """``true``/``false`` (with ``text``: also ``1``/``yes``/``on`` and their opposites, any case)."""
    parsed = parse_bool(value) if text else value if isinstance(value, bool) else None
    if parsed is None:
        raise _fail(name, f"must be {BOOL_RULE}, got {value!r}", BOOL_RULE, kind)
    return parsed


def as_int(name: str, value: Any, lo: int, hi: int, *, text: bool = True, kind: str = "field") -> int:
    """An integer in ``[lo, hi]`` (never a boolean; with ``text``: also ``"8"`` and ``8.0``)."""
    allowed = f"an integer in [{lo}, {hi}]"
    i: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        i = value
    elif text and isinstance(value, float) and value.is_integer():
        i = int(value)
    elif text and isinstance(value, str):
        try:
            i = int(value)
        except ValueError:
            i = None
    if i is None or not lo <= i <= hi:
        raise _fail(name, f"must be {allowed}, got {value!r}", allowed, kind)
    return i


def as_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, text: bool = True,
             kind: str = "field") -> float:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); never a boolean."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    allowed = f"a number in {rng}"
    f: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
    elif text and isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            f = None
    if f is None:
        raise _fail(name, f"must be a number, got {value!r}", allowed, kind)
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise _fail(name, f"must be in {rng}, got {value!r}", allowed, kind)
    return f


def as_choice(name: str, value: Any, choices: Sequence[str], *, kind: str = "field") -> str:
    """One of ``choices`` (lower-case words; the value is matched without case or surrounding spaces)."""
    allowed = f"one of {', '.join(choices)}"
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise _fail(name, f"must be {allowed}, got {value!r}", allowed, kind)


def as_enum(name: str, value: Any, enum_type: type[E], *, kind: str = "field") -> E:
    """A member of ``enum_type``, or its value written as text."""
    if isinstance(value, enum_type):
        return value
    return enum_type(as_choice(name, value, [str(m.value) for m in enum_type], kind=kind))


def as_names(name: str, value: Any, pattern: re.Pattern[str], rule: str, *, what: str,
             kind: str = "field") -> tuple[str, ...]:
    """A list of names (or one comma-separated string), each matching ``pattern``; blanks dropped, duplicates
    dropped keeping the first. ``what`` says what a name is (``namespace``), ``rule`` what it may hold."""
    items = value.split(",") if isinstance(value, str) else [] if value is None else value
    if not isinstance(items, (list, tuple)):
        raise _fail(name, f"must be a list of {what}s (or comma-separated), got {value!r}", f"a list of {what}s",
                    kind)
    out = tuple(str(n).strip() for n in items if str(n).strip())
    for n in out:
        if not pattern.fullmatch(n):
            raise _fail(name, f"{n!r} is not a {what} name ({rule})", rule, kind)
    return tuple(dict.fromkeys(out))


def as_service(name: str, value: Any, *, kind: str = "field") -> str:
    """A service name (:data:`~optimizer.values.SERVICE_RE`), required."""
    if not isinstance(value, str) or not value:
        raise _fail(name, f"is required ({SERVICE_RULE})", SERVICE_RULE, kind)
    if not SERVICE_RE.fullmatch(value):
        raise _fail(name, f"must be {SERVICE_RULE}, got {value[:64]!r}", SERVICE_RULE, kind)
    return value


def unknown_key(name: str, allowed: Sequence[str], *, noun: str = "key", kind: str = "field") -> FieldError:
    """The error for a key that is not one of ``allowed`` (to raise)."""
    listed = ", ".join(allowed)
    return FieldError(name, f"unknown {noun}; allowed {noun}s are {listed}", allowed=listed, kind=kind)
