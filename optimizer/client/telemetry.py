"""Deprecated: ``optimizer.client.telemetry`` is now ``vlm_optimizer_client`` (docs/client.md); a re-export for one release."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import vlm_optimizer_client.telemetry
import vlm_optimizer_client._reporting
import vlm_optimizer_client.measuring
import vlm_optimizer_client._torch
import vlm_optimizer_client.validate
from vlm_optimizer_client.telemetry import *  # noqa: F403 - the re-export

_FROM: tuple[ModuleType, ...] = (vlm_optimizer_client.telemetry, vlm_optimizer_client._reporting, vlm_optimizer_client.measuring, vlm_optimizer_client._torch, vlm_optimizer_client.validate,)


def __getattr__(name: str) -> Any:
    """Any other name of the modules this one was split into."""
    for module in _FROM:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
