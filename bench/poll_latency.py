"""Measure ``GET /batch-size`` under many concurrent pollers against a bare aiohttp handler (the ceiling).

Starts ``vlm-gpu-optimizer serve --backend simulated`` (the production handler and
sampler, default 5 s interval) and, in the same run, a bare aiohttp app that answers the same bytes
with the same headers (Content-Type, ETag, Cache-Control) from a constant. Both are loaded in turn,
``--rounds`` times each, by one load generator process, for two kinds of poll:

- ``200``: a poll without ``If-None-Match`` (the full JSON body);
- ``304``: a poll with the current ETag in ``If-None-Match`` (what a following client sends).

The generator is ``wrk`` (Debian package ``wrk``) when it is on PATH, else an aiohttp client in a
separate process (``--generator aiohttp``). With two or more CPUs, the server under test is pinned
to CPU 0 and the generator to CPU 1 (``--no-pin`` turns this off).

Reported per server and kind: requests/s, p50 and p99 latency, and the server's CPU time per
request (utime+stime from /proc over the run divided by the requests it answered), then the
ratios optimizer/bare. ``--handler-calls N`` also times the batch-size handler alone, in process,
on a simulated engine (no HTTP): microseconds per call for a 200 and a 304. Linux only.

    .venv/bin/python bench/poll_latency.py [--seconds 10] [--connections 64] [--rounds 3]
        [--generator auto|wrk|aiohttp] [--no-pin] [--handler-calls 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
from aiohttp import web

from measure_resources import cpu_seconds, free_port, wait_ready

SERVICE = "bench-poller"
HEADERS = ("Content-Type", "ETag", "Cache-Control")


@dataclass
class Run:
    server: str  # optimizer | bare
    kind: str  # 200 | 304
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    statuses: str  # what the generator saw, e.g. "200" or "304"


# --------------------------------------------------------------------------- the bare server


def bare_app(body: bytes, headers: dict[str, str]) -> web.Application:
    """A minimal aiohttp app: the same bytes and headers, 304 on a matching If-None-Match, nothing else."""
    etag = headers["ETag"]
    not_modified = {k: v for k, v in headers.items() if k != "Content-Type"}

    async def handler(request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=not_modified)
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/batch-size", handler)
    return app


async def serve_bare(port: int, body_file: str) -> None:
    spec = json.loads(open(body_file).read())
    app = bare_app(spec["body"].encode(), spec["headers"])
    runner = web.AppRunner(app, access_log=None)  # as optimizer.server does
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- the aiohttp load generator


async def generate(url: str, connections: int, seconds: float, inm: str | None) -> dict[str, Any]:
    """Closed loop: ``connections`` clients, each sending its next request when the last one is answered."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"If-None-Match": inm} if inm else {}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            while (t0 := time.perf_counter()) < deadline:
                async with session.get(url, headers=headers) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t0)
                statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(client() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {"requests": n, "seconds": elapsed, "rps": n / elapsed,
            "p50_ms": 1000 * latencies[n // 2], "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))],
            "statuses": ",".join(f"{k}" for k in sorted(statuses))}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> dict[str, Any]:
    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            raise RuntimeError(f"no {label}% latency in wrk output:\n{out}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"cannot read wrk output:\n{out}")
    seconds = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"requests": int(m.group(1)), "seconds": seconds, "rps": float(rps.group(1)),
            "p50_ms": ms("50"), "p99_ms": ms("99"), "statuses": f"non-2xx/3xx: {bad.group(1)}" if bad else "2xx/3xx"}


# --------------------------------------------------------------------------- orchestration


def pinned(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def load(args: argparse.Namespace, url: str, inm: str | None, gen_cpu: int | None) -> dict[str, Any]:
    if args.generator == "wrk":
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency"]
        if inm:
            cmd += ["-H", f"If-None-Match: {inm}"]
        out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True, preexec_fn=pinned(gen_cpu))
        return parse_wrk(out.stdout)
    cmd = [sys.executable, __file__, "--generate", url, "--connections", str(args.connections),
           "--seconds", str(args.seconds)] + (["--inm", inm] if inm else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pinned(gen_cpu))
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def fetch(url: str, inm: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"If-None-Match": inm} if inm else {}) as r:
            return r.status, await r.read(), {k: r.headers[k] for k in HEADERS if k in r.headers}


def measure(args: argparse.Namespace) -> tuple[list[Run], dict[str, Any]]:
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, gen_cpu = (cpus[0], cpus[1]) if args.pin and len(cpus) >= 2 else (None, None)
    port, admin, bare_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1",
           "--port", str(port), "--admin-port", str(admin), "--log-level", "warning"]
    if args.scenario:
        cmd += ["--scenario", args.scenario]
    opt = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(server_cpu))
    procs = [opt]
    tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    try:
        asyncio.run(wait_ready(f"http://127.0.0.1:{port}"))
        path = f"/batch-size?service={args.service}"
        status, body, headers = asyncio.run(fetch(f"http://127.0.0.1:{port}{path}"))
        assert status == 200, status
        json.dump({"body": body.decode(), "headers": headers}, tmp)
        tmp.close()
        bare = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare_port), tmp.name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(server_cpu))
        procs.append(bare)
        bare_url = f"http://127.0.0.1:{bare_port}{path}"
        deadline = time.monotonic() + 20
        while True:
            try:
                b_status, b_body, b_headers = asyncio.run(fetch(bare_url))
                break
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert (b_status, b_body, b_headers) == (status, body, headers), "the bare server must answer the same"
        servers = {"optimizer": (opt, f"http://127.0.0.1:{port}{path}"), "bare": (bare, bare_url)}
        runs: list[Run] = []
        for _ in range(args.rounds):
            for kind in args.kinds:
                for name, (proc, url) in servers.items():
                    inm = None
                    if kind == "304":  # the current ETag: the decision may have changed since the last round
                        inm = asyncio.run(fetch(url))[2]["ETag"]
                    cpu0 = cpu_seconds(proc.pid)
                    r = load(args, url, inm, gen_cpu)
                    cpu = cpu_seconds(proc.pid) - cpu0
                    runs.append(Run(server=name, kind=kind, requests=r["requests"], seconds=round(r["seconds"], 2),
                                    rps=round(r["rps"], 1), p50_ms=round(r["p50_ms"], 3),
                                    p99_ms=round(r["p99_ms"], 3),
                                    cpu_us_per_request=round(1e6 * cpu / max(1, r["requests"]), 1),
                                    statuses=r["statuses"]))
        meta = {"body_bytes": len(body), "headers": headers, "server_cpu": server_cpu, "generator_cpu": gen_cpu,
                "generator": args.generator, "connections": args.connections, "seconds": args.seconds,
                "rounds": args.rounds}
        return runs, meta
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
        os.unlink(tmp.name)


