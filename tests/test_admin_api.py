"""The admin API over a real server on an ephemeral port (pytest-aiohttp's ``aiohttp_client``).

The admin application shares the read API's engine, sampler and persister; a second client on
the read API shows what services see. Sampling is driven by the tests (``await adm.tick()``) on a
fake clock with a scripted backend. The last tests run ``serve`` as a real process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.admin_access import TOKEN_RE, AccessError, GeneratedToken, generated_token_path
from optimizer.api import build_app
from optimizer.api.admin import EXPORT_FORMAT, HISTORY_KINDS, MAX_TTL_S, build_admin_app
from optimizer.api.schemas import MAX_REPORT_BYTES
from optimizer.config import (
    ConfigError,
    ServerSettings,
    ServiceProfile,
    Settings,
    Strategy,
    apply_server,
    load_config,
    settings_to_dict,
)
from optimizer.engine import Engine
from optimizer.persistence import Persister, StateFile
from optimizer.policy.types import PolicyState
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, uuid_of
from tests.logcapture import LogList, events_named

GIB = 1024**3
TOTAL = 80 * GIB
INTERVAL = Settings().monitoring_interval  # 5 s
OPT_INTERVAL = Settings().optimization_interval  # 60 s
TOKEN = "tok"
ROOT = Path(__file__).resolve().parent.parent
Client = TestClient[web.Request, web.Application]


async def park(delay: float) -> None:
    """The persister loop's sleep: parks until the application cancels it (the tests tick explicitly)."""
    await asyncio.Event().wait()


