"""GET /workers: the worker count for the GPU the optimizer sees (seed 000's formula)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.api.app import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from optimizer.workers import plan_workers as server_plan
from tests.fakes import GIB, FakeClock, ScriptedBackend
from vlm_optimizer_client.workers import plan_workers as client_plan



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


def test_the_servers_formula_is_the_clients() -> None:
    """optimizer/workers.py and vlm_optimizer_client.workers are two copies of one formula (docs/architecture.md):
    they agree on every figure, the body's fields included, over a grid with the edge cases."""
    for cores in (1, 2, 7, 64):
        for total in (None, 0.0, 500.0, 6000.0, 81559.0, 1e6):
            for typ in (0.0, -1.0, 0.5, 1000.0, 6000.0, 90000.0, float("inf")):
                server = server_plan(cores, total, typ).as_dict()
                client = client_plan(cores=cores, total_vram_mb=total, gpu_mem_typ_mb=typ, environ={}).as_dict()
                assert server == client, (cores, total, typ)
