"""Measure the service's resident memory over an hour-equivalent of sampling and polling (does it grow?).

Runs the read and admin APIs as ``serve`` does (``build_app``, ``build_admin_app``,
``serve_until_signalled``, the simulated backend with its in-process services, logs as JSON at
``info`` to /dev/null) in a subprocess whose sampler runs on a virtual clock: each 5 s interval
passes in 5/``--speedup`` real seconds, so 720 ticks (an hour) take 3600/``--speedup`` s.

A load generator in another process plays ``--pollers`` VLM services at the same speed-up, each
one per virtual second: ``GET /batch-size`` with the last ETag, and every fifth poll a
``POST /reports`` (one report in 200 an OOM). Every ``--churn`` virtual seconds every poller takes a
new service name, so services come and expire (``service_expiry``, 300 s). A scraper reads
``/metrics`` every 15 virtual seconds and ``/status`` and ``/history`` every minute. With two or more
CPUs the server runs on CPU 0 and the generator on CPU 1.

Reported: the server's VmRSS every 10 virtual minutes, its peak (VmHWM), the growth over the run
and over its second half, the requests served, and the sizes of what could grow inside the
process (events, history, services, per-service counters, encoded decisions, live objects). Linux only.

    .venv/bin/python bench/memory_soak.py [--hours 1] [--speedup 20] [--pollers 50] [--churn 600]
        [--scenario bench/scenarios/eight-h100.yaml] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from measure_resources import free_port, memory_kib, wait_ready

HERE = os.path.dirname(os.path.abspath(__file__))
EIGHT_GPUS = os.path.join(HERE, "scenarios", "eight-h100.yaml")
INTERVAL = 5.0
TOKEN_ENV = "VLM_OPTIMIZER_ADMIN_TOKEN"


# --------------------------------------------------------------------------- the server under test


async def serve(port: int, admin_port: int, scenario_path: str, speedup: float, log_level: str) -> None:
    from optimizer.api import build_app
    from optimizer.api.admin import build_admin_app
    from optimizer.api.keys import ENCODED
    from optimizer.config import Settings
    from optimizer.engine import Engine
    from optimizer.simulation.backend import SimulatedBackend
    from optimizer.logs import configure_logging
    from optimizer.sampler import Sampler
    from optimizer.server import serve_until_signalled
    from optimizer.simulation.link import EngineLink
    from optimizer.simulation.run import with_scenario_profiles
    from optimizer.simulation.scenario import load_scenario

    configure_logging("json", log_level)
    scenario = load_scenario(scenario_path)
    settings = with_scenario_profiles(Settings(), scenario)
    engine = Engine(settings)
    now = [time.time()]
    sim = SimulatedBackend(scenario, settings, origin=now[0])
    sim.attach(EngineLink(engine, origin=sim.origin))

    async def sleep(delay: float) -> None:
        now[0] += delay
        await asyncio.sleep(delay / speedup)

    sampler = Sampler(sim, engine, clock=lambda: now[0], sleep=sleep)
    app = build_app(engine, sampler)
    admin = build_admin_app(app, os.environ[TOKEN_ENV].encode())

    async def sizes(request: web.Request) -> web.Response:
        """What could grow inside the process (a bench-only route on the admin app)."""
        return web.json_response({
            "samples": sampler.stats.samples,
            "virtual_s": now[0] - sim.origin,
            "events": len(engine.events),
            "history_per_gpu": max((len(h) for h in engine.history.values()), default=0),
            "services": len(engine.state.services),
            "counter_service_names": sum(len(c.batch_changes) for c in engine.counters.values()),
            "encoded_decisions": len(app[ENCODED]),
            "gc_objects": len(gc.get_objects()),
        })

    admin.router.add_get("/bench/sizes", sizes)
    await serve_until_signalled(app, "127.0.0.1", port, admin, "127.0.0.1", admin_port)


# --------------------------------------------------------------------------- the load generator


async def generate(base: str, pollers: int, gpus: int, speedup: float, seconds: float, churn: float) -> dict[str, int]:
    counts = {"polls": 0, "not_modified": 0, "reports": 0, "ooms": 0, "scrapes": 0, "errors": 0}
    started = time.monotonic()
    deadline = started + seconds

    def virtual() -> float:
        return (time.monotonic() - started) * speedup

    async def poller(session: aiohttp.ClientSession, i: int) -> None:
        etag: str | None = None
        batch = 4
        n = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            service = f"soak-{i}-g{int(virtual() // churn)}"
            gpu = i % gpus
            try:
                headers = {"If-None-Match": etag} if etag else {}
                async with session.get(f"{base}/batch-size?service={service}&gpu={gpu}", headers=headers) as r:
                    if r.status == 200:
                        batch = (await r.json())["batch_size"]
                    else:
                        await r.read()
                        counts["not_modified"] += 1
                    etag = r.headers.get("ETag", etag)
                counts["polls"] += 1
                n += 1
                if n % 5 == 0:
                    oom = n % 1000 == 0
                    body = {"service": service, "gpu": gpu, "batch_size": batch, "peak_bytes": (20 + batch) << 30,
                            "allocated_bytes": (18 + batch) << 30, "reserved_bytes": (19 + batch) << 30, "oom": oom}
                    async with session.post(f"{base}/reports", json=body) as r:
                        await r.read()
                    counts["reports"] += 1
                    counts["ooms"] += oom
            except aiohttp.ClientError:
                counts["errors"] += 1
            await asyncio.sleep(max(0.0, 1.0 / speedup - (time.monotonic() - t0)))

    async def scraper(session: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() < deadline:
            paths = ["/metrics"] + (["/status", "/history"] if n % 4 == 0 else [])
            for path in paths:
                async with session.get(f"{base}{path}") as r:
                    await r.read()
                counts["scrapes"] += 1
            n += 1
            await asyncio.sleep(15.0 / speedup)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pollers + 4)) as session:
        await asyncio.gather(scraper(session), *(poller(session, i) for i in range(pollers)))
    return counts


# --------------------------------------------------------------------------- orchestration


def pinned(cpu: int | None) -> Callable[[], None] | None:
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


async def get_json(url: str, token: str | None = None) -> Any:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(url) as r:
            return await r.json()


def soak(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, gen_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    port, admin = free_port(), free_port()
    token = secrets.token_urlsafe(32)  # the admin API always needs one (the bench reads /bench/sizes there)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(admin), args.scenario,
                               str(args.speedup), args.log_level], env={**os.environ, TOKEN_ENV: token},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(server_cpu))
    base, sizes_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}/bench/sizes"
    try:
        asyncio.run(wait_ready(base))
        gpus = len(asyncio.run(get_json(f"{base}/status"))["gpus"])
        seconds = args.hours * 3600 / args.speedup
        gen = subprocess.Popen([sys.executable, __file__, "--generate", base, "--pollers", str(args.pollers),
                                "--gpus", str(gpus), "--speedup", str(args.speedup), "--seconds", str(seconds),
                                "--churn", str(args.churn)], stdout=subprocess.PIPE, text=True,
                               preexec_fn=pinned(gen_cpu))
        points: list[dict[str, Any]] = []
        step = 600.0  # a checkpoint every 10 virtual minutes
        next_at = 0.0
        while gen.poll() is None:
            s = asyncio.run(get_json(sizes_url, token))
            if s["virtual_s"] >= next_at:
                points.append({"virtual_min": round(s["virtual_s"] / 60, 1),
                               "rss_mib": round(memory_kib(server.pid)["VmRSS"] / 1024, 1), **s})
                next_at += step
            time.sleep(min(1.0, step / args.speedup / 4))
        out, _ = gen.communicate()
        counts = json.loads(out)
        s = asyncio.run(get_json(sizes_url, token))
        mem = memory_kib(server.pid)
        points.append({"virtual_min": round(s["virtual_s"] / 60, 1), "rss_mib": round(mem["VmRSS"] / 1024, 1), **s})
    finally:
        server.terminate()
        server.wait(timeout=30)
    first, last = points[0], points[-1]
    middle = min(points, key=lambda p: abs(p["virtual_min"] - last["virtual_min"] / 2))
    return {
        "hours": args.hours, "speedup": args.speedup, "pollers": args.pollers, "churn_s": args.churn, "gpus": gpus,
        "scenario": os.path.relpath(args.scenario), "requests": counts,
        "poll_hours": round(counts["polls"] / (args.pollers * 3600), 3),
        "rss_start_mib": first["rss_mib"], "rss_middle_mib": middle["rss_mib"], "rss_end_mib": last["rss_mib"],
        "rss_peak_mib": round(mem["VmHWM"] / 1024, 1),
        "growth_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "growth_second_half_mib": round(last["rss_mib"] - middle["rss_mib"], 1),
        "points": points,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0, help="virtual hours to run (default: 1, 720 ticks)")
    ap.add_argument("--speedup", type=float, default=20.0,
                    help="virtual seconds per real second (default: 20: an hour in 3 minutes)")
    ap.add_argument("--pollers", type=int, default=50, help="services polling once a virtual second (default: 50)")
    ap.add_argument("--churn", type=float, default=600.0,
                    help="virtual seconds between new service names for every poller (default: 600)")
    ap.add_argument("--scenario", default=EIGHT_GPUS, help="scenario (default: bench/scenarios/eight-h100.yaml)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                    help="the server's log level (logs go to /dev/null; default: info, as in production)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--serve", nargs=5, metavar=("PORT", "ADMIN", "SCENARIO", "SPEEDUP", "LEVEL"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--generate", metavar="BASE", help=argparse.SUPPRESS)
    ap.add_argument("--gpus", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        port, admin, scenario, speedup, level = args.serve
        asyncio.run(serve(int(port), int(admin), scenario, float(speedup), level))
        return 0
    if args.generate:
        print(json.dumps(asyncio.run(generate(args.generate, args.pollers, args.gpus, args.speedup, args.seconds,
                                              args.churn))))
        return 0
    result = soak(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result
    print(f"{r['hours']:g} virtual hour(s) at x{r['speedup']:g}, {r['gpus']} GPUs ({r['scenario']}), "
          f"{r['pollers']} pollers, new service names every {r['churn_s']:g} s")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in r["requests"].items())
          + f" ({r['poll_hours']} poller-hours of polls)")
    cols = ["virtual_min", "samples", "rss_mib", "events", "history_per_gpu", "services", "counter_service_names",
            "encoded_decisions", "gc_objects"]
    lines = [cols] + [[str(p[c]) for c in cols] for p in r["points"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print("\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines))
    print(f"RSS start {r['rss_start_mib']} MiB, middle {r['rss_middle_mib']} MiB, end {r['rss_end_mib']} MiB, "
          f"peak {r['rss_peak_mib']} MiB; growth {r['growth_mib']} MiB, second half {r['growth_second_half_mib']} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
