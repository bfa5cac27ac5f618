"""vlm_optimizer_client.admission: VRAM profiles and checks, the 503 middleware (over a real aiohttp
server), worker counts, hwFetch summaries and per-kind concurrency limits.

Concurrency is synchronised with events and by yielding to the loop, never by sleeping for time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from vlm_optimizer_client import (
    MIB,
    WORKERS_ENV,
    Admission,
    ConcurrencyLimits,
    InsufficientVRAMError,
    VRAMGuard,
    VRAMProfiles,
    WorkerPlan,
    check_vram,
    hw_summary,
    hw_summary_from_decision,
    hw_summary_from_torch,
    plan_workers,
    vram_middleware,
    worker_count,
)

GIB = 1024**3
TOTAL = 80 * GIB
PARAMS: dict[str, Any] = {"model": "base", "batch": 8, "fp16": True}


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def profiles_dir(home: Path, app: str = "app") -> Path:
    return home / "vlm-gpu-optimizer" / "memory_profiles" / app


# --------------------------------------------------------------------------------------------------
# Import hygiene


def test_client_imports_without_server_dependencies() -> None:
    """A fresh interpreter with the server's dependencies, aiohttp and torch made unimportable."""
    code = (
        "import sys\n"
        "for name in ('pynvml', 'kubernetes', 'prometheus_client', 'structlog', 'yaml', 'aiohttp', 'torch'):\n"
        "    sys.modules[name] = None\n"
        "import vlm_optimizer_client as a\n"
        "assert a.worker_count(cores=2) == 5\n"
        "assert a.hw_summary_from_torch() is None\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'optimizer')\n"
        "assert not leaked, leaked\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# Profiles


def test_first_estimate_is_share_of_total(cache_home: Path) -> None:
    p = VRAMProfiles("app")
    assert p.directory == profiles_dir(cache_home)
    assert p.peak(PARAMS) is None
    assert p.estimate(PARAMS, TOTAL) == math.ceil(TOTAL * 0.8)
    assert VRAMProfiles("app", first_run_share=0.5).estimate(PARAMS, TOTAL) == TOTAL // 2


def test_record_then_estimate_with_headroom(cache_home: Path) -> None:
    p = VRAMProfiles("app")
    assert p.record(PARAMS, 10 * GIB)
    assert p.estimate(PARAMS, TOTAL) == math.ceil(10 * GIB * 1.2)
    path = p.path(PARAMS)
    assert path.parent == profiles_dir(cache_home)
    assert path.name == f"{VRAMProfiles.key(PARAMS)}.txt"
    assert path.read_text().strip() == str(10 * GIB)  # one integer, like CLAMS
    assert [f.name for f in path.parent.iterdir()] == [path.name]  # no temporary file left
    # Another instance (another worker) reads the same profile.
    assert VRAMProfiles("app").peak(PARAMS) == 10 * GIB


def test_lower_peak_does_not_overwrite(cache_home: Path) -> None:
    p = VRAMProfiles("app")
    assert p.record(PARAMS, 10 * GIB)
    assert not p.record(PARAMS, 9 * GIB)
    assert not p.record(PARAMS, 10 * GIB)
    assert p.peak(PARAMS) == 10 * GIB
    assert p.record(PARAMS, 11 * GIB)
    assert p.peak(PARAMS) == 11 * GIB


def test_key_ignores_order_and_separates_params(cache_home: Path) -> None:
    p = VRAMProfiles("app")
    reordered = {"fp16": True, "batch": 8, "model": "base"}
    assert VRAMProfiles.key(PARAMS) == VRAMProfiles.key(reordered)
    assert len(VRAMProfiles.key(PARAMS)) == 64  # sha256 hex
    p.record(PARAMS, 5 * GIB)
    assert p.peak(reordered) == 5 * GIB
    for other in ({**PARAMS, "model": "large"}, {"model": "base", "batch": 8}, {**PARAMS, "batch": "8"}):
        assert p.peak(other) is None
    # Different apps do not share profiles.
    assert VRAMProfiles("other").peak(PARAMS) is None


def test_non_serialisable_params_raise_type_error(cache_home: Path) -> None:
    with pytest.raises(TypeError):
        VRAMProfiles.key({"x": object()})
    with pytest.raises(TypeError):
        VRAMProfiles.key({1: "a"})  # type: ignore[dict-item]


@pytest.mark.parametrize("content", ["", "not a number\n", "-5\n", "1.5e9\n", b"\xff\xfe"])
def test_corrupt_profile_is_unknown_and_logged(cache_home: Path, caplog: pytest.LogCaptureFixture,
                                               content: str | bytes) -> None:
    p = VRAMProfiles("app")
    path = p.path(PARAMS)
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="vlm_optimizer_client"):
        assert p.peak(PARAMS) is None
        assert p.estimate(PARAMS, TOTAL) == math.ceil(TOTAL * 0.8)
    assert any(r.name == "vlm_optimizer_client" and str(path) in r.getMessage() for r in caplog.records)
    # A new peak replaces the corrupt file.
    assert p.record(PARAMS, GIB)
    assert p.peak(PARAMS) == GIB


