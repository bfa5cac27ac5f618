"""Telemetry of the client library (vlm_optimizer_client.telemetry) against a real optimizer.
(The reporters on their own, against fakes: client/tests/test_client_telemetry.py.)

The optimizer runs on an ephemeral port (pytest-aiohttp's ``aiohttp_server``) over a scripted GPU
backend; its engine records every report it takes. The sync reporter's blocking calls run in a worker
thread (``asyncio.to_thread``) so that the server keeps serving on the test's event loop. Where the
test needs answers the optimizer does not give (a 503, a stalled request, the exact body on the wire),
a small fake upstream server gives them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from client_fakes import OOM_ERROR, CUuuid, FakeCuda, Upstream, closed_port, install_fake_cuda, oom
from client_fakes import transport, upstream  # noqa: F401 - fixtures, shared with client/tests
from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Decision, Engine
from optimizer.policy.types import ServiceState
from optimizer.sampler import Sampler
from tests.fakes import FakeClock, ScriptedBackend, Sink, no_sleep, uuid_of
from vlm_optimizer_client import AsyncReporter, DecisionSink, Reporter, measure, recover_oom

GIB = 1024**3
HOUR = 3600.0  # an interval that never elapses during a test: only flush(), OOMs and stop() send


# --------------------------------------------------------------------------- the optimizer and its doubles


class RecordingEngine(Engine):
    """The real engine, recording each report the API hands it."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.reports: list[dict[str, Any]] = []

    def report(self, service: str, gpu: int | str | None, now: float, *, batch_size: int | None = None,
               peak_bytes: int | None = None, allocated_bytes: int | None = None,
               reserved_bytes: int | None = None, oom: bool = False, pod: str | None = None,
               inactive_split_bytes: int | None = None, peer: str | None = None) -> Decision:
        self.reports.append({"service": service, "gpu": gpu, "batch_size": batch_size, "peak_bytes": peak_bytes,
                             "allocated_bytes": allocated_bytes, "reserved_bytes": reserved_bytes, "oom": oom,
                             **({"pod": pod} if pod is not None else {}),
                             **({"inactive_split_bytes": inactive_split_bytes}
                                if inactive_split_bytes is not None else {})})
        return super().report(service, gpu, now, batch_size=batch_size, peak_bytes=peak_bytes,
                              allocated_bytes=allocated_bytes, reserved_bytes=reserved_bytes, oom=oom, pod=pod,
                              inactive_split_bytes=inactive_split_bytes, peer=peer)


@dataclass
class Optimizer:
    server: TestServer
    engine: RecordingEngine

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def service(self, name: str, gpu: int = 0) -> ServiceState:
        return self.engine.state.services[(gpu, name)]


class StartOptimizer(Protocol):
    def __call__(self, settings: Settings | None = None, port: int | None = None) -> Awaitable[Optimizer]: ...


@pytest.fixture
def start_optimizer(aiohttp_server: AiohttpServer) -> StartOptimizer:
    async def start(settings: Settings | None = None, port: int | None = None) -> Optimizer:
        engine = RecordingEngine(settings or Settings(default_batch_size=8))
        sampler = Sampler(ScriptedBackend(), engine, clock=FakeClock(), sleep=no_sleep)
        server = await aiohttp_server(build_app(engine, sampler, run_sampler=False), port=port)
        await sampler.tick()
        return Optimizer(server, engine)

    return start


@pytest.fixture
async def optimizer(start_optimizer: StartOptimizer) -> Optimizer:
    return await start_optimizer()


@pytest.fixture
async def reporters(start_optimizer: StartOptimizer) -> AsyncIterator[list[Reporter]]:
    """Reporters to stop after the test (in a worker thread: their last flush needs the loop free)."""
    made: list[Reporter] = []
    yield made
    for r in made:
        await asyncio.to_thread(r.stop)


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vlm_optimizer_client" and r.getMessage().startswith(event)]


# --------------------------------------------------------------------------- aggregation


