"""The read API over a real server on an ephemeral port, for tests: ``make_api`` and ``api`` fixtures.

Sampling is driven by the tests (``await api.tick()``) on a fake clock, with a scripted backend
whose memory figures the tests set between ticks.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.gpu.types import GpuBackend
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, no_sleep

GIB = 1024**3
TOTAL = 80 * GIB
INTERVAL = Settings().monitoring_interval  # 5 s
Client = TestClient[web.Request, web.Application]


@dataclass
class Api:
    client: Client
    engine: Engine
    sampler: Sampler
    backend: GpuBackend
    clock: FakeClock

    @property
    def gpus(self) -> ScriptedBackend:
        assert isinstance(self.backend, ScriptedBackend)
        return self.backend

    async def tick(self, advance: float = INTERVAL) -> None:
        """One sample; every sample after the first comes ``advance`` seconds after the previous."""
        if self.sampler.stats.samples:
            self.clock.advance(advance)
        assert await self.sampler.tick() is not None

    async def get(self, path: str, status: int = 200, **headers: str) -> Any:
        resp = await self.client.get(path, headers=headers)
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()

    async def post(self, body: Any, status: int = 200) -> Any:
        resp = await self.client.post("/reports", json=body)
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()

    async def metrics(self) -> str:
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        return await resp.text()


class MakeApi(Protocol):
    def __call__(self, gpus: int = 1, settings: Settings | None = None,
                 backend: GpuBackend | None = None) -> Awaitable[Api]: ...


@pytest.fixture
def make_api(aiohttp_client: AiohttpClient) -> MakeApi:
    async def make(gpus: int = 1, settings: Settings | None = None, backend: GpuBackend | None = None) -> Api:
        clock = FakeClock()
        backend = backend or ScriptedBackend(gpus)
        engine = Engine(settings or Settings(), has_gpus=backend.name != "none")  # as serve makes it
        sampler = Sampler(backend, engine, clock=clock, sleep=no_sleep)
        client = await aiohttp_client(build_app(engine, sampler, run_sampler=False))
        return Api(client, engine, sampler, backend, clock)

    return make


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    a = await make_api()
    await a.tick()
    return a
