"""``GET /batch-size`` answers from ready-encoded decisions: the same bytes as encoding on every poll.

The encoded body and ETag of a (service, GPU) are reused only while its decision is unchanged.
These tests change the decision every way it can change (a sample, a report, an override, a
settings change, a state restored from disk) and check that the next poll carries the change, and
that the answer is byte for byte what encoding the decision afresh gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from optimizer.api import build_app
from optimizer.api.admin import build_admin_app
from optimizer.api.decisions import decision_dict, decision_etag
from optimizer.api.encoded import SLACK, Encoded, EncodedDecisions
from optimizer.api.keys import ENCODED
from optimizer.config import Settings
from optimizer.engine import Decision, Engine
from optimizer.gpu.none import NoGpuBackend
from optimizer.gpu.types import GpuBackend
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, no_sleep

GIB = 1024**3
INTERVAL = Settings().monitoring_interval
Client = TestClient[web.Request, web.Application]


@dataclass
class Rig:
    server: BaseTestServer
    client: Client
    admin: Client
    engine: Engine
    sampler: Sampler
    backend: GpuBackend
    clock: FakeClock
    app: web.Application

    @property
    def gpus(self) -> ScriptedBackend:
        assert isinstance(self.backend, ScriptedBackend)
        return self.backend

    @property
    def encoded(self) -> EncodedDecisions:
        return self.app[ENCODED]

    async def tick(self) -> None:
        if self.sampler.stats.samples:
            self.clock.advance(INTERVAL)
        assert await self.sampler.tick() is not None

    async def poll(self, service: str = "svc", **headers: str) -> tuple[int, Mapping[str, str], bytes]:
        resp = await self.client.get(f"/batch-size?service={service}", headers=headers)
        return resp.status, resp.headers, await resp.read()

    async def body(self, service: str = "svc") -> Any:
        status, _, body = await self.poll(service)
        assert status == 200, body
        return json.loads(body)


class MakeRig(Protocol):
    def __call__(self, gpus: int = 1, settings: Settings | None = None,
                 backend: GpuBackend | None = None) -> Awaitable[Rig]: ...


@pytest.fixture
def make_rig(aiohttp_client: AiohttpClient) -> MakeRig:
    async def make(gpus: int = 1, settings: Settings | None = None, backend: GpuBackend | None = None) -> Rig:
        clock = FakeClock()
        backend = backend or ScriptedBackend(gpus)
        engine = Engine(settings or Settings(), has_gpus=backend.name != "none")  # as serve makes it
        sampler = Sampler(backend, engine, clock=clock, sleep=no_sleep)
        app = build_app(engine, sampler, run_sampler=False)
        admin = build_admin_app(app, b"tok")
        client = await aiohttp_client(app)
        admin_client = await aiohttp_client(admin, headers={"Authorization": "Bearer tok",
                                                            "Content-Type": "application/json"})
        return Rig(client.server, client, admin_client, engine, sampler, backend, clock, app)

    return make


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    r = await make_rig()
    await r.tick()
    return r


# --------------------------------------------------------------------------- the same bytes as before


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def reference_dict(d: Decision) -> dict[str, Any]:
    """The JSON object of a decision as ``Decision.to_dict`` wrote it before it moved to the API layer."""
    gpu = None
    if d.gpu_index is not None:
        gpu = {"index": d.gpu_index, "uuid": d.gpu_uuid, "name": d.gpu_name,
               "memory_used_bytes": d.memory_used_bytes, "memory_total_bytes": d.memory_total_bytes}
    return {"service": d.service, "batch_size": d.batch_size, "optimal_batch_size": d.optimal_batch_size,
            "strategy": d.strategy, "pressure": d.pressure, "cleanup_epoch": d.cleanup_epoch, "reason": d.reason,
            "updated_at": d.updated_at, "gpu": gpu, "registered": d.registered}


def reference_etag(d: Decision) -> str:
    """The ETag of a decision as ``Decision.etag`` computed it before it moved to the API layer."""
    key = json.dumps([d.service, d.gpu_index, d.batch_size, d.optimal_batch_size, d.strategy,
                      d.pressure, d.cleanup_epoch, d.reason, d.registered])
    return 'W/"' + hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + '"'


def reference_response(request: web.Request, d: Decision, interval: float) -> web.Response:
    """How ``/batch-size`` answered before the encoded decisions: a fresh encoding on every poll."""
    etag = reference_etag(d)
    headers = {"ETag": etag, "Cache-Control": f"max-age={max(1, math.floor(interval))}"}
    inm = request.headers.get("If-None-Match")
    if inm is not None and (inm.strip() == "*" or _opaque(etag) in [_opaque(t) for t in inm.split(",")]):
        return web.Response(status=304, headers=headers)
    return web.json_response(reference_dict(d), headers=headers,
                             dumps=lambda o: json.dumps(o, separators=(",", ":")))


async def reference_server(aiohttp_server: AiohttpServer, engine: Engine) -> TestServer:
    """A server answering each request with ``reference_response`` of the engine's current decision."""
    async def handler(request: web.Request) -> web.Response:
        service = request.query["service"]
        d = engine.decision_of(engine.state.services[(0, service)])
        return reference_response(request, d, engine.settings.monitoring_interval)

    app = web.Application()
    app.router.add_get("/batch-size", handler)
    server: TestServer = await aiohttp_server(app)
    return server


