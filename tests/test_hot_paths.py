"""The poll path at the cost of a lookup (issue 15): a known service's poll changes no state and builds nothing.

The work is counted with spies (calls into the policy, decisions made, Python calls and bytes allocated
per poll), not timed: a poll of one service costs the same with 2 or 200 services registered. Liveness,
kept apart from the policy state, still expires services exactly as the policy did when every poll
rebuilt the state (the same state, field for field, against the policy driven directly, in virtual time).
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from aiohttp import web

from optimizer import decision, gpu_lookup, policy
from optimizer.api import build_app
from optimizer.api.encoded import Encoded
from optimizer.config import Settings
from optimizer.engine import Engine, UnknownGpu
from optimizer.gpu.types import GpuSample
from optimizer.policy.types import PolicyState, ServiceReport, Snapshot
from optimizer.sampler import Sampler
from tests.api_harness import Api, MakeApi
from tests.fakes import ScriptedBackend

GIB = 1024**3


def snapshot(t: float, gpus: int = 1, used: int = 20 * GIB) -> Snapshot:
    return Snapshot(t, tuple(ScriptedBackend(gpus, used=used).sample(t)))


def engine_with(n: int) -> Engine:
    """An engine with ``n`` services registered on GPU 0, sampled once after they registered."""
    engine = Engine(Settings(max_services=512, max_services_per_gpu=512))
    engine.observe(snapshot(1.0))
    for i in range(n):
        engine.poll(f"svc-{i}", 0, 2.0)
    engine.observe(snapshot(6.0))
    return engine


class Work:
    """Python calls and peak bytes allocated while polling (``sys.setprofile``, ``tracemalloc``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.peak_bytes = 0

    def _count(self, frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            self.calls += 1


def polled(engine: Engine, polls: int = 20) -> Work:
    """The work of ``polls`` polls of ``svc-0``, after one that may make its decision."""
    engine.poll("svc-0", 0, 7.0)
    work = Work()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sys.setprofile(work._count)
        try:
            for k in range(polls):
                engine.poll("svc-0", 0, 7.0 + k / 100)
        finally:
            sys.setprofile(None)
        work.peak_bytes = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return work


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of the calls that rebuild state or decisions: the policy's touch, a new Decision, a GPU scan."""
    counts = {"touch": 0, "of_service": 0, "resolve_gpu": 0, "gpu_sample": 0}

    def spy(module: Any, name: str) -> None:
        real = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    spy(policy, "touch")
    spy(decision, "of_service")
    spy(gpu_lookup, "resolve_gpu")
    spy(gpu_lookup, "gpu_sample")
    yield counts


def test_a_known_services_poll_rebuilds_nothing(spies: dict[str, int]) -> None:
    engine = engine_with(200)
    first = engine.poll("svc-0", 0, 7.0)
    spies.update(dict.fromkeys(spies, 0))
    revision = engine.revision
    for k in range(50):
        assert engine.poll("svc-0", 0 if k % 2 else None, 7.0 + k) is first  # the same decision, reused
    assert spies == {"touch": 0, "of_service": 0, "resolve_gpu": 0, "gpu_sample": 0}
    assert engine.revision == revision  # nothing worth saving changed
    assert engine.state.services[(0, "svc-0")].last_seen == 56.0  # yet its liveness is known


def test_a_polls_work_does_not_grow_with_the_services_registered() -> None:
    few, many = polled(engine_with(2)), polled(engine_with(200))
    assert many.calls == few.calls  # the same Python calls: nothing iterates over the services
    # a copy of the services (200 entries: ~10 KiB) would show; the rest is the same at 2 and 200
    assert many.peak_bytes < few.peak_bytes + 1024, (few.peak_bytes, many.peak_bytes)


def test_a_new_decision_is_made_only_when_its_inputs_change(spies: dict[str, int]) -> None:
    engine = engine_with(3)
    before = engine.poll("svc-0", 0, 7.0)
    engine.observe(snapshot(11.0, used=30 * GIB))  # a new sample: new figures
    after = engine.poll("svc-0", 0, 12.0)
    assert after is not before and after.memory_used_bytes == 30 * GIB
    assert engine.poll("svc-0", 0, 13.0) is after
    engine.set_runtime({"strategy": "conservative"})
    assert engine.poll("svc-0", 0, 14.0).strategy == "conservative"


# --------------------------------------------------------------------------- liveness, in virtual time


class Reference:
    """The policy driven as the engine drove it when every poll rebuilt the state (``policy.touch``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = PolicyState()
        self.snapshot: Snapshot | None = None

    def sample(self, gpu: int) -> GpuSample | None:
        return gpu_lookup.gpu_sample(self.snapshot, gpu)

    def poll(self, service: str, now: float) -> None:
        self.state, _ = policy.touch(self.state, service, 0, now, self.settings, self.sample(0))

    def report(self, service: str, now: float, batch: int) -> None:
        r = ServiceReport(service=service, gpu=0, timestamp=now, batch_size=batch, peak_bytes=GIB)
        self.state = policy.apply_report(self.state, r, self.settings, self.sample(0)).state

    def observe(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.state = policy.decide(snap, self.state, self.settings).state


def test_liveness_expires_services_exactly_as_before() -> None:
    settings = Settings(service_expiry=30.0)
    engine, ref = Engine(settings), Reference(settings)
    # (time, what): polls and reports of three services; samples every 5 s of virtual time
    script: list[tuple[float, str, str]] = [
        (1.0, "poll", "a"), (1.5, "poll", "b"), (2.0, "poll", "c"), (3.0, "report", "b"), (4.0, "poll", "b"),
        (12.0, "poll", "a"), (13.0, "report", "c"), (21.0, "poll", "a"), (24.0, "poll", "b"),
        (24.5, "report", "b"), (33.0, "poll", "a"), (47.0, "poll", "a"), (58.0, "report", "a"),
    ]
    alive: dict[float, set[str]] = {}
    t = 0.0
    while t <= 90.0:
        for at, what, service in [s for s in script if t - 5.0 < s[0] <= t]:
            if what == "poll":
                engine.poll(service, 0, at)
                ref.poll(service, at)
            else:
                engine.report(service, 0, at, batch_size=4, peak_bytes=GIB)
                ref.report(service, at, 4)
        snap = snapshot(t)
        engine.observe(snap)
        ref.observe(snap)
        assert dict(engine.state.services) == dict(ref.state.services), t  # field for field, last_seen too
        alive[t] = {name for _, name in engine.state.services}
        t += 5.0
    assert alive[50.0] == {"a", "b"}  # b: its report at 24.5 keeps it until 54.5
    assert alive[55.0] == {"a"}
    assert alive[60.0] == {"a"} and alive[85.0] == {"a"}  # a reported at 58
    assert alive[90.0] == set()


def test_a_report_after_a_poll_and_a_poll_after_a_report_each_count() -> None:
    engine = Engine(Settings())
    engine.observe(snapshot(1.0))
    engine.poll("svc", 0, 2.0)
    engine.poll("svc", 0, 3.0)
    engine.report("svc", 0, 4.0, batch_size=4)
    assert engine.state.services[(0, "svc")].last_seen == 4.0
    engine.poll("svc", 0, 5.0)
    assert engine.state.services[(0, "svc")].last_seen == 5.0


# --------------------------------------------------------------------------- GPUs by index


def mixed_snapshot() -> Snapshot:
    """GPU 1 failed, listed first; GPU 0 healthy; GPU 2 a MIG device of parent 0."""
    g0, g1, g2 = ScriptedBackend(3).sample(1.0)
    g1 = GpuSample(**{**vars_of(g1), "failed": True})
    g2 = GpuSample(**{**vars_of(g2), "uuid": "MIG-abc", "parent_index": 0, "gpu_instance_id": 1,
                      "compute_instance_id": 0})
    return Snapshot(1.0, (g1, g0, g2))


def vars_of(g: GpuSample) -> dict[str, Any]:
    return {f: getattr(g, f) for f in g.__dataclass_fields__}


@pytest.mark.parametrize("snap", [None, Snapshot(1.0, ()), snapshot(1.0, gpus=2), mixed_snapshot()],
                         ids=["none", "empty", "two", "mixed"])
@pytest.mark.parametrize("has_gpus", [True, False])
def test_the_index_resolves_every_selector_as_the_scan_did(snap: Snapshot | None, has_gpus: bool) -> None:
    index = gpu_lookup.GpuIndex.of(snap)
    registered = {(2, "on-two"), (0, "on-zero"), (1, "on-one")}
    uuids = [g.uuid for g in snap.gpus] if snap else []
    for service in ("on-two", "on-zero", "on-one", "new"):
        for selector in [None, 0, 1, 2, 7, "GPU-nope", "0:1", "0:1:0", "0:2", *uuids]:
            try:
                expected: Any = gpu_lookup.resolve_gpu(snap, registered, has_gpus, service, selector)
            except UnknownGpu as exc:
                expected = ("unknown", str(exc), exc.available, exc.selectors)
            try:
                got: Any = index.resolve(registered, has_gpus, service, selector)
            except UnknownGpu as exc:
                got = ("unknown", str(exc), exc.available, exc.selectors)
            assert got == expected, (service, selector)
    for i in range(4):
        assert index.by_index.get(i) is gpu_lookup.gpu_sample(snap, i)


# --------------------------------------------------------------------------- the answers


def test_the_headers_are_built_once_per_encoding_and_max_age() -> None:
    engine = engine_with(1)
    e = Encoded.of(engine.poll("svc-0", 0, 7.0))
    ok, not_modified = e.headers(5)
    assert e.headers(5)[0] is ok and e.headers(5)[1] is not_modified
    assert list(ok.items()) == [("ETag", e.etag), ("Cache-Control", "max-age=5"),
                                ("Content-Type", "application/json; charset=utf-8"),
                                ("Content-Length", str(len(e.body)))]
    assert list(not_modified.items()) == [("ETag", e.etag), ("Cache-Control", "max-age=5")]
    assert e.headers(10)[1]["Cache-Control"] == "max-age=10"


def test_the_read_api_runs_no_middleware() -> None:
    engine = Engine(Settings())
    app = build_app(engine, Sampler(ScriptedBackend(1), engine), run_sampler=False)
    assert list(app.middlewares) == []


async def test_the_cache_control_follows_a_new_monitoring_interval(api: Api) -> None:
    resp = await api.client.get("/batch-size?service=svc")
    assert resp.headers["Cache-Control"] == "max-age=5"
    etag = resp.headers["ETag"]
    api.engine.set_runtime({"monitoring_interval": 12.0})
    resp = await api.client.get("/batch-size?service=svc", headers={"If-None-Match": etag})
    assert resp.status == 304 and resp.headers["Cache-Control"] == "max-age=12"
    resp = await api.client.get("/batch-size?service=svc")
    assert resp.status == 200 and resp.headers["Cache-Control"] == "max-age=12"


async def test_an_unexpected_exception_in_a_report_is_a_json_500(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(api.engine, "report", failing)
    body = await api.post({"service": "svc", "batch_size": 4}, status=500)
    assert body == {"error": "internal error"}


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("HEAD", "/batch-size?service=svc", 200, None), ("PUT", "/reports", 405, "POST"),
    ("PATCH", "/history", 405, "GET,HEAD"), ("GET", "/batch-size/", 404, None), ("POST", "/nothing", 404, None)])
async def test_what_no_route_takes_answers_as_the_router_did(api: Api, method: str, path: str, status: int,
                                                              allow: str | None) -> None:
    resp = await api.client.request(method, path)
    assert resp.status == status
    assert resp.headers.get("Allow") == allow
    if method != "HEAD":
        assert resp.content_type == "application/json"
    assert isinstance(api.client.app, web.Application)


async def test_a_polls_query_is_checked_once_per_query_string(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.api import routes, schemas

    calls: list[Any] = []
    real = schemas.parse_service

    def counted(value: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(value)
        return real(value, *args, **kwargs)

    monkeypatch.setattr(routes, "parse_service", counted)
    monkeypatch.setattr(routes, "_QUERIES", {})
    for _ in range(3):
        assert (await api.get("/batch-size?service=svc-q&gpu=0"))["service"] == "svc-q"
    assert calls == ["svc-q"]
    for _ in range(2):  # a bad one is checked (and refused) every time: it is not kept
        body = await api.get("/batch-size?service=bad%20name", status=400)
        assert body["parameter"] == "service"
    assert calls == ["svc-q", "bad name", "bad name"]
    # the raw string is the key: an encoded '&' is part of the name, not a separator
    assert (await api.get("/batch-size?service=a%3Ab"))["service"] == "a:b"
    body = await api.get("/batch-size?service=a%26b", status=400)
    assert body["parameter"] == "service"
    monkeypatch.setattr(routes, "MAX_QUERIES", 2)
    for name in ("x1", "x2", "x3"):
        await api.get(f"/batch-size?service={name}")
    assert len(routes._QUERIES) <= 2


# --------------------------------------------------------------------------- the header clock, per connection


async def test_keep_alive_requests_move_one_timer_and_a_late_header_is_still_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time

    from optimizer.api.admin import build_admin_app
    from optimizer.api.timeouts import ReadTimeouts, _Connection
    from optimizer.server import Listener, listening

    engine = Engine(Settings())
    app = build_app(engine, Sampler(ScriptedBackend(1), engine), run_sampler=False)
    admin = build_admin_app(app, b"tok")
    loop = asyncio.get_running_loop()
    armed = 0
    real_call_at = loop.call_at

    def call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal armed
        if isinstance(getattr(callback, "__self__", None), _Connection):
            armed += 1
        return real_call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", call_at)
    header_s = 0.5
    async with listening(Listener("read API", app, "127.0.0.1", 0), Listener("admin API", admin, "127.0.0.1", 0),
                         ReadTimeouts(header_s=header_s, body_s=0.5)) as addresses:
        port = int(addresses["api"][0].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(50):
            writer.write(b"GET /batch-size?service=svc HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        assert armed <= 3  # one timer for the connection (re-armed when it fired early), not one per request
        started = time.monotonic()
        writer.write(b"GET /batch-size?service=svc HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5.0)  # cut off at the bound: 408, closed
        assert data.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started >= header_s * 0.9
        writer.close()


# --------------------------------------------------------------------------- the kept answers (a repeat poll)


Answered = tuple[int, list[tuple[str, str]], bytes]


class Peers:
    """Polls of one read API from two client addresses (127.0.0.1 and 127.0.0.2: the peer the trust model reads)."""

    ADDRESSES = ("127.0.0.1", "127.0.0.2")

    def __init__(self, api: Api) -> None:
        import aiohttp

        self.api = api
        self.base = f"http://{api.client.server.host}:{api.client.server.port}"
        self.sessions = {ip: aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))
                         for ip in self.ADDRESSES}

    async def get(self, path: str, peer: str = "127.0.0.1", **headers: str) -> Answered:
        async with self.sessions[peer].get(self.base + path, headers=headers) as resp:
            kept = [(k, v) for k, v in resp.headers.items() if k.lower() != "date"]
            return resp.status, kept, await resp.read()

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()


def observable(engine: Engine) -> tuple[Any, ...]:
    """What a poll may change, as the engine shows it: the state (liveness too), revision, pods' GPUs, refusals."""
    return dict(engine.state.services), engine.revision, dict(engine.pod_gpus), dict(engine.refused)


def p_pod(name: str, service: str, ip: str) -> Any:
    from optimizer.pods import PodInfo

    return PodInfo(namespace="vlm", name=name, uid=f"uid-{name}", node="node-a", service=service,
                   phase="Running", ready=True, deleting=False, resource_version="1", ips=(ip,))


async def test_a_repeat_poll_is_answered_as_the_whole_path_answers_it(make_api: MakeApi,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same script against two read APIs, one answering repeat polls from its kept answers and one
    taking the whole path every time: every answer (status, headers, bytes) and everything a poll changes
    (the state with each service's last_seen, the revision, the pods' GPUs, the refusals) stays equal.

    It fails if a kept answer were served stale (after a sample, a report, an override, a setting, new
    pods, an expiry), without the liveness update, to another peer, or past validation and the trust model.
    """
    from optimizer.api.keys import ENCODED

    settings = Settings(max_services_per_gpu=2, service_expiry=60.0)
    fast, whole = await make_api(settings=settings), await make_api(settings=settings)
    monkeypatch.setattr(whole.client.app[ENCODED], "kept", lambda *args: None)  # the whole path only
    store = fast.client.app[ENCODED]
    real_kept = store.kept
    served = [0]

    def counted(*args: Any) -> Any:
        kept = real_kept(*args)
        served[0] += kept is not None
        return kept

    monkeypatch.setattr(store, "kept", counted)
    peers = {name: Peers(api) for name, api in (("fast", fast), ("whole", whole))}
    steps = 0

    async def both(action: Any) -> None:
        for api in (fast, whole):
            result = action(api)
            if hasattr(result, "__await__"):
                await result

    async def poll(path: str, peer: str = "127.0.0.1", times: int = 2, inm: str | None = None) -> Answered:
        nonlocal steps
        headers = {} if inm is None else {"If-None-Match": inm}
        for _ in range(times):
            got = await peers["fast"].get(path, peer, **headers)
            want = await peers["whole"].get(path, peer, **headers)
            assert got == want, (path, peer, headers)
            assert observable(fast.engine) == observable(whole.engine), (path, peer)
            steps += 1
        return got

    try:
        await both(lambda a: a.tick())
        _, headers, _ = await poll("/batch-size?service=a", times=3)
        etag = {k.lower(): v for k, v in headers}["etag"]
        for inm in (etag, etag[2:], f'W/"other", {etag}', "*", 'W/"other"', " " + etag + " "):
            await poll("/batch-size?service=a", inm=inm)
        await poll("/batch-size?service=a&gpu=0")
        await both(lambda a: a.clock.advance(2.0))
        await poll("/batch-size?service=a")  # liveness: last_seen moves on both
        await both(lambda a: a.engine.report("a", 0, a.clock(), batch_size=4, peak_bytes=GIB))
        await poll("/batch-size?service=a")
        await both(lambda a: a.engine.set_override("a", 0, 3, None, a.clock()))
        await poll("/batch-size?service=a")
        await both(lambda a: a.engine.set_runtime({"monitoring_interval": 12.0}))
        await poll("/batch-size?service=a", inm=etag)
        await both(lambda a: a.engine.set_runtime({"strategy": "conservative"}))
        await poll("/batch-size?service=a")
        await both(lambda a: a.gpus.used.__setitem__(0, 50 * GIB))
        await both(lambda a: a.tick())
        await poll("/batch-size?service=a")
        # bad input and an unknown GPU: refused every time
        assert (await poll("/batch-size?service=bad%20name"))[0] == 400
        assert (await poll("/batch-size?service=a&gpu=7"))[0] == 400
        # the caps: a second service fills GPU 0, a third is refused every time
        await poll("/batch-size?service=b")
        assert (await poll("/batch-size?service=c"))[0] == 429
        # register_unknown off: an unknown name is answered unregistered every time, never kept
        await both(lambda a: a.engine.set_runtime({"register_unknown": False}))
        assert b'"registered":false' in (await poll("/batch-size?service=stranger"))[2]
        await both(lambda a: a.clock.advance(1.0))
        await poll("/batch-size?service=stranger")  # its answer is made at each poll (updated_at: now)
        await both(lambda a: a.engine.set_runtime({"register_unknown": True}))
        # discovery: service d's pod is at 127.0.0.2; only it may register d, and only it moves its pod's GPU
        await both(lambda a: a.engine.attach_discovery())
        await both(lambda a: a.engine.set_pods({"vlm/d-1": p_pod("d-1", "d", "127.0.0.2")}))
        await both(lambda a: a.engine.clear_override("a", 0, a.clock()))
        await both(lambda a: a.engine.set_runtime({"max_services_per_gpu": 8}))
        assert (await poll("/batch-size?service=d"))[0] == 403  # a wrong pod IP, every time
        assert (await poll("/batch-size?service=d", peer="127.0.0.2"))[0] == 200
        await poll("/batch-size?service=d&pod=d-1", times=3)  # read from anywhere; the pod hint not taken
        assert fast.engine.pod_gpus == {}
        await poll("/batch-size?service=d&pod=d-1", peer="127.0.0.2")  # the same query from the pod: taken
        assert fast.engine.pod_gpus == {"d-1": 0}
        # expiry: only a keeps polling; the others are forgotten, and d's next poll registers it again
        for _ in range(14):
            await both(lambda a: a.tick())
            await poll("/batch-size?service=a")
        assert {name for _, name in fast.engine.state.services} == {"a"}
        await poll("/batch-size?service=d", peer="127.0.0.2")
        assert (0, "d") in fast.engine.state.services
    finally:
        for p in peers.values():
            await p.close()
    assert served[0] >= steps // 3, (served[0], steps)  # the kept answers did serve (each step's repeats)


async def test_a_kept_answer_notes_liveness_and_keeps_a_polled_service_alive(api: Api) -> None:
    from optimizer.api import routes

    first = await api.get("/batch-size?service=svc")
    api.clock.advance(3.0)
    calls: list[Any] = []
    real = routes._poll

    def whole(request: web.Request) -> web.Response:
        calls.append(request)
        return real(request)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routes, "_poll", whole)
        assert await api.get("/batch-size?service=svc") == first  # from the kept answer ...
        assert calls == []
    assert api.engine.state.services[(0, "svc")].last_seen == api.clock()  # ... with its liveness noted


async def test_the_kept_answers_are_bounded(api: Api) -> None:
    from optimizer.api.keys import ENCODED

    store = api.client.app[ENCODED]
    store.entries = 2
    for extra in range(5):  # a registered service under made-up query strings
        await api.get(f"/batch-size?service=svc&x={extra}")
    assert len(store._answers) <= 2


def test_changes_count_everything_but_liveness() -> None:
    engine = engine_with(3)
    before = engine.changes
    for k in range(5):
        engine.poll("svc-0", 0, 7.0 + k)
    assert engine.changes == before  # liveness only
    assert engine.state.services[(0, "svc-0")].last_seen == 11.0  # folded on reading: still no change
    assert engine.changes == before
    engine.poll("svc-new", 0, 12.0)  # a new service
    assert engine.changes == before + 1
    for change in (lambda: engine.observe(snapshot(13.0)), lambda: engine.set_runtime({"strategy": "aggressive"}),
                   lambda: engine.report("svc-1", 0, 14.0, batch_size=2), engine.attach_discovery,
                   lambda: engine.set_pods({"vlm/p": p_pod("p", "svc-2", "10.0.0.2")})):
        seen = engine.changes
        change()
        assert engine.changes == seen + 1
    engine.poll("svc-2", 0, 15.0, pod="p", peer="10.0.0.2")  # the pod's GPU learned: a change
    assert engine.pod_gpus == {"p": 0}
    seen = engine.changes
    engine.poll("svc-2", 0, 16.0, pod="p", peer="10.0.0.2")  # known already: none
    assert engine.changes == seen


async def test_no_gpu_answers_are_made_at_each_poll(make_api: MakeApi) -> None:
    from optimizer.gpu.none import NoGpuBackend

    api = await make_api(backend=NoGpuBackend())
    await api.tick()
    for _ in range(3):
        body = await api.get("/batch-size?service=svc")
        assert body["gpu"] is None and body["updated_at"] == api.clock()  # never a kept answer
        api.clock.advance(1.0)