def auth(token: str = TOKEN) -> dict[str, str]:
    """The headers of a good admin request: the token, and JSON, which every write must say it sends."""
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@dataclass
class Admin:
    client: Client  # the admin API
    read: Client  # the read API over the same engine
    engine: Engine
    sampler: Sampler
    gpus: ScriptedBackend
    clock: FakeClock
    state_path: Path | None = None

    async def tick(self, advance: float = INTERVAL) -> None:
        """One sample; every sample after the first comes ``advance`` seconds after the previous."""
        if self.sampler.stats.samples:
            self.clock.advance(advance)
        assert await self.sampler.tick() is not None

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, status: int = 200,
                   headers: dict[str, str] | None = None) -> Any:
        """An admin request (with the right token unless ``headers`` says otherwise); the JSON reply."""
        kwargs: dict[str, Any] = {"headers": auth() if headers is None else headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        resp = await self.client.request(method, path, **kwargs)
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.json()

    async def get(self, path: str, status: int = 200) -> Any:
        """A read-API request, without any token."""
        resp = await self.read.get(path)
        assert resp.status == status, await resp.text()
        return await resp.json()

    async def batch(self, service: str = "svc") -> Any:
        return await self.get(f"/batch-size?service={service}")

    def saved(self) -> Any:
        assert self.state_path is not None
        return json.loads(self.state_path.read_bytes())


class MakeAdmin(Protocol):
    def __call__(self, *, token: bytes = ..., settings: Settings | None = ..., state_path: Path | None = ...,
                 allowed_hosts: tuple[str, ...] = ...) -> Awaitable[Admin]: ...


@pytest.fixture
def make_admin(aiohttp_client: AiohttpClient) -> MakeAdmin:
    async def make(*, token: bytes = TOKEN.encode(), settings: Settings | None = None,
                   state_path: Path | None = None, allowed_hosts: tuple[str, ...] = ()) -> Admin:
        clock = FakeClock()
        backend = ScriptedBackend(1)
        engine = Engine(settings or Settings())
        sampler = Sampler(backend, engine, clock=clock, sleep=park)
        persister = None if state_path is None else Persister(engine, StateFile(state_path))
        app = build_app(engine, sampler, run_sampler=False, persister=persister)
        admin = build_admin_app(app, token, allowed_hosts=allowed_hosts)
        read = await aiohttp_client(app)
        client = await aiohttp_client(admin)
        return Admin(client, read, engine, sampler, backend, clock, state_path)

    return make


@pytest.fixture
async def adm(make_admin: MakeAdmin) -> Admin:
    a = await make_admin()
    await a.tick()
    return a


@dataclass(frozen=True)
class Observed:
    """Everything an admin request could change."""

    revision: int
    settings: Settings
    state: PolicyState
    runtime: dict[str, Any]
    running: bool
    events: int


def observe(a: Admin) -> Observed:
    return Observed(a.engine.revision, a.engine.settings, a.engine.state, dict(a.engine.runtime), a.sampler.running,
                    len(a.engine.events))


# --------------------------------------------------------------------------- authentication

# (method, path, body, whether an authorized request changes anything)
ENDPOINTS: list[tuple[str, str, Any, bool]] = [
    ("GET", "/admin/status", None, False),
    ("GET", "/admin/history", None, False),
    ("POST", "/admin/optimize", None, True),
    ("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 2}, True),
    ("DELETE", "/admin/batch-size?service=svc", None, True),
    ("POST", "/admin/enable", None, True),
    ("POST", "/admin/disable", None, True),
    ("POST", "/admin/monitoring/start", None, True),
    ("POST", "/admin/monitoring/stop", None, True),
    ("GET", "/admin/config", None, False),
    ("PATCH", "/admin/config", {"strategy": "aggressive"}, True),
    ("GET", "/admin/config/export", None, False),
    ("POST", "/admin/config/import", {"format": EXPORT_FORMAT, "version": 1,
                                      "settings": {"strategy": "conservative"}}, True),
    ("POST", "/admin/config/reset", {"all": True}, True),
]
ENDPOINT_IDS = [f"{m} {p.split('?')[0]}" for m, p, _, _ in ENDPOINTS]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


BAD_AUTH: list[dict[str, str]] = [
    {},  # no header at all
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Bearer tok2"},
    {"Authorization": "Bearer to"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer"},
    {"Authorization": ""},
    {"Authorization": TOKEN},  # the token without a scheme
    {"Authorization": "Basic " + TOKEN},  # the right token under the wrong scheme
    {"Authorization": _basic("admin", TOKEN)},
    {"Authorization": _basic(TOKEN, "")},
    {"Authorization": "Token " + TOKEN},
    {"X-Admin-Token": TOKEN},
]


async def _auth_setup(make_admin: MakeAdmin, path: str, *, token: bytes = TOKEN.encode(),
                      state_path: Path | None = None) -> Admin:
    """A state every mutating endpoint would change: an override to clear, the opposite of what is asked."""
    a = await make_admin(token=token, state_path=state_path)
    await a.tick()
    a.engine.set_override("svc", 0, 3, None, a.clock())
    if path == "/admin/enable":
        a.engine.update_settings({"enabled": False})
    if path == "/admin/monitoring/start":
        a.sampler.running = False
    if path == "/admin/config/reset":
        a.engine.update_settings({"strategy": "aggressive"})  # something to unpin
    return a


@pytest.mark.parametrize(("method", "path", "body", "mutates"), ENDPOINTS, ids=ENDPOINT_IDS)
async def test_every_endpoint_refuses_a_missing_or_wrong_token_and_changes_nothing(
        make_admin: MakeAdmin, tmp_path: Path, logs: LogList, method: str, path: str, body: Any,
        mutates: bool) -> None:
    a = await _auth_setup(make_admin, path, state_path=tmp_path / "state" / "state.json")
    before = observe(a)
    for headers in BAD_AUTH:
        resp = await a.client.request(method, path, json=body, headers=headers)
        assert resp.status == 401, (headers, await resp.text())
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.content_type == "application/json"
        assert "error" in await resp.json()
        assert observe(a) == before, headers
    assert a.state_path is not None and not a.state_path.exists()  # nothing was saved either
    unauthorized = events_named(logs, "admin_unauthorized")
    assert len(unauthorized) == len(BAD_AUTH)
    assert all(e["client"] == "127.0.0.1" and e["path"] == path.split("?")[0] and e["method"] == method
               for e in unauthorized)
    assert events_named(logs, "admin_audit") == []

    resp = await a.client.request(method, path, json=body, headers=auth())
    assert 200 <= resp.status < 300, await resp.text()
    assert resp.content_type == "application/json"
    if mutates:
        assert observe(a) != before
        assert len(events_named(logs, "admin_audit")) == 1
        assert a.state_path.exists()
    else:
        assert observe(a) == before
        assert events_named(logs, "admin_audit") == []


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_auth_scheme_is_case_insensitive(adm: Admin, scheme: str) -> None:
    resp = await adm.client.get("/admin/config", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert resp.status == 200


async def test_unknown_admin_path_needs_the_token_too(adm: Admin) -> None:
    assert (await adm.client.get("/admin/nothing-here")).status == 401
    resp = await adm.client.get("/admin/nothing-here", headers=auth())
    assert resp.status == 404
    assert "error" in await resp.json()


# --------------------------------------------------------------------------- what a web page could send

WRITES = [(m, p, b) for m, p, b, mutates in ENDPOINTS if mutates]
WRITE_IDS = [f"{m} {p.split('?')[0]}" for m, p, _ in WRITES]
# a browser sends these across origins without asking first ("simple requests"), or none at all
SIMPLE_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", None, "application/jsonp", "text/json"]


def _as_bytes(body: Any) -> bytes:
    return b"" if body is None else json.dumps(body).encode()


async def _refused(a: Admin, logs: LogList, method: str, path: str, body: Any, headers: dict[str, str],
                   status: int, header: str) -> dict[str, Any]:
    """Send it (the body as raw bytes, so aiohttp adds no Content-Type); check it changed nothing."""
    before = observe(a)
    resp = await a.client.request(method, path, data=_as_bytes(body), headers=headers)
    assert resp.status == status, (headers, await resp.text())
    assert resp.content_type == "application/json"
    answer: dict[str, Any] = await resp.json()
    assert answer["header"] == header and header in answer["error"]
    assert observe(a) == before
    assert events_named(logs, "admin_audit") == []
    refused = events_named(logs, "admin_refused")[-1]
    assert (refused["client"], refused["status"], refused["header"], refused["log_level"]) == (
        "127.0.0.1", status, header, "warning")
    return answer


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=WRITE_IDS)
async def test_a_write_that_is_not_json_is_a_415_and_changes_nothing(
        make_admin: MakeAdmin, tmp_path: Path, logs: LogList, method: str, path: str, body: Any) -> None:
    a = await _auth_setup(make_admin, path, state_path=tmp_path / "state.json")
    for content_type in SIMPLE_TYPES:
        headers = {"Authorization": f"Bearer {TOKEN}"}  # even with the token (CSRF does not need it read)
        if content_type is not None:
            headers["Content-Type"] = content_type
        answer = await _refused(a, logs, method, path, body, headers, 415, "Content-Type")
        assert answer["allowed"] == ["application/json"] and "application/json" in answer["error"]
    assert not (tmp_path / "state.json").exists()
    # the same write as JSON goes through (with a charset parameter too)
    resp = await a.client.request(method, path, data=_as_bytes(body), headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json; charset=utf-8"})
    assert 200 <= resp.status < 300, await resp.text()


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=WRITE_IDS)
async def test_a_request_with_an_origin_is_a_403_and_changes_nothing(
        make_admin: MakeAdmin, logs: LogList, method: str, path: str, body: Any) -> None:
    a = await _auth_setup(make_admin, path)
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{a.client.port}", "http://localhost"):
        await _refused(a, logs, method, path, body, {**auth(), "Origin": origin}, 403, "Origin")
        # what a page's form would send: no token, text/plain
        await _refused(a, logs, method, path, body, {"Origin": origin, "Content-Type": "text/plain"}, 403, "Origin")
    await _refused(a, logs, "OPTIONS", path, None, {"Origin": "https://evil.example",  # a preflight
                                                    "Access-Control-Request-Method": method}, 403, "Origin")
    await _refused(a, logs, "GET", "/admin/config/export", None, {**auth(), "Origin": "https://evil.example"}, 403,
                   "Origin")


async def test_the_attacks_of_the_report_change_neither_the_configuration_nor_monitoring(
        adm: Admin, logs: LogList) -> None:
    """A page's text/plain POST to import a configuration and to pause monitoring, with and without Origin."""
    doc = {"format": EXPORT_FORMAT, "version": 1, "settings": {"enabled": False, "max_batch_size": 1}}
    config = settings_to_dict(adm.engine.settings)
    for path, body in (("/admin/config/import", doc), ("/admin/monitoring/stop", None)):
        for headers in ({"Content-Type": "text/plain"},
                        {"Content-Type": "text/plain", "Origin": "https://evil.example"},
                        {**auth(), "Content-Type": "text/plain"}):
            resp = await adm.client.post(path, data=_as_bytes(body), headers=headers)
            assert resp.status in (401, 403, 415), await resp.text()
    assert settings_to_dict(adm.engine.settings) == config
    assert adm.sampler.running is True
    assert (await adm.call("GET", "/admin/status"))["monitoring"] is True
    assert events_named(logs, "admin_audit") == []


REBOUND = ["evil.example", "rebound.evil.example:{port}", "127.0.0.1.nip.io:{port}", "0.0.0.0:{port}",
           "localhost.evil.example", "[::2]:{port}", "", "not a host", "127.0.0.1:port", "10.0.0.1"]


@pytest.mark.parametrize("host", REBOUND)
async def test_a_host_that_does_not_name_the_admin_api_is_a_421(adm: Admin, logs: LogList, host: str) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name, and the browser sends that name as Host."""
    value = host.format(port=adm.client.port)
    for method, path, body in (("POST", "/admin/monitoring/stop", None), ("GET", "/admin/status", None),
                               ("PATCH", "/admin/config", {"strategy": "aggressive"})):
        answer = await _refused(adm, logs, method, path, body, {**auth(), "Host": value}, 421, "Host")
        assert "server.admin_allowed_hosts" in answer["error"]
    assert adm.sampler.running


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "[::1]:{port}",
                                  "127.0.0.1", "localhost:9999", "127.0.0.2:{port}", "admin.example:{port}",
                                  "ADMIN.example", "10.1.2.3:80"])
async def test_loopback_names_the_listening_address_and_configured_names_are_answered(
        make_admin: MakeAdmin, host: str) -> None:
    """Ports are not compared: a port-forward (kubectl port-forward 9999:8081) changes the port, not the name."""
    a = await make_admin(allowed_hosts=("admin.example", "10.1.2.3", "0.0.0.0"))
    resp = await a.client.get("/admin/status", headers={**auth(), "Host": host.format(port=a.client.port)})
    assert resp.status == 200, await resp.text()
    resp = await a.client.get("/admin/status", headers={**auth(), "Host": "0.0.0.0"})  # a wildcard is no name
    assert resp.status == 421


async def _raw(a: Admin, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket, as bytes (aiohttp's client would not send invalid UTF-8)."""
    reader, writer = await asyncio.open_connection(a.client.host, a.client.port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("offered", [b"\xff\xfe\xfd", TOKEN.encode() + b"\xff", b"t\xf6k", "t\u00f6k".encode(),
                                     b"\xc3\x28", b"\xed\xa0\x80"])
async def test_a_token_that_is_not_valid_utf8_is_a_401_without_a_traceback(adm: Admin, logs: LogList,
                                                                             offered: bytes) -> None:
    before = observe(adm)
    for method, path in ((b"GET", b"/admin/status"), (b"POST", b"/admin/monitoring/stop")):
        status, headers, body = await _raw(adm, method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                           b"Content-Type: application/json\r\nContent-Length: 0\r\n"
                                           b"Authorization: Bearer " + offered + b"\r\nConnection: close\r\n\r\n")
        assert status == 401, body
        assert headers["www-authenticate"].startswith("Bearer")
        assert "error" in json.loads(body)
    assert observe(adm) == before
    assert len(events_named(logs, "admin_unauthorized")) == 2
    assert events_named(logs, "request_failed") == []
    assert not any(e.get("exc_info") or e["log_level"] in ("error", "critical") for e in logs)


async def test_headers_that_are_not_valid_utf8_are_refused_and_logged_printably(adm: Admin, logs: LogList) -> None:
    status, _, body = await _raw(adm, b"GET /admin/status HTTP/1.1\r\nHost: \xff\xfe.example\r\n"
                                      b"Connection: close\r\n\r\n")
    assert status == 421 and "\\xff" in json.loads(body)["error"]
    status, _, body = await _raw(adm, b"GET /admin/status HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://\xff\r\n"
                                      b"Connection: close\r\n\r\n")
    assert status == 403
    status, _, body = await _raw(adm, b"POST /admin/optimize HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                                 + TOKEN.encode() + b"\r\nContent-Type: text/\xff\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
    assert status == 415
    assert [e["value"] for e in events_named(logs, "admin_refused")] == [
        "\\xff\\xfe.example", "http://\\xff", "text/\\xff"]
    assert events_named(logs, "request_failed") == []


def test_allowed_hosts_come_from_the_file_the_environment_and_the_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  admin_allowed_hosts: [Optimizer.Example., '[fd00::1]', 10.0.0.7]\n")
    assert load_config(cfg, environ={}).server.admin_allowed_hosts == ("optimizer.example", "fd00::1", "10.0.0.7")
    env = {"VLM_OPTIMIZER_ADMIN_ALLOWED_HOSTS": "a.example, b.example,,a.example"}
    assert load_config(cfg, environ=env).server.admin_allowed_hosts == ("a.example", "b.example")
    flags = {"admin_allowed_hosts": ["c.example"]}
    assert load_config(cfg, environ=env, cli_server=flags).server.admin_allowed_hosts == ("c.example",)
    assert load_config(None, environ={}).server.admin_allowed_hosts == ()


@pytest.mark.parametrize("value", ["optimizer.example:8081", "http://optimizer.example", "a/b", "two words",
                                   "[::1]:8081", "*.example", 8081, {"a": 1}, ["ok.example", 5]])
def test_a_bad_allowed_host_is_a_config_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        apply_server(ServerSettings(), {"admin_allowed_hosts": [value] if isinstance(value, str) else value})
    assert info.value.key == "server.admin_allowed_hosts"
    assert "host name" in str(info.value)


def test_a_bad_allowed_host_flag_stops_serve_with_one_line(tmp_path: Path) -> None:
    line = _serve_fails(tmp_path, "--admin-allowed-host", "optimizer.example:8081")
    assert "server.admin_allowed_hosts" in line and "without a port" in line


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_generated_token_file_is_0600_from_its_creation_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "tokens"
    saved = os.umask(0)
    try:
        gen = GeneratedToken(directory / "admin-token-1")
        gen.prepare()
    finally:
        os.umask(saved)
    [pending] = list(directory.iterdir())  # written, not yet in place: a serve that cannot bind stops here
    assert _mode(pending) == 0o600 and _mode(directory) == 0o700
    assert not gen.path.exists()
    gen.publish()
    assert gen.path.read_text() == gen.token + "\n" and _mode(gen.path) == 0o600
    assert TOKEN_RE.fullmatch(gen.token) and len(gen.token) >= 40
    later = GeneratedToken(gen.path)  # a later serve on the same port replaced it
    later.prepare()
    later.publish()
    gen.discard()
    assert gen.path.read_text().strip() == later.token  # never removes another's token
    later.discard()
    assert list(directory.iterdir()) == []


def test_a_generated_token_is_kept_only_in_a_directory_of_this_user_nobody_else_can_write(tmp_path: Path) -> None:
    for mode in (0o770, 0o757, 0o1777):
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        with pytest.raises(AccessError, match="writable by other users"):
            GeneratedToken(shared / "admin-token-1").prepare()
        assert list(shared.iterdir()) == []
    if os.geteuid() == 0:  # only root can hand a directory to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, -1)
        with pytest.raises(AccessError, match="belongs to another user"):
            GeneratedToken(foreign / "admin-token-1").prepare()
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    with pytest.raises(AccessError):
        GeneratedToken(not_dir / "admin-token-1").prepare()


def test_where_a_generated_token_is_kept(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    state = str(tmp_path / "state" / "s.json")
    assert generated_token_path(8081, state, {"XDG_RUNTIME_DIR": str(run)}) == tmp_path / "state" / "admin-token-8081"
    in_run = run / "vlm-gpu-optimizer" / "admin-token-8081"
    assert generated_token_path(8081, None, {"XDG_RUNTIME_DIR": str(run)}) == in_run
    fallback = Path(f"/tmp/vlm-gpu-optimizer-{os.geteuid()}/admin-token-8082")
    assert generated_token_path(8082, None, {}) == fallback
    assert generated_token_path(8082, None, {"XDG_RUNTIME_DIR": str(tmp_path / "absent")}) == fallback
    assert generated_token_path(8082, None, {"XDG_RUNTIME_DIR": "relative"}) == fallback
    assert generated_token_path(8082, None, {"TMPDIR": str(tmp_path)}) == (
        tmp_path / f"vlm-gpu-optimizer-{os.geteuid()}" / "admin-token-8082")


def test_there_is_no_admin_api_without_a_token() -> None:
    engine = Engine(Settings())
    app = build_app(engine, Sampler(ScriptedBackend(1), engine, clock=FakeClock(), sleep=park), run_sampler=False)
    with pytest.raises(ValueError, match="token"):
        build_admin_app(app, b"")


async def test_the_read_api_stays_open_without_a_token(adm: Admin) -> None:
    assert (await adm.read.get("/batch-size?service=svc")).status == 200
    assert (await adm.read.post("/reports", json={"service": "svc", "batch_size": 4})).status == 200
    for path in ("/status", "/history", "/health", "/ready", "/metrics"):
        resp = await adm.read.get(path)
        assert resp.status == 200, path
    # the admin routes are not on the read API at all
    assert (await adm.read.get("/admin/status")).status == 404
    assert (await adm.read.post("/admin/disable")).status == 404
    assert adm.engine.settings.enabled


# --------------------------------------------------------------------------- status and history


async def test_admin_status_is_the_status_document(adm: Admin) -> None:
    await adm.batch()
    body = await adm.call("GET", "/admin/status")
    assert body == await adm.get("/status")
    assert body["monitoring"] is True
    assert [s["service"] for s in body["services"]] == ["svc"]


async def test_history_lists_overrides_and_batch_changes(adm: Admin) -> None:
    await adm.batch("svc-a")
    await adm.batch("svc-b")
    await adm.call("PUT", "/admin/batch-size", {"service": "svc-b", "batch_size": 3})
    opt = await adm.call("POST", "/admin/optimize")
    adm.gpus.used[0] = 65 * GIB  # warning pressure: a pressure_changed event, which is not history
    await adm.tick()
    assert any(e.kind == "pressure_changed" for e in adm.engine.events)

    full = (await adm.call("GET", "/admin/history"))["events"]
    kinds = [e["kind"] for e in full]
    assert set(kinds) <= set(HISTORY_KINDS)
    assert "pressure_changed" not in kinds
    assert {"kind": "override_set", "gpu": 0, "service": "svc-b", "new": 3,
            "timestamp": adm.clock() - INTERVAL} in full
    changed = [e for e in full if e["kind"] == "batch_changed"]
    assert {(e["service"], e["trigger"], e["old"], e["new"]) for e in changed} >= {
        ("svc-b", "manual", 4, 3), ("svc-a", "optimization", 4, 16)}
    assert [e for e in opt["events"] if e["kind"] == "batch_changed"] == [
        e for e in full if e["kind"] == "batch_changed" and e["trigger"] == "optimization"]

    last = (await adm.call("GET", "/admin/history?limit=1"))["events"]
    assert last == full[-1:]
    two = (await adm.call("GET", "/admin/history?limit=2"))["events"]
    assert two == full[-2:]


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "10001", "1.5"])
async def test_history_bad_limit(adm: Admin, limit: str) -> None:
    body = await adm.call("GET", f"/admin/history?limit={limit}", status=400)
    assert body["parameter"] == "limit"


# --------------------------------------------------------------------------- PUT/DELETE /admin/batch-size


async def test_set_batch_size_is_published_at_once_and_held(adm: Admin) -> None:
    first = await adm.read.get("/batch-size?service=svc")
    assert (await first.json())["batch_size"] == 4
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "gpu": 0, "batch_size": 6, "ttl_s": 600})
    assert body["service"] == "svc" and body["batch_size"] == 6
    assert body["reason"] == "manual override by an operator"
    assert body["gpu"]["index"] == 0 and body["gpu"]["uuid"] == uuid_of(0)

    now = await adm.read.get("/batch-size?service=svc")
    polled = await now.json()
    assert polled["batch_size"] == 6
    assert polled["reason"] == "manual override by an operator"
    assert now.headers["ETag"] != first.headers["ETag"]
    svc = adm.engine.state.services[(0, "svc")]
    assert svc.override == 6 and svc.override_until == adm.clock() + 600

    # held across a periodic optimization; optimal_batch_size shows what the policy would choose
    await adm.tick(advance=OPT_INTERVAL)
    held = await adm.batch()
    assert held["batch_size"] == 6
    assert held["optimal_batch_size"] == 16
    assert "manual override" in held["reason"]


async def test_set_batch_size_by_gpu_uuid_and_without_gpu(adm: Admin) -> None:
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "gpu": uuid_of(0), "batch_size": 5})
    assert body["gpu"]["index"] == 0 and body["batch_size"] == 5
    body = await adm.call("PUT", "/admin/batch-size", {"service": "other", "batch_size": 7})
    assert body["gpu"]["index"] == 0 and body["batch_size"] == 7
    assert adm.engine.state.services[(0, "other")].override_until is None  # no ttl: until cleared


