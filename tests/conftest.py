"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api_harness import api, make_api  # noqa: F401 (fixtures of the read API over a real server)
from tests.logcapture import LogList, capture_all_logs


@pytest.fixture
def logs() -> Iterator[LogList]:
    """Every structlog event of the test."""
    yield from capture_all_logs()