async def raw_get(server: BaseTestServer, path: str, **headers: str) -> tuple[int, list[tuple[str, str]], bytes]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    return int(lines[0].split()[1]), [(k, v) for k, v in fields if k.lower() != "date"], body


async def test_answers_are_byte_identical_to_a_fresh_encoding(rig: Rig, aiohttp_server: AiohttpServer) -> None:
    await rig.poll("svc")  # registers the service
    ref = await reference_server(aiohttp_server, rig.engine)
    path = "/batch-size?service=svc"
    for _ in range(2):  # the second answer comes from the kept encoding
        assert await raw_get(rig.server, path) == await raw_get(ref, path)
    status, headers, body = await raw_get(rig.server, path)
    assert status == 200
    assert dict(headers)["Content-Type"] == "application/json; charset=utf-8"
    etag = dict(headers)["ETag"]
    for inm in (etag, etag[2:], f'W/"other", {etag}', "*", 'W/"other"', " " + etag + " "):
        assert await raw_get(rig.server, path, **{"If-None-Match": inm}) == await raw_get(ref, path, **{
            "If-None-Match": inm}), inm
    rig.gpus.used[0] = 33 * GIB
    await rig.tick()
    assert await raw_get(rig.server, path) == await raw_get(ref, path)
    assert rig.encoded.hits > 0


async def test_polls_between_samples_reuse_the_encoding(rig: Rig) -> None:
    status, headers, body = await rig.poll()
    misses = rig.encoded.misses
    again_status, again_headers, again_body = await rig.poll()
    assert (again_status, again_headers["ETag"], again_body) == (status, headers["ETag"], body)
    assert rig.encoded.misses == misses
    assert rig.encoded.hits >= 1


# --------------------------------------------------------------------------- every change shows at the next poll


async def test_a_new_sample_refreshes_the_memory_figures(rig: Rig) -> None:
    status, headers, _ = await rig.poll()
    assert (await rig.body())["gpu"]["memory_used_bytes"] == 20 * GIB
    for used in (21, 22, 22, 37):
        rig.gpus.used[0] = used * GIB
        await rig.tick()
        body = await rig.body()
        assert body["gpu"]["memory_used_bytes"] == used * GIB == rig.engine.gpu_sample(0).memory_used_bytes  # type: ignore[union-attr]
        assert body["gpu"]["memory_total_bytes"] == 80 * GIB
        # what a service acts on has not changed: still 304 for the first ETag
        assert (await rig.poll(**{"If-None-Match": headers["ETag"]}))[0] == 304


async def test_a_report_that_lowers_the_batch_changes_the_answer(make_rig: MakeRig) -> None:
    r = await make_rig(settings=Settings(default_batch_size=8))
    await r.tick()
    _, headers, body = await r.poll()
    assert json.loads(body)["batch_size"] == 8
    resp = await r.client.post("/reports", json={"service": "svc", "gpu": 0, "batch_size": 8, "oom": True})
    reply = await resp.read()
    assert resp.headers["ETag"] != headers["ETag"]
    status, after_headers, after = await r.poll(**{"If-None-Match": headers["ETag"]})
    assert status == 200
    assert after == reply
    assert json.loads(after)["batch_size"] == 7
    assert after_headers["ETag"] == resp.headers["ETag"]
    assert (await r.poll(**{"If-None-Match": after_headers["ETag"]}))[0] == 304


async def test_an_override_and_its_clearing_change_the_answer(rig: Rig) -> None:
    _, headers, _ = await rig.poll()
    resp = await rig.admin.put("/admin/batch-size", json={"service": "svc", "gpu": 0, "batch_size": 2})
    assert resp.status == 200, await resp.text()
    status, overridden, body = await rig.poll(**{"If-None-Match": headers["ETag"]})
    assert status == 200
    overridden_body = json.loads(body)
    assert overridden_body["batch_size"] == 2
    resp = await rig.admin.delete("/admin/batch-size?service=svc&gpu=0")
    assert resp.status == 200, await resp.text()
    status, _, body = await rig.poll(**{"If-None-Match": overridden["ETag"]})
    assert status == 200
    cleared = json.loads(body)
    assert cleared["reason"] != overridden_body["reason"]
    assert cleared == decision_dict(rig.engine.decision_of(rig.engine.state.services[(0, "svc")]))
    await rig.tick()  # the policy decides again
    assert await rig.body() == decision_dict(rig.engine.decision_of(rig.engine.state.services[(0, "svc")]))