async def test_override_above_the_safety_bound_is_held_at_the_bound(adm: Admin) -> None:
    adm.gpus.used[0] = 70 * GIB
    await adm.tick()
    # the bound: 4 items in force + (0.95 * 80 GiB - 1 GiB reserve - 70 GiB used) / 512 MiB per item = 14
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 15})
    assert body["batch_size"] == 14
    assert "manual override 15" in body["reason"] and "held at 14 by the safety bound" in body["reason"]
    assert (await adm.batch())["batch_size"] == 14
    assert adm.engine.state.services[(0, "svc")].override == 15
    # under the bound it is published as asked
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 9})
    assert body["batch_size"] == 9 and body["reason"] == "manual override by an operator"


async def test_override_above_max_batch_size_is_published_as_it_will_be_held(adm: Admin) -> None:
    assert adm.engine.settings.max_batch_size == 16
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 40})
    at_once = body["batch_size"]
    await adm.tick(advance=OPT_INTERVAL)  # a periodic optimization, well within the safety bound
    held = await adm.batch()
    assert held["batch_size"] == at_once  # "held across periodic optimizations" (docs/admin.md)
    assert at_once <= adm.engine.settings.max_batch_size  # "largest batch published"


async def test_override_expires_after_its_ttl(adm: Admin, logs: LogList) -> None:
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6, "ttl_s": 30})
    set_at = adm.clock()
    await adm.tick(advance=25)  # before the ttl: still there
    assert adm.engine.state.services[(0, "svc")].override == 6
    assert (await adm.batch())["batch_size"] == 6
    await adm.tick(advance=6)  # 31 s after it was set
    assert adm.clock() > set_at + 30
    svc = adm.engine.state.services[(0, "svc")]
    assert svc.override is None and svc.override_until is None
    cleared = [e for e in adm.engine.events if e.kind == "override_cleared"]
    assert [(e.service, e.old, e.detail) for e in cleared] == [("svc", 6, "expired")]
    history = (await adm.call("GET", "/admin/history"))["events"]
    assert {"kind": "override_cleared", "gpu": 0, "service": "svc", "old": 6, "detail": "expired",
            "timestamp": adm.clock()} in history
    assert any(e["event"] == "override_cleared" and e["detail"] == "expired" for e in logs)
    # the policy decides again at its next optimization
    await adm.tick(advance=OPT_INTERVAL)
    assert (await adm.batch())["batch_size"] == 16


async def test_delete_clears_the_override(adm: Admin) -> None:
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6})
    body = await adm.call("DELETE", "/admin/batch-size?service=svc&gpu=0")
    assert body["service"] == "svc"
    assert "manual override cleared" in body["reason"]
    assert adm.engine.state.services[(0, "svc")].override is None
    cleared = [e for e in adm.engine.events if e.kind == "override_cleared"]
    assert [(e.old, e.detail) for e in cleared] == [(6, "cleared by an operator")]
    await adm.tick(advance=OPT_INTERVAL)
    assert (await adm.batch())["batch_size"] == 16  # the policy took over again
    # clearing a known service without an override is harmless
    again = await adm.call("DELETE", "/admin/batch-size?service=svc")
    assert again["batch_size"] == 16


async def test_delete_of_an_unknown_service_is_a_404(adm: Admin) -> None:
    await adm.batch("known")
    before = observe(adm)
    body = await adm.call("DELETE", "/admin/batch-size?service=never-seen", status=404)
    assert body["parameter"] == "service"
    assert "never-seen" in body["error"]
    assert observe(adm) == before


@pytest.mark.parametrize(("query", "parameter"), [("", "service"), ("service=bad%20name", "service"),
                                                  ("service=svc&gpu=9", "gpu"), ("service=svc&gpu=x", "gpu")])
async def test_delete_bad_parameters(adm: Admin, query: str, parameter: str) -> None:
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6})
    before = observe(adm)
    body = await adm.call("DELETE", f"/admin/batch-size?{query}", status=400)
    assert body["parameter"] == parameter
    if query.endswith("gpu=9"):
        assert body["available"] == [0]
    assert observe(adm) == before


BAD_PUTS: list[tuple[str, bytes, str]] = [
    ("batch_size 0", b'{"service": "svc", "batch_size": 0}', "batch_size"),
    ("batch_size string", b'{"service": "svc", "batch_size": "x"}', "batch_size"),
    ("batch_size float", b'{"service": "svc", "batch_size": 4.5}', "batch_size"),
    ("batch_size bool", b'{"service": "svc", "batch_size": true}', "batch_size"),
    ("batch_size too large", b'{"service": "svc", "batch_size": 4097}', "batch_size"),
    ("batch_size missing", b'{"service": "svc"}', "batch_size"),
    ("ttl negative", b'{"service": "svc", "batch_size": 4, "ttl_s": -1}', "ttl_s"),
    ("ttl zero", b'{"service": "svc", "batch_size": 4, "ttl_s": 0}', "ttl_s"),
    ("ttl string", b'{"service": "svc", "batch_size": 4, "ttl_s": "60"}', "ttl_s"),
    ("ttl bool", b'{"service": "svc", "batch_size": 4, "ttl_s": true}', "ttl_s"),
    ("ttl over 7 days", b'{"service": "svc", "batch_size": 4, "ttl_s": %d}' % (MAX_TTL_S + 1), "ttl_s"),
    ("unknown field", b'{"service": "svc", "batch_size": 4, "batch": 4}', "batch"),
    ("service missing", b'{"batch_size": 4}', "service"),
    ("bad service", b'{"service": "bad name", "batch_size": 4}', "service"),
    ("gpu negative", b'{"service": "svc", "batch_size": 4, "gpu": -1}', "gpu"),
    ("gpu junk", b'{"service": "svc", "batch_size": 4, "gpu": "abc"}', "gpu"),
    ("not json", b'{"service": ', "body"),
    ("empty body", b"", "body"),
    ("array", b'[{"service": "svc", "batch_size": 4}]', "body"),
    ("null", b"null", "body"),
]