async def test_reports_of_one_interval_go_out_as_one(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    peaks = [20, 22, 31, 25, 24, 26, 23, 22, 21, 20]
    for i, peak in enumerate(peaks):
        reporter.report(8, peak_bytes=peak * GIB, allocated_bytes=(5 + i) * GIB, reserved_bytes=(10 + i) * GIB)
    assert optimizer.engine.reports == []  # nothing sent from report()
    assert reporter.stats.queued == 10 and reporter.stats.pending == 10

    await asyncio.to_thread(reporter.flush)

    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 8, "peak_bytes": 31 * GIB,
                                         "allocated_bytes": 14 * GIB, "reserved_bytes": 19 * GIB, "oom": False}]
    svc = optimizer.service("svc-a")
    assert svc.reported_batch == 8
    assert svc.memory.fixed == 14 * GIB and [x for _, x in svc.memory.observations] == [17 * GIB / 8]
    assert svc.allocated_bytes == 14 * GIB and svc.reserved_bytes == 19 * GIB
    assert reporter.stats.sent == 1 and reporter.stats.pending == 0

    await asyncio.to_thread(reporter.flush)  # nothing new: nothing sent
    assert len(optimizer.engine.reports) == 1


async def test_the_aggregate_carries_the_latest_batch_and_its_own_peak(optimizer: Optimizer) -> None:
    """A peak measured at another batch size says nothing of the latest one: it is not carried over."""
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    reporter.report(4, peak_bytes=60 * GIB, allocated_bytes=3 * GIB)
    reporter.report(8, peak_bytes=30 * GIB)
    reporter.report(8, peak_bytes=32 * GIB, reserved_bytes=12 * GIB)
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)
    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 8, "peak_bytes": 32 * GIB,
                                         "allocated_bytes": 3 * GIB, "reserved_bytes": 12 * GIB, "oom": False}]
    memory = optimizer.service("svc-a").memory
    assert memory.fixed == 3 * GIB and [x for _, x in memory.observations] == [29 * GIB / 8]


async def test_the_background_thread_sends_every_interval(optimizer: Optimizer, reporters: list[Reporter]) -> None:
    sink = Sink()
    reporter = Reporter("svc-a", url=optimizer.url, interval=0.05, sink=sink)
    reporters.append(reporter.start())
    reporter.report(5, peak_bytes=9 * GIB)
    assert await sink.wait()
    assert optimizer.engine.reports[0]["batch_size"] == 5
    assert sink.decisions[0]["service"] == "svc-a"


# --------------------------------------------------------------------------- OOM


async def test_an_oom_goes_out_at_once_and_the_sink_gets_the_lowered_batch(optimizer: Optimizer,
                                                                           reporters: list[Reporter]) -> None:
    sink = Sink()
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR, sink=sink)
    reporters.append(reporter.start())
    reporter.report(8, peak_bytes=70 * GIB)  # waits for its interval
    reporter.report(8, oom=True)  # does not
    assert await sink.wait()
    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 8, "peak_bytes": None,
                                         "allocated_bytes": None, "reserved_bytes": None, "oom": True}]
    assert sink.decisions[0]["batch_size"] == 7  # the optimizer's back-off: 90 % of 8
    assert optimizer.service("svc-a").batch_size == 7
    assert reporter.stats.sent == 1 and reporter.stats.pending == 1

    await asyncio.to_thread(reporter.stop)  # the last flush sends the rest
    assert not reporter.running
    assert [r["oom"] for r in optimizer.engine.reports] == [True, False]
    assert len(sink.decisions) == 2 and sink.decisions[1]["batch_size"] == 7
    assert optimizer.service("svc-a").memory.bare_peaks == ((8, 70 * GIB),)  # a peak without allocated_bytes


async def test_an_oom_reported_before_the_start_goes_out_when_it_starts(optimizer: Optimizer,
                                                                       reporters: list[Reporter]) -> None:
    sink = Sink()
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR, sink=sink)
    reporter.report(8, oom=True)
    reporters.append(reporter.start())
    assert await sink.wait()
    assert sink.decisions[0]["batch_size"] == 7