def summarise(runs: list[Run], kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Medians over the rounds per server and kind, and the ratios optimizer/bare."""
    rows = []
    for kind in kinds:
        med: dict[str, dict[str, float]] = {}
        for name in ("optimizer", "bare"):
            rs = [r for r in runs if r.server == name and r.kind == kind]
            med[name] = {f: statistics.median(getattr(r, f) for r in rs)
                         for f in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
        for name in ("optimizer", "bare"):
            rows.append({"kind": kind, "server": name, **med[name]})
        rows.append({"kind": kind, "server": "optimizer/bare",
                     **{f: round(med["optimizer"][f] / med["bare"][f], 2) if med["bare"][f] else None
                        for f in med["bare"]}})
    return rows


# --------------------------------------------------------------------------- the handler alone


def handler_timing(calls: int) -> dict[str, float]:
    """Microseconds per call of the batch-size handler (through the app's dispatch), no HTTP.

    The median of five batches of ``calls / 5`` requests, each after a garbage collection.
    """
    from aiohttp.test_utils import make_mocked_request

    from optimizer.api import build_app
    from optimizer.config import Settings
    from optimizer.engine import Engine
    from optimizer.simulation.backend import SimulatedBackend
    from optimizer.logs import configure_logging
    from optimizer.sampler import Sampler
    from optimizer.simulation.link import EngineLink
    from optimizer.simulation.run import with_scenario_profiles
    from optimizer.simulation.scenario import DEFAULT_SCENARIO, load_scenario

    configure_logging("json", "warning")
    scenario = load_scenario(DEFAULT_SCENARIO)
    settings = with_scenario_profiles(Settings(), scenario)
    engine = Engine(settings)
    now = [1_800_000_000.0]
    backend = SimulatedBackend(scenario, settings, origin=now[0])
    backend.attach(EngineLink(engine, origin=now[0]))

    async def no_sleep(_: float) -> None:
        return None

    sampler = Sampler(backend, engine, clock=lambda: now[0], sleep=no_sleep)
    app = build_app(engine, sampler, run_sampler=False)
    out: dict[str, float] = {}

    async def run() -> None:
        await sampler.tick()
        handler = app._handle  # the app's dispatch: router and handler (the read API runs no middleware)
        req = make_mocked_request("GET", f"/batch-size?service={SERVICE}", app=app)
        first = await handler(req)
        etag = first.headers["ETag"]
        batch = max(1, calls // 5)
        for kind, headers in (("200", {}), ("304", {"If-None-Match": etag})):
            per_call = []
            for _ in range(5):  # five batches; the median is reported (a collection or a neighbour hits one)
                reqs = [make_mocked_request("GET", f"/batch-size?service={SERVICE}", headers=headers, app=app)
                        for _ in range(batch)]
                gc.collect()
                t0 = time.perf_counter()
                for r in reqs:
                    resp = await handler(r)
                per_call.append((time.perf_counter() - t0) / batch)
                assert resp.status == int(kind), resp.status
            out[f"handler_{kind}_us"] = round(1e6 * statistics.median(per_call), 2)

    asyncio.run(run())
    return out


# --------------------------------------------------------------------------- main


def table(rows: list[dict[str, Any]]) -> str:
    head = ["kind", "server", "req/s", "p50 ms", "p99 ms", "server CPU us/req"]
    lines = [head] + [[str(r["kind"]), str(r["server"])] + [f"{r[f]:g}" if r[f] is not None else "-"
                                                         for f in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")]
                      for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of each load run (default: 10)")
    ap.add_argument("--connections", type=int, default=64, help="concurrent pollers (default: 64)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and kind; medians reported (default: 3)")
    ap.add_argument("--kinds", default="200,304", help="poll kinds to run: 200, 304 or both (default: 200,304)")
    ap.add_argument("--generator", choices=["auto", "wrk", "aiohttp"], default="auto",
                    help="load generator (default: wrk when on PATH, else aiohttp)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and generator to CPUs")
    ap.add_argument("--scenario", help="scenario for the optimizer's simulated backend (default: its own)")
    ap.add_argument("--service", default=SERVICE, help=f"the polling service's name (default: {SERVICE})")
    ap.add_argument("--handler-calls", type=int, default=0,
                    help="also time the handler alone, in process, over this many calls (default: 0, skip)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--serve-bare", nargs=2, metavar=("PORT", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--generate", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--inm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_bare:
        asyncio.run(serve_bare(int(args.serve_bare[0]), args.serve_bare[1]))
        return 0
    if args.generate:
        print(json.dumps(asyncio.run(generate(args.generate, args.connections, args.seconds, args.inm))))
        return 0
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "aiohttp"
    args.kinds = [k for k in args.kinds.split(",") if k]
    out: dict[str, Any] = {}
    if args.handler_calls:
        out["handler"] = handler_timing(args.handler_calls)
    if args.rounds > 0:
        runs, meta = measure(args)
        out.update(meta=meta, summary=summarise(runs, args.kinds), runs=[asdict(r) for r in runs])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "handler" in out:
        h = out["handler"]
        print(f"handler alone (in process, {args.handler_calls} calls): "
              f"200 {h['handler_200_us']} us/call, 304 {h['handler_304_us']} us/call")
    if "meta" in out:
        m = out["meta"]
        print(f"generator {m['generator']}, {m['connections']} connections, {m['seconds']} s x {m['rounds']} rounds "
              f"(medians), body {m['body_bytes']} bytes, server on CPU {m['server_cpu']}, "
              f"generator on CPU {m['generator_cpu']}")
        print(table(out["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
