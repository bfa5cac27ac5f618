"""Read timeouts and the binding order, on real sockets: both APIs served by ``optimizer.server.listening``.

A client that sends part of a request (its line, its headers, a byte at a time) and stalls is
answered 408 and disconnected once the header bound passes; a body that stalls gets 408 and the
connection is closed; a keep-alive connection idle between requests stays open. The tests
synchronise on the server closing the connection (end of file), never on sleeps; the bounds are
small (``HEADER_S``, ``BODY_S``) and aiohttp's own closes late (lingering on an unread body 10 s,
keep-alive 75 s), so a close within the read's limit can only be the timeouts'.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from optimizer.api import build_app
from optimizer.api.admin import build_admin_app
from optimizer.api.timeouts import KEEPALIVE_S, ReadTimeouts
from optimizer.config import ServiceProfile, Settings
from optimizer.engine import Engine
from optimizer.sampler import Sampler
from optimizer.server import Listener, StartupError, listening
from tests.fakes import FakeClock, ScriptedBackend, no_sleep
from tests.logcapture import LogList, events_named

HEADER_S = 0.5
BODY_S = 0.5
CLOSE_WITHIN_S = 5.0  # below aiohttp's lingering (10 s) and keep-alive (75 s): a close before is the timeout's
TOKEN = "tok"
assert CLOSE_WITHIN_S < KEEPALIVE_S


@dataclass
class Served:
    engine: Engine
    api_port: int
    admin_port: int


def _port(addresses: list[str]) -> int:
    return int(addresses[0].rsplit(":", 1)[1])


def _apps(backend: ScriptedBackend, *, run_sampler: bool = False) -> tuple[Engine, Listener, Listener]:
    engine = Engine(Settings(profiles=(ServiceProfile(name="vlm"),)))  # a service the optimizer knows
    sampler = Sampler(backend, engine, clock=FakeClock(), sleep=no_sleep)
    app = build_app(engine, sampler, run_sampler=run_sampler)
    admin = build_admin_app(app, TOKEN.encode())
    return engine, Listener("read API", app, "127.0.0.1", 0), Listener("admin API", admin, "127.0.0.1", 0)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    engine, api, admin = _apps(ScriptedBackend())
    async with listening(api, admin, ReadTimeouts(header_s=HEADER_S, body_s=BODY_S)) as addresses:
        yield Served(engine, _port(addresses["api"]), _port(addresses["admin"]))


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by CLOSE_WITHIN_S)."""
    return await asyncio.wait_for(reader.read(), timeout=CLOSE_WITHIN_S)


def _status_and_body(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a kept-alive connection: its status and body (Content-Length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=CLOSE_WITHIN_S)
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(": ") for line in lines[1:]) if k.lower() == "content-length")
    return int(lines[0].split()[1]), await reader.readexactly(length)


# -- headers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("partial", [b"GET /hea", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "])
async def test_a_stalled_request_line_or_header_is_answered_408_and_closed(served: Served, partial: bytes,
                                                                          logs: LogList) -> None:
    reader, writer = await _connect(served.api_port)
    writer.write(partial)
    await writer.drain()
    data = await _until_closed(reader)
    status, body = _status_and_body(data)
    assert status == 408
    assert body == {"error": f"request line and headers not received within {HEADER_S:g} s"}
    (line,) = events_named(logs, "request_header_timeout")
    assert line["partial"] is True and line["timeout_s"] == HEADER_S
    writer.close()


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_bound(served: Served) -> None:
    """The bound runs from the request's first byte: bytes that keep coming do not extend it."""
    reader, writer = await _connect(served.admin_port)
    request = b"GET /admin/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n"
    closed = asyncio.create_task(_until_closed(reader))
    sent = 0
    while not closed.done() and sent < len(request):
        try:
            writer.write(request[sent:sent + 1])
            await writer.drain()
        except ConnectionError:  # the server closed it between two bytes
            break
        sent += 1
        await asyncio.sleep(HEADER_S / 10)  # the slow client's pace (the test waits on `closed`)
    data = await closed
    assert sent < len(request), "the whole request went through: nothing cut it off"
    assert _status_and_body(data)[0] == 408
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(served: Served) -> None:
    reader, writer = await _connect(served.api_port)
    assert await _until_closed(reader) == b""
    writer.close()