async def test_ooms_are_not_aggregated(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    reporter.report(8, oom=True)
    reporter.report(7, peak_bytes=GIB)
    reporter.report(7, oom=True)
    await asyncio.to_thread(reporter.flush)
    assert [(r["batch_size"], r["oom"]) for r in optimizer.engine.reports] == [(8, True), (7, True), (7, False)]


# --------------------------------------------------------------------------- outages and refusals


async def test_report_does_not_block_while_a_send_hangs(upstream: Upstream, reporters: list[Reporter]) -> None:
    upstream.stall = True
    sink = Sink()
    reporter = Reporter("svc", url=upstream.url, interval=HOUR, timeout=30, sink=sink)
    reporters.append(reporter.start())
    reporter.report(8, oom=True)
    await asyncio.wait_for(upstream.arrived.wait(), 10)  # the sender is now inside its POST

    def many() -> None:
        for i in range(1000):
            reporter.report(8, peak_bytes=i)

    await asyncio.wait_for(asyncio.to_thread(many), 10)  # would time out if report() waited for the send
    assert reporter.stats.queued == 1001 and not sink.received.is_set()
    upstream.release.set()
    assert await sink.wait()


async def test_one_log_line_per_outage_and_one_on_recovery(start_optimizer: StartOptimizer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vlm_optimizer_client")
    port = closed_port()
    reporter = Reporter("svc-a", url=f"http://127.0.0.1:{port}", gpu=0, interval=HOUR)
    reporter.report(8, peak_bytes=30 * GIB)
    for _ in range(3):
        await asyncio.to_thread(reporter.flush)
    reporter.report(8, peak_bytes=33 * GIB)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.failed == 4 and reporter.stats.outages == 1
    [down] = log_lines(caplog, "optimizer_unreachable")
    assert down.levelno == logging.WARNING and str(port) in down.getMessage()

    optimizer = await start_optimizer(port=port)  # the optimizer comes (back) on that port
    await asyncio.to_thread(reporter.flush)
    [up] = log_lines(caplog, "optimizer_reachable")
    assert up.levelno == logging.INFO and "4 failed sends" in up.getMessage()
    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 8, "peak_bytes": 33 * GIB,
                                         "allocated_bytes": None, "reserved_bytes": None, "oom": False}]
    assert reporter.stats.pending == 0 and reporter.stats.sent == 1

    await optimizer.server.close()  # a second outage: a second line
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)
    await asyncio.to_thread(reporter.flush)
    assert len(log_lines(caplog, "optimizer_unreachable")) == 2
    assert reporter.stats.outages == 2


async def test_a_refused_report_is_logged_and_not_retried(optimizer: Optimizer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # A malformed name is refused here, at construction (tests/test_client_validation.py); a GPU the
    # optimizer does not have only it can refuse.
    reporter = Reporter("svc", url=optimizer.url, gpu=7, interval=HOUR)
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.rejected == 1 and reporter.stats.pending == 0 and reporter.stats.failed == 0
    [line] = log_lines(caplog, "report_rejected")
    assert line.levelno == logging.WARNING
    assert "HTTP 400: gpu: " in line.getMessage()

    await asyncio.to_thread(reporter.flush)  # not retried
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)  # refused again, for the same reason: not logged again
    assert reporter.stats.rejected == 2
    assert len(log_lines(caplog, "report_rejected")) == 1
    assert optimizer.engine.state.services == {}  # refused: nothing changed


async def test_a_failing_sink_does_not_stop_the_reports(optimizer: Optimizer) -> None:
    class Broken:
        def apply_decision(self, decision: dict[str, Any]) -> None:
            raise RuntimeError("sink bug")

    reporter = Reporter("svc-a", url=optimizer.url, interval=HOUR, sink=Broken())
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)
    reporter.report(6)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.sent == 2


# --------------------------------------------------------------------------- lifecycle and arguments


async def test_start_and_stop_are_prompt_and_idempotent(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, interval=HOUR)
    assert reporter.start() is reporter.start()
    assert reporter.running
    await asyncio.to_thread(reporter.stop, 5)  # would wait the hour if stop() did not wake the thread
    assert not reporter.running
    await asyncio.to_thread(reporter.stop)
    assert reporter.start().running  # and it starts again
    await asyncio.to_thread(reporter.stop, 5)
    assert not reporter.running


async def test_the_context_manager_starts_and_stops_with_a_last_flush(optimizer: Optimizer) -> None:
    def use() -> None:
        with Reporter("svc-a", url=optimizer.url, interval=HOUR) as reporter:
            assert reporter.running
            reporter.report(3)
        assert not reporter.running

    await asyncio.to_thread(use)
    assert optimizer.service("svc-a").reported_batch == 3


