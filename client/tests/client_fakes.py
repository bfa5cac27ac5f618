"""Doubles the client's tests share: a fake optimizer for ``POST /reports`` (an aiohttp server on a free
port), the CI rule for optional modules, the OOM PyTorch raises, and a stand-in ``torch.cuda``. Nothing of
the optimizer's server is imported here; the server's tests of the client (tests/test_client_*.py) import
these from here (pyproject's pytest ``pythonpath`` puts client/tests on the path)."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid as pyuuid
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from vlm_optimizer_client import BatchSizeClient, telemetry

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


OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB"


class OutOfMemoryError(RuntimeError):
    """What the library sees of ``torch.cuda.OutOfMemoryError`` when PyTorch is not installed."""


def _oom_class() -> type[Exception]:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        if in_ci():  # make test installs PyTorch (the dev extras): without it these tests test less
            raise
        return OutOfMemoryError
    return cast(type[Exception], torch.cuda.OutOfMemoryError)


OOM_ERROR = _oom_class()
"""PyTorch's ``torch.cuda.OutOfMemoryError`` when PyTorch is installed (the dev extras install it, and
under CI its absence fails), else a class of the same name and base, as the library sees it without it."""


def oom(note: str = "") -> Exception:
    return OOM_ERROR(OOM_TEXT + note)


@dataclass
class FakeReporter:
    """Records what recovery reports."""

    calls: list[tuple[int, bool]] = field(default_factory=list)

    def report(self, batch_size: int, *, oom: bool = False) -> None:
        self.calls.append((batch_size, oom))



def wait_until_ready(proc: subprocess.Popen[str], url: str, timeout: float) -> None:
    """Poll ``url``/ready until it answers 200; fail if ``proc`` exits first or ``timeout`` seconds pass.

    A bounded poll of another process's readiness (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the optimizer exited with {proc.returncode}: {err}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the optimizer did not become ready within {timeout:g} s"
        time.sleep(0.05)


def decision(batch_size: int) -> dict[str, Any]:
    return {"service": "svc", "batch_size": batch_size, "optimal_batch_size": batch_size, "reason": "scripted"}


@dataclass
class Upstream:
    """A fake optimizer: answers each ``POST /reports`` with the next scripted (status, body), and
    records the bodies. ``stall`` makes it wait for ``release`` after a request arrived."""

    script: list[tuple[int, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stall: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.server.host}:{self.server.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.arrived.set()
        if self.stall:
            await self.release.wait()
        status, text = self.script.pop(0) if self.script else (200, json.dumps(decision(4)))
        return web.Response(status=status, text=text, content_type="application/json")



@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    """A running :class:`Upstream` on a free port (import this fixture where it is used)."""
    up = Upstream()
    app = web.Application()
    app.router.add_post("/reports", up.handle)
    up.server = await aiohttp_server(app)
    return up


@pytest.fixture(params=["aiohttp", "thread"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the async reporter sends: aiohttp, and urllib in a worker thread without aiohttp."""
    mode: str = request.param
    if mode == "thread":
        monkeypatch.setattr(telemetry, "_load_aiohttp", lambda: None)
    return mode

class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def uuid_of(i: int) -> str:
    """A GPU UUID that shows its index."""
    return f"GPU-{i:08d}-0000-4000-8000-000000000000"


@dataclass
class Sink:
    """A DecisionSink that records the decisions it gets."""

    decisions: list[dict[str, Any]] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)

    def apply_decision(self, decision: dict[str, Any]) -> None:
        self.decisions.append(decision)
        self.received.set()

    async def wait(self) -> bool:
        return await asyncio.to_thread(self.received.wait, 10)


class CUuuid:
    """What ``torch.cuda.get_device_properties(i).uuid`` is: it prints without the ``GPU-`` prefix."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class RawCUuuid(CUuuid):
    """A ``_CUuuid`` that prints its bytes undecoded (PyTorch 2.4), with the ``bytes`` of later versions."""

    def __init__(self, uuid: str) -> None:
        super().__init__("\x8f\xfe")
        self.bytes = pyuuid.UUID(uuid.removeprefix("GPU-")).bytes


class FakeCuda:
    """The part of ``torch.cuda`` the library reads, recording each call.

    A stand-in for a PyTorch *with CUDA* (a device, its UUID, allocator figures): those paths cannot run
    on the CPU build the suite installs. What the real module does without CUDA is in test_client_torch.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.initialized = True
        self.uuid: CUuuid | None = CUuuid(uuid_of(0).removeprefix("GPU-"))
        self.peak = self.allocated = self.reserved = self.inactive = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, index: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(name="Test GPU") if self.uuid is None else types.SimpleNamespace(uuid=self.uuid)

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.calls.append(f"reset {device}")

    def max_memory_allocated(self, device: Any = None) -> int:
        self.calls.append(f"max {device}")
        return self.peak

    def memory_allocated(self, device: Any = None) -> int:
        self.calls.append(f"allocated {device}")
        return self.allocated

    def memory_reserved(self, device: Any = None) -> int:
        self.calls.append(f"reserved {device}")
        return self.reserved

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        self.calls.append(f"stats {device}")
        return {"inactive_split_bytes.all.current": self.inactive, "num_ooms": 0}

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """A ``FakeCuda`` as ``torch.cuda`` of a stand-in ``torch`` module, for the test's duration."""
    fake = FakeCuda()
    torch = types.ModuleType("torch")
    setattr(torch, "cuda", fake)
    monkeypatch.setitem(sys.modules, "torch", torch)
    return fake


# --------------------------------------------------------------------------- following the batch size

LOGGER = "vlm_optimizer_client"


@dataclass
class Calls:
    """What the callbacks saw, from whichever thread ran them."""

    changes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    cleanups: list[int] = field(default_factory=list)

    def on_change(self, batch: int, decision: dict[str, Any]) -> None:
        self.changes.append((batch, decision))

    def on_cleanup(self, epoch: int) -> None:
        self.cleanups.append(epoch)

    @property
    def values(self) -> list[int]:
        return [b for b, _ in self.changes]


def sync_client(url: str, calls: Calls | None = None, **kwargs: Any) -> BatchSizeClient:
    calls = calls or Calls()
    kwargs.setdefault("clock", FakeClock(0.0))
    kwargs.setdefault("rng", random.Random(7))
    return BatchSizeClient("svc-a", url=url, on_change=calls.on_change, on_cleanup=calls.on_cleanup, **kwargs)


async def poll(client: BatchSizeClient) -> float:
    return await asyncio.to_thread(client.poll_once)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def records(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level and text in r.getMessage()]


class MaxRandom(random.Random):
    """Full jitter at its upper bound, so that the bound itself shows."""

    def random(self) -> float:
        return 1.0
