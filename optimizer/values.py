"""Reading setting values written as text (YAML, environment variables, flags); shared by the config layers."""

from __future__ import annotations

import re
from typing import Any

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
BOOL_RULE = "true or false"


def parse_bool(value: Any) -> bool | None:
    """``value`` as a boolean (``true``/``1``/``yes``/``on`` and their opposites, any case); ``None`` if it is none."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


#: A service name, in the HTTP API and in pod annotations (use with ``fullmatch``).
SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
SERVICE_RULE = "1-128 characters: letters, digits and . _ : / - (starting with a letter or digit)"
