"""The read API over a real server on an ephemeral port (pytest-aiohttp's ``aiohttp_client``).

Sampling is driven by the tests (``await api.tick()``) on a fake clock, with a scripted backend
whose memory figures the tests set between ticks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.streams import StreamReader
from pytest_aiohttp import AiohttpClient

from optimizer.api import build_app
from optimizer.api.schemas import MAX_REPORT_BYTES
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.gpu.none import NoGpuBackend
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, uuid_of, no_sleep

from tests.api_harness import GIB, INTERVAL, TOTAL, Api, MakeApi


# --------------------------------------------------------------------------- GET /batch-size


async def test_batch_size_answer(api: Api) -> None:
    resp = await api.client.get("/batch-size?service=svc-a")
    assert resp.status == 200
    body = await resp.json()
    assert body["service"] == "svc-a"
    assert body["batch_size"] == 4  # the default profile's default batch
    assert isinstance(body["optimal_batch_size"], int)
    assert body["strategy"] == "balanced"
    assert body["pressure"] in ("normal", "warning", "critical", "oom")
    assert body["pressure"] == "normal"
    assert body["cleanup_epoch"] == 0
    assert isinstance(body["reason"], str) and body["reason"]
    assert body["updated_at"] == api.clock()
    assert body["gpu"] == {"index": 0, "uuid": uuid_of(0), "name": "Test GPU", "memory_used_bytes": 20 * GIB,
                           "memory_total_bytes": TOTAL}
    assert resp.headers["ETag"].startswith('W/"')
    assert resp.headers["Cache-Control"] == "max-age=5"


@pytest.mark.parametrize(("interval", "max_age"), [(2.5, "2"), (0.5, "1"), (30.0, "30")])
async def test_cache_control_follows_the_monitoring_interval(make_api: MakeApi, interval: float,
                                                             max_age: str) -> None:
    a = await make_api(settings=Settings(monitoring_interval=interval))
    await a.tick()
    resp = await a.client.get("/batch-size?service=svc")
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == f"max-age={max_age}"


async def test_etag_and_if_none_match(make_api: MakeApi) -> None:
    a = await make_api(settings=Settings(default_batch_size=8))
    await a.tick()
    first = await a.client.get("/batch-size?service=svc-a")
    assert first.status == 200
    etag = first.headers["ETag"]
    assert (await first.json())["batch_size"] == 8

    same = await a.client.get("/batch-size?service=svc-a", headers={"If-None-Match": etag})
    assert same.status == 304
    assert await same.read() == b""
    assert same.headers["ETag"] == etag
    assert same.headers["Cache-Control"] == "max-age=5"

    listed = await a.client.get("/batch-size?service=svc-a", headers={"If-None-Match": f'W/"other", {etag}'})
    assert listed.status == 304

    # memory moving alone does not change what the service acts on
    a.gpus.used[0] = 21 * GIB
    await a.tick()
    moved = await a.client.get("/batch-size?service=svc-a", headers={"If-None-Match": etag})
    assert moved.status == 304

    report = await a.post({"service": "svc-a", "gpu": 0, "batch_size": 8, "oom": True})
    assert report["batch_size"] < 8

    changed = await a.client.get("/batch-size?service=svc-a", headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    assert (await changed.json())["batch_size"] == report["batch_size"]
    again = await a.client.get("/batch-size?service=svc-a", headers={"If-None-Match": changed.headers["ETag"]})
    assert again.status == 304


async def test_etags_differ_between_services(api: Api) -> None:
    a = await api.client.get("/batch-size?service=svc-a")
    b = await api.client.get("/batch-size?service=svc-b")
    assert a.headers["ETag"] != b.headers["ETag"]
    cross = await api.client.get("/batch-size?service=svc-b", headers={"If-None-Match": a.headers["ETag"]})
    assert cross.status == 200


async def test_if_none_match_uses_weak_comparison(api: Api) -> None:
    first = await api.client.get("/batch-size?service=svc-a")
    etag = first.headers["ETag"]
    assert etag.startswith("W/")
    resp = await api.client.get("/batch-size?service=svc-a", headers={"If-None-Match": etag[2:]})
    assert resp.status == 304


async def test_gpu_selection_by_index_and_uuid(make_api: MakeApi) -> None:
    a = await make_api(gpus=2)
    a.gpus.used[1] = 30 * GIB
    await a.tick()
    by_index = await a.get("/batch-size?service=svc-a&gpu=1")
    assert by_index["gpu"]["index"] == 1
    assert by_index["gpu"]["uuid"] == uuid_of(1)
    assert by_index["gpu"]["memory_used_bytes"] == 30 * GIB
    by_uuid = await a.get(f"/batch-size?service=svc-b&gpu={uuid_of(1)}")
    assert by_uuid["gpu"]["index"] == 1
    assert by_uuid["gpu"]["uuid"] == uuid_of(1)
    # a known service without a gpu parameter stays on the GPU it registered on
    assert (await a.get("/batch-size?service=svc-a"))["gpu"]["index"] == 1
    # a new one without gpu goes to the first GPU
    assert (await a.get("/batch-size?service=svc-c"))["gpu"]["index"] == 0
    assert {(g, s) for g, s in a.engine.state.services} == {(1, "svc-a"), (1, "svc-b"), (0, "svc-c")}


@pytest.mark.parametrize("gpu", ["5", "GPU-does-not-exist", "1023"])
async def test_unknown_gpu_is_rejected_listing_the_available_ones(make_api: MakeApi, gpu: str) -> None:
    a = await make_api(gpus=2)
    await a.tick()
    body = await a.get(f"/batch-size?service=svc&gpu={gpu}", status=400)
    assert body["parameter"] == "gpu"
    assert body["available"] == [0, 1]
    assert "error" in body
    assert a.engine.state.services == {}


@pytest.mark.parametrize(("query", "parameter"), [
    ("service=svc&gpu=-1", "gpu"),
    ("service=svc&gpu=abc", "gpu"),
    ("service=svc&gpu=1.5", "gpu"),
    ("service=svc&gpu=99999", "gpu"),
    ("", "service"),
    ("gpu=0", "service"),
    ("service=", "service"),
    ("service=bad%20name", "service"),
    ("service=svc%3Bdrop", "service"),
    ("service=-leading-dash", "service"),
    ("service=" + "a" * 129, "service"),
])
async def test_invalid_parameters(api: Api, query: str, parameter: str) -> None:
    body = await api.get(f"/batch-size?{query}", status=400)
    assert body["parameter"] == parameter
    assert body["error"].startswith(f"{parameter}:")
    assert api.engine.state.services == {}


async def test_service_with_a_trailing_newline_is_rejected(api: Api) -> None:
    body = await api.get("/batch-size?service=svc%0A", status=400)
    assert body["parameter"] == "service"


async def test_non_ascii_digit_gpu_is_a_400(api: Api) -> None:
    body = await api.get("/batch-size?service=svc&gpu=%C2%B2", status=400)  # '²'
    assert body["parameter"] == "gpu"


async def test_service_names_at_the_limits(api: Api) -> None:
    longest = "a" * 128
    assert (await api.get(f"/batch-size?service={longest}"))["service"] == longest
    odd = "ns/svc-1.v2:prod_x"
    assert (await api.get(f"/batch-size?service={odd}"))["service"] == odd


async def test_unknown_service_gets_the_default_batch(api: Api) -> None:
    body = await api.get("/batch-size?service=never-seen-before")
    assert body["batch_size"] == 4
    assert body["optimal_batch_size"] == 4


async def test_before_the_first_sample_gpu_0_is_assumed(make_api: MakeApi) -> None:
    a = await make_api()
    body = await a.get("/batch-size?service=svc")
    assert body["batch_size"] == 4
    assert body["gpu"]["index"] == 0
    assert body["gpu"]["memory_used_bytes"] is None


# --------------------------------------------------------------------------- POST /reports


async def test_valid_report_answers_the_decision(api: Api) -> None:
    resp = await api.client.post("/reports", json={"service": "svc-a", "gpu": 0, "batch_size": 4,
                                                   "peak_bytes": 30 * GIB, "allocated_bytes": 6 * GIB,
                                                   "reserved_bytes": 8 * GIB, "inactive_split_bytes": 0})
    assert resp.status == 200
    assert resp.headers["ETag"].startswith('W/"')
    body = await resp.json()
    assert body["service"] == "svc-a"
    assert body["batch_size"] == 4
    assert body["gpu"]["index"] == 0
    svc = api.engine.state.services[(0, "svc-a")]
    assert svc.reported_batch == 4
    assert svc.allocated_bytes == 6 * GIB and svc.reserved_bytes == 8 * GIB


async def test_minimal_report_without_gpu(api: Api) -> None:
    body = await api.post({"service": "svc-a"})
    assert body["service"] == "svc-a"
    assert body["gpu"]["index"] == 0


async def test_oom_report_lowers_the_batch_at_once(make_api: MakeApi) -> None:
    a = await make_api(settings=Settings(default_batch_size=8))
    await a.tick()
    assert (await a.get("/batch-size?service=svc-a&gpu=0"))["batch_size"] == 8
    body = await a.post({"service": "svc-a", "gpu": 0, "batch_size": 8, "oom": True})
    assert body["batch_size"] < 8
    assert body["batch_size"] == 7  # 90 % of 8, rounded down
    assert "OOM" in body["reason"]
    polled = await a.get("/batch-size?service=svc-a")
    assert polled["batch_size"] == 7
    assert polled["reason"] == body["reason"]
    metrics = await a.metrics()
    assert f'vlm_current_batch_size{{gpu="0",gpu_instance_id="",mig_uuid="",profile="",service="svc-a",uuid="{uuid_of(0)}"}} 7.0' in metrics


async def test_report_for_an_unknown_gpu(make_api: MakeApi) -> None:
    a = await make_api(gpus=2)
    await a.tick()
    body = await a.post({"service": "svc-a", "gpu": 7}, status=400)
    assert body["field"] == "gpu"
    assert body["available"] == [0, 1]
    assert a.engine.state.services == {}


BAD_REPORTS: list[tuple[str, bytes, str]] = [
    ("not json", b"{not json", "body"),
    ("empty", b"", "body"),
    ("json array", b'[{"service": "svc-a"}]', "body"),
    ("json string", b'"svc-a"', "body"),
    ("missing service", b'{"gpu": 0, "batch_size": 4}', "service"),
    ("bad service", b'{"service": "bad name"}', "service"),
    ("batch_size string", b'{"service": "svc-a", "batch_size": "a"}', "batch_size"),
    ("batch_size zero", b'{"service": "svc-a", "batch_size": 0}', "batch_size"),
    ("batch_size float", b'{"service": "svc-a", "batch_size": 4.5}', "batch_size"),
    ("batch_size bool", b'{"service": "svc-a", "batch_size": true}', "batch_size"),
    ("negative peak", b'{"service": "svc-a", "peak_bytes": -1}', "peak_bytes"),
    ("huge peak", b'{"service": "svc-a", "peak_bytes": 1e300}', "peak_bytes"),
    ("negative allocated", b'{"service": "svc-a", "allocated_bytes": -5}', "allocated_bytes"),
    ("negative split", b'{"service": "svc-a", "inactive_split_bytes": -5}', "inactive_split_bytes"),
    ("oom string", b'{"service": "svc-a", "batch_size": 8, "oom": "yes"}', "oom"),
    ("unknown field", b'{"service": "svc-a", "batch": 8}', "batch"),
    ("oom without batch", b'{"service": "svc-a", "oom": true}', "batch_size"),
    ("gpu negative", b'{"service": "svc-a", "gpu": -1}', "gpu"),
    ("gpu bool", b'{"service": "svc-a", "gpu": true}', "gpu"),
    ("gpu junk", b'{"service": "svc-a", "gpu": "abc"}', "gpu"),
]


@pytest.mark.parametrize(("raw", "field"), [(raw, field) for _, raw, field in BAD_REPORTS],
                         ids=[name for name, _, _ in BAD_REPORTS])
async def test_bad_report_is_rejected_naming_the_field(make_api: MakeApi, raw: bytes, field: str) -> None:
    a = await make_api(settings=Settings(default_batch_size=8))
    await a.tick()
    await a.post({"service": "svc-a", "gpu": 0, "batch_size": 8, "allocated_bytes": GIB, "reserved_bytes": 2 * GIB})
    before = await a.client.get("/batch-size?service=svc-a")
    before_body = await before.json()
    metrics_before = await a.metrics()
    state_before = a.engine.state

    resp = await a.client.post("/reports", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == field
    assert isinstance(body["error"], str) and body["error"]

    assert a.engine.state is state_before
    after = await a.client.get("/batch-size?service=svc-a")
    assert await after.json() == before_body
    assert after.headers["ETag"] == before.headers["ETag"]
    assert await a.metrics() == metrics_before


async def test_deeply_nested_json_is_a_400(api: Api) -> None:
    resp = await api.client.post("/reports", data=b"[" * 50_000)
    assert resp.status == 400
    assert (await resp.json())["field"] == "body"


async def test_non_ascii_digit_gpu_in_a_report_is_a_400(api: Api) -> None:
    body = await api.post({"service": "svc-a", "gpu": "²"}, status=400)
    assert body["field"] == "gpu"


async def test_body_over_64_kib_with_content_length_is_413(api: Api) -> None:
    state_before = api.engine.state
    metrics_before = await api.metrics()
    raw = b'{"service": "svc-a", "oom": true, "batch_size": 4}' + b" " * MAX_REPORT_BYTES
    resp = await api.client.post("/reports", data=raw)
    assert resp.status == 413
    assert "error" in await resp.json()
    assert api.engine.state is state_before
    assert await api.metrics() == metrics_before
    # the server goes on
    assert (await api.get("/batch-size?service=svc-a"))["batch_size"] == 4


async def test_chunked_body_over_64_kib_is_413(api: Api) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"service": "svc-a", "oom": true, "batch_size": 4' + b" " * (MAX_REPORT_BYTES + 100) + b"}"

    state_before = api.engine.state
    resp = await api.client.post("/reports", data=body())
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status == 413
    assert "error" in await resp.json()
    assert api.engine.state is state_before


class ServerReads:
    """Signals when a read of a request body returns (to stream a body in pieces deterministically)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.returned = asyncio.Event()
        read, readany = StreamReader.read, StreamReader.readany

        async def hooked_read(reader: StreamReader, n: int = -1) -> bytes:
            data = await read(reader, n)
            self.returned.set()
            return data

        async def hooked_readany(reader: StreamReader) -> bytes:
            data = await readany(reader)
            self.returned.set()
            return data

        monkeypatch.setattr(StreamReader, "read", hooked_read)
        monkeypatch.setattr(StreamReader, "readany", hooked_readany)

    def pieces(self, *parts: bytes) -> Callable[[], AsyncIterator[bytes]]:
        """A body that sends each part only after the server has read from the request body."""
        async def gen() -> AsyncIterator[bytes]:
            for i, part in enumerate(parts):
                if i:
                    await asyncio.wait_for(self.returned.wait(), timeout=5)
                yield part
        return gen


