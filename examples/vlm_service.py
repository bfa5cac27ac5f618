"""A minimal VLM-style aiohttp service that follows the optimizer, with a fake model (no GPU needed).

    .venv/bin/vlm-gpu-optimizer serve --backend simulated &
    .venv/bin/python examples/vlm_service.py --port 9000 &
    curl -s -X POST localhost:9000/caption -H 'Content-Type: application/json' -d '{"images": ["a", "b", "c"]}'
    curl -s localhost:9000/hw
    curl -s localhost:9000/workers

It uses every piece of ``vlm_optimizer_client``: the batch size it captions with comes from the optimizer
(AsyncBatchSizeClient), each batch is measured and reported (AsyncReporter, measure), an OOM is
recovered (recover_oom) and reported, requests are admitted only when the GPU has room for them
(VRAMGuard + vram_middleware: 503 with Retry-After otherwise), work is limited per kind
(ConcurrencyLimits), and /hw and /workers show the hardware summary and the worker count.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from vlm_optimizer_client import (
    AsyncBatchSizeClient,
    AsyncReporter,
    ConcurrencyLimits,
    VRAMGuard,
    VRAMProfiles,
    hw_summary_from_decision,
    measure,
    plan_workers,
    recover_oom,
    vram_middleware,
)

MIB = 1024 * 1024
PER_ITEM_MIB = 512  # what the fake model "needs" per image; a real service measures it (measure())

FOLLOWER = web.AppKey("follower", AsyncBatchSizeClient)
REPORTER = web.AppKey("reporter", AsyncReporter)
LIMITS = web.AppKey("limits", ConcurrencyLimits)
GUARD = web.AppKey("guard", VRAMGuard)
CAPACITY = web.AppKey("capacity", int)


class FakeOOM(RuntimeError):
    """What a framework raises when the GPU runs out of memory (same message as PyTorch's)."""


def build_app(url: str | None = None, service: str = "vlm-example", capacity: int = 8,
              cache_dir: str | Path | None = None) -> web.Application:
    follower = AsyncBatchSizeClient(service, url=url, interval=1.0, safe_batch_size=1)
    reporter = AsyncReporter(service, url=url, interval=1.0, sink=follower)

    def gpu_bytes(key: str) -> int | None:  # from the optimizer's view of our GPU (no torch needed)
        gpu = (follower.decision or {}).get("gpu") or {}
        value = gpu.get(key)
        return int(value) if isinstance(value, int) else None

    def available() -> int | None:
        total, used = gpu_bytes("memory_total_bytes"), gpu_bytes("memory_used_bytes")
        return None if total is None or used is None else total - used

    guard = VRAMGuard(VRAMProfiles(service, cache_dir=cache_dir, first_run_share=0.05), available_fn=available,
                      total_fn=lambda: gpu_bytes("memory_total_bytes"), retry_after_s=5)
    app = web.Application(middlewares=[vram_middleware()])
    app[FOLLOWER], app[REPORTER], app[GUARD], app[CAPACITY] = follower, reporter, guard, capacity
    app[LIMITS] = ConcurrencyLimits({"caption": 2, "extract": 4})

    async def lifecycle(app: web.Application) -> Any:
        follower.start()
        await reporter.start()
        yield
        await reporter.stop()
        await follower.stop()

    app.cleanup_ctx.append(lifecycle)
    app.add_routes([web.post("/caption", caption), web.get("/hw", hw), web.get("/workers", workers)])
    return app


async def run_model(images: list[str], *, batch_size: int, capacity: int) -> list[str]:
    """The fake model: captions ``images`` in batches; runs out of memory above ``capacity`` items."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if len(batch) > capacity:
            raise FakeOOM(f"CUDA out of memory. Tried to allocate {len(batch) * PER_ITEM_MIB} MiB")
        await asyncio.sleep(0)  # the forward pass would run here
        out += [f"a photo of {image}" for image in batch]
    return out


async def caption(request: web.Request) -> web.Response:
    body = await request.json()
    images = [str(i) for i in body.get("images", [])]
    app = request.app
    follower, reporter = app[FOLLOWER], app[REPORTER]
    params = {"task": "caption", "images": len(images)}
    async with app[LIMITS].acquire("caption"):
        with app[GUARD].admit(params):  # InsufficientVRAMError -> 503 + Retry-After (the middleware)

            @recover_oom()  # retries: empty cache, then a smaller batch; measure reports each OOM
            async def captioned(*, batch_size: int, device: Any = None) -> list[str]:
                with measure(reporter, batch_size):
                    return await run_model(images, batch_size=batch_size, capacity=app[CAPACITY])

            captions = await captioned(batch_size=follower.batch_size)
    return web.json_response({"captions": captions, "batch_size": follower.batch_size})


async def hw(request: web.Request) -> web.Response:
    decision = request.app[FOLLOWER].decision
    return web.json_response({"hw": hw_summary_from_decision(decision) if decision else "optimizer not reached yet"})


async def workers(request: web.Request) -> web.Response:
    total = (request.app[FOLLOWER].decision or {}).get("gpu") or {}
    total_mb = total.get("memory_total_bytes", 0) / MIB if total else None
    return web.json_response(plan_workers(total_vram_mb=total_mb, gpu_mem_typ_mb=6000).as_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="the optimizer (default: $VLM_OPTIMIZER_URL or http://127.0.0.1:8080)")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--capacity", type=int, default=8, help="the fake model runs out of memory above this")
    args = ap.parse_args()
    web.run_app(build_app(args.url, capacity=args.capacity), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
