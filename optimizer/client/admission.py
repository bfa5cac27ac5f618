"""Deprecated: ``optimizer.client.admission`` is now ``vlm_optimizer_client`` (docs/client.md); a re-export for one release."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import vlm_optimizer_client.admission
import vlm_optimizer_client.profiles
import vlm_optimizer_client.workers
import vlm_optimizer_client.hardware
import vlm_optimizer_client.limits
import vlm_optimizer_client._torch
from vlm_optimizer_client.admission import *  # noqa: F403 - the re-export

_FROM: tuple[ModuleType, ...] = (vlm_optimizer_client.admission, vlm_optimizer_client.profiles, vlm_optimizer_client.workers, vlm_optimizer_client.hardware, vlm_optimizer_client.limits, vlm_optimizer_client._torch,)


def __getattr__(name: str) -> Any:
    """Any other name of the modules this one was split into."""
    for module in _FROM:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