@pytest.mark.parametrize(("raw", "field"), [(raw, f) for _, raw, f in BAD_PUTS], ids=[n for n, _, _ in BAD_PUTS])
async def test_bad_set_batch_size_is_a_400_naming_the_field(adm: Admin, logs: LogList, raw: bytes,
                                                            field: str) -> None:
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6})
    logs.clear()
    before = observe(adm)
    body = await adm.call("PUT", "/admin/batch-size", raw=raw, status=400)
    assert body["field"] == field
    assert isinstance(body["error"], str) and body["error"].startswith(field)
    assert observe(adm) == before
    assert (await adm.batch())["batch_size"] == 6
    assert events_named(logs, "admin_audit") == []


async def test_set_batch_size_on_an_unknown_gpu_lists_the_available_ones(adm: Admin) -> None:
    before = observe(adm)
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "gpu": 9, "batch_size": 4}, status=400)
    assert body["field"] == "gpu"
    assert body["available"] == [0]
    body = await adm.call("PUT", "/admin/batch-size", {"service": "svc", "gpu": "GPU-nope", "batch_size": 4},
                          status=400)
    assert body["field"] == "gpu" and body["available"] == [0]
    assert observe(adm) == before
    assert adm.engine.state.services == {}


async def test_a_body_over_64_kib_is_a_413_and_changes_nothing(adm: Admin) -> None:
    before = observe(adm)
    raw = b'{"service": "svc", "batch_size": 2' + b" " * MAX_REPORT_BYTES + b"}"
    resp = await adm.client.put("/admin/batch-size", data=raw, headers=auth())
    assert resp.status == 413
    assert "error" in await resp.json()
    resp = await adm.client.patch("/admin/config", data=b'{"strategy": "aggressive"' + b" " * MAX_REPORT_BYTES + b"}",
                                  headers=auth())
    assert resp.status == 413
    assert observe(adm) == before


# --------------------------------------------------------------------------- POST /admin/optimize


async def test_optimize_now_grows_a_batch_with_headroom(adm: Admin) -> None:
    assert (await adm.batch())["batch_size"] == 4
    await adm.tick()  # not yet an optimization interval since the first sample: nothing moves by itself
    assert (await adm.batch())["batch_size"] == 4
    body = await adm.call("POST", "/admin/optimize")
    changed = [e for e in body["events"] if e["kind"] == "batch_changed"]
    assert [(e["service"], e["trigger"], e["old"], e["new"]) for e in changed] == [("svc", "optimization", 4, 16)]
    assert [(s["service"], s["batch_size"]) for s in body["services"]] == [("svc", 16)]
    polled = await adm.batch()
    assert polled["batch_size"] == 16
    assert polled["reason"].startswith("balanced:")
    # nothing left to gain: a second run changes nothing
    again = await adm.call("POST", "/admin/optimize")
    assert [e for e in again["events"] if e["kind"] == "batch_changed"] == []
    assert again["services"][0]["batch_size"] == 16


async def test_optimize_before_the_first_sample_does_nothing(make_admin: MakeAdmin) -> None:
    a = await make_admin()
    body = await a.call("POST", "/admin/optimize")
    assert body == {"events": [], "services": [], "deferred": []}


# --------------------------------------------------------------------------- enable/disable, monitoring


async def test_disable_publishes_the_default_and_enable_resumes(adm: Admin) -> None:
    await adm.batch()
    await adm.call("POST", "/admin/optimize")
    assert (await adm.batch())["batch_size"] == 16

    assert await adm.call("POST", "/admin/disable") == {
        "enabled": False, "changed": True, "deferred": [],
        "batch_changes": [{"service": "svc", "gpu": 0, "old": 16, "new": 4}]}
    assert adm.engine.settings.enabled is False
    assert (await adm.call("GET", "/admin/config"))["enabled"] is False
    await adm.tick()
    body = await adm.batch()
    assert body["batch_size"] == 4
    assert "disabled" in body["reason"]
    fresh = await adm.batch("newcomer")
    assert fresh["batch_size"] == 4 and "disabled" in fresh["reason"]
    assert await adm.call("POST", "/admin/disable") == {"enabled": False, "changed": False, "batch_changes": [],
                                                        "deferred": []}
    # no optimization while disabled, whoever asks
    assert (await adm.call("POST", "/admin/optimize"))["events"] == []
    await adm.tick(advance=OPT_INTERVAL)
    assert (await adm.batch())["batch_size"] == 4
    # an override is still published while disabled
    await adm.call("PUT", "/admin/batch-size", {"service": "newcomer", "batch_size": 6})
    await adm.tick()
    manual = await adm.batch("newcomer")
    assert manual["batch_size"] == 6 and "manual override" in manual["reason"]

    enabled = await adm.call("POST", "/admin/enable")  # optimizes at once, from the latest sample
    assert enabled == {"enabled": True, "changed": True, "deferred": [],
                       "batch_changes": [{"service": "svc", "gpu": 0, "old": 4, "new": 16}]}
    assert adm.engine.settings.enabled is True
    resumed = await adm.batch()
    assert resumed["batch_size"] == 16
    assert resumed["reason"].startswith("balanced:")


async def test_enable_right_after_a_batch_change_is_deferred_to_the_first_settled_sample(adm: Admin) -> None:
    await adm.batch()
    await adm.call("POST", "/admin/optimize")  # 4 -> 16: the samples do not show it for 1.5 intervals
    adopt_after = adm.engine.state.gpus[0].adopt_after
    assert adopt_after == adm.clock() + 1.5 * INTERVAL
    await adm.call("POST", "/admin/disable")
    assert "optimization disabled" in (await adm.batch())["reason"]
    await adm.call("PUT", "/admin/batch-size", {"service": "held", "batch_size": 3})
    await adm.tick()  # a sample while disabled (still within the adoption window)
    assert adm.clock() < adopt_after
    assert (await adm.batch("held"))["reason"] == "manual override by an operator (optimization disabled)"

    body = await adm.call("POST", "/admin/enable")
    assert body["changed"] is True and body["batch_changes"] == []
    assert (await adm.batch("held"))["reason"] == "manual override by an operator"
    held, deferred = body["deferred"]  # by service name
    assert held["service"] == "held"
    assert (deferred["service"], deferred["gpu"], deferred["deferred"], deferred["until"]) == (
        "svc", 0, "optimization", adopt_after)
    assert "first sample from" in deferred["reason"] and "last batch change" in deferred["reason"]
    # what the service reads says so at once: not "optimization disabled"
    polled = await adm.batch()
    assert "optimization disabled" not in polled["reason"]
    assert polled["reason"] == "optimization requested by an operator: " + deferred["reason"]
    assert polled["batch_size"] == 4

    await adm.tick()  # the first sample from adopt_after on: the optimization runs there, not 60 s later
    assert adm.clock() >= adopt_after
    resumed = await adm.batch()
    assert resumed["batch_size"] == 16 and resumed["reason"].startswith("balanced:")
    assert (await adm.call("POST", "/admin/optimize"))["deferred"][0]["until"] == adm.clock() + 1.5 * INTERVAL


async def test_optimize_right_after_a_batch_change_names_what_waits_and_until_when(adm: Admin) -> None:
    await adm.batch("svc-a")
    await adm.batch("svc-b")
    first = await adm.call("POST", "/admin/optimize")
    assert [e["kind"] for e in first["events"]].count("batch_changed") == 2
    assert first["deferred"] == []
    again = await adm.call("POST", "/admin/optimize")
    assert again["events"] == []
    until = adm.clock() + 1.5 * INTERVAL
    assert [(d["service"], d["gpu"], d["until"]) for d in again["deferred"]] == [("svc-a", 0, until),
                                                                                ("svc-b", 0, until)]
    assert all(s["reason"].startswith("optimization requested by an operator: deferred") for s in again["services"])


async def test_adaptive_enable_right_after_a_change_is_deferred_and_runs_at_the_settled_sample(
        make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=Settings(strategy=Strategy.ADAPTIVE))
    await a.tick()
    await a.batch()
    await a.call("POST", "/admin/optimize")
    grown = (await a.batch())["batch_size"]
    assert grown > 4
    await a.call("POST", "/admin/disable")
    body = await a.call("POST", "/admin/enable")
    assert [d["service"] for d in body["deferred"]] == ["svc"]
    assert "optimization disabled" not in (await a.batch())["reason"]
    await a.tick()
    await a.tick()  # settled: the deferred optimization grows it again at once
    assert (await a.batch())["batch_size"] == grown
    assert a.engine.deferred_optimizations() == ()


async def test_optimize_of_a_gpu_whose_sample_failed_is_deferred_until_it_answers(adm: Admin) -> None:
    await adm.batch()
    adm.gpus.failed.add(0)
    await adm.tick()
    body = await adm.call("POST", "/admin/optimize")
    assert [(d["service"], d["until"]) for d in body["deferred"]] == [("svc", None)]
    assert "answers a sample again" in body["deferred"][0]["reason"]
    adm.gpus.failed.discard(0)
    await adm.tick()
    assert (await adm.batch())["batch_size"] == 16


async def test_monitoring_stop_pauses_and_start_resumes(adm: Admin) -> None:
    paused_at = adm.clock()
    assert await adm.call("POST", "/admin/monitoring/stop") == {"monitoring": False, "changed": True}
    assert adm.sampler.running is False
    adm.clock.advance(100 * INTERVAL)  # long past any sample: paused is not stale
    resp = await adm.read.get("/health")
    assert resp.status == 200  # a pod an operator paused is not restarted
    health = await resp.json()
    assert health["status"] == "paused"
    assert (health["paused_since"], health["paused_for_s"]) == (paused_at, 100 * INTERVAL)
    assert health["last_sample_age_s"] == 100 * INTERVAL
    status = await adm.call("GET", "/admin/status")
    assert (status["monitoring"], status["paused_since"]) == (False, paused_at)
    assert "vlm_optimizer_monitoring_enabled 0.0" in await (await adm.read.get("/metrics")).text()
    assert await adm.call("POST", "/admin/monitoring/stop") == {"monitoring": False, "changed": False}
    assert (await adm.get("/health"))["paused_since"] == paused_at  # a second stop does not move it

    assert await adm.call("POST", "/admin/monitoring/start") == {"monitoring": True, "changed": True}
    assert adm.sampler.running is True
    stale = await adm.get("/health", status=503)  # until the next sample
    assert stale["status"] == "stale" and "paused_since" not in stale
    await adm.tick(advance=0)
    assert (await adm.get("/health"))["status"] == "ok"
    status = await adm.call("GET", "/admin/status")
    assert (status["monitoring"], status["paused_since"]) == (True, None)


# --------------------------------------------------------------------------- configuration


async def test_get_config_is_the_effective_settings(make_admin: MakeAdmin) -> None:
    s = Settings(strategy=Strategy.CONSERVATIVE, max_batch_size=32)
    a = await make_admin(settings=s)
    assert await a.call("GET", "/admin/config") == settings_to_dict(s)


