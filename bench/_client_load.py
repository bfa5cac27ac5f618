"""The production-shaped client load, through the client library: SERVICES services, each polling
``GET /batch-size`` every POLL_INTERVAL seconds (a ``BatchSizeClient``) and reporting its batches
(a ``Reporter``, sending one aggregated ``POST /reports`` every REPORT_INTERVAL seconds), spread over
GPUS GPUs (service i on GPU i % GPUS). The default is the issue's shape: 50 services at 1 Hz with
reports every 5 s (the reporter's default), 8 GPUs, about 60 requests/s.

For a benchmark (bench/hot_paths.py) that measures the server's CPU share under this load: run it in a
process of its own (pinned to another CPU than the server), against the optimizer or a bare server
that answers the same request mix (``GET /batch-size`` with ``ETag``/304, ``POST /reports`` with a
decision body). It prints one JSON object: the requests sent and answered, the failures, and the TCP
connections the clients opened, which keep-alive holds at one per object (2 x SERVICES).

    python bench/_client_load.py --url http://127.0.0.1:8080 [--seconds 60] [--services 50] [--gpus 8]
        [--poll-interval 1] [--report-interval 5] [--face sync|async]

From Python (blocking; the same fields): ``from _client_load import run_load; run_load(url, seconds=60)``.

``--face sync`` (the default) is the thread face every service gets without aiohttp: one polling
thread and one sending thread per service. ``--face async`` runs the asyncio faces on one event loop.
The starts are spread over one poll interval, as independent services' are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from vlm_optimizer_client import AsyncBatchSizeClient, AsyncReporter, BatchSizeClient, Reporter

GIB = 1024**3


@dataclass
class LoadResult:
    face: str
    services: int
    gpus: int
    seconds: float  # of load, measured
    polls: int  # poll attempts (answered or not)
    poll_failures: int  # polls that got no good answer (the follower's failure count, summed)
    reports_sent: int  # reports the server answered with a decision
    reports_failed: int
    reports_rejected: int
    connections_opened: int | None  # TCP connections the clients opened (sync face: counted exactly)
    sockets_open_at_end: int  # TCP sockets this process held just before the clients stopped
    requests_per_s: float


class _CountedClient(BatchSizeClient):
    """A follower that counts its polls (the library keeps no such count)."""

    polls = 0
    failures = 0

    def poll_once(self) -> float:
        delay = super().poll_once()
        self.polls += 1
        self.failures += 0 if self.consecutive_failures == 0 else 1
        return delay


class _CountedAsyncClient(AsyncBatchSizeClient):
    polls = 0
    failures = 0

    async def poll_once(self) -> float:
        delay = await super().poll_once()
        self.polls += 1
        self.failures += 0 if self.consecutive_failures == 0 else 1
        return delay


def _open_sockets() -> int:
    """The sockets this process holds now (Linux: /proc/self/fd), -1 where that cannot be read."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return -1
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the listing's own descriptor, gone
            pass
    return count


def _names(services: int, gpus: int) -> list[tuple[str, int]]:
    return [(f"load-svc-{i:03d}", i % gpus) for i in range(services)]


def _measurement(i: int, rng: random.Random) -> dict[str, Any]:
    return {"batch_size": 4, "peak_bytes": (20 + i % 7) * GIB + rng.randrange(GIB), "allocated_bytes": 18 * GIB,
            "reserved_bytes": 22 * GIB}


def run_load(url: str, *, seconds: float = 60.0, services: int = 50, gpus: int = 8, poll_interval: float = 1.0,
             report_interval: float = 5.0, face: str = "sync") -> LoadResult:
    """Run the load against ``url`` for ``seconds`` (blocking) and return what the clients saw."""
    if face == "async":
        return asyncio.run(_run_async(url, seconds, services, gpus, poll_interval, report_interval))
    if face != "sync":
        raise ValueError(f"face: must be sync or async, got {face!r}")
    rng = random.Random(1)
    clients = [_CountedClient(name, url=url, gpu=gpu, interval=poll_interval) for name, gpu in _names(services, gpus)]
    reporters = [Reporter(c.service, url=url, gpu=c.gpu, interval=report_interval) for c in clients]
    stop = threading.Event()

    def measure() -> None:  # each service finishes a batch about every 0.5 s (report() does no I/O)
        while not stop.wait(0.5):
            for i, r in enumerate(reporters):
                r.report(**_measurement(i, rng))

    feeder = threading.Thread(target=measure, name="load-measure", daemon=True)
    t0 = time.monotonic()
    for i, (c, r) in enumerate(zip(clients, reporters)):
        c.start()
        r.start()
        stop.wait(poll_interval / services)  # spread over one interval
    feeder.start()
    stop.wait(max(0.0, seconds - (time.monotonic() - t0)))
    sockets = _open_sockets()
    stop.set()
    for c in clients:
        c.stop()
    for r in reporters:
        r.stop()
    elapsed = time.monotonic() - t0
    return _result("sync", services, gpus, elapsed, [c.polls for c in clients], [c.failures for c in clients],
                   reporters, _opened(clients, reporters), sockets)


def _opened(clients: list[_CountedClient], reporters: list[Reporter]) -> int | None:
    """The connections the sync objects opened (None with a client library before keep-alive)."""
    kept = [getattr(c, "_http", None) for c in clients] + [getattr(r._core, "http", None) for r in reporters]
    if any(k is None for k in kept):
        return None
    return sum(k.opened for k in kept)


async def _run_async(url: str, seconds: float, services: int, gpus: int, poll_interval: float,
                     report_interval: float) -> LoadResult:
    rng = random.Random(1)
    clients = [_CountedAsyncClient(name, url=url, gpu=gpu, interval=poll_interval)
               for name, gpu in _names(services, gpus)]
    reporters = [AsyncReporter(c.service, url=url, gpu=c.gpu, interval=report_interval) for c in clients]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for c, r in zip(clients, reporters):
        c.start()
        await r.start()
        await asyncio.sleep(poll_interval / services)

    async def measure() -> None:
        while True:
            await asyncio.sleep(0.5)
            for i, r in enumerate(reporters):
                r.report(**_measurement(i, rng))

    feeder = asyncio.create_task(measure())
    await asyncio.sleep(max(0.0, seconds - (loop.time() - t0)))
    sockets = _open_sockets()
    feeder.cancel()
    for c in clients:
        await c.stop()
    for r in reporters:
        await r.stop()
    return _result("async", services, gpus, loop.time() - t0, [c.polls for c in clients],
                   [c.failures for c in clients], reporters, None, sockets)


def _result(face: str, services: int, gpus: int, elapsed: float, polls: list[int], failures: list[int],
            reporters: list[Any], opened: int | None, sockets: int) -> LoadResult:
    sent = sum(r.stats.sent for r in reporters)
    failed = sum(r.stats.failed for r in reporters)
    rejected = sum(r.stats.rejected for r in reporters)
    return LoadResult(face, services, gpus, round(elapsed, 2), sum(polls), sum(failures), sent, failed, rejected,
                      opened, sockets, round((sum(polls) + sent + failed + rejected) / elapsed, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--url", required=True, help="the optimizer's (or the bare server's) read API")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    ap.add_argument("--report-interval", type=float, default=5.0)
    ap.add_argument("--face", choices=["sync", "async"], default="sync")
    args = ap.parse_args()
    result = run_load(args.url, seconds=args.seconds, services=args.services, gpus=args.gpus,
                      poll_interval=args.poll_interval, report_interval=args.report_interval, face=args.face)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