async def test_a_settings_change_shows_in_the_body_and_the_headers(rig: Rig) -> None:
    _, headers, body = await rig.poll()
    assert json.loads(body)["strategy"] == "balanced"
    assert headers["Cache-Control"] == "max-age=5"
    resp = await rig.admin.patch("/admin/config", json={"strategy": "conservative"})
    assert resp.status == 200, await resp.text()
    status, changed, body = await rig.poll(**{"If-None-Match": headers["ETag"]})
    assert status == 200
    assert json.loads(body)["strategy"] == "conservative"
    assert changed["ETag"] != headers["ETag"]
    # the interval is not part of the decision, but Cache-Control follows it at once
    resp = await rig.admin.patch("/admin/config", json={"monitoring_interval": 30})
    assert resp.status == 200, await resp.text()
    _, after, body_after = await rig.poll()
    assert after["Cache-Control"] == "max-age=30"
    assert body_after == body
    status, not_modified, _ = await rig.poll(**{"If-None-Match": after["ETag"]})
    assert status == 304 and not_modified["Cache-Control"] == "max-age=30"


async def test_a_state_swapped_without_a_revision_still_shows(rig: Rig) -> None:
    """A state restored from disk replaces services without a new revision; the answer follows it all the same."""
    await rig.poll()
    revision = rig.engine.revision
    svc = rig.engine.state.services[(0, "svc")]
    rig.engine.restore_services({(0, "svc"): dataclasses.replace(svc, batch_size=3, reason="restored")})
    assert rig.engine.revision == revision
    body = await rig.body()
    assert (body["batch_size"], body["reason"]) == (3, "restored")


async def test_services_and_gpus_are_kept_apart(make_rig: MakeRig) -> None:
    r = await make_rig(gpus=2)
    r.gpus.used[1] = 50 * GIB
    await r.tick()
    a0 = json.loads(await (await r.client.get("/batch-size?service=a&gpu=0")).read())
    a1 = json.loads(await (await r.client.get("/batch-size?service=a&gpu=1")).read())
    b0 = await r.body("b")
    assert (a0["service"], a0["gpu"]["index"], a0["gpu"]["memory_used_bytes"]) == ("a", 0, 20 * GIB)
    assert (a1["service"], a1["gpu"]["index"], a1["gpu"]["memory_used_bytes"]) == ("a", 1, 50 * GIB)
    assert (b0["service"], b0["gpu"]["index"]) == ("b", 0)


async def test_a_cpu_only_host_answers_the_time_of_each_poll(make_rig: MakeRig) -> None:
    r = await make_rig(backend=NoGpuBackend())
    assert not r.engine.has_gpus  # as serve makes it for backend none
    await r.tick()
    first = await r.body()
    r.clock.advance(1.5)
    second = await r.body()
    assert second["updated_at"] == first["updated_at"] + 1.5 == r.clock()
    assert second["gpu"] is None


# --------------------------------------------------------------------------- the store itself


def decision(service: str = "svc", gpu: int | None = 0, batch: int = 4, used: int | None = 20 * GIB) -> Decision:
    return Decision(service=service, batch_size=batch, optimal_batch_size=batch, strategy="balanced",
                    pressure="normal", cleanup_epoch=0, reason="r", updated_at=1.0, gpu_index=gpu,
                    gpu_uuid=None if gpu is None else f"GPU-{gpu}", gpu_name=None if gpu is None else "g",
                    memory_used_bytes=used, memory_total_bytes=None if gpu is None else 80 * GIB)


