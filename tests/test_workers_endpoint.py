"""GET /workers: the worker count for the GPU the optimizer sees (seed 000's formula)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.api.app import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from tests.fakes import GIB, FakeClock, ScriptedBackend



async def client(aiohttp_client: AiohttpClient, total: int = 24 * GIB) -> TestClient:  # type: ignore[type-arg]
    engine = Engine(Settings())
    sampler = Sampler(ScriptedBackend(1, total=total, used=2 * GIB), engine, clock=FakeClock())
    await sampler.tick()
    return await aiohttp_client(build_app(engine, sampler, run_sampler=False))


async def test_vram_bounds_the_workers(aiohttp_client: AiohttpClient) -> None:
    c = await client(aiohttp_client, total=24 * 1024 * 1024 * 1024)
    r = await c.get("/workers?gpu_mem_typ_mb=6000&cores=8")
    assert r.status == 200
    body = await r.json()
    assert body["cpu_workers"] == 17 and body["vram_workers"] == 4 and body["workers"] == 4
    assert body["gpu"]["index"] == 0


async def test_cpu_bounds_the_workers(aiohttp_client: AiohttpClient) -> None:
    c = await client(aiohttp_client, total=80 * GIB)
    body = await (await c.get("/workers?gpu_mem_typ_mb=1000&cores=2")).json()
    assert body["workers"] == 5 and body["vram_workers"] == 81


async def test_bad_parameters_are_named(aiohttp_client: AiohttpClient) -> None:
    c = await client(aiohttp_client)
    for query, name in (("", "gpu_mem_typ_mb"), ("gpu_mem_typ_mb=0", "gpu_mem_typ_mb"),
                        ("gpu_mem_typ_mb=abc", "gpu_mem_typ_mb"), ("gpu_mem_typ_mb=²", "gpu_mem_typ_mb"),
                        ("gpu_mem_typ_mb=6000&cores=1.5", "cores"), ("gpu_mem_typ_mb=6000&gpu=3", "gpu")):
        r = await c.get(f"/workers?{query}")
        assert r.status == 400, query
        assert (await r.json()).get("parameter") == name, query