async def test_patch_changes_only_the_given_keys(adm: Admin) -> None:
    before = settings_to_dict(adm.engine.settings)
    body = await adm.call("PATCH", "/admin/config", {"strategy": "aggressive", "memory_threshold_warning": 0.7,
                                                     "max_batch_size": 16})
    assert body["changed"] == ["memory_threshold_warning", "strategy"]  # max_batch_size was 16 already
    after = settings_to_dict(adm.engine.settings)
    assert body["settings"] == after
    assert {k for k in after if after[k] != before[k]} == {"strategy", "memory_threshold_warning"}
    assert adm.engine.settings.strategy is Strategy.AGGRESSIVE
    assert adm.engine.settings.memory_threshold_warning == 0.7
    # max_batch_size already had the value: reported unchanged and not pinned
    assert body["unchanged"] == ["max_batch_size"]
    assert body["pinned"] == ["memory_threshold_warning", "strategy"]
    assert adm.engine.runtime == {"strategy": "aggressive", "memory_threshold_warning": 0.7}
    assert (await adm.batch())["strategy"] == "aggressive"
    assert await adm.call("GET", "/admin/config") == after


BAD_PATCHES: list[tuple[str, bytes, str]] = [
    ("unknown strategy", b'{"strategy": "turbo"}', "strategy"),
    ("warning above 1", b'{"memory_threshold_warning": 2}', "memory_threshold_warning"),
    ("warning above critical", b'{"memory_threshold_warning": 0.95}', "memory_threshold_critical"),
    ("min above max", b'{"min_batch_size": 20}', "min_batch_size"),
    ("min above a new max", b'{"min_batch_size": 8, "max_batch_size": 4}', "min_batch_size"),
    ("unknown key", b'{"turbo": true}', "turbo"),
    ("one bad among good", b'{"strategy": "aggressive", "max_batch_size": 8, "monitoring_interval": -5}',
     "monitoring_interval"),
    ("good after bad", b'{"enabled": "maybe", "strategy": "aggressive"}', "enabled"),
    ("profiles are file-only", b'{"profiles": [{"name": "x", "per_item_mb": 100}]}', "profiles"),
    ("profiles among good keys", b'{"strategy": "aggressive", "profiles": []}', "profiles"),
    ("bad default profile", b'{"default_profile": {"per_item_mb": 0}}', "default_profile.per_item_mb"),
    ("empty object", b"{}", "body"),
    ("array", b'[{"strategy": "aggressive"}]', "body"),
    ("string", b'"aggressive"', "body"),
    ("not json", b"{strategy: aggressive}", "body"),
]


@pytest.mark.parametrize(("raw", "field"), [(raw, f) for _, raw, f in BAD_PATCHES],
                         ids=[n for n, _, _ in BAD_PATCHES])
async def test_bad_patch_is_a_400_and_changes_nothing(adm: Admin, logs: LogList, raw: bytes, field: str) -> None:
    before = observe(adm)
    settings_before = settings_to_dict(adm.engine.settings)
    body = await adm.call("PATCH", "/admin/config", raw=raw, status=400)
    assert body["field"] == field
    assert field in body["error"]
    assert observe(adm) == before
    assert adm.engine.settings == Settings()
    assert await adm.call("GET", "/admin/config") == settings_before
    assert events_named(logs, "admin_audit") == []


FILE_PROFILES = (ServiceProfile("vlm", per_item_mb=2048.0, weight=2.0),)
# what the "file" (the engine's base) says; the tests pin on top of it
BASE = Settings(strategy=Strategy.CONSERVATIVE, max_batch_size=32, memory_reserve_mb=2048, profiles=FILE_PROFILES)


async def test_export_import_round_trip(make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=BASE)
    await a.call("PATCH", "/admin/config", {"strategy": "aggressive", "max_batch_size": 24})
    exported = await a.call("GET", "/admin/config/export")
    assert exported["format"] == EXPORT_FORMAT and exported["version"] == 1
    assert exported["settings"] == settings_to_dict(a.engine.settings)
    assert exported["settings"]["profiles"] == [dataclasses.asdict(p) for p in FILE_PROFILES]
    assert exported["pinned"] == ["max_batch_size", "strategy"]
    snapshot, pinned = a.engine.settings, a.engine.runtime

    patched = await a.call("PATCH", "/admin/config", {"strategy": "adaptive", "max_batch_size": 8,
                                                      "gc_threshold": 0.7})
    assert set(patched["changed"]) == {"strategy", "max_batch_size", "gc_threshold"}
    assert a.engine.settings != snapshot

    body = await a.call("POST", "/admin/config/import", exported)
    assert body["settings"] == exported["settings"]
    assert set(body["changed"]) == {"strategy", "max_batch_size", "gc_threshold"}
    assert body["pinned"] == ["max_batch_size", "strategy"] and body["unpinned"] == ["gc_threshold"]
    # the same effective settings and the same runtime layer: the keys the export did not pin follow the file
    assert a.engine.settings == snapshot and a.engine.runtime == pinned
    assert a.engine.settings.profiles == FILE_PROFILES
    assert await a.call("GET", "/admin/config") == exported["settings"]
    # a JSON round trip of the export is the same document
    assert await a.call("GET", "/admin/config/export") == exported


async def test_import_of_an_edited_export_pins_what_differs_from_the_file(make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=BASE)
    doc = await a.call("GET", "/admin/config/export")
    assert doc["pinned"] == []
    doc["settings"]["gc_threshold"] = 0.7  # edited by hand; every other value is the file's
    body = await a.call("POST", "/admin/config/import", doc)
    assert body["changed"] == ["gc_threshold"] and body["pinned"] == ["gc_threshold"]
    assert a.engine.runtime == {"gc_threshold": 0.7}
    assert a.engine.settings == dataclasses.replace(BASE, gc_threshold=0.7)


async def test_import_of_a_plain_mapping_pins_only_its_keys_the_rest_follow_the_file(make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=BASE)
    await a.call("PATCH", "/admin/config", {"max_batch_size": 8, "gc_threshold": 0.7})
    body = await a.call("POST", "/admin/config/import", {"strategy": "adaptive", "cleanup_interval": 120})
    # not the built-in defaults (balanced, 16, 1024 MiB, no profiles): the file's values
    assert a.engine.settings == dataclasses.replace(BASE, strategy=Strategy.ADAPTIVE, cleanup_interval=120.0)
    assert a.engine.runtime == {"strategy": "adaptive", "cleanup_interval": 120.0}
    assert set(body["changed"]) == {"strategy", "cleanup_interval", "max_batch_size", "gc_threshold"}
    assert body["pinned"] == ["cleanup_interval", "strategy"]
    assert body["unpinned"] == ["gc_threshold", "max_batch_size"]
    assert body["settings"] == settings_to_dict(a.engine.settings)
    # a key the mapping names keeps its value even when it is the file's: the mapping is the runtime layer
    await a.call("POST", "/admin/config/import", {"max_batch_size": 32})
    assert a.engine.runtime == {"max_batch_size": 32}
    # an empty mapping unpins everything
    body = await a.call("POST", "/admin/config/import", {})
    assert a.engine.runtime == {} and a.engine.settings == BASE and body["unpinned"] == ["max_batch_size"]


async def test_import_keeps_the_file_profiles(make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=BASE)
    same = [dataclasses.asdict(p) for p in FILE_PROFILES]
    body = await a.call("POST", "/admin/config/import", {"strategy": "adaptive", "profiles": same})
    assert body["pinned"] == ["strategy"]  # the file's own profiles are accepted, and not pinned
    assert a.engine.settings.profiles == FILE_PROFILES
    before = observe(a)
    for profiles in ([], [{"name": "other", "per_item_mb": 100}], [{**same[0], "weight": 3}]):
        body = await a.call("POST", "/admin/config/import", {"strategy": "balanced", "profiles": profiles},
                            status=400)
        assert body["field"] == "profiles" and "config file" in body["error"]
        assert observe(a) == before


async def test_patch_of_profiles_is_refused_naming_where_they_are_set(make_admin: MakeAdmin,
                                                                      logs: LogList) -> None:
    a = await make_admin(settings=BASE)
    before = observe(a)
    body = await a.call("PATCH", "/admin/config", {"profiles": [dataclasses.asdict(p) for p in FILE_PROFILES]},
                        status=400)
    assert body["field"] == "profiles"
    assert "set only in the config file" in body["error"] and "--config" in body["error"]
    assert observe(a) == before and events_named(logs, "admin_audit") == []


async def test_patch_of_an_unchanged_value_pins_nothing(make_admin: MakeAdmin, logs: LogList) -> None:
    a = await make_admin(settings=BASE)
    before = observe(a)
    body = await a.call("PATCH", "/admin/config", {"strategy": "conservative", "max_batch_size": 32.0})
    assert (body["changed"], body["unchanged"], body["pinned"]) == ([], ["max_batch_size", "strategy"], [])
    assert a.engine.runtime == {} and observe(a).revision == before.revision
    [audit] = events_named(logs, "admin_audit")
    assert (audit["action"], audit["changes"], audit["pinned"]) == ("configure", {}, [])
    # a changed value is pinned; stating it again pins nothing more and keeps it pinned
    await a.call("PATCH", "/admin/config", {"strategy": "aggressive"})
    body = await a.call("PATCH", "/admin/config", {"strategy": "aggressive", "max_batch_size": 32})
    assert body["unchanged"] == ["max_batch_size", "strategy"] and body["pinned"] == ["strategy"]
    assert a.engine.runtime == {"strategy": "aggressive"}


async def test_reset_unpins_one_key_or_all(make_admin: MakeAdmin, logs: LogList, tmp_path: Path) -> None:
    a = await make_admin(settings=BASE, state_path=tmp_path / "state.json")
    await a.tick()
    await a.call("PATCH", "/admin/config", {"strategy": "aggressive", "max_batch_size": 8, "gc_threshold": 0.7})
    assert (await a.batch())["strategy"] == "aggressive"

    body = await a.call("POST", "/admin/config/reset", {"keys": ["strategy", "cleanup_interval"]})
    assert body["unpinned"] == ["strategy"] and body["not_pinned"] == ["cleanup_interval"]
    assert body["changed"] == ["strategy"] and body["pinned"] == ["gc_threshold", "max_batch_size"]
    assert a.engine.settings.strategy is Strategy.CONSERVATIVE  # the file's value, at once
    assert (await a.batch())["strategy"] == "conservative"
    assert a.saved()["settings"] == {"max_batch_size": 8, "gc_threshold": 0.7}
    status = await a.get("/status")
    assert status["runtime_settings"] == {"max_batch_size": 8, "gc_threshold": 0.7}

    body = await a.call("POST", "/admin/config/reset", {"all": True})
    assert body["unpinned"] == ["gc_threshold", "max_batch_size"] and body["pinned"] == []
    assert a.engine.settings == BASE and a.engine.runtime == {}
    assert a.saved()["settings"] == {}
    resets = [e for e in events_named(logs, "admin_audit") if e["action"] == "reset_config"]
    assert [(e["keys"], e["unpinned"]) for e in resets] == [
        (["cleanup_interval", "strategy"], ["strategy"]), ("all", ["gc_threshold", "max_batch_size"])]
    assert resets[0]["changes"] == {"strategy": {"old": "aggressive", "new": "conservative"}}


