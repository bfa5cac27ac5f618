"""The one way the client checks an argument, and its one error: :class:`InvalidArgument`.

Every client module checks what a service passes it here, so a bad argument always reads the same:
``<name>: must be <what is allowed>, got <the value>``, and is always the same type. The server has
its own validation; the client keeps this copy because it must stay dependency-free.

The checks also hold the server's rules for the values a client sends it (``service``, ``gpu``, the
optimizer's URL: docs/api.md), so that a misconfigured service fails at start-up rather than polling
or reporting into 400s forever.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from typing import Final, NoReturn

__all__ = ["DEFAULT_URL", "URL_ENV", "InvalidArgument"]

URL_ENV: Final = "VLM_OPTIMIZER_URL"
DEFAULT_URL: Final = "http://127.0.0.1:8080"

_SERVICE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_GPU_UUID_RE: Final = re.compile(r"(GPU|MIG)-[A-Za-z0-9-]{1,100}")
_MIG_SELECTOR_RE: Final = re.compile(r"[0-9]{1,2}:[0-9]{1,2}(:[0-9]{1,2})?")  # parent:gpu_instance[:compute]
MAX_GPU_INDEX: Final = 66559  # a MIG device's index may exceed 1023 (docs/architecture.md, "MIG")


class InvalidArgument(ValueError, TypeError):
    """A bad argument of a client call (or of the environment variable standing in for one).

    ``name`` is the argument, ``allowed`` what it must be, ``value`` what it was. A
    :class:`ValueError`, and a :class:`TypeError` too, so code written for either keeps catching it.
    """

    def __init__(self, name: str, allowed: str, value: object) -> None:
        super().__init__(f"{name}: must be {allowed}, got {value!r:.200}")
        self.name = name
        self.allowed = allowed
        self.value = value

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.allowed, self.value))


def fail(name: str, allowed: str, value: object) -> NoReturn:
    raise InvalidArgument(name, allowed, value)


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(name: str, value: object, lo: int, *, unit: str = "") -> int:
    """``value`` if it is an integer >= ``lo`` (``unit`` names what it counts, e.g. ``bytes``)."""
    if not is_int(value) or value < lo:  # type: ignore[operator]
        fail(name, f"an integer >= {lo}{' ' + unit if unit else ''}", value)
    assert isinstance(value, int)
    return value


def optional_integer(name: str, value: object, lo: int) -> int | None:
    return None if value is None else integer(name, value, lo)


def number(name: str, value: object, allowed: str, *, lo: float = -math.inf, hi: float = math.inf,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the range; ``allowed`` says the range in words."""
    if not is_number(value):
        fail(name, allowed, value)
    v = float(value)  # type: ignore[arg-type]
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        fail(name, allowed, value)
    return v


def seconds(name: str, value: object, *, zero: bool = False) -> float:
    """A finite number of seconds, > 0 (>= 0 with ``zero``)."""
    return number(name, value, f"a finite number of seconds {'>= 0' if zero else '> 0'}", lo=0.0, lo_open=not zero)


def service(value: object) -> str:
    """A service name as the optimizer accepts it."""
    if not isinstance(value, str) or not _SERVICE_RE.fullmatch(value):
        fail("service", "1-128 characters (letters, digits, . _ : / -) starting with a letter or digit", value)
    return value


def gpu(value: object) -> int | str | None:
    """A GPU as the optimizer accepts it: ``None``, an index, a UUID, or a MIG device ``parent:instance``."""
    if value is None:
        return None
    if is_int(value):
        assert isinstance(value, int)
        if not 0 <= value <= MAX_GPU_INDEX:
            fail("gpu", f"a GPU index in [0, {MAX_GPU_INDEX}]", value)
        return value
    if isinstance(value, str) and (re.fullmatch(r"[0-9]{1,5}", value) or _GPU_UUID_RE.fullmatch(value)
                                   or _MIG_SELECTOR_RE.fullmatch(value)):
        return value
    fail("gpu", "a GPU index (0, 1, ...), a UUID (GPU-..., MIG-...) or a MIG device as parent:instance "
         "(e.g. 0:1)", value)


def optimizer_url(value: object) -> str:
    """The optimizer's base URL without a trailing slash: ``value``, else ``$VLM_OPTIMIZER_URL``, else
    :data:`DEFAULT_URL`; ``http`` or ``https`` with a host, and no query or fragment."""
    base = value if value is not None else (os.environ.get(URL_ENV) or DEFAULT_URL)
    if not isinstance(base, str):
        fail("url", "a string", base)
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        fail("url", "http:// or https:// with a host and no query", base)
    return base.rstrip("/")
