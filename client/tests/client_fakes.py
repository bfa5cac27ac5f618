"""Doubles the client's tests share: a fake optimizer for ``POST /reports`` (an aiohttp server on a free
port), and the CI rule for optional modules. Nothing of the optimizer's server is imported here."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

HOUR = 3600.0  # an interval that never elapses during a test: only flush(), OOMs and stop() send


def in_ci() -> bool:
    """``CI`` is set to anything but empty, ``0`` or ``false`` (as the server's tests/tools.py)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_module(name: str) -> ModuleType:
    """The Python module ``name``, imported; skipped without it, failed under CI (make test installs it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if in_ci():
            pytest.fail(f"the Python module {name} is not installed: make test installs the dev extras")
        pytest.skip(f"the Python module {name} is not installed")


def decision(batch_size: int) -> dict[str, Any]:
    return {"service": "svc", "batch_size": batch_size, "optimal_batch_size": batch_size, "reason": "scripted"}


@dataclass
class Upstream:
    """A fake optimizer: answers each ``POST /reports`` with the next scripted (status, body), and
    records the bodies."""

    script: list[tuple[int, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.server.host}:{self.server.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        status, text = self.script.pop(0) if self.script else (200, json.dumps(decision(4)))
        return web.Response(status=status, text=text, content_type="application/json")


class FakeClock:
    """A clock that moves only when told to (as the server's tests/fakes.py)."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def uuid_of(i: int) -> str:
    """A GPU UUID that shows its index (as the server's tests/fakes.py)."""
    return f"GPU-{i:08d}-0000-4000-8000-000000000000"


@dataclass
class Sink:
    """A DecisionSink that records the decisions it gets (as the server's tests/fakes.py)."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)

    def apply_decision(self, decision: dict[str, Any]) -> None:
        self.decisions.append(decision)
        self.received.set()

    async def wait(self) -> bool:
        return await asyncio.to_thread(self.received.wait, 10)
