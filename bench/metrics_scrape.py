"""What a ``GET /metrics`` scrape costs the optimizer, against a bare aiohttp handler serving the same bytes.

Starts two servers, each pinned to ``--server-cpu``: the optimizer's read API (``build_app``, no
sampling loop: nothing changes between scrapes, the steady state between two samples) with
``--gpus`` GPUs and ``--services`` services on each, and a bare aiohttp application whose one
handler answers the optimizer's exposition bytes with the same Content-Type. A load generator pinned
to ``--client-cpu`` scrapes each over ``--connections`` keep-alive connections (raw sockets) for
``--seconds``, alternating which goes first, ``--rounds`` times. Per round it prints requests/s and
the server's CPU per request (utime+stime from /proc) of each, and the ratios; then their medians,
and what one render of the exposition costs (what the first scrape after a change pays). Access
logs are off in both. Linux only.

    .venv/bin/python bench/metrics_scrape.py [--gpus 8] [--services 32] [--rounds 5] [--seconds 3] [--uncached]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web

TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def optimizer_app(gpus: int, services: int) -> web.Application:
    """The read API over an engine with ``gpus`` sampled GPUs and ``services`` registered services on each."""
    from optimizer.api import build_app
    from optimizer.config import Settings
    from optimizer.engine import Engine
    from optimizer.gpu.types import GpuSample
    from optimizer.sampler import Sampler

    gib = 1024**3

    class Backend:
        name = "bench"
        blocking = False

        def sample(self, now: float) -> list[GpuSample]:
            return [GpuSample(index=i, uuid=f"GPU-{i:08d}-0000-4000-8000-000000000000", name="bench", timestamp=now,
                              memory_total_bytes=80 * gib, memory_used_bytes=30 * gib, memory_free_bytes=50 * gib,
                              temperature_celsius=50.0 + i, power_usage_watts=200.0 + i, utilization_percent=60.0,
                              ecc_corrected_volatile=0, ecc_uncorrected_volatile=0, ecc_corrected_aggregate=0,
                              ecc_uncorrected_aggregate=0, retired_pages_sbe=0, retired_pages_dbe=0,
                              retired_pages_pending=False, remapped_rows_correctable=0,
                              remapped_rows_uncorrectable=0, remapped_rows_pending=False,
                              remapped_rows_failure=False, throttle_reasons=frozenset(), xid_errors=())
                    for i in range(gpus)]

        def close(self) -> None:
            return None

    engine = Engine(Settings(max_services=gpus * services, max_services_per_gpu=max(64, services)))
    sampler = Sampler(Backend(), engine)
    asyncio.run(sampler.tick())
    for i in range(gpus):
        for s in range(services):
            engine.poll(f"svc-{s}", i, time.time())
    asyncio.run(sampler.tick())
    return build_app(engine, sampler, run_sampler=False)


def serve(kind: str, port: int, gpus: int, services: int, payload: Path, uncached: bool) -> None:
    app = optimizer_app(gpus, services)
    if kind == "optimizer":
        from optimizer.api.keys import REGISTRY
        from optimizer.metrics import MetricsRegistry, render

        if uncached:  # what every scrape cost before the exposition was kept: a render each
            setattr(MetricsRegistry, "exposition", render)

        body, content_type = app[REGISTRY].exposition()
        payload.write_bytes(body)
        payload.with_suffix(".type").write_text(content_type)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
        return
    body = payload.read_bytes()
    content_type = payload.with_suffix(".type").read_text()

    async def metrics(request: web.Request) -> web.Response:
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    bare = web.Application()
    bare.router.add_get("/metrics", metrics)
    web.run_app(bare, host="127.0.0.1", port=port, access_log=None, print=None)


async def scrape(port: int, seconds: float, connections: int) -> int:
    """Scrape ``/metrics`` over keep-alive connections for ``seconds``; the number of answers."""
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    deadline = time.perf_counter() + seconds
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            done += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return done


def wait_ready(port: int) -> None:
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server on port {port} never became ready")


def measure(pid: int, port: int, seconds: float, connections: int) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) for one scrape run."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    n = asyncio.run(scrape(port, seconds, connections))
    cpu1, t1 = cpu_seconds(pid), time.perf_counter()
    return n / (t1 - t0), (cpu1 - cpu0) / n * 1e6


def render_cost(gpus: int, services: int) -> tuple[float, int, int]:
    """One render of the exposition (median of 20, ms), its size in bytes and its number of series."""
    from prometheus_client import generate_latest

    from optimizer.api.keys import REGISTRY

    registry = optimizer_app(gpus, services)[REGISTRY]
    times = []
    for _ in range(20):
        t = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - t)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return statistics.median(times) * 1e3, len(body), series


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--services", type=int, default=32, help="services on each GPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--uncached", action="store_true", help="render on every scrape (the cost before the cache)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--serve", choices=("optimizer", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.gpus, a.services, a.payload, a.uncached)
        return
    os.sched_setaffinity(0, {a.client_cpu})
    payload = Path(f"/tmp/metrics-scrape-{os.getpid()}.txt")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for kind in ("optimizer", "bare"):  # the optimizer first: it writes the bytes the bare one serves
            port = free_port()
            proc = subprocess.Popen(["taskset", "-c", str(a.server_cpu), sys.executable, __file__, "--serve", kind,
                                     "--port", str(port), "--payload", str(payload), "--gpus", str(a.gpus),
                                     "--services", str(a.services), *(["--uncached"] if a.uncached else [])], env=env)
            servers[kind] = (proc, port)
            wait_ready(port)
        ms, size, series = render_cost(a.gpus, a.services)
        print(f"{a.gpus} GPUs x {a.services} services: {series} series, {size} bytes; one render {ms:.2f} ms")
        for proc, port in servers.values():
            measure(proc.pid, port, 0.5, a.connections)  # warm-up
        cpu_ratios, rps_ratios = [], []
        for r in range(a.rounds):
            order = ("optimizer", "bare") if r % 2 == 0 else ("bare", "optimizer")
            got = {kind: measure(servers[kind][0].pid, servers[kind][1], a.seconds, a.connections) for kind in order}
            (o_rps, o_cpu), (b_rps, b_cpu) = got["optimizer"], got["bare"]
            cpu_ratios.append(o_cpu / b_cpu)
            rps_ratios.append(o_rps / b_rps)
            print(f"round {r + 1}: optimizer {o_rps:7.0f} req/s {o_cpu:6.1f} us CPU/req | bare {b_rps:7.0f} req/s "
                  f"{b_cpu:6.1f} us CPU/req | CPU/req {cpu_ratios[-1]:.2f}x, req/s {rps_ratios[-1]:.2f}x")
        print(f"median over {a.rounds} rounds: CPU per request {statistics.median(cpu_ratios):.2f}x the bare "
              f"handler, requests/s {statistics.median(rps_ratios):.2f}x")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
        payload.unlink(missing_ok=True)
        payload.with_suffix(".type").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
