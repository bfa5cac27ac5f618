"""The batch-size follower (``vlm_optimizer_client.follow``) on its own: its state machine and backoff, what it
makes of garbage answers, the callbacks' defaults, construction, and the faces against fake optimizers
or none. The same follower against the real optimizer is the server's tests/test_client_follow.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from client_fakes import LOGGER, Calls, FakeClock, MaxRandom, closed_port, poll, records, sync_client, uuid_of
from pytest_aiohttp import AiohttpServer

from vlm_optimizer_client import (
    DEFAULT_URL,
    URL_ENV,
    AsyncBatchSizeClient,
    BadAnswer,
    BatchSizeClient,
    default_cleanup,
    parse_decision,
)
from vlm_optimizer_client._follower import _Follower
from vlm_optimizer_client.follow import BACKOFF_MAX_S

ROOT = Path(__file__).resolve().parent


def test_backoff_doubles_from_1_s_and_caps_at_60_s() -> None:
    client = BatchSizeClient("svc-a", url=f"http://127.0.0.1:{closed_port()}", clock=FakeClock(0.0),
                             rng=MaxRandom(), timeout=1.0)
    delays = [client.poll_once() for _ in range(9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert client.consecutive_failures == 9 and client.batch_size == 1


def test_backoff_has_full_jitter_within_bounds() -> None:
    follower = _Follower(target="test", interval=5.0, safe_batch_size=1, max_staleness=60.0, on_change=None,
                         on_cleanup=None, rng=random.Random(1))
    bounds = [min(BACKOFF_MAX_S, 2.0 ** i) for i in range(40)]
    delays = [follower.on_failure(ConnectionRefusedError(), 0.0) for _ in bounds]
    assert all(0.0 <= d <= hi for d, hi in zip(delays, bounds))
    capped = delays[7:]
    assert len(set(capped)) == len(capped)  # jittered, not a fixed 60
    assert min(capped) < 30.0 < max(capped)  # spread over the whole range
    assert follower.on_answer(200, {}, b'{"batch_size": 3}', 0.0) == 5.0  # success: back to the interval
    assert follower.on_failure("again", 0.0) <= 1.0  # and the backoff starts over


GARBAGE: dict[str, tuple[int, str, str]] = {  # mode -> (status, content type, body)
    "not json": (200, "text/html", "<html>hello</html>"),
    "a list": (200, "application/json", "[1, 2]"),
    "no batch_size": (200, "application/json", '{"service": "svc-a"}'),
    "batch_size a string": (200, "application/json", '{"batch_size": "x"}'),
    "batch_size zero": (200, "application/json", '{"batch_size": 0}'),
    "batch_size true": (200, "application/json", '{"batch_size": true}'),
    "batch_size a float": (200, "application/json", '{"batch_size": 2.5}'),
    "epoch a string": (200, "application/json", '{"batch_size": 3, "cleanup_epoch": "1"}'),
    "epoch negative": (200, "application/json", '{"batch_size": 3, "cleanup_epoch": -1}'),
    "gpu a string": (200, "application/json", '{"batch_size": 3, "gpu": "GPU-0"}'),
    "500": (500, "application/json", '{"error": "internal error"}'),
    "404": (404, "text/plain", "not found"),
    "304 to nothing": (304, "", ""),
}


@dataclass
class Garbage:
    url: str
    mode: list[str]


@pytest.fixture
async def garbage(aiohttp_server: AiohttpServer) -> Garbage:
    mode = ["good"]

    async def handler(request: web.Request) -> web.Response:
        if mode[0] == "good":
            return web.json_response({"batch_size": 6, "cleanup_epoch": 0}, headers={"ETag": 'W/"good"'})
        status, content_type, body = GARBAGE[mode[0]]
        if status == 304:
            return web.Response(status=304)
        return web.Response(status=status, text=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/batch-size", handler)
    server = await aiohttp_server(app)
    return Garbage(f"http://{server.host}:{server.port}", mode)


async def test_garbage_answers_are_failures(garbage: Garbage, caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    client = sync_client(garbage.url, calls)
    caplog.set_level(logging.DEBUG, LOGGER)
    for n, mode in enumerate(GARBAGE, start=1):
        garbage.mode[0] = mode
        delay = await poll(client)  # no exception escapes
        assert 0.0 <= delay <= min(BACKOFF_MAX_S, 2.0 ** (n - 1)), mode
        assert client.consecutive_failures == n, mode
        assert client.batch_size == 1 and client.decision is None, mode
        assert client.last_status == GARBAGE[mode][0], mode
    assert calls.changes == [] and calls.cleanups == []
    assert len(records(caplog, logging.WARNING)) == 1

    garbage.mode[0] = "good"
    assert await poll(client) == 5.0
    assert client.batch_size == 6 and client.healthy and calls.values == [6]


@pytest.mark.parametrize("mode", ["not json", "batch_size a string", "500", "404"])
async def test_garbage_after_a_good_answer_keeps_the_value(garbage: Garbage, mode: str) -> None:
    client = sync_client(garbage.url)
    await poll(client)
    garbage.mode[0] = mode
    await poll(client)
    assert not client.healthy and client.batch_size == 6
    assert client.decision is not None and client.decision["batch_size"] == 6


async def test_async_client_counts_garbage_as_failures(garbage: Garbage) -> None:
    client = AsyncBatchSizeClient("svc-a", url=garbage.url, clock=FakeClock(0.0))
    for n, mode in enumerate(GARBAGE, start=1):
        garbage.mode[0] = mode
        await client.poll_once()
        assert client.consecutive_failures == n and client.batch_size == 1, mode


def test_parse_decision() -> None:
    assert parse_decision(b'{"batch_size": 2, "extra": 1}') == {"batch_size": 2, "extra": 1}
    assert parse_decision({"batch_size": 2, "gpu": None}) == {"batch_size": 2, "gpu": None}
    for bad in (b"\xff", "nan", b"{", b"null", b'{"batch_size": null}', b'{"batch_size": 3, "updated_at": "x"}'):
        with pytest.raises(BadAnswer):
            parse_decision(bad)
    assert issubclass(BadAnswer, ValueError)


def test_default_cleanup_collects_and_empties_the_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``torch`` with CUDA available, which the CPU build is not (test_client_torch runs the real
    module without CUDA)."""
    ran: list[str] = []
    def collect() -> int:
        ran.append("gc")
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    default_cleanup()  # without torch: garbage collection only, and torch is not imported
    assert ran == ["gc"] and "torch" not in sys.modules

    available = [True]
    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: available[0],
                                                             empty_cache=lambda: ran.append("empty_cache")))
    monkeypatch.setitem(sys.modules, "torch", torch)
    default_cleanup()
    assert ran == ["gc", "gc", "empty_cache"]
    available[0] = False  # torch without CUDA
    default_cleanup()
    assert ran == ["gc", "gc", "empty_cache", "gc"]