BAD_RESETS: list[tuple[str, Any, str, str]] = [
    ("unknown key", {"keys": ["strategy", "turbo"]}, "keys", "'turbo': not a setting; allowed keys are enabled"),
    ("profiles", {"keys": ["profiles"]}, "keys", "never pinned"),
    ("keys not a list", {"keys": "strategy"}, "keys", "allowed keys are"),
    ("empty keys", {"keys": []}, "keys", "non-empty list"),
    ("all false", {"all": False}, "all", "must be true"),
    ("both", {"keys": ["strategy"], "all": True}, "body", "exactly one"),
    ("neither", {}, "body", "exactly one"),
    ("unknown field", {"key": "strategy"}, "key", "allowed: keys, all"),
    ("array", ["strategy"], "body", "JSON object"),
    # the file's maximum (32) is below the pinned minimum (20 <= 24 pinned): unpinning the maximum alone cannot be
    ("left inconsistent", {"keys": ["max_batch_size"]}, "min_batch_size", "max_batch_size"),
]


@pytest.mark.parametrize(("doc", "field", "says"), [(d, f, w) for _, d, f, w in BAD_RESETS],
                         ids=[n for n, _, _, _ in BAD_RESETS])
async def test_bad_reset_is_a_400_and_changes_nothing(make_admin: MakeAdmin, logs: LogList, doc: Any, field: str,
                                                      says: str) -> None:
    a = await make_admin(settings=dataclasses.replace(BASE, max_batch_size=16))
    await a.call("PATCH", "/admin/config", {"strategy": "aggressive", "max_batch_size": 64, "min_batch_size": 20})
    before = observe(a)
    body = await a.call("POST", "/admin/config/reset", doc, status=400)
    assert body["field"] == field and says in body["error"], body
    assert observe(a) == before
    assert [e["action"] for e in events_named(logs, "admin_audit")] == ["configure"]


async def test_status_shows_the_pinned_keys(make_admin: MakeAdmin) -> None:
    a = await make_admin(settings=BASE)
    await a.tick()
    assert (await a.get("/status"))["runtime_settings"] == {}
    await a.call("PATCH", "/admin/config", {"strategy": "adaptive", "memory_threshold_warning": 0.7})
    for doc in (await a.get("/status"), await a.call("GET", "/admin/status")):
        assert doc["runtime_settings"] == {"strategy": "adaptive", "memory_threshold_warning": 0.7}
        assert doc["settings"]["max_batch_size"] == 32  # the file's


BAD_IMPORTS: list[tuple[str, Any, str]] = [
    ("invalid value", {"format": EXPORT_FORMAT, "version": 1, "settings": {"strategy": "turbo"}}, "strategy"),
    ("invalid relation", {"format": EXPORT_FORMAT, "version": 1,
                          "settings": {"min_batch_size": 9, "max_batch_size": 8}}, "min_batch_size"),
    ("unknown key", {"format": EXPORT_FORMAT, "version": 1, "settings": {"nope": 1}}, "nope"),
    ("unknown format", {"format": "something-else", "version": 1, "settings": {}}, "format"),
    ("unknown version", {"format": EXPORT_FORMAT, "version": 2, "settings": {}}, "format"),
    ("settings not an object", {"format": EXPORT_FORMAT, "version": 1, "settings": [1]}, "settings"),
    ("plain mapping with a bad value", {"strategy": "conservative", "max_batch_size": 0}, "max_batch_size"),
    ("array", [{"strategy": "conservative"}], "settings"),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in BAD_IMPORTS], ids=[n for n, _, _ in BAD_IMPORTS])
async def test_bad_import_is_a_400_and_changes_nothing(adm: Admin, doc: Any, field: str) -> None:
    await adm.call("PATCH", "/admin/config", {"strategy": "aggressive"})
    before = observe(adm)
    body = await adm.call("POST", "/admin/config/import", doc, status=400)
    assert body["field"] == field
    assert observe(adm) == before
    assert adm.engine.settings.strategy is Strategy.AGGRESSIVE


# --------------------------------------------------------------------------- audit


async def test_every_change_is_audited_with_client_action_old_and_new(adm: Admin, logs: LogList) -> None:
    await adm.batch()
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6, "ttl_s": 60})
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 5})
    await adm.call("PATCH", "/admin/config", {"strategy": "aggressive", "max_batch_size": 16})
    await adm.call("POST", "/admin/disable")
    await adm.call("POST", "/admin/enable")
    await adm.call("POST", "/admin/monitoring/stop")
    await adm.call("POST", "/admin/monitoring/start")
    await adm.call("POST", "/admin/config/import", {"strategy": "conservative"})
    await adm.call("POST", "/admin/optimize")
    await adm.call("DELETE", "/admin/batch-size?service=svc")
    for path in ("/admin/status", "/admin/history", "/admin/config", "/admin/config/export"):
        await adm.call("GET", path)  # reads are not audited

    audit = events_named(logs, "admin_audit")
    assert all(e["client"] == "127.0.0.1" and e["log_level"] == "info" for e in audit)
    assert [e["action"] for e in audit] == ["set_batch_size", "set_batch_size", "configure", "disable", "enable",
                                           "stop_monitoring", "start_monitoring", "import_config", "optimize",
                                           "clear_batch_size"]
    put1, put2, configure, disable, enable, stop, start, imported, optimized, cleared = audit
    assert (put1["service"], put1["gpu"], put1["old"], put1["new"], put1["ttl_s"], put1["published"]) == (
        "svc", 0, None, 6, 60, 6)
    assert (put2["old"], put2["new"], put2["ttl_s"]) == (6, 5, None)
    assert configure["changes"] == {"strategy": {"old": "balanced", "new": "aggressive"}}
    assert (disable["key"], disable["old"], disable["new"]) == ("enabled", True, False)
    assert (enable["key"], enable["old"], enable["new"]) == ("enabled", False, True)
    assert (stop["old"], stop["new"]) == (True, False)
    assert (start["old"], start["new"]) == (False, True)
    assert imported["changes"] == {"strategy": {"old": "aggressive", "new": "conservative"}}
    assert optimized["changes"] == []  # the override holds the batch
    assert (cleared["service"], cleared["gpu"]) == ("svc", 0)
    assert events_named(logs, "admin_unauthorized") == []


async def test_clearing_an_override_audits_the_old_value(adm: Admin, logs: LogList) -> None:
    await adm.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6})
    await adm.call("DELETE", "/admin/batch-size?service=svc")
    [cleared] = [e for e in events_named(logs, "admin_audit") if e["action"] == "clear_batch_size"]
    assert cleared["old"] == 6
    assert "new" in cleared and cleared["new"] is None


async def test_unauthorized_requests_log_a_warning_and_no_audit(adm: Admin, logs: LogList) -> None:
    resp = await adm.client.post("/admin/disable", headers=auth("nope"))
    assert resp.status == 401
    resp = await adm.client.patch("/admin/config", json={"strategy": "aggressive"})
    assert resp.status == 401
    warned = events_named(logs, "admin_unauthorized")
    assert [(e["method"], e["path"], e["client"], e["log_level"]) for e in warned] == [
        ("POST", "/admin/disable", "127.0.0.1", "warning"), ("PATCH", "/admin/config", "127.0.0.1", "warning")]
    assert all(TOKEN not in json.dumps(dict(e), default=str) and "nope" not in json.dumps(dict(e), default=str)
               for e in warned)  # the token offered is not logged
    assert events_named(logs, "admin_audit") == []
    assert adm.engine.settings == Settings()


# --------------------------------------------------------------------------- durable state


async def test_every_admin_change_is_saved_at_once(make_admin: MakeAdmin, tmp_path: Path) -> None:
    a = await make_admin(state_path=tmp_path / "state.json")
    await a.tick()
    await a.call("GET", "/admin/status")
    assert a.state_path is not None and not a.state_path.exists()  # a read saves nothing

    await a.call("PUT", "/admin/batch-size", {"service": "svc", "batch_size": 6, "ttl_s": 120})
    saved = a.saved()
    [item] = saved["services"]
    assert (item["service"], item["gpu"], item["override"], item["override_until"], item["batch_size"]) == (
        "svc", 0, 6, a.clock() + 120, 6)

    await a.call("PATCH", "/admin/config", {"strategy": "aggressive"})
    assert a.saved()["settings"] == {"strategy": "aggressive"}

    await a.call("POST", "/admin/disable")
    assert a.saved()["settings"] == {"strategy": "aggressive", "enabled": False}

    await a.call("DELETE", "/admin/batch-size?service=svc")
    assert a.saved()["services"][0]["override"] is None

    await a.call("POST", "/admin/config/import", {"strategy": "balanced"})
    assert a.saved()["settings"] == {"strategy": "balanced"}  # exactly what the import holds

    await a.call("POST", "/admin/config/reset", {"all": True})
    assert a.saved()["settings"] == {}
    await a.call("POST", "/admin/config/import", {"strategy": "balanced"})

    # saved immediately: a fresh engine restores exactly the state the admin API left
    fresh = Engine(Settings(max_batch_size=8))
    assert Persister(fresh, StateFile(a.state_path)).load(a.clock())
    assert fresh.runtime == a.engine.runtime == {"strategy": "balanced"}
    assert fresh.settings == Settings(max_batch_size=8)  # the new configuration, with what was pinned on top
    assert fresh.state.services[(0, "svc")].override is None