async def test_a_proxy_in_the_environment_is_not_used(optimizer: Optimizer, transport: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer is a neighbour: HTTP_PROXY (here a dead one) is for the outside world."""
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed_port()}")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    reporter = Reporter("svc-a", url=optimizer.url, interval=HOUR)
    reporter.report(2)
    await asyncio.to_thread(reporter.flush)
    async_reporter = AsyncReporter("svc-b", url=optimizer.url, interval=HOUR)
    async_reporter.report(3)
    await async_reporter.flush()
    assert reporter.stats.sent == 1 and async_reporter.stats.sent == 1


async def test_a_follower_takes_the_lowered_batch_from_the_oom_reply(optimizer: Optimizer) -> None:
    from vlm_optimizer_client import BatchSizeClient

    follower = BatchSizeClient("svc-a", url=optimizer.url, gpu=0, interval=HOUR)  # not polling
    sink: DecisionSink = follower
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR, sink=sink)
    reporter.report(8, oom=True)
    await asyncio.to_thread(reporter.flush)
    assert follower.batch_size == 7


# --------------------------------------------------------------------------- measure


async def test_measure_without_torch_reports_the_batch_size(optimizer: Optimizer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    with measure(reporter, batch_size=6):
        pass
    await asyncio.to_thread(reporter.flush)
    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 6, "peak_bytes": None,
                                         "allocated_bytes": None, "reserved_bytes": None, "oom": False}]
    assert optimizer.service("svc-a").reported_batch == 6
    assert "torch" not in sys.modules


async def test_measure_as_a_decorator_reads_the_batch_size_of_each_call(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)

    @measure(reporter)
    def embed(images: list[str], batch_size: int = 2) -> int:
        return len(images)

    @measure(reporter)
    async def embed_async(images: list[str], *, batch_size: int) -> int:
        await asyncio.sleep(0)
        return len(images)

    assert embed(["a"]) == 1
    await asyncio.to_thread(reporter.flush)
    assert embed(["a", "b"], batch_size=5) == 2
    await asyncio.to_thread(reporter.flush)
    assert await embed_async(["a"], batch_size=3) == 1
    await asyncio.to_thread(reporter.flush)
    assert [r["batch_size"] for r in optimizer.engine.reports] == [2, 5, 3]


async def test_measure_reports_an_oom_and_reraises_it(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR)
    with pytest.raises(OOM_ERROR):
        with measure(reporter, batch_size=8):
            raise oom()
    with pytest.raises(ValueError):
        with measure(reporter, batch_size=8):
            raise ValueError("not an OOM: the batch did not finish, nothing is reported")
    assert reporter.stats.queued == 1
    await asyncio.to_thread(reporter.flush)
    assert [(r["batch_size"], r["oom"]) for r in optimizer.engine.reports] == [(8, True)]
    assert optimizer.service("svc-a").batch_size == 7


# --------------------------------------------------------------------------- with PyTorch (a stand-in)


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """A stand-in PyTorch *with CUDA* (client/tests/client_fakes.py): those paths cannot run on the CPU build."""
    return install_fake_cuda(monkeypatch)


async def test_the_reporter_sends_the_uuid_of_the_current_device(cuda: FakeCuda, optimizer: Optimizer) -> None:
    cuda.initialized = False
    reporter = Reporter("svc-a", url=optimizer.url, interval=HOUR)
    reporter.report(4)
    assert reporter.gpu is None  # not yet: CUDA is not initialised
    cuda.initialized = True
    reporter.report(4)
    assert reporter.gpu == uuid_of(0)
    await asyncio.to_thread(reporter.flush)
    assert optimizer.engine.reports[0]["gpu"] == uuid_of(0)
    assert optimizer.service("svc-a", gpu=0).reported_batch == 4


async def test_a_detected_gpu_the_optimizer_does_not_know_is_dropped(cuda: FakeCuda, optimizer: Optimizer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    cuda.uuid = CUuuid("MIG-0000aaaa-0000-4000-8000-000000000000")
    reporter = Reporter("svc-a", url=optimizer.url, interval=HOUR)
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert reporter.gpu is None and reporter.stats.sent == 1 and reporter.stats.rejected == 0
    assert optimizer.engine.reports[-1]["gpu"] is None
    assert len(log_lines(caplog, "gpu_unknown")) == 1


async def test_a_gpu_given_by_the_service_is_not_dropped(optimizer: Optimizer) -> None:
    reporter = Reporter("svc-a", url=optimizer.url, gpu=7, interval=HOUR)
    reporter.report(4)
    await asyncio.to_thread(reporter.flush)
    assert reporter.gpu == 7 and reporter.stats.rejected == 1


# --------------------------------------------------------------------------- the async reporter


async def test_the_async_reporter_aggregates_and_sends_an_oom_at_once(optimizer: Optimizer, transport: str) -> None:
    sink = Sink()
    reporter = AsyncReporter("svc-a", url=optimizer.url, gpu=0, interval=HOUR, sink=sink)
    for peak in (20, 29, 25):
        reporter.report(8, peak_bytes=peak * GIB, allocated_bytes=peak)
    await reporter.flush()
    assert optimizer.engine.reports == [{"service": "svc-a", "gpu": 0, "batch_size": 8, "peak_bytes": 29 * GIB,
                                         "allocated_bytes": 25, "reserved_bytes": None, "oom": False}]
    assert sink.decisions[-1]["batch_size"] == 8

    sink.received.clear()
    async with reporter:
        assert reporter.running
        reporter.report(8, peak_bytes=GIB)
        reporter.report(8, oom=True)
        assert await sink.wait()  # at once: the interval is an hour
        assert sink.decisions[1]["batch_size"] == 7
        assert [r["oom"] for r in optimizer.engine.reports] == [False, True]
    assert not reporter.running
    assert [r["oom"] for r in optimizer.engine.reports] == [False, True, False]  # the last flush


async def test_the_async_reporter_stops_promptly(optimizer: Optimizer, transport: str) -> None:
    reporter = AsyncReporter("svc-a", url=optimizer.url, interval=HOUR)
    assert await reporter.start() is await reporter.start()
    await asyncio.wait_for(reporter.stop(), 5)
    assert not reporter.running
    await reporter.stop()


async def test_the_async_reporter_refuses_what_the_optimizer_refuses(optimizer: Optimizer, transport: str) -> None:
    reporter = AsyncReporter("svc", url=optimizer.url, gpu=7, interval=HOUR)  # a GPU it does not have
    reporter.report(8)
    await reporter.flush()
    await reporter.flush()
    assert reporter.stats.rejected == 1 and reporter.stats.pending == 0


# --------------------------------------------------------------------------- OOM recovery against a real optimizer


@pytest.fixture
def sync_reporters() -> Iterator[list[Reporter]]:
    made: list[Reporter] = []
    yield made
    for r in made:
        r.stop()


async def test_each_oom_reaches_the_optimizer_which_lowers_the_batch(aiohttp_server: AiohttpServer,
                                                                     sync_reporters: list[Reporter]) -> None:
    engine = Engine(Settings(default_batch_size=16))
    # 40 of 80 GiB in use: memory an OOM could have run out of (not contradicted by the sample)
    sampler = Sampler(ScriptedBackend(used=40 * 1024**3), engine, clock=FakeClock(), sleep=no_sleep)
    server = await aiohttp_server(build_app(engine, sampler, run_sampler=False))
    await sampler.tick()
    sink = Sink()
    reporter = Reporter("svc-oom", url=f"http://{server.host}:{server.port}", gpu=0, interval=3600, sink=sink)
    sync_reporters.append(reporter.start())
    assert engine.poll("svc-oom", 0, sampler.clock()).batch_size == 16

    calls: list[int] = []

    @recover_oom(reporter=reporter, cleanup=lambda: None)
    def run(batch_size: int) -> int:
        calls.append(batch_size)
        if len(calls) == 1:
            raise oom()
        return batch_size

    assert await asyncio.to_thread(run, batch_size=16) == 16  # the retry at the same size (empty_cache) works
    assert await asyncio.to_thread(sink.received.wait, 10)  # sent at once, not at the 1-hour interval
    svc = engine.state.services[(0, "svc-oom")]
    assert svc.batch_size == 14  # the optimizer's own back-off: 90 % of the failed 16
    assert svc.last_oom_at is not None
    assert sink.decisions[0]["batch_size"] == 14
    assert "OOM reported at batch 16" in sink.decisions[0]["reason"]
    assert reporter.stats.sent == 1