def test_apply_decision_without_etag_forgets_the_stored_one() -> None:
    follower = _Follower(target="test", interval=5.0, safe_batch_size=1, max_staleness=60.0, on_change=None,
                         on_cleanup=None, rng=random.Random(1))
    follower.on_answer(200, {"etag": 'W/"a"'}, b'{"batch_size": 3}', 0.0)  # header names in any case
    assert follower.etag == 'W/"a"'
    assert follower.apply({"batch_size": 2}, 1.0)
    assert follower.etag is None and follower.value(1.0) == 2


async def test_thread_as_a_context_manager_against_a_dead_optimizer() -> None:
    failed = threading.Event()

    class Watch(BatchSizeClient):
        def poll_once(self) -> float:
            delay = super().poll_once()
            failed.set()
            return delay

    with Watch("svc-a", url=f"http://127.0.0.1:{closed_port()}", rng=MaxRandom()) as client:
        thread = client._thread
        assert await asyncio.to_thread(failed.wait, 10.0)
        assert not client.healthy and client.batch_size == 1
    assert thread is not None and not thread.is_alive()


def test_async_start_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError):
        AsyncBatchSizeClient("svc-a").start()


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"interval": 0}, "interval"),
    ({"interval": -1.0}, "interval"),
    ({"interval": float("nan")}, "interval"),
    ({"safe_batch_size": 0}, "safe_batch_size"),
    ({"safe_batch_size": True}, "safe_batch_size"),
    ({"max_staleness": 0}, "max_staleness"),
    ({"timeout": 0}, "timeout"),
    ({"url": "ftp://optimizer:8080"}, "url"),
    ({"url": "optimizer:8080"}, "url"),
    ({"url": "http://"}, "url"),
    ({"url": "http://optimizer:8080/?x=1"}, "url"),
    ({"service": ""}, "service"),
    ({"service": "two words"}, "service"),
    ({"gpu": -1}, "gpu"),
    ({"gpu": "first"}, "gpu"),
    ({"gpu": True}, "gpu"),
])
@pytest.mark.parametrize("face", [BatchSizeClient, AsyncBatchSizeClient])
def test_constructor_rejects_bad_arguments(face: Callable[..., object], kwargs: dict[str, Any],
                                           argument: str) -> None:
    args = {"service": "svc-a", **kwargs}
    with pytest.raises(ValueError, match=f"^{argument}:"):
        face(**args)


def test_url_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    assert BatchSizeClient("svc-a").url == f"{DEFAULT_URL}/batch-size?service=svc-a"
    monkeypatch.setenv(URL_ENV, "https://optimizer.ns.svc:8443/prefix/")
    client = AsyncBatchSizeClient("team/vlm:1", gpu=uuid_of(2))
    assert client.url == ("https://optimizer.ns.svc:8443/prefix/batch-size?service=team%2Fvlm%3A1&gpu="
                          + uuid_of(2))
    assert BatchSizeClient("svc-a", url="http://other:1", gpu=0).url == "http://other:1/batch-size?service=svc-a&gpu=0"


def test_importable_without_the_server_dependencies() -> None:
    """With aiohttp, structlog, pynvml, kubernetes, prometheus_client, yaml and torch all missing, the
    module imports, imports nothing else of the optimizer, and the async face falls back to urllib."""
    script = textwrap.dedent(f"""
        import asyncio, importlib.abc, sys
        BLOCKED = {{"aiohttp", "structlog", "pynvml", "kubernetes", "prometheus_client", "yaml", "torch"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        from vlm_optimizer_client import AsyncBatchSizeClient, BatchSizeClient, default_cleanup
        default_cleanup()
        async def main():
            c = AsyncBatchSizeClient("svc-a", url="http://127.0.0.1:{closed_port()}", safe_batch_size=2)
            await c.poll_once()
            await c.stop()
            return c
        c = asyncio.run(main())
        assert c.batch_size == 2 and not c.healthy and c.last_status is None, vars(c)
        mods = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("optimizer"))
        print(" ".join(mods))
    """)
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []  # nothing of the server, nor any of the blocked packages