async def test_a_failing_save_is_a_503_that_says_the_change_is_applied_but_not_saved(
        make_admin: MakeAdmin, tmp_path: Path, logs: LogList) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    path = blocker / "state.json"
    a = await make_admin(state_path=path)
    await a.tick()
    assert (await a.get("/health"))["status"] == "ok"
    resp = await a.client.put("/admin/batch-size", json={"service": "svc", "batch_size": 6}, headers=auth())
    assert resp.status == 503 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["applied"] is True and body["saved"] is False and body["state_file"] == str(path)
    assert "File exists" in body["os_error"] or "Not a directory" in body["os_error"]
    assert body["error"].startswith("set_batch_size: the change is applied in memory but not saved")
    assert str(path) in body["error"] and body["os_error"] in body["error"]
    assert a.engine.state.services[(0, "svc")].override == 6  # applied, as it says
    assert (await a.batch())["batch_size"] == 6
    failed = events_named(logs, "state_save_failed")
    assert len(failed) == 1 and failed[0]["path"] == str(path) and failed[0]["log_level"] == "error"
    [not_saved] = events_named(logs, "admin_change_not_saved")
    assert (not_saved["action"], not_saved["path"], not_saved["log_level"]) == ("set_batch_size", str(path), "error")
    assert len(events_named(logs, "admin_audit")) == 1

    # the metric counts it, and /health says degraded (still 200: a restart does not fix a disk)
    metrics = await (await a.read.get("/metrics")).text()
    assert "vlm_optimizer_state_save_errors_total 1.0" in metrics
    health = await a.get("/health")
    assert health["status"] == "degraded"
    detail = health["degraded"]["state_save"]
    assert (detail["path"], detail["error"], detail["failed_saves"]) == (str(path), body["os_error"], 1)
    assert detail["since"] == detail["last_failed_at"]

    # every mutating endpoint answers the same way while the disk is broken
    for method, endpoint, payload in [("POST", "/admin/optimize", None), ("POST", "/admin/disable", None),
                                      ("POST", "/admin/enable", None), ("POST", "/admin/monitoring/stop", None),
                                      ("POST", "/admin/monitoring/start", None),
                                      ("PATCH", "/admin/config", {"strategy": "aggressive"})]:
        resp = await a.client.request(method, endpoint, json=payload, headers=auth())
        assert resp.status == 503, (endpoint, await resp.text())
        assert (await resp.json())["saved"] is False
    assert a.engine.settings.strategy is Strategy.AGGRESSIVE
    later = (await a.get("/health"))["degraded"]["state_save"]
    assert later["since"] == detail["since"] and later["failed_saves"] == 7

    # the disk is fixed: the next change is saved, and /health is ok again
    blocker.unlink()
    await a.call("DELETE", "/admin/batch-size?service=svc")
    assert a.saved()["settings"] == {"strategy": "aggressive", "enabled": True}
    health = await a.get("/health")
    assert health["status"] == "ok" and "degraded" not in health
    assert "vlm_optimizer_state_save_errors_total 7.0" in await (await a.read.get("/metrics")).text()
    assert len(events_named(logs, "state_save_recovered")) == 1


async def test_without_a_state_file_nothing_is_degraded_and_the_counter_is_zero(adm: Admin) -> None:
    await adm.call("POST", "/admin/optimize")
    health = await adm.get("/health")
    assert health["status"] == "ok" and "degraded" not in health
    assert "vlm_optimizer_state_save_errors_total 0.0" in await (await adm.read.get("/metrics")).text()


# --------------------------------------------------------------------------- serve as a real process


def _free_port(avoid: int | None = None) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port != avoid:
            return port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_") and not k.endswith("_proxy")
           and not k.endswith("_PROXY")}
    env.update(extra)
    return env