def test_the_wire_form_of_a_decision_is_pinned() -> None:
    """The JSON body and ETag of two decisions, byte for byte, as released (the API layer writes them now)."""
    d = Decision(service="svc", batch_size=4, optimal_batch_size=6, strategy="balanced", pressure="high",
                 cleanup_epoch=2, reason='r "q" \u00e9', updated_at=1.5, gpu_index=0, gpu_uuid="GPU-0", gpu_name="g",
                 memory_used_bytes=20 * GIB, memory_total_bytes=80 * GIB)
    cpu = Decision(service="cpu", batch_size=32, optimal_batch_size=32, strategy="fixed", pressure="normal",
                   cleanup_epoch=0, reason="x", updated_at=2.0, gpu_index=None, gpu_uuid=None, gpu_name=None,
                   memory_used_bytes=None, memory_total_bytes=None, registered=False)
    assert Encoded.of(d).body == (
        b'{"service":"svc","batch_size":4,"optimal_batch_size":6,"strategy":"balanced","pressure":"high",'
        b'"cleanup_epoch":2,"reason":"r \\"q\\" \\u00e9","updated_at":1.5,"gpu":{"index":0,"uuid":"GPU-0",'
        b'"name":"g","memory_used_bytes":21474836480,"memory_total_bytes":85899345920},"registered":true}')
    assert Encoded.of(d).etag == decision_etag(d) == 'W/"71ece7fe6335d2e6"'
    assert Encoded.of(cpu).body == (
        b'{"service":"cpu","batch_size":32,"optimal_batch_size":32,"strategy":"fixed","pressure":"normal",'
        b'"cleanup_epoch":0,"reason":"x","updated_at":2.0,"gpu":null,"registered":false}')
    assert decision_etag(cpu) == 'W/"4aaf55e72846e1c5"'
    assert decision_dict(d) == reference_dict(d) and decision_dict(cpu) == reference_dict(cpu)


def test_encoded_is_the_compact_json_and_etag_of_the_decision() -> None:
    d = decision()
    e = Encoded.of(d)
    assert e.body == json.dumps(reference_dict(d), separators=(",", ":")).encode()
    assert e.etag == reference_etag(d) and e.opaque_etag == reference_etag(d)[2:]


@pytest.mark.parametrize(("header", "matches"), [
    ("{etag}", True), ("{bare}", True), (' {etag} ', True), ('W/"x", {etag}', True), ('"x",{bare}', True),
    ("*", True), (" * ", True), ('W/"x"', False), ("", False), ('"{bare_inner}x"', False),
])
def test_if_none_match_is_compared_weakly(header: str, matches: bool) -> None:
    e = Encoded.of(decision())
    value = header.format(etag=e.etag, bare=e.etag[2:], bare_inner=e.etag[3:-1])
    assert e.matches(value) is matches


def test_an_equal_decision_reuses_the_bytes_and_a_different_one_does_not() -> None:
    store = EncodedDecisions(lambda: {(0, "svc")})
    first = store.get(decision())
    assert store.get(decision()) is first
    moved = store.get(decision(used=21 * GIB))
    assert moved is not first
    assert json.loads(moved.body)["gpu"]["memory_used_bytes"] == 21 * GIB
    assert moved.etag == first.etag  # the memory figures are not part of the ETag
    assert store.get(decision(used=21 * GIB)) is moved
    assert (store.hits, store.misses) == (2, 2)
    assert len(store) == 1


def test_the_store_is_bounded_dropping_the_oldest_encoding() -> None:
    names = ["a", "b", "c"]
    store = EncodedDecisions(lambda: {(0, n) for n in names}, entries=2)
    a = store.get(decision("a"))
    store.get(decision("b"))
    store.get(decision("a", batch=5))  # re-encoded: now the newest
    store.get(decision("c"))  # full: "b" goes
    assert len(store) == 2
    assert store.get(decision("a", batch=5)) is not a
    misses = store.misses
    store.get(decision("b"))
    assert store.misses == misses + 1
    assert len(store) == 2
    with pytest.raises(ValueError, match="entries"):
        EncodedDecisions(lambda: (), entries=0)


def test_services_the_engine_forgot_are_dropped() -> None:
    live = {(0, f"old-{i}") for i in range(100)}
    store = EncodedDecisions(lambda: live)
    for i in range(100):
        store.get(decision(f"old-{i}"))
    assert len(store) == 100
    live = {(0, "new")}  # the old services expired
    store.get(decision("new"))
    assert len(store) <= 2 * len(live) + SLACK
    kept = store.get(decision("new"))
    assert store.get(decision("new")) is kept
    for i in range(1000):  # names polled once each, never live long: the store stays small
        store.get(decision(f"once-{i}"))
        assert len(store) <= 2 * len(live) + SLACK + 1


async def test_the_answers_store_follows_the_engines_services(make_rig: MakeRig) -> None:
    r = await make_rig(settings=Settings(service_expiry=30.0, max_services_per_gpu=4 * SLACK,
                                         max_services=4 * SLACK))
    await r.tick()
    for i in range(2 * SLACK):
        await r.poll(f"gone-{i}")
    assert len(r.encoded) == 2 * SLACK
    for _ in range(7):  # 35 s: past the expiry, the engine forgets them
        await r.tick()
    assert r.engine.state.services == {}
    await r.poll("new")
    assert len(r.encoded) == 1
    assert (await r.body("new"))["service"] == "new"