async def test_a_keep_alive_connection_idle_between_requests_stays_open(served: Served) -> None:
    reader, writer = await _connect(served.api_port)
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(2):
        writer.write(request)
        await writer.drain()
        status, _ = await _answer(reader)
        assert status == 503  # no sample yet: stale, but answered
        await asyncio.sleep(2 * HEADER_S)  # idle for longer than the header bound: keep-alive's, not closed
    assert not reader.at_eof()
    writer.write(request)
    await writer.drain()
    assert (await _answer(reader))[0] == 503
    writer.close()


async def test_ordinary_requests_are_unaffected(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{served.api_port}"
        for _ in range(3):  # one pooled connection, several requests
            async with session.post(base + "/reports", json={"service": "vlm", "batch_size": 4}) as r:
                assert r.status == 200
            async with session.get(base + "/batch-size?service=vlm") as r:
                assert r.status == 200 and (await r.json())["service"] == "vlm"
        async with session.get(f"http://127.0.0.1:{served.admin_port}/admin/config",
                               headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200


# -- bodies ------------------------------------------------------------------------------------------


async def test_a_stalled_report_body_is_answered_408_and_closed(served: Served, logs: LogList) -> None:
    reader, writer = await _connect(served.api_port)
    writer.write(b"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"service\": ")
    await writer.drain()
    data = await _until_closed(reader)
    status, body = _status_and_body(data)
    assert status == 408 and body["field"] == "body"
    assert body["error"] == f"body: not received within {BODY_S:g} s (12 bytes came)"
    assert b"Connection: close" in data.partition(b"\r\n\r\n")[0]
    assert served.engine.state.services == {}  # nothing was registered
    assert events_named(logs, "request_body_timeout")
    writer.close()


async def test_a_stalled_admin_body_is_answered_408_and_changes_nothing(served: Served) -> None:
    before = served.engine.settings
    reader, writer = await _connect(served.admin_port)
    writer.write(f"PATCH /admin/config HTTP/1.1\r\nHost: 127.0.0.1:{served.admin_port}\r\n"
                 f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                 "Content-Length: 50\r\n\r\n{\"max_batch_size\": 8".encode())
    await writer.drain()
    status, body = _status_and_body(await _until_closed(reader))
    assert status == 408 and body["field"] == "body"
    assert served.engine.settings == before
    writer.close()


# -- binding order -----------------------------------------------------------------------------------


async def test_admin_port_busy_nothing_is_served_and_nothing_starts() -> None:
    backend = ScriptedBackend()
    engine, api, admin = _apps(backend, run_sampler=True)
    with socket.socket() as probe:  # a free port for the read API, to try after the failure
        probe.bind(("127.0.0.1", 0))
        api_port = probe.getsockname()[1]
    api = Listener(api.what, api.app, "127.0.0.1", api_port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        admin = Listener(admin.what, admin.app, "127.0.0.1", busy.getsockname()[1])
        with pytest.raises(StartupError, match=r"^cannot listen on 127\.0\.0\.1:\d+ for the admin API: "
                                               r"Address already in use$"):
            async with listening(api, admin):
                pytest.fail("served although the admin port is busy")
    assert backend.calls == 0  # the sampler never started
    with pytest.raises(ConnectionRefusedError):  # and the read API's port was released
        await _connect(api_port)


async def test_the_same_port_twice_is_refused_before_binding() -> None:
    _, api, admin = _apps(ScriptedBackend())
    with socket.socket() as busy:  # bound by someone else: an error about binding would be the wrong one
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=f"server.admin_port: must differ from server.port, both are {port}"):
            async with listening(Listener(api.what, api.app, "127.0.0.1", port),
                                 Listener(admin.what, admin.app, "127.0.0.1", port)):
                pytest.fail("served on one port twice")
