"""Measure ``/health`` and ``/batch-size`` latency before and after a flood of made-up service names.

Starts ``vlm-gpu-optimizer serve --backend simulated`` (a real server on a random port, logging at
info to a pipe that is drained and thrown away, as a container's log pipeline would take it), keeps one
real service (``bench-real``, a declared profile) polling, then tries ``--names`` made-up names with
``GET /batch-size?service=flood-N`` (``--concurrency`` at a time) and says what they were answered
(registered, answered unregistered, refused with 429), while one prober asks ``/health`` over and
over (its median and worst latency during the flood).

Latency is measured in ``--rounds`` rounds before the flood and as many after it; a round is
``--requests`` sequential requests to each path, and lasts at least one sampling interval
(``--interval``, default 1 s, so that every round after the flood contains samples with the made-up
names registered). Reported per path: the median over the rounds of each round's median and of its
worst request, and the real service's batch before and after.

The trust-model settings go in as environment variables (``VLM_OPTIMIZER_REGISTER_UNKNOWN``,
``VLM_OPTIMIZER_MAX_SERVICES_PER_GPU``, ``VLM_OPTIMIZER_MAX_SERVICES``), which a server without them
ignores: the same command measures an older checkout (``PYTHONPATH=<checkout>``). Linux or macOS.

    .venv/bin/python bench/name_flood.py [--names 4200] [--rounds 5] [--requests 20] [--interval 1]
        [--register-unknown on|off] [--max-services-per-gpu 64] [--max-services 256] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import aiohttp

from measure_resources import free_port, wait_ready

REAL = "bench-real"


async def timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, int, Any]:
    t0 = time.perf_counter()
    async with session.get(url) as r:
        body = await r.json(content_type=None)
    return time.perf_counter() - t0, r.status, body


async def rounds(session: aiohttp.ClientSession, base: str, n_rounds: int, n_requests: int,
                 interval: float) -> dict[str, dict[str, float]]:
    """Per path: the median over the rounds of each round's median and worst latency (ms)."""
    out: dict[str, dict[str, float]] = {}
    per: dict[str, list[tuple[float, float]]] = {"/health": [], "/batch-size": []}
    for _ in range(n_rounds):
        started = time.perf_counter()
        for path, url in (("/health", f"{base}/health"), ("/batch-size", f"{base}/batch-size?service={REAL}")):
            lat = [(await timed_get(session, url))[0] for _ in range(n_requests)]
            per[path].append((statistics.median(lat), max(lat)))
        left = interval - (time.perf_counter() - started)
        if left > 0:
            await asyncio.sleep(left)  # a benchmark's pacing: each round spans a sample
    for path, values in per.items():
        out[path] = {"median_ms": round(1000 * statistics.median(m for m, _ in values), 3),
                     "worst_ms": round(1000 * statistics.median(w for _, w in values), 3)}
    return out


async def flood(session: aiohttp.ClientSession, base: str, names: int, concurrency: int) -> dict[str, Any]:
    """Try the names; meanwhile one prober asks ``/health`` again and again (its latency during the flood)."""
    answers: Counter[str] = Counter()
    queue = iter(range(names))
    started = time.perf_counter()
    done = asyncio.Event()
    health: list[float] = []

    async def prober() -> None:
        while not done.is_set():
            health.append((await timed_get(session, f"{base}/health"))[0])

    async def worker() -> None:
        for i in queue:
            _, status, body = await timed_get(session, f"{base}/batch-size?service=flood-{i}")
            if status == 200:
                answers["registered" if body.get("registered", True) else "unregistered"] += 1
            else:
                answers[str(status)] += 1

    probe = asyncio.create_task(prober())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done.set()
    await probe
    return {"seconds": round(time.perf_counter() - started, 3), "answers": dict(answers),
            "health_during": {"median_ms": round(1000 * statistics.median(health), 3),
                              "worst_ms": round(1000 * max(health), 3)}}


async def measure(base: str, args: argparse.Namespace) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        _, status, first = await timed_get(session, f"{base}/batch-size?service={REAL}")
        assert status == 200, first
        before = await rounds(session, base, args.rounds, args.requests, args.interval)
        _, _, real_before = await timed_get(session, f"{base}/batch-size?service={REAL}")
        tried = await flood(session, base, args.names, args.concurrency)
        after = await rounds(session, base, args.rounds, args.requests, args.interval)
        _, _, real_after = await timed_get(session, f"{base}/batch-size?service={REAL}")
        _, _, status_body = await timed_get(session, f"{base}/status")
    return {"names": args.names, "flood": tried, "registered_services": len(status_body["services"]),
            "before": before, "after": after,
            "real_batch": {"before": real_before["batch_size"], "after": real_after["batch_size"]}}


def drain(stream: Any) -> None:
    for _ in iter(lambda: stream.read(65536), b""):
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", type=int, default=4200, help="made-up names to try (default 4200)")
    p.add_argument("--concurrency", type=int, default=16, help="requests of the flood in flight (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of measurement before and after (default 5)")
    p.add_argument("--requests", type=int, default=20, help="requests per path and round (default 20)")
    p.add_argument("--interval", type=float, default=1.0, help="the server's monitoring_interval, s (default 1)")
    p.add_argument("--register-unknown", choices=("on", "off"), default="on",
                   help="the server's register_unknown (default on, as make serve)")
    p.add_argument("--max-services-per-gpu", type=int, default=None, help="default: the server's (64)")
    p.add_argument("--max-services", type=int, default=None, help="default: the server's (256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_")}
    env["VLM_OPTIMIZER_MONITORING_INTERVAL"] = str(args.interval)
    env["VLM_OPTIMIZER_REGISTER_UNKNOWN"] = "true" if args.register_unknown == "on" else "false"
    if args.max_services_per_gpu is not None:
        env["VLM_OPTIMIZER_MAX_SERVICES_PER_GPU"] = str(args.max_services_per_gpu)
    if args.max_services is not None:
        env["VLM_OPTIMIZER_MAX_SERVICES"] = str(args.max_services)
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)  # the real service is declared
    config.write(f"profiles:\n  - name: {REAL}\n")
    config.close()
    port = free_port()
    cmd = [sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1", "--port",
           str(port), "--admin-port", "0", "--log-format", "json", "--config", config.name]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    threading.Thread(target=drain, args=(proc.stdout,), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base))
        result = asyncio.run(measure(base, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.unlink(config.name)
    result["settings"] = {"register_unknown": args.register_unknown, "max_services_per_gpu": args.max_services_per_gpu,
                          "max_services": args.max_services, "monitoring_interval": args.interval}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.names} made-up names tried in {result['flood']['seconds']} s: {result['flood']['answers']}; "
          f"{result['registered_services']} services registered")
    during = result["flood"]["health_during"]
    print(f"/health during the flood: median {during['median_ms']} ms, worst {during['worst_ms']} ms")
    print(f"{'path':<12} {'before p50':>11} {'before worst':>13} {'after p50':>10} {'after worst':>12}  (ms)")
    for path in ("/health", "/batch-size"):
        b, a = result["before"][path], result["after"][path]
        print(f"{path:<12} {b['median_ms']:>11} {b['worst_ms']:>13} {a['median_ms']:>10} {a['worst_ms']:>12}")
    print(f"real service's batch: {result['real_batch']['before']} before, {result['real_batch']['after']} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