async def test_report_arriving_in_pieces_is_read_whole(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps({"service": "svc-a", "gpu": 0, "batch_size": 4}).encode()
    reads = ServerReads(monkeypatch)
    resp = await api.client.post("/reports", data=reads.pieces(raw[:10], raw[10:])(),
                                 headers={"Content-Length": str(len(raw))})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["service"] == "svc-a"


async def test_chunked_body_over_64_kib_in_pieces_is_413(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = ServerReads(monkeypatch)
    parts = [b'{"service": "svc-a", "pad": "'] + [b"x" * 4096] * 17 + [b'"}']
    resp = await api.client.post("/reports", data=reads.pieces(*parts)())
    assert resp.status == 413, await resp.text()


# --------------------------------------------------------------------------- GET /status, /history


async def test_status(make_api: MakeApi) -> None:
    a = await make_api(gpus=2)
    a.gpus.used[1] = 70 * GIB  # over gc_threshold: a cleanup is raised
    await a.tick()
    await a.get("/batch-size?service=svc-a&gpu=0")
    body = await a.get("/status")
    assert body["backend"] == "scripted"
    assert body["ready"] is True
    assert body["healthy"] is True
    assert body["monitoring"] is True
    assert body["samples"] == 1
    assert body["sample_errors"] == 0
    assert body["last_sample_at"] == a.clock()
    assert body["settings"]["monitoring_interval"] == INTERVAL
    assert body["settings"]["strategy"] == "balanced"
    gpus = {g["index"]: g for g in body["gpus"]}
    assert set(gpus) == {0, 1}
    assert gpus[0]["pressure"] == "normal" and gpus[0]["cleanup_epoch"] == 0
    assert gpus[1]["pressure"] == "warning" and gpus[1]["cleanup_epoch"] == 1
    assert gpus[1]["uuid"] == uuid_of(1)
    assert gpus[1]["memory_usage_percent"] == 87.5
    assert gpus[0]["fragmentation_percent"] is None
    assert [s["service"] for s in body["services"]] == ["svc-a"]
    assert body["services"][0]["batch_size"] == 4


async def test_status_before_the_first_sample(make_api: MakeApi) -> None:
    a = await make_api()
    body = await a.get("/status")
    assert body["gpus"] == [] and body["services"] == []
    assert body["ready"] is False and body["healthy"] is False
    assert body["samples"] == 0 and body["last_sample_at"] is None


async def test_history(make_api: MakeApi) -> None:
    a = await make_api(gpus=2)
    for i in range(5):
        a.gpus.used[0] = (20 + i) * GIB
        await a.tick()
    a.gpus.used[1] = 70 * GIB  # a cleanup on GPU 1
    await a.tick()
    await a.post({"service": "svc-a", "gpu": 0, "batch_size": 4, "oom": True})  # events on GPU 0

    full = await a.get("/history")
    assert set(full["gpus"]) == {"0", "1"}
    assert len(full["gpus"]["0"]) == 6
    assert [s["memory_used_bytes"] for s in full["gpus"]["0"]][:5] == [(20 + i) * GIB for i in range(5)]
    kinds = {(e["gpu"], e["kind"]) for e in full["events"]}
    assert (1, "cleanup_raised") in kinds
    assert (0, "batch_changed") in kinds

    last2 = await a.get("/history?limit=2")
    assert [s["timestamp"] for s in last2["gpus"]["0"]] == [a.clock() - INTERVAL, a.clock()]
    assert len(last2["gpus"]["1"]) == 2
    assert len(last2["events"]) <= 2

    only1 = await a.get("/history?gpu=1")
    assert set(only1["gpus"]) == {"1"}
    assert only1["events"] and all(e["gpu"] == 1 for e in only1["events"])
    by_uuid = await a.get(f"/history?gpu={uuid_of(0)}")
    assert set(by_uuid["gpus"]) == {"0"}
    assert by_uuid["events"] and all(e["gpu"] == 0 for e in by_uuid["events"])


async def test_history_is_bounded_by_history_size(make_api: MakeApi) -> None:
    a = await make_api(settings=Settings(history_size=3))
    for _ in range(5):
        await a.tick()
    body = await a.get("/history?limit=100")
    assert [s["timestamp"] for s in body["gpus"]["0"]] == [a.clock() - 2 * INTERVAL, a.clock() - INTERVAL, a.clock()]


@pytest.mark.parametrize(("query", "parameter"), [
    ("limit=0", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"), ("limit=100001", "limit"),
    ("gpu=abc", "gpu"), ("gpu=-1", "gpu"),
])
async def test_history_invalid_parameters(api: Api, query: str, parameter: str) -> None:
    body = await api.get(f"/history?{query}", status=400)
    assert body["parameter"] == parameter


async def test_history_unknown_gpu(api: Api) -> None:
    body = await api.get("/history?gpu=3", status=400)
    assert body["parameter"] == "gpu"
    assert body["available"] == [0]


# --------------------------------------------------------------------------- /health, /ready


async def test_health_follows_the_last_sample(make_api: MakeApi) -> None:
    a = await make_api()
    body = await a.get("/health", status=503)
    assert body["status"] == "stale"
    assert body["last_sample_age_s"] is None
    await a.tick()
    body = await a.get("/health")
    assert body["status"] == "ok"
    assert body["last_sample_age_s"] == 0
    assert body["max_age_s"] == 3 * INTERVAL
    a.clock.advance(3 * INTERVAL - 0.5)
    await a.get("/health")
    a.clock.advance(1.0)
    body = await a.get("/health", status=503)
    assert body["status"] == "stale"
    assert body["last_sample_age_s"] == 3 * INTERVAL + 0.5
    await a.tick(advance=0)
    await a.get("/health")


async def test_health_while_paused(api: Api) -> None:
    api.sampler.running = False
    api.clock.advance(100 * INTERVAL)
    body = await api.get("/health")
    assert body["status"] == "paused"


async def test_ready(make_api: MakeApi) -> None:
    a = await make_api(gpus=2)
    body = await a.get("/ready", status=503)
    assert body["status"] == "not ready"
    assert body["backend"] == "scripted"
    a.gpus.failed = {0, 1}
    await a.tick()
    await a.get("/ready", status=503)
    await a.tick()
    await a.get("/ready", status=503)
    a.gpus.failed = {1}
    await a.tick()
    assert (await a.get("/ready"))["status"] == "ready"


async def test_cpu_only_host(make_api: MakeApi) -> None:
    a = await make_api(backend=NoGpuBackend())
    assert not a.engine.has_gpus  # as serve makes it for backend none
    await a.get("/ready", status=503)
    await a.tick()
    body = await a.get("/ready")
    assert body == {"status": "ready", "backend": "none"}
    await a.get("/health")
    decision = await a.get("/batch-size?service=svc-a")
    assert decision["gpu"] is None
    assert decision["batch_size"] == 16 == a.engine.settings.max_batch_size
    assert decision["optimal_batch_size"] == 16
    assert decision["pressure"] == "normal"
    report = await a.post({"service": "svc-a", "batch_size": 16, "oom": True})
    assert report["gpu"] is None and report["batch_size"] == 16
    bad = await a.get("/batch-size?service=svc-a&gpu=0", status=400)
    assert bad["parameter"] == "gpu" and bad["available"] == []
    status = await a.get("/status")
    assert status["gpus"] == [] and status["backend"] == "none"


# --------------------------------------------------------------------------- /metrics


async def test_metrics_endpoint(api: Api) -> None:
    await api.get("/batch-size?service=svc-a")
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert f'vlm_memory_usage_percent{{gpu="0",gpu_instance_id="",mig_uuid="",profile="",uuid="{uuid_of(0)}"}} 25.0' in text
    assert "# TYPE vlm_memory_usage_percent gauge" in text
    assert f'vlm_current_batch_size{{gpu="0",gpu_instance_id="",mig_uuid="",profile="",service="svc-a",uuid="{uuid_of(0)}"}} 4.0' in text
    assert "vlm_optimizer_sample_duration_seconds_count 1.0" in text


# --------------------------------------------------------------------------- errors


async def test_unknown_path_is_a_json_404(api: Api) -> None:
    body = await api.get("/no-such-thing", status=404)
    assert "error" in body


@pytest.mark.parametrize(("method", "path", "allow"), [("POST", "/batch-size", "GET"),
                                                        ("GET", "/reports", "POST"),
                                                        ("DELETE", "/status", "GET")])
async def test_wrong_method_is_a_json_405(api: Api, method: str, path: str, allow: str) -> None:
    resp = await api.client.request(method, path)
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert "error" in await resp.json()
    assert allow in resp.headers["Allow"]


async def test_unexpected_exception_is_a_json_500_and_the_server_goes_on(api: Api,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_poll = api.engine.poll
    calls = 0

    def poll_failing_once(service: str, gpu: int | str | None, now: float, pod: str | None = None,
                          peer: str | None = None) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return real_poll(service, gpu, now, pod=pod, peer=peer)

    monkeypatch.setattr(api.engine, "poll", poll_failing_once)
    body = await api.get("/batch-size?service=svc-a", status=500)
    assert body == {"error": "internal error"}
    assert "boom" not in json.dumps(body)
    again = await api.get("/batch-size?service=svc-a")
    assert again["batch_size"] == 4
    assert calls == 2
    await api.get("/status")


# --------------------------------------------------------------------------- the sampler as the app's task


async def test_app_runs_and_stops_the_sampler(aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock()
    backend = ScriptedBackend()
    engine = Engine(Settings())
    delays: list[float] = []
    slept = asyncio.Event()
    parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        slept.set()
        await parked  # never resolved: the loop parks here until the app cancels it

    sampler = Sampler(backend, engine, clock=clock, sleep=sleep)
    client = await aiohttp_client(build_app(engine, sampler))
    await asyncio.wait_for(slept.wait(), timeout=5)
    assert sampler.stats.samples == 1
    assert delays == [INTERVAL]
    resp = await client.get("/ready")
    assert resp.status == 200
    assert not backend.closed

    await client.close()
    assert backend.closed
    assert parked.cancelled()
    assert sampler.stats.samples == 1


async def test_app_without_the_sampler_does_not_own_it(aiohttp_client: AiohttpClient) -> None:
    backend = ScriptedBackend()
    engine = Engine(Settings())
    sampler = Sampler(backend, engine, clock=FakeClock(), sleep=no_sleep)
    client = await aiohttp_client(build_app(engine, sampler, run_sampler=False))
    resp = await client.get("/ready")
    assert resp.status == 503
    await client.close()
    assert backend.calls == 0
    assert not backend.closed