def _runtime_dir(tmp_path: Path) -> Path:
    """A private directory to stand for ``$XDG_RUNTIME_DIR`` (so a generated token stays in the test's tree)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700, parents=True)
    return run


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, token: str | None = None, headers: dict[str, str] | None = None,
          data: bytes | None = None) -> tuple[int, Any]:
    """A request as a program sends it: the token if given, and JSON for a write (unless ``headers`` say)."""
    sent = {} if token is None else {"Authorization": f"Bearer {token}"}
    if method != "GET":
        sent["Content-Type"] = "application/json"
        data = b"" if data is None else data
    sent.update(headers or {})
    req = urllib.request.Request(url, method=method, headers=sent, data=data)
    try:
        with _DIRECT.open(req, timeout=5) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    api: str
    admin: str
    admin_port: int
    log_path: Path
    log: list[dict[str, Any]] = field(default_factory=list)


def _until_answers(served: Served, url: str, ok: set[int]) -> None:
    """Poll ``url`` until it answers with a status in ``ok`` (bounded; a short back-off between tries)."""
    deadline = time.monotonic() + 30
    while True:
        assert served.proc.poll() is None, served.log_path.read_text()
        try:
            status, _ = _http("GET", url)
            if status in ok:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"{url} never answered; log:\n{served.log_path.read_text()}"
        time.sleep(0.05)  # back-off between polls; the synchronisation is the answer itself


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, env: dict[str, str]) -> Iterator[Served]:
    port = _free_port()
    admin_port = _free_port(avoid=port)
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                                 "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
                                 "--monitoring-interval", "0.2", "--log-format", "json", *args],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
    served = Served(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", admin_port, log_path)
    try:
        _until_answers(served, served.api + "/ready", {200})
        _until_answers(served, served.admin + "/admin/config", {200, 401})  # the admin site is up too
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)
        text = log_path.read_text()
        assert proc.returncode in (0, -15), text
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    served.log.append(item)


def _listening(port: int) -> set[str]:
    """The addresses with a TCP socket listening on ``port`` (Linux's /proc/net/tcp; IPv4 only)."""
    found: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return found


def _token_file(directory: Path, admin_port: int) -> Path:
    return directory / f"admin-token-{admin_port}"


def _cli(served: Served, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A management command against the served admin API, with no token flag."""
    return subprocess.run([sys.executable, "-m", "optimizer", *args, "--url", served.admin], capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)


def test_serve_without_a_token_generates_one_that_only_its_user_can_read(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    with serving(tmp_path, "--admin-host", "0.0.0.0", env=_env(XDG_RUNTIME_DIR=str(run))) as served:
        token_file = _token_file(run / "vlm-gpu-optimizer", served.admin_port)
        token = token_file.read_text(encoding="ascii").strip()
        assert len(token) >= 40
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        assert sorted(p.name for p in token_file.parent.iterdir()) == [token_file.name]  # no temporary left
        status, body = _http("GET", served.admin + "/admin/status")  # no token-less mode
        assert status == 401 and "error" in body
        status, body = _http("GET", served.admin + "/admin/status", token=token)
        assert status == 200 and body["backend"] == "simulated"
        if Path("/proc/net/tcp").exists():
            assert _listening(served.admin_port) == {"127.0.0.1"}
    assert not token_file.exists()  # removed at exit: no stale token for the CLI to send
    events = {e.get("event"): e for e in served.log}
    loopback = events["admin_api_loopback_only"]
    assert loopback["level"] == "warning"
    assert "token" in loopback["reason"] and loopback["token_file"] == str(token_file)
    assert events["admin_token_written"]["path"] == str(token_file)
    assert events["listening"]["admin"] == f"127.0.0.1:{served.admin_port}"
    assert token not in served.log_path.read_text()  # where, never what


def test_the_cli_drives_a_serve_without_a_token_with_no_token_flags(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    env = _env(XDG_RUNTIME_DIR=str(run))
    with serving(tmp_path, env=env) as served:
        done = _cli(served, "status", "--json", env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["backend"] == "simulated"
        # writes without a body and with one: the CLI says JSON on both
        done = _cli(served, "stop-monitoring", env=env)
        assert (done.returncode, done.stdout) == (0, "monitoring stopped\n"), done.stderr
        done = _cli(served, "configure", "--max-batch-size", "12", env=env)
        assert done.returncode == 0 and "max_batch_size = 12" in done.stdout, done.stderr
        done = _cli(served, "status", "--json", env=env)
        assert json.loads(done.stdout)["monitoring"] is False
        # what a web page could send instead: refused, and nothing changes
        assert _http("POST", served.admin + "/admin/monitoring/start",
                     headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})[0] == 403
        token = _token_file(run / "vlm-gpu-optimizer", served.admin_port).read_text().strip()
        assert _http("POST", served.admin + "/admin/monitoring/start", token=token,
                     headers={"Host": f"rebound.evil.example:{served.admin_port}"})[0] == 421
        assert _http("POST", served.admin + "/admin/monitoring/start", token=token,
                     headers={"Content-Type": "text/plain"})[0] == 415
        assert json.loads(_cli(served, "status", "--json", env=env).stdout)["monitoring"] is False
        # another user's environment (no runtime directory in common) finds no token
        other = _env(XDG_RUNTIME_DIR=str(_runtime_dir(tmp_path / "other")))
        done = _cli(served, "status", env=other)
        assert done.returncode == 3 and "no token given" in done.stderr and "no generated token at" in done.stderr
    refused = [e for e in served.log if e.get("event") == "admin_refused"]
    assert [(e["status"], e["header"]) for e in refused] == [(403, "Origin"), (421, "Host"), (415, "Content-Type")]
    assert all(e["client"] == "127.0.0.1" and e["level"] == "warning" for e in refused)


def test_with_a_state_path_the_generated_token_is_kept_next_to_it(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    state = tmp_path / "state" / "state.json"
    env = _env(XDG_RUNTIME_DIR=str(run), VLM_OPTIMIZER_STATE_PATH=str(state))  # serve and the CLI read it
    with serving(tmp_path, env=env) as served:
        token_file = _token_file(state.parent, served.admin_port)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
        assert not (run / "vlm-gpu-optimizer").exists()
        done = _cli(served, "disable", env=env)
        assert done.returncode == 0, done.stderr
        assert _http("GET", served.admin + "/admin/config", token=token_file.read_text().strip())[1]["enabled"] is False



def _logged(proc: subprocess.Popen[bytes], log_path: Path, event: str) -> dict[str, Any]:
    """The first JSON log line of ``event`` the process writes (a bounded poll of its log file: there is
    nothing to await across processes)."""
    deadline = time.monotonic() + 30
    while True:
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and item.get("event") == event:
                    return item
        assert proc.poll() is None and time.monotonic() < deadline, f"no {event}; log:\n{log_path.read_text()}"
        time.sleep(0.05)


def test_with_admin_port_0_the_generated_token_is_named_for_the_port_bound(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    env = _env(XDG_RUNTIME_DIR=str(run))
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                                 "127.0.0.1", "--port", "0", "--admin-port", "0", "--log-format", "json"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        written = _logged(proc, log_path, "admin_token_written")
        admin = _logged(proc, log_path, "listening")["bound"]["admin"][0]
        port = int(admin.rsplit(":", 1)[1])
        assert port != 0
        token_file = _token_file(run / "vlm-gpu-optimizer", port)
        assert written["path"] == str(token_file)
        assert sorted(p.name for p in token_file.parent.iterdir()) == [token_file.name]
        loopback = _logged(proc, log_path, "admin_api_loopback_only")
        assert "token_file" not in loopback and loopback["token_dir"] == str(token_file.parent)
        done = subprocess.run([sys.executable, "-m", "optimizer", "status", "--json", "--url",
                               f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60, env=env,
                              cwd=ROOT)  # the CLI finds the token by the port in its URL
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["backend"] == "simulated"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode in (0, -15), log_path.read_text()
    assert not token_file.exists()  # removed at exit, by its real name


def test_a_second_serve_that_cannot_bind_the_admin_port_leaves_the_first_ones_token(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    env = _env(XDG_RUNTIME_DIR=str(run))
    with serving(tmp_path, env=env) as served:
        token_file = _token_file(run / "vlm-gpu-optimizer", served.admin_port)
        first = token_file.read_text()
        done = subprocess.run([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host",
                               "127.0.0.1", "--port", str(_free_port(avoid=served.admin_port)), "--admin-port",
                               str(served.admin_port)], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert done.returncode != 0
        assert token_file.read_text() == first
        assert sorted(p.name for p in token_file.parent.iterdir()) == [token_file.name]
        assert _cli(served, "status", env=env).returncode == 0


def test_serve_with_a_token_in_the_environment_requires_it(tmp_path: Path) -> None:
    run = _runtime_dir(tmp_path)
    with serving(tmp_path, "--admin-host", "127.0.0.1", "--admin-allowed-host", "optimizer.example",
                 env=_env(VLM_OPTIMIZER_ADMIN_TOKEN="s3cret-from-env", XDG_RUNTIME_DIR=str(run))) as served:
        status, body = _http("GET", served.admin + "/admin/status")
        assert status == 401 and "error" in body
        for host, answer in (("optimizer.example:8081", 200), ("other.example", 421)):
            assert _http("GET", served.admin + "/admin/status", token="s3cret-from-env",
                         headers={"Host": host})[0] == answer, host
        status, _ = _http("POST", served.admin + "/admin/disable", token="wrong")
        assert status == 401
        status, body = _http("GET", served.admin + "/admin/config", token="s3cret-from-env")
        assert status == 200 and body["enabled"] is True
        status, body = _http("POST", served.admin + "/admin/disable", token="s3cret-from-env")
        assert status == 200 and (body["enabled"], body["changed"]) == (False, True)
        status, _ = _http("GET", served.api + "/batch-size?service=vlm")  # the read API needs no token
        assert status == 200
        assert list(run.iterdir()) == []  # a configured token is not written anywhere
    names = [e.get("event") for e in served.log]
    assert "admin_api_loopback_only" not in names and "admin_token_written" not in names
    refused = {(e.get("method"), e.get("path")) for e in served.log if e.get("event") == "admin_unauthorized"}
    assert {("GET", "/admin/status"), ("POST", "/admin/disable")} <= refused
    assert any(e.get("event") == "admin_audit" and e.get("action") == "disable" for e in served.log)


def test_serve_token_file_takes_precedence_over_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    with serving(tmp_path, "--admin-host", "127.0.0.1", "--admin-token-file", str(token_file),
                 env=_env(VLM_OPTIMIZER_ADMIN_TOKEN="from-env")) as served:
        assert _http("GET", served.admin + "/admin/config", token="from-the-file")[0] == 200
        assert _http("GET", served.admin + "/admin/config", token="from-env")[0] == 401


def test_serve_enable_right_after_a_batch_change_is_never_silent(tmp_path: Path) -> None:
    """The finding replayed on a real process: optimize (a batch change), disable, enable, and read
    the batch at once, without waiting: the reply says what moved or what waits, and the service
    is not told "optimization disabled"."""
    with serving(tmp_path, env=_env(VLM_OPTIMIZER_ADMIN_TOKEN=TOKEN)) as served:
        assert _http("GET", served.api + "/batch-size?service=vlm")[0] == 200
        status, optimized = _http("POST", served.admin + "/admin/optimize", token=TOKEN)
        assert status == 200
        moved = [e for e in optimized["events"] if e["kind"] == "batch_changed"]
        assert moved, optimized  # the simulated GPU has headroom: a batch change to be adopted
        assert _http("POST", served.admin + "/admin/disable", token=TOKEN)[0] == 200
        status, enabled = _http("POST", served.admin + "/admin/enable", token=TOKEN)
        status_read, polled = _http("GET", served.api + "/batch-size?service=vlm")
        assert (status, status_read) == (200, 200)
        assert enabled["changed"] is True
        assert "optimization disabled" not in polled["reason"], polled
        # acted at once (the batch moved back) or deferred, and said which
        assert enabled["batch_changes"] or enabled["deferred"], enabled
        for d in enabled["deferred"]:
            assert d["service"] == "vlm" and d["until"] is not None and "deferred" in d["reason"]


@pytest.mark.parametrize("env_token", [None, "from-env"])
def test_a_token_file_that_does_not_exist_yet_is_no_token_configured(tmp_path: Path, env_token: str | None) -> None:
    """An optional Kubernetes Secret not created yet mounts as an empty directory: the file is not there."""
    secret = tmp_path / "secret"
    secret.mkdir()
    run = _runtime_dir(tmp_path)
    env = _env(XDG_RUNTIME_DIR=str(run), **({} if env_token is None else {"VLM_OPTIMIZER_ADMIN_TOKEN": env_token}))
    with serving(tmp_path, "--admin-host", "0.0.0.0", "--admin-token-file", str(secret / "token"),
                 env=env) as served:
        if env_token is None:  # a generated token, loopback only, and the CLI finds it
            assert _cli(served, "status", env=env).returncode == 0
            if Path("/proc/net/tcp").exists():
                assert _listening(served.admin_port) == {"127.0.0.1"}
        else:
            assert _http("GET", served.admin + "/admin/config", token=env_token)[0] == 200
    [missing] = [e for e in served.log if e.get("event") == "admin_token_file_missing"]
    assert missing["level"] == "warning" and missing["path"] == str(secret / "token")
    names = [e.get("event") for e in served.log]
    assert ("admin_api_loopback_only" in names) == (env_token is None)


def _serve_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``serve`` that must stop at start with one line and exit code 2 (on ports nothing else uses)."""
    port = _free_port()
    done = subprocess.run([sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1",
                           "--port", str(port), "--admin-port", str(_free_port(avoid=port)), *args],
                          capture_output=True, text=True, timeout=60, env=env or _env(), cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("vlm-gpu-optimizer: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"\xff\xfe not utf-8", b"two words", "t\u00f6ken".encode()])
def test_serve_with_an_unusable_token_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    line = _serve_fails(tmp_path, "--admin-token-file", str(token_file),
                        env=_env(VLM_OPTIMIZER_ADMIN_TOKEN="ignored-when-a-file-is-given"))
    assert "server.admin_token_file" in line and str(token_file) in line


def test_serve_with_a_token_file_it_cannot_read_is_a_config_error(tmp_path: Path) -> None:
    line = _serve_fails(tmp_path, "--admin-token-file", str(tmp_path))  # exists, but a directory
    assert "server.admin_token_file" in line and str(tmp_path) in line


def test_serve_with_a_token_in_the_environment_that_is_no_token_is_a_config_error(tmp_path: Path) -> None:
    line = _serve_fails(tmp_path, env=_env(VLM_OPTIMIZER_ADMIN_TOKEN="two words"))
    assert "VLM_OPTIMIZER_ADMIN_TOKEN" in line and "printable ASCII" in line


def test_serve_does_not_keep_a_generated_token_where_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    line = _serve_fails(tmp_path, "--state-path", str(shared / "state.json"))
    assert str(shared) in line and "writable by other users" in line and "--admin-token-file" in line
    assert list(shared.iterdir()) == []


# --------------------------------------------------------------------------- runtime settings across a restart


def _profile_names(config: dict[str, Any]) -> set[str]:
    return {p["name"] for p in config["profiles"]}


def test_a_partial_import_then_a_restart_on_a_new_config_file_takes_the_new_files_values(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    env = _env(VLM_OPTIMIZER_ADMIN_TOKEN=TOKEN)
    file_a, file_b, partial = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "partial.yaml"
    file_a.write_text("strategy: conservative\nmax_batch_size: 24\nmemory_reserve_mb: 2048\ngc_threshold: 0.8\n"
                      "profiles:\n  - {name: captioner, per_item_mb: 256}\n")
    file_b.write_text("strategy: aggressive\nmax_batch_size: 8\nmemory_reserve_mb: 512\ncleanup_interval: 600\n"
                      "profiles:\n  - {name: ocr, per_item_mb: 128}\n")
    partial.write_text("max_batch_size: 40\ncleanup_interval: 120\n")

    with serving(tmp_path, "--config", str(file_a), "--state-path", str(state), env=env) as served:
        done = _cli(served, "import-config", str(partial), env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1] == "pinned at runtime: cleanup_interval, max_batch_size"
        _, config = _http("GET", served.admin + "/admin/config", token=TOKEN)
        # what the import left out is file A's, not the built-in defaults; A's profiles are kept
        assert (config["strategy"], config["memory_reserve_mb"], config["gc_threshold"]) == ("conservative", 2048, 0.8)
        assert (config["max_batch_size"], config["cleanup_interval"]) == (40, 120)
        assert "captioner" in _profile_names(config)
        _, status = _http("GET", served.api + "/status")
        assert status["runtime_settings"] == {"max_batch_size": 40, "cleanup_interval": 120}
    assert json.loads(state.read_bytes())["settings"] == {"max_batch_size": 40, "cleanup_interval": 120}

    with serving(tmp_path, "--config", str(file_b), "--state-path", str(state), env=env) as served:
        _, config = _http("GET", served.admin + "/admin/config", token=TOKEN)
        assert (config["max_batch_size"], config["cleanup_interval"]) == (40, 120)  # the import's
        assert (config["strategy"], config["memory_reserve_mb"]) == ("aggressive", 512)  # file B's
        assert config["gc_threshold"] == Settings().gc_threshold  # B leaves it out: not A's 0.8 any more
        names = _profile_names(config)
        assert "ocr" in names and "captioner" not in names
        done = _cli(served, "status", env=env)
        assert done.returncode == 0, done.stderr
        assert "pinned:    cleanup_interval=120.0, max_batch_size=40 (configure --reset" in done.stdout

        done = _cli(served, "configure", "--reset", "max_batch_size", env=env)
        assert done.returncode == 0, done.stderr
        assert _http("GET", served.admin + "/admin/config", token=TOKEN)[1]["max_batch_size"] == 8  # file B's, at once
    assert json.loads(state.read_bytes())["settings"] == {"cleanup_interval": 120}
    restored = [e for e in served.log if e.get("event") == "state_restored"]
    assert restored and restored[0]["settings"] == ["cleanup_interval", "max_batch_size"]
