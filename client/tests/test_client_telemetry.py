"""Telemetry of the client library (``vlm_optimizer_client.telemetry``, ``measuring``) on its own: the wire
body, the buffer, retries against a fake optimizer, arguments, ``measure`` and the GPU identity with a
stand-in ``torch``, and the async reporter's outages. The reporters against the real optimizer are the
server's tests/test_client_telemetry.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import pytest
from client_fakes import HOUR, OOM_ERROR, CUuuid, FakeCuda, RawCUuuid, Sink, Upstream, closed_port, decision, oom, uuid_of

from vlm_optimizer_client import AsyncReporter, Reporter, gpu_identity, measure, telemetry

GIB = 1024**3


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vlm_optimizer_client" and r.getMessage().startswith(event)]


async def test_the_wire_body_names_only_what_was_measured(upstream: Upstream) -> None:
    reporter = Reporter("svc", url=upstream.url + "/", gpu="GPU-1234-abcd", interval=HOUR)
    reporter.report(6, inactive_split_bytes=123)
    reporter.report(6, peak_bytes=7)
    await asyncio.to_thread(reporter.flush)
    assert upstream.bodies == [{"service": "svc", "gpu": "GPU-1234-abcd", "batch_size": 6, "peak_bytes": 7,
                                "inactive_split_bytes": 123}]


async def test_report_never_raises_and_the_buffer_drops_the_oldest(caplog: pytest.LogCaptureFixture) -> None:
    reporter = Reporter("svc-a", url=f"http://127.0.0.1:{closed_port()}", interval=HOUR, max_pending=4)
    for i in range(10):
        reporter.report(8, peak_bytes=i * GIB)
    assert reporter.stats.queued == 10
    assert reporter.stats.dropped == 6 and reporter.stats.pending == 4

    for bad in (0, -1, True, "8", None, 8.5):
        reporter.report(bad)  # type: ignore[arg-type]
    reporter.report(8, peak_bytes=-1)
    assert reporter.stats.invalid == 7 and reporter.stats.pending == 4
    assert [r.levelno for r in log_lines(caplog, "telemetry_invalid")] == [logging.WARNING]  # once: a hot path

    await asyncio.to_thread(reporter.flush)  # refused: kept, as one aggregate
    stats = reporter.stats
    assert stats.failed == 1 and stats.outages == 1 and stats.sent == 0
    assert stats.pending == 1


async def test_a_server_error_or_a_reply_that_is_no_decision_is_retried(upstream: Upstream,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    upstream.script = [(503, '{"error": "overloaded"}'), (200, "<html>a proxy</html>")]
    sink = Sink()
    reporter = Reporter("svc", url=upstream.url, interval=HOUR, sink=sink)
    reporter.report(8)
    await asyncio.to_thread(reporter.flush)
    await asyncio.to_thread(reporter.flush)
    assert reporter.stats.failed == 2 and reporter.stats.pending == 1 and sink.decisions == []
    assert "HTTP 503: overloaded" in log_lines(caplog, "optimizer_unreachable")[0].getMessage()
    await asyncio.to_thread(reporter.flush)
    assert sink.decisions == [decision(4)]
    assert len(upstream.bodies) == 3 and reporter.stats.pending == 0


def test_the_url_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(telemetry.URL_ENV, raising=False)
    assert Reporter("svc").url == "http://127.0.0.1:8080"
    monkeypatch.setenv(telemetry.URL_ENV, "http://optimizer.gpu-system:8080/")
    assert Reporter("svc").url == "http://optimizer.gpu-system:8080"
    assert Reporter("svc", url="https://o:1").url == "https://o:1"


@pytest.mark.parametrize("kwargs", [
    {"url": "optimizer:8080"}, {"url": "ftp://o"}, {"interval": 0}, {"interval": float("inf")}, {"timeout": -1},
    {"max_pending": 0}, {"gpu": 1.5}, {"gpu": True},
])
def test_bad_arguments_are_refused_at_once(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Reporter("svc", **kwargs)
    with pytest.raises(ValueError):
        AsyncReporter("svc", **kwargs)


def test_measure_reports_nothing_for_the_cpu() -> None:
    reporter = Reporter("svc", interval=HOUR)
    with measure(reporter, batch_size=8, device="cpu"):
        pass
    with pytest.raises(OOM_ERROR):
        with measure(reporter, batch_size=8, device="cpu"):
            raise oom()
    assert reporter.stats.queued == 0


def test_measure_needs_a_batch_size() -> None:
    reporter = Reporter("svc", interval=HOUR)
    with pytest.raises(ValueError, match="batch_size"):
        with measure(reporter):
            pass

    def no_batch(images: list[str]) -> int:
        return len(images)

    with pytest.raises(TypeError, match="batch_size"):
        measure(reporter)(no_batch)
    assert measure(reporter, batch_size=4)(no_batch)(["a"]) == 1
    assert reporter.stats.queued == 1


async def test_measure_with_cuda_reads_the_allocator_around_the_batch(cuda: FakeCuda, upstream: Upstream) -> None:
    reporter = Reporter("svc", url=upstream.url, gpu=0, interval=HOUR)
    with measure(reporter, batch_size=8, device="cuda:0"):
        cuda.calls.append("batch")
        cuda.peak, cuda.allocated, cuda.reserved, cuda.inactive = 30 * GIB, 6 * GIB, 8 * GIB, GIB
    assert cuda.calls == ["reset cuda:0", "batch", "max cuda:0", "allocated cuda:0", "reserved cuda:0",
                          "stats cuda:0"]
    await asyncio.to_thread(reporter.flush)
    assert upstream.bodies == [{"service": "svc", "gpu": 0, "batch_size": 8, "peak_bytes": 30 * GIB,
                                "allocated_bytes": 6 * GIB, "reserved_bytes": 8 * GIB, "inactive_split_bytes": GIB}]


async def test_measure_with_cuda_reports_an_oom_with_the_allocator_figures(cuda: FakeCuda,
                                                                           upstream: Upstream) -> None:
    reporter = Reporter("svc", url=upstream.url, gpu=0, interval=HOUR)
    cuda.allocated, cuda.reserved = 70 * GIB, 79 * GIB
    with pytest.raises(OOM_ERROR):
        with measure(reporter, batch_size=16):
            raise oom()
    await asyncio.to_thread(reporter.flush)
    assert upstream.bodies == [{"service": "svc", "gpu": 0, "batch_size": 16, "allocated_bytes": 70 * GIB,
                                "reserved_bytes": 79 * GIB, "inactive_split_bytes": 0, "oom": True}]


def test_measure_survives_a_failing_allocator_reading(cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: Any = None) -> dict[str, int]:
        raise RuntimeError("no stats")

    monkeypatch.setattr(cuda, "memory_stats", broken)
    reporter = Reporter("svc", interval=HOUR)
    with measure(reporter, batch_size=2):
        pass
    assert reporter.stats.queued == 1 and reporter.stats.invalid == 0


def test_the_gpu_identity_is_the_current_devices_uuid(cuda: FakeCuda) -> None:
    assert gpu_identity() == uuid_of(0)
    cuda.uuid = CUuuid("MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f")
    assert gpu_identity() == "MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"
    cuda.uuid = RawCUuuid(uuid_of(3))  # PyTorch 2.4: printed as raw bytes, read through .bytes
    assert gpu_identity() == uuid_of(3)
    cuda.uuid = None  # an older PyTorch
    assert gpu_identity() is None
    cuda.uuid = CUuuid("x")
    cuda.initialized = False  # reading it would initialise CUDA
    assert gpu_identity() is None


def test_without_torch_there_is_no_gpu_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpu_identity() is None
    assert "torch" not in sys.modules


async def test_the_async_reporter_logs_an_outage_once_and_keeps_the_reports(transport: str,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    reporter = AsyncReporter("svc-a", url=f"http://127.0.0.1:{closed_port()}", interval=HOUR, max_pending=2)
    for batch in (8, 8, 6):
        reporter.report(batch)
    await reporter.flush()
    await reporter.flush()
    stats = reporter.stats
    assert (stats.queued, stats.dropped, stats.failed, stats.outages, stats.pending) == (3, 1, 2, 1, 1)
    assert len(log_lines(caplog, "optimizer_unreachable")) == 1
