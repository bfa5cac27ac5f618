"""Which pod a client runs in, so the optimizer knows which GPU that pod uses.

Set ``POD_NAME`` from the Downward API (``fieldRef: metadata.name``) in the VLM pod and every poll
and report carries it; without it the optimizer must count the pod on every GPU of its node.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

POD_ENV: Final = "POD_NAME"
_POD_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def pod_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``$POD_NAME`` if it holds a valid pod name, else ``None`` (a bad value is not sent)."""
    value = (os.environ if environ is None else environ).get(POD_ENV, "").strip()
    return value if _POD_RE.fullmatch(value) else None