def test_unreadable_profile_is_unknown(cache_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = VRAMProfiles("app")
    p.path(PARAMS).mkdir(parents=True)  # a directory where the file should be
    with caplog.at_level(logging.WARNING, logger="vlm_optimizer_client"):
        assert p.peak(PARAMS) is None
        assert not p.record(PARAMS, GIB)  # the write fails too: logged, not raised
    assert len([r for r in caplog.records if r.name == "vlm_optimizer_client"]) >= 2


def test_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert VRAMProfiles("svc").directory == profiles_dir(tmp_path / "home" / ".cache", "svc")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert VRAMProfiles("svc").directory == profiles_dir(tmp_path / "home" / ".cache", "svc")
    assert VRAMProfiles("svc", cache_dir=tmp_path / "c").directory == profiles_dir(tmp_path / "c", "svc")
    assert VRAMProfiles("svc", environ={"XDG_CACHE_HOME": str(tmp_path / "x")}).directory \
        == profiles_dir(tmp_path / "x", "svc")


@pytest.mark.parametrize("app_id", ["", "..", ".", "a/b", "a\\b", " padded"])
def test_bad_app_id(app_id: str, cache_home: Path) -> None:
    with pytest.raises(ValueError, match="app_id"):
        VRAMProfiles(app_id)


def test_bad_profile_settings(cache_home: Path) -> None:
    with pytest.raises(ValueError, match="first_run_share"):
        VRAMProfiles("app", first_run_share=0)
    with pytest.raises(ValueError, match="headroom"):
        VRAMProfiles("app", headroom=0.9)
    p = VRAMProfiles("app")
    with pytest.raises(ValueError, match="peak_bytes"):
        p.record(PARAMS, -1)
    with pytest.raises(TypeError, match="peak_bytes"):
        p.record(PARAMS, 1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# check_vram and the guard


def test_check_vram() -> None:
    check_vram(GIB, GIB)
    check_vram(0, 0)
    with pytest.raises(InsufficientVRAMError) as info:
        check_vram(3 * GIB, 2 * GIB, retry_after_s=7.5)
    e = info.value
    assert isinstance(e, RuntimeError)
    assert (e.required_bytes, e.available_bytes, e.retry_after_s) == (3 * GIB, 2 * GIB, 7.5)
    assert "3072 MB required" in str(e) and "2048 MB available" in str(e)
    with pytest.raises(ValueError, match="available_bytes"):
        check_vram(1, -1)
    with pytest.raises(ValueError, match="retry_after_s"):
        check_vram(1, 1, retry_after_s=-1)


def test_error_pickles_with_figures() -> None:
    e = pickle.loads(pickle.dumps(InsufficientVRAMError(5, 3, 2.0)))
    assert isinstance(e, InsufficientVRAMError)
    assert (e.required_bytes, e.available_bytes, e.retry_after_s) == (5, 3, 2.0)


class FakeGpu:
    """Figures a test sets; the guard reads them through injected functions."""

    def __init__(self, available: int | None, total: int | None = TOTAL, peak: int | None = None) -> None:
        self.available = available
        self.total = total
        self.peak = peak

    def guard(self, profiles: VRAMProfiles, **kw: Any) -> VRAMGuard:
        return VRAMGuard(profiles, available_fn=lambda: self.available, total_fn=lambda: self.total,
                         peak_fn=lambda: self.peak, **kw)


def test_guard_first_run_refused_then_admitted(cache_home: Path) -> None:
    gpu = FakeGpu(available=60 * GIB)
    guard = gpu.guard(VRAMProfiles("app"), retry_after_s=3)
    with pytest.raises(InsufficientVRAMError) as info:
        guard.check(PARAMS)  # first run: 80% of 80 GiB = 64 GiB > 60 GiB
    assert (info.value.required_bytes, info.value.available_bytes) == (math.ceil(TOTAL * 0.8), 60 * GIB)
    assert info.value.retry_after_s == 3
    gpu.available = 70 * GIB
    a = guard.check(PARAMS)
    assert a == Admission(math.ceil(TOTAL * 0.8), 70 * GIB, TOTAL)


def test_guard_admit_records_peak(cache_home: Path) -> None:
    profiles = VRAMProfiles("app")
    gpu = FakeGpu(available=70 * GIB, peak=20 * GIB)
    guard = gpu.guard(profiles)
    with guard.admit(PARAMS) as a:
        assert a.peak_bytes is None
    assert a.peak_bytes == 20 * GIB
    assert profiles.peak(PARAMS) == 20 * GIB
    # Now the estimate is 24 GiB: 30 GiB free is enough, 23 GiB is not.
    gpu.available = 30 * GIB
    assert guard.check(PARAMS).required_bytes == math.ceil(20 * GIB * 1.2)
    gpu.available = 23 * GIB
    with pytest.raises(InsufficientVRAMError):
        with guard.admit(PARAMS):
            pytest.fail("the block must not run")  # pragma: no cover


def test_guard_admit_records_peak_of_failed_run_and_keeps_its_error(cache_home: Path) -> None:
    profiles = VRAMProfiles("app")
    gpu = FakeGpu(available=70 * GIB, peak=30 * GIB)
    with pytest.raises(ZeroDivisionError):
        with gpu.guard(profiles).admit(PARAMS):
            raise ZeroDivisionError
    assert profiles.peak(PARAMS) == 30 * GIB

    def broken() -> int:
        raise RuntimeError("CUDA error: an illegal memory access")

    guard = VRAMGuard(profiles, available_fn=lambda: 70 * GIB, total_fn=lambda: TOTAL, peak_fn=broken)
    with pytest.raises(KeyError):
        with guard.admit(PARAMS):
            raise KeyError("own error")
    assert profiles.peak(PARAMS) == 30 * GIB


def test_guard_without_measurements_admits(cache_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    profiles = VRAMProfiles("app")
    gpu = FakeGpu(available=None, total=None, peak=None)
    with caplog.at_level(logging.INFO, logger="vlm_optimizer_client"):
        with gpu.guard(profiles).admit(PARAMS) as a:
            pass
    assert a == Admission(None, None, None, None)
    assert not profiles.directory.exists()  # nothing recorded without a peak
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_guard_defaults_without_torch_admit(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # torch unimportable, whether installed or not
    guard = VRAMGuard(VRAMProfiles("app"))
    with guard.admit(PARAMS) as a:
        pass
    assert a == Admission(None, None, None, None)
    assert hw_summary_from_torch() is None


def test_guard_known_profile_needs_no_total(cache_home: Path) -> None:
    profiles = VRAMProfiles("app")
    profiles.record(PARAMS, 10 * GIB)
    guard = FakeGpu(available=11 * GIB, total=None).guard(profiles)
    with pytest.raises(InsufficientVRAMError):
        guard.check(PARAMS)


def test_guard_min_bytes_floor(cache_home: Path) -> None:
    profiles = VRAMProfiles("app")
    profiles.record(PARAMS, GIB)
    guard = FakeGpu(available=3 * GIB).guard(profiles, min_bytes=4 * GIB)
    with pytest.raises(InsufficientVRAMError) as info:
        guard.check(PARAMS)
    assert info.value.required_bytes == 4 * GIB


# --------------------------------------------------------------------------------------------------
# The 503 middleware, over a real server


def make_app(retry_after_s: float | None = None) -> web.Application:
    async def full(request: web.Request) -> web.Response:
        raise InsufficientVRAMError(3 * GIB, GIB, retry_after_s=2.2)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def boom(request: web.Request) -> web.Response:
        raise ValueError("something else")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application(middlewares=[vram_middleware(retry_after_s)])
    app.router.add_get("/full", full)
    app.router.add_get("/ok", ok)
    app.router.add_get("/boom", boom)
    app.router.add_get("/missing", missing)
    return app


async def test_middleware_503(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_app())
    resp = await client.get("/full")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"  # 2.2 s rounded up
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["required_bytes"] == 3 * GIB and body["available_bytes"] == GIB
    assert body["retry_after_s"] == 3
    assert "insufficient GPU memory" in body["error"]


async def test_middleware_passes_the_rest(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(make_app())
    resp = await client.get("/ok")
    assert resp.status == 200 and await resp.json() == {"ok": True}
    resp = await client.get("/boom")
    assert resp.status == 500  # aiohttp's own answer to an unhandled exception
    assert "Retry-After" not in resp.headers
    assert (await client.get("/missing")).status == 404
    assert (await client.get("/nowhere")).status == 404


@pytest.mark.parametrize(("override", "header"), [(30.0, "30"), (0.0, "1"), (0.2, "1")])
async def test_middleware_retry_after_override(aiohttp_client: AiohttpClient, override: float,
                                               header: str) -> None:
    client = await aiohttp_client(make_app(override))
    resp = await client.get("/full")
    assert resp.status == 503 and resp.headers["Retry-After"] == header


def test_middleware_rejects_bad_retry_after() -> None:
    with pytest.raises(ValueError, match="retry_after_s"):
        vram_middleware(-1)


# --------------------------------------------------------------------------------------------------
# Worker count


def test_worker_count_clams_example() -> None:
    # 8 cores -> 17; 24 GB / 6000 MB -> 4: limited by VRAM.
    assert worker_count(cores=8, total_vram_mb=24 * 1024, gpu_mem_typ_mb=6000, environ={}) == 4
    plan = plan_workers(cores=8, total_vram_mb=24 * 1024, gpu_mem_typ_mb=6000, environ={})
    assert plan == WorkerPlan(workers=4, cpu_workers=17, vram_workers=4, source="computed", cores=8)
    assert plan.as_dict() == {"workers": 4, "cpu_workers": 17, "vram_workers": 4, "source": "computed",
                              "cores": 8}


def test_worker_count_cpu_bound() -> None:
    assert worker_count(cores=2, total_vram_mb=80 * 1024, gpu_mem_typ_mb=1000, environ={}) == 5
    assert worker_count(cores=4, environ={}) == 9  # no GPU
    assert worker_count(cores=4, total_vram_mb=24000, gpu_mem_typ_mb=0, environ={}) == 9
    assert plan_workers(cores=4, total_vram_mb=24000, environ={}).vram_workers is None


def test_worker_count_at_least_one() -> None:
    plan = plan_workers(cores=8, total_vram_mb=4000, gpu_mem_typ_mb=6000, environ={})
    assert (plan.workers, plan.vram_workers) == (1, 0)


def test_worker_count_default_cores() -> None:
    assert worker_count(environ={}) >= 3


def test_worker_count_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_workers(cores=8, total_vram_mb=24576, gpu_mem_typ_mb=6000, environ={WORKERS_ENV: " 2 "})
    assert plan == WorkerPlan(workers=2, cpu_workers=17, vram_workers=4, source="env", cores=8)
    monkeypatch.setenv(WORKERS_ENV, "7")
    assert worker_count(cores=1) == 7  # os.environ by default
    assert worker_count(cores=1, environ={WORKERS_ENV: ""}) == 3  # blank: not set


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_worker_count_invalid_env(value: str) -> None:
    with pytest.raises(ValueError, match=WORKERS_ENV):
        worker_count(cores=4, environ={WORKERS_ENV: value})


def test_worker_count_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cores"):
        worker_count(cores=0, environ={})
    with pytest.raises(ValueError, match="total_vram_mb"):
        worker_count(cores=1, total_vram_mb=-1, gpu_mem_typ_mb=10, environ={})


# --------------------------------------------------------------------------------------------------
# hwFetch summaries


def test_hw_summary_formats() -> None:
    assert hw_summary("NVIDIA RTX 4090", None, 20480 * MIB, 3584 * MIB) \
        == "NVIDIA RTX 4090, 20480 MB available, 3584 MB peak used"
    assert hw_summary("NVIDIA H100 80GB HBM3", 85520809984, 20480 * MIB, 3584 * MIB) \
        == "NVIDIA H100 80GB HBM3, 81559 MB total, 20480 MB available, 3584 MB peak used"
    assert hw_summary("GPU", 10 * MIB, 5 * MIB + MIB - 1, None) == "GPU, 10 MB total, 5 MB available"


def test_hw_summary_from_decision() -> None:
    decision: Mapping[str, Any] = {
        "service": "vlm", "batch_size": 12,
        "gpu": {"index": 0, "uuid": "GPU-x", "name": "NVIDIA H100 80GB HBM3",
                "memory_used_bytes": 85520809984 - 20480 * MIB, "memory_total_bytes": 85520809984},
    }
    assert hw_summary_from_decision(decision) == "NVIDIA H100 80GB HBM3, 81559 MB total, 20480 MB available"
    assert hw_summary_from_decision(decision, peak_bytes=3584 * MIB).endswith(", 3584 MB peak used")
    assert hw_summary_from_decision({"gpu": None}) == "no GPU"
    with pytest.raises(ValueError, match="gpu"):
        hw_summary_from_decision({"batch_size": 1})
    with pytest.raises(ValueError, match="memory_used_bytes"):
        hw_summary_from_decision({"gpu": {"name": "x", "memory_total_bytes": 1, "memory_used_bytes": "1"}})


# --------------------------------------------------------------------------------------------------
# Concurrency limits


async def until(predicate: Callable[[], bool], turns: int = 100) -> None:
    """Yield to the loop (no time passes) until ``predicate`` holds."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_limit_one_serialises() -> None:
    limits = ConcurrencyLimits({"extraction": 4, "classification": 1})
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with limits.acquire("classification"):
            order.append("first in")
            first_in.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        async with limits.acquire("classification"):
            order.append("second in")

    t1 = asyncio.create_task(first())
    await first_in.wait()
    t2 = asyncio.create_task(second())
    await until(lambda: limits.waiting("classification") == 1)
    assert order == ["first in"] and limits.in_use("classification") == 1
    # Another kind is not blocked by classification.
    async with limits.acquire("extraction"):
        assert limits.in_use("extraction") == 1
    release_first.set()
    await asyncio.gather(t1, t2)
    assert order == ["first in", "first out", "second in"]
    assert limits.snapshot() == {"extraction": {"limit": 4, "in_use": 0, "waiting": 0},
                                 "classification": {"limit": 1, "in_use": 0, "waiting": 0}}


async def test_limit_n_admits_n() -> None:
    limits = ConcurrencyLimits({"extraction": 3})
    inside = 0
    all_in = asyncio.Event()
    go = asyncio.Event()

    async def work() -> None:
        nonlocal inside
        async with limits.acquire("extraction"):
            inside += 1
            if inside == 3:
                all_in.set()
            await go.wait()

    tasks = [asyncio.create_task(work()) for _ in range(5)]
    await all_in.wait()
    await until(lambda: limits.waiting("extraction") == 2)
    assert limits.in_use("extraction") == 3
    go.set()
    await asyncio.gather(*tasks)
    assert (limits.in_use("extraction"), limits.waiting("extraction")) == (0, 0)


async def test_cancelled_waiter_leaves_queue() -> None:
    limits = ConcurrencyLimits({"k": 1})
    hold = limits.acquire("k")
    await hold.__aenter__()

    async def wait() -> None:
        async with limits.acquire("k"):
            pass  # pragma: no cover

    t = asyncio.create_task(wait())
    await until(lambda: limits.waiting("k") == 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert limits.waiting("k") == 0
    await hold.__aexit__(None, None, None)
    assert limits.in_use("k") == 0


async def test_cancel_after_handover_passes_the_slot_on() -> None:
    limits = ConcurrencyLimits({"k": 1})
    hold = limits.acquire("k")
    await hold.__aenter__()
    got: list[str] = []

    async def wait(name: str) -> None:
        async with limits.acquire("k"):
            got.append(name)

    b = asyncio.create_task(wait("b"))
    c = asyncio.create_task(wait("c"))
    await until(lambda: limits.waiting("k") == 2)
    await hold.__aexit__(None, None, None)  # hands the slot to b (no suspension inside)...
    b.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await b
    await c
    assert got == ["c"]
    assert (limits.in_use("k"), limits.waiting("k")) == (0, 0)


async def test_sync_and_async_share_the_limit() -> None:
    limits = ConcurrencyLimits({"gpu": 1})
    held = threading.Event()
    release = threading.Event()

    def thread_work() -> None:
        with limits.acquire_sync("gpu"):
            held.set()
            release.wait()

    thread = threading.Thread(target=thread_work)
    thread.start()
    try:
        await asyncio.to_thread(held.wait)
        entered = asyncio.Event()

        async def coro() -> None:
            async with limits.acquire("gpu"):
                entered.set()

        t = asyncio.create_task(coro())
        await until(lambda: limits.waiting("gpu") == 1)
        assert not entered.is_set()
        release.set()  # the thread releases and wakes the coroutine on this loop
        await t
        assert entered.is_set()
    finally:
        release.set()
        thread.join()
    assert limits.in_use("gpu") == 0


def spin_until(predicate: Callable[[], bool], deadline_s: float = 10.0) -> None:
    """Yield the CPU (no timed sleep) until ``predicate`` holds; the deadline only bounds a failure."""
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0)  # a bare yield of the CPU


def test_sync_threads_serialise_and_timeout() -> None:
    limits = ConcurrencyLimits({"gpu": 1})
    held = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first() -> None:
        with limits.acquire_sync("gpu"):
            order.append("first in")
            held.set()
            release.wait()
            order.append("first out")

    def second() -> None:
        with limits.acquire_sync("gpu", timeout=60):
            order.append("second in")

    t1 = threading.Thread(target=first)
    t1.start()
    held.wait()
    with pytest.raises(TimeoutError, match="gpu"):
        with limits.acquire_sync("gpu", timeout=0):
            pass  # pragma: no cover
    t2 = threading.Thread(target=second)
    t2.start()
    spin_until(lambda: limits.waiting("gpu") == 1)
    assert order == ["first in"]
    release.set()
    t1.join()
    t2.join()
    assert order == ["first in", "first out", "second in"]
    assert (limits.in_use("gpu"), limits.waiting("gpu")) == (0, 0)


def test_limits_not_bound_to_a_loop() -> None:
    limits = ConcurrencyLimits({"k": 1})

    async def use() -> int:
        async with limits.acquire("k"):
            return limits.in_use("k")

    assert asyncio.run(use()) == 1
    assert asyncio.run(use()) == 1  # a second loop, same object


def test_unknown_kind() -> None:
    limits = ConcurrencyLimits({"extraction": 4, "classification": 1})
    with pytest.raises(KeyError, match="'summarise'.*classification, extraction"):
        limits.acquire("summarise")
    with pytest.raises(KeyError, match="summarise"):
        limits.acquire_sync("summarise")
    with pytest.raises(KeyError, match="summarise"):
        limits.in_use("summarise")
    with pytest.raises(KeyError, match="summarise"):
        limits.waiting("summarise")
    assert limits.kinds == ("extraction", "classification")
    assert limits.limit("extraction") == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_limits(bad: object) -> None:
    with pytest.raises(ValueError, match="'classification'"):
        ConcurrencyLimits({"extraction": 4, "classification": bad})  # type: ignore[dict-item]


def test_no_kinds() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimits({})
