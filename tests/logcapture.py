"""Capturing structlog events in tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import structlog
from structlog.testing import capture_logs

LogList = list[MutableMapping[str, Any]]


def capture_all_logs() -> Iterator[LogList]:
    """Every structlog event, whatever level another test configured (``serve`` and ``simulate`` filter
    below warning); the configuration is restored afterwards."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**saved)


def events_named(logs: LogList, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]
