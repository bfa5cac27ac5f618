"""The hot paths against a bare aiohttp handler serving the same bytes: polls, 304s, scrapes, and a production load.

One command measures what issue 15 asks of the read API (docs/benchmarks.md, "The hot paths"):

1. ``GET /batch-size`` answered ``200`` and ``304`` (1 simulated GPU, the polled service declared in
   the scenario), and ``GET /metrics`` (8 simulated GPUs x 32 services). For each, the real
   optimizer (``python -m optimizer serve --backend simulated``, its own process) and a bare aiohttp
   app (its own process) that answers the same bytes with the same headers, fetched from the
   optimizer first (for ``/metrics``, once the scenario's services have registered) and checked equal
   on the wire (all headers but ``Date``). Each server is pinned to
   one CPU, the load generator to another. ``--rounds`` rounds, each one run of ``--duration``
   seconds per server; the pair's order alternates (optimizer first in odd rounds, the bare app
   first in even ones). Per round: the requests/s ratio and the CPU-per-request ratio
   (optimizer / bare); then their medians. CPU is the server process's utime+stime from
   ``/proc/<pid>/stat`` over the run, divided by the requests it answered.
2. The production-shaped load: ``--services`` services (default 50) on 8 simulated GPUs, each a
   ``vlm_optimizer_client.BatchSizeClient`` polling every second and a ``Reporter`` (the client's
   default 5 s interval) fed one measurement a second, for ``--load-duration`` seconds against the
   optimizer, then the same clients against a bare aiohttp app answering the same request mix with
   the optimizer's bytes. Reported: each server's CPU share (% of one core), CPU per request, the
   ratio, and its RSS at the start and end of the run with the slope (``--load-duration 1200`` for
   the issue's 20 minutes).

The load generator is built in (``wrk`` is not needed): ``--connections`` keep-alive HTTP/1.1
connections over raw asyncio sockets, each sending its next request when the last is answered,
counting answers by status. A ``304`` run follows, as the client does: it sends the last ETag it got
and takes the new one from a ``200``, so a decision that changes during the run costs one ``200``
per connection. Linux only (``/proc``, CPU affinity).

    .venv/bin/python bench/hot_paths.py [--rounds 5] [--duration 5] [--connections 64]
        [--load-duration 60] [--services 50] [--only polls,metrics,load] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN_ENV = "VLM_OPTIMIZER_ADMIN_TOKEN"
TICKS = os.sysconf("SC_CLK_TCK")
POLLED = "bench"  # the polled service in the 1-GPU scenario
KEEPALIVE_S = 75.0  # optimizer.api.timeouts.KEEPALIVE_S: the bare app keeps idle connections as long
UNCOMPARED = {"date"}  # the only header allowed to differ between the two servers
GENERATED = {"date", "server", "content-length"}  # aiohttp writes these itself
SECTIONS = ("polls", "metrics", "load")
MAX_SERVICES = 256  # optimizer.config.Settings().max_services: the load's names register within it
TARGETS = {"batch-size 200": "rps >= 0.85, cpu <= 1.2", "batch-size 304": "rps >= 0.85, cpu <= 1.2",
           "metrics": "cpu <= 2.0"}

Headers = list[tuple[str, str]]


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, live and ended), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import aiohttp
    import importlib.util
    loop = "uvloop installed, not used" if importlib.util.find_spec("uvloop") else "no uvloop"
    return {"cpu": model, "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "affinity": sorted(os.sched_getaffinity(0)),
            "kernel": platform.release(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "event_loop": loop}


def pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- scenarios


def scenario(gpus: int, services_per_gpu: int, name: str) -> dict[str, Any]:
    """``gpus`` simulated H100s with ``services_per_gpu`` small services each (they fit: 32 x ~2 GB)."""
    doc: dict[str, Any] = {
        "name": name, "seed": 15, "duration_s": 86400, "step_s": 1.0,
        "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3 (simulated)", "total_mb": 81559} for i in range(gpus)],
        "services": [],
    }
    for g in range(gpus):
        for s in range(services_per_gpu):
            svc = POLLED if (gpus, services_per_gpu) == (1, 1) else f"svc-{g}-{s}"
            doc["services"].append({"name": svc, "gpu": g, "base_mb": 1000 + 10 * s, "per_item_mb": 50,
                                    "noise": 0.05, "item_ms": 40, "overhead_ms": 100})
    return doc


def write_scenario(directory: str, doc: dict[str, Any]) -> str:
    path = os.path.join(directory, f"{doc['name']}.yaml")
    with open(path, "w") as f:
        json.dump(doc, f)  # JSON is YAML
    return path


# --------------------------------------------------------------------------- plain HTTP (setup and checks)


@dataclass
class Answer:
    status: int
    headers: Headers
    body: bytes

    def compared(self) -> tuple[int, Headers, bytes]:
        """What must be equal between the two servers: the status, the headers but Date, the body."""
        return self.status, sorted((k, v) for k, v in self.headers if k.lower() not in UNCOMPARED), self.body

    def served(self) -> Headers:
        """The headers a server must set itself to answer the same (aiohttp adds the rest)."""
        return [(k, v) for k, v in self.headers if k.lower() not in GENERATED]


def http(base: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> Answer:
    """One request with urllib (no proxy), HTTP errors returned as answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(base + path, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with opener.open(req, timeout=10) as r:
            return Answer(r.status, list(r.headers.items()), r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Answer(exc.code, list(exc.headers.items()), exc.read())


def wait_http(base: str, path: str, proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering {path}")
        try:
            if http(base, path).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base}{path} did not answer 200 in {seconds:g} s")
        time.sleep(0.1)


# --------------------------------------------------------------------------- the servers


@dataclass
class Server:
    name: str  # optimizer | bare
    proc: subprocess.Popen[bytes]
    base: str
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_optimizer(scenario_path: str, cpu: int | None, extra: Sequence[str] = ()) -> Server:
    port, admin = free_port(), free_port()
    cmd = [sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--scenario", scenario_path,
           "--host", "127.0.0.1", "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin),
           "--log-format", "json", "--log-level", "warning", *extra]
    env = {**os.environ, TOKEN_ENV: secrets.token_urlsafe(24)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pin(cpu))
    server = Server("optimizer", proc, f"http://127.0.0.1:{port}", port)
    try:
        wait_http(server.base, "/ready", proc)
    except BaseException:
        server.stop()
        raise
    return server


def start_bare(spec: dict[str, Any], spec_dir: str, cpu: int | None, probe: str) -> Server:
    """The bare app in its own process, serving ``spec`` (see :func:`bare_app`); ``probe`` answers 200 when up."""
    path = os.path.join(spec_dir, f"bare-{secrets.token_hex(4)}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-bare", str(port), path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin(cpu))
    server = Server("bare", proc, f"http://127.0.0.1:{port}", port)
    try:
        wait_http(server.base, probe, proc)
    except BaseException:
        server.stop()
        raise
    return server


def bare_app(spec: dict[str, Any]) -> Any:
    """An aiohttp app that answers from constants, nothing else (the framework's ceiling).

    ``spec["polls"]``: per service, the ``/batch-size`` body, its headers, and the ``304``'s headers;
    with one service the handler does not read the query (as the bare handler of issue 15), with
    several it picks the service's answer from ``?service=``. A matching ``If-None-Match`` gets the
    ``304``. ``spec["reports"]``: per service, the ``POST /reports`` reply
    (the body is read and parsed for its ``service``). ``spec["metrics"]``: the ``/metrics`` answer.
    """
    from aiohttp import web

    def answers(a: dict[str, Any]) -> tuple[bytes, dict[str, str], str, dict[str, str]]:
        headers = dict(a["headers"])
        return a["body"].encode(), headers, headers.get("ETag", ""), dict(a["not_modified"])

    polls = {svc: answers(a) for svc, a in spec.get("polls", {}).items()}
    app = web.Application()

    if len(polls) == 1:
        (only,) = polls.values()

        async def poll(request: web.Request) -> web.Response:
            body, headers, etag, not_modified = only
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=not_modified)
            return web.Response(body=body, headers=headers)
        app.router.add_get("/batch-size", poll)
    elif polls:
        async def poll_by_service(request: web.Request) -> web.Response:
            found = polls.get(request.query.get("service", ""))
            if found is None:
                return web.Response(status=404)
            body, headers, etag, not_modified = found
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers=not_modified)
            return web.Response(body=body, headers=headers)
        app.router.add_get("/batch-size", poll_by_service)

    reports = {svc: (a["body"].encode(), dict(a["headers"])) for svc, a in spec.get("reports", {}).items()}
    if reports:
        async def report(request: web.Request) -> web.Response:
            sent = json.loads(await request.read())
            body, headers = reports[sent["service"]]
            return web.Response(body=body, headers=headers)
        app.router.add_post("/reports", report)

    if "metrics" in spec:
        m_body, m_headers = spec["metrics"]["body"].encode(), dict(spec["metrics"]["headers"])

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=m_body, headers=m_headers)
        app.router.add_get("/metrics", metrics)

    return app


async def serve_bare(port: int, spec_path: str) -> None:
    from aiohttp import web
    with open(spec_path) as f:
        spec = json.load(f)
    runner = web.AppRunner(bare_app(spec), access_log=None, keepalive_timeout=KEEPALIVE_S)  # as optimizer.server
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


Expected = list[tuple[str, dict[str, str], bytes | None, Answer]]  # request (path, headers, body), answer


def poll_answers(base: str, path: str, expected: Expected) -> dict[str, Any]:
    """The 200 and 304 of ``path`` as the bare app's spec wants them; both answers go to ``expected``."""
    ok = http(base, path)
    if ok.status != 200:
        raise RuntimeError(f"GET {path} answered {ok.status}: {ok.body[:200]!r}")
    etag = dict(ok.headers)["ETag"]
    nm = http(base, path, {"If-None-Match": etag})
    if nm.status != 304:
        raise RuntimeError(f"GET {path} with If-None-Match answered {nm.status}, not 304")
    expected += [(path, {}, None, ok), (path, {"If-None-Match": etag}, None, nm)]
    return {"body": ok.body.decode(), "headers": ok.served(), "not_modified": nm.served(), "etag": etag}


def check_same(bare: Server, expected: Expected) -> int:
    """The bare app answers each request as the optimizer did (status, headers but Date, body).

    The optimizer's answers were taken when the spec was (its decisions change once a sample, so it
    is not asked again). Returns the number of answers compared.
    """
    for path, headers, body, want in expected:
        got = http(bare.base, path, headers, body)
        if got.compared() != want.compared():
            raise RuntimeError(f"the bare app does not answer {path} {headers} as the optimizer did:\n"
                               f"  optimizer {want.compared()!r}\n  bare      {got.compared()!r}")
    return len(expected)


# --------------------------------------------------------------------------- the load generator


class _Conn(asyncio.Protocol):
    """One keep-alive connection: request, wait for the whole answer, count it, repeat."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.need = -1  # bytes of the answer in progress (head + body); -1 before its head is complete
        self.status = 0
        self.etag = gen.etag
        self.transport: asyncio.Transport | None = None
        self.closed = gen.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.gen.request(self.etag))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                self.status = int(head[9:12])
                length = 0
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17:stop if stop > 0 else len(head)])
                elif b"\r\ntransfer-encoding:" in head:
                    self.gen.errors += 1  # not what either server sends
                    self.abort()
                    return
                if self.gen.follow and self.status == 200:
                    at = head.find(b"\r\netag:")
                    if at >= 0:
                        stop = head.find(b"\r\n", at + 2)
                        raw = bytes(self.buf[at + 7:stop if stop > 0 else end])  # the original case
                        self.etag = raw.decode("latin-1").strip()
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            del self.buf[:self.need]
            self.need = -1
            self.gen.answered(self, self.status)
            if self.buf:  # more than one answer to one request: the server is broken
                self.gen.errors += 1
                self.abort()
                return

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.gen.lost(self)


class Generator:
    """``connections`` connections to ``host:port``, ``GET path`` in a closed loop for ``seconds``.

    ``etag``: sent as ``If-None-Match`` from the first request on; with ``follow`` each connection
    takes the ETag of every ``200`` it gets (a following client).
    """

    def __init__(self, host: str, port: int, path: str, connections: int, seconds: float,
                 etag: str | None = None, follow: bool = False) -> None:
        self.host, self.port, self.path = host, port, path
        self.connections, self.seconds = connections, seconds
        self.etag, self.follow = etag, follow
        self.loop = asyncio.get_running_loop()
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.deadline = 0.0
        self.last = 0.0
        self.in_flight = 0
        self.all_done = self.loop.create_future()
        self._line = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: hot-paths-bench\r\nAccept: */*\r\n"
        self._plain = (self._line + "\r\n").encode("latin-1")
        self._with: dict[str, bytes] = {}
        self._open: set[_Conn] = set()

    def request(self, etag: str | None) -> bytes:
        if etag is None:
            return self._plain
        raw = self._with.get(etag)
        if raw is None:
            raw = self._with[etag] = (self._line + f"If-None-Match: {etag}\r\n\r\n").encode("latin-1")
        return raw

    def answered(self, conn: _Conn, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        now = time.perf_counter()
        self.last = now
        if now < self.deadline:
            conn.send()
        else:
            self._finished(conn)

    def lost(self, conn: _Conn) -> None:
        if self.in_flight and conn in self._open:
            self.errors += 1  # closed by the server before the run ended
            self._finished(conn)

    def _finished(self, conn: _Conn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self.in_flight -= 1
            if conn.transport is not None:
                conn.transport.close()
            if not self.in_flight and not self.all_done.done():
                self.all_done.set_result(None)

    async def run(self) -> dict[str, Any]:
        conns: list[_Conn] = []
        for _ in range(self.connections):
            _, proto = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
            conns.append(proto)
        self._open = set(conns)
        self.in_flight = len(conns)
        cpu0 = time.process_time()
        started = self.last = time.perf_counter()
        self.deadline = started + self.seconds
        for c in conns:
            c.send()
        try:
            await asyncio.wait_for(self.all_done, self.seconds + 30)
        except asyncio.TimeoutError:
            self.errors += self.in_flight  # answers that never came
        for c in conns:
            c.abort()
        elapsed = self.last - started
        requests = sum(self.statuses.values())
        return {"requests": requests, "seconds": round(elapsed, 3), "rps": round(requests / elapsed, 1) if elapsed else 0,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "errors": self.errors,
                "generator_cpu_s": round(time.process_time() - cpu0, 3)}


def generate(host: str, port: int, path: str, connections: int, seconds: float, etag: str | None = None,
             follow: bool = False) -> dict[str, Any]:
    """Run the generator in this process (the bench runs it in a pinned child; the smoke test in its own)."""
    async def main() -> dict[str, Any]:
        return await Generator(host, port, path, connections, seconds, etag, follow).run()
    return asyncio.run(main())


def generate_pinned(server: Server, path: str, connections: int, seconds: float, cpu: int | None,
                    etag: str | None = None, follow: bool = False) -> dict[str, Any]:
    job = json.dumps({"port": server.port, "path": path, "connections": connections, "seconds": seconds,
                      "etag": etag, "follow": follow})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", job], capture_output=True,
                         text=True, check=True, preexec_fn=pin(cpu))
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# --------------------------------------------------------------------------- the rounds


@dataclass
class Run:
    server: str
    requests: int
    seconds: float
    rps: float
    cpu_s: float
    cpu_us_per_request: float
    busy: float  # the server's CPU over the run's wall time: ~1.0 when it is saturated
    statuses: dict[str, int]
    errors: int
    generator_busy: float


@dataclass
class Round:
    kind: str
    round: int
    first: str
    optimizer: Run
    bare: Run
    rps_ratio: float = field(init=False)
    cpu_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.rps_ratio = round(self.optimizer.rps / self.bare.rps, 3) if self.bare.rps else float("nan")
        b = self.bare.cpu_us_per_request
        self.cpu_ratio = round(self.optimizer.cpu_us_per_request / b, 3) if b else float("nan")


def one_run(server: Server, path: str, args: argparse.Namespace, cpu: int | None, etag: str | None,
            follow: bool) -> Run:
    cpu0 = cpu_seconds(server.proc.pid)
    r = generate_pinned(server, path, args.connections, args.duration, cpu, etag, follow)
    cpu_s = cpu_seconds(server.proc.pid) - cpu0
    n = max(1, r["requests"])
    return Run(server=server.name, requests=r["requests"], seconds=r["seconds"], rps=r["rps"], cpu_s=round(cpu_s, 3),
               cpu_us_per_request=round(1e6 * cpu_s / n, 1),
               busy=round(cpu_s / r["seconds"], 3) if r["seconds"] else 0.0, statuses=r["statuses"],
               errors=r["errors"], generator_busy=round(r["generator_cpu_s"] / r["seconds"], 3) if r["seconds"] else 0.0)


def rounds(kind: str, servers: dict[str, Server], path: str, args: argparse.Namespace, gen_cpu: int | None,
           etag_of: Callable[[Server], str | None], progress: Callable[[str], None]) -> list[Round]:
    follow = etag_of(servers["bare"]) is not None
    for s in servers.values():  # warm up: the first requests of a process are not its cost
        generate_pinned(s, path, args.connections, min(1.0, args.duration), gen_cpu, etag_of(s), follow)
    out = []
    for i in range(1, args.rounds + 1):
        order = ("optimizer", "bare") if i % 2 else ("bare", "optimizer")
        runs = {name: one_run(servers[name], path, args, gen_cpu, etag_of(servers[name]), follow) for name in order}
        rd = Round(kind, i, order[0], runs["optimizer"], runs["bare"])
        progress(f"{kind} round {i}: rps ratio {rd.rps_ratio}, cpu ratio {rd.cpu_ratio}")
        out.append(rd)
    return out


def summary(rs: list[Round]) -> dict[str, Any]:
    def med(xs: list[float]) -> float:
        return round(statistics.median(xs), 3)
    return {
        "kind": rs[0].kind, "rounds": len(rs),
        "rps_ratio": med([r.rps_ratio for r in rs]), "rps_ratio_range": [min(r.rps_ratio for r in rs),
                                                                        max(r.rps_ratio for r in rs)],
        "cpu_ratio": med([r.cpu_ratio for r in rs]), "cpu_ratio_range": [min(r.cpu_ratio for r in rs),
                                                                        max(r.cpu_ratio for r in rs)],
        "optimizer_rps": med([r.optimizer.rps for r in rs]), "bare_rps": med([r.bare.rps for r in rs]),
        "optimizer_cpu_us": med([r.optimizer.cpu_us_per_request for r in rs]),
        "bare_cpu_us": med([r.bare.cpu_us_per_request for r in rs]),
        "errors": sum(r.optimizer.errors + r.bare.errors for r in rs),
        "target": TARGETS.get(rs[0].kind, ""),
    }


@contextmanager
def running(*starters: Callable[[], Server]) -> Iterator[list[Server]]:
    servers: list[Server] = []
    try:
        for start in starters:
            servers.append(start())
        yield servers
    finally:
        for s in servers:
            s.stop()


def measure_polls(args: argparse.Namespace, tmp: str, cpus: tuple[int | None, int | None],
                  progress: Callable[[str], None]) -> list[Round]:
    server_cpu, gen_cpu = cpus
    path = f"/batch-size?service={POLLED}"
    sc = write_scenario(tmp, scenario(1, 1, "hot-paths-1gpu"))
    with running(lambda: start_optimizer(sc, server_cpu)) as (opt,):
        expected: Expected = []
        spec = {"polls": {POLLED: poll_answers(opt.base, path, expected)}}
        with running(lambda: start_bare(spec, tmp, server_cpu, path)) as (bare,):
            check_same(bare, expected)
            servers = {"optimizer": opt, "bare": bare}
            out = rounds("batch-size 200", servers, path, args, gen_cpu, lambda s: None, progress)
            out += rounds("batch-size 304", servers, path, args, gen_cpu,
                          lambda s: dict(http(s.base, path).headers)["ETag"], progress)
            return out


def settled_metrics(base: str, services: int, seconds: float = 60.0) -> Answer:
    """``/metrics`` once every one of the scenario's ``services`` has its series.

    The simulated services register with their first polls, in process, when the sampler first
    advances the world (a sample or so after ``/ready``): taken before that, the exposition has no
    service series (60 kB at 8 x 32 instead of 157 kB), and the bare app would serve a smaller body
    than the optimizer does for most of the run.
    """
    deadline = time.monotonic() + seconds
    while True:
        m = http(base, "/metrics")
        if m.status != 200:
            raise RuntimeError(f"/metrics answered {m.status}")
        if m.body.count(b"\nvlm_current_batch_size{") >= services:
            return m
        if time.monotonic() > deadline:
            raise RuntimeError(f"/metrics did not show {services} services within {seconds:g} s")
        time.sleep(0.2)


def measure_metrics(args: argparse.Namespace, tmp: str, cpus: tuple[int | None, int | None],
                    progress: Callable[[str], None]) -> tuple[list[Round], int, int]:
    """The /metrics rounds; the bytes the bare app serves, and the optimizer's answer's at the end (the
    memory figures move each sample, so the two differ by a few digits, not by whole series)."""
    server_cpu, gen_cpu = cpus
    sc = write_scenario(tmp, scenario(8, 32, "hot-paths-8x32"))
    with running(lambda: start_optimizer(sc, server_cpu)) as (opt,):
        m = settled_metrics(opt.base, 8 * 32)
        spec = {"metrics": {"body": m.body.decode(), "headers": m.served()}}
        with running(lambda: start_bare(spec, tmp, server_cpu, "/metrics")) as (bare,):
            check_same(bare, [("/metrics", {}, None, m)])
            out = rounds("metrics", {"optimizer": opt, "bare": bare}, "/metrics", args, gen_cpu,
                         lambda s: None, progress)
            end = http(opt.base, "/metrics")
            if abs(len(end.body) - len(m.body)) > len(m.body) // 100:
                raise RuntimeError(f"the optimizer's /metrics went from {len(m.body)} to {len(end.body)} bytes "
                                   "during the rounds: the bare app's body no longer stands for it")
            return out, len(m.body), len(end.body)


# --------------------------------------------------------------------------- the production-shaped load


def client_load(job: dict[str, Any]) -> None:
    """The load process: ``services`` clients and reporters through vlm_optimizer_client.

    Reads commands on stdin, one a line: ``mark`` (answers the counts so far as a JSON line) and
    ``stop`` (stops every client, answers the final counts). Prints ``started`` once every client runs.
    """
    import vlm_optimizer_client as voc

    lock = threading.Lock()
    polls: dict[str, int] = {}

    class CountingClient(voc.BatchSizeClient):
        def poll_once(self) -> float:
            delay = super().poll_once()
            key = str(self.last_status) if self.last_status is not None else "failed"
            with lock:
                polls[key] = polls.get(key, 0) + 1
            return delay

    url, n, gpus = job["url"], job["services"], job["gpus"]
    clients = [CountingClient(f"load-{i}", url=url, gpu=i % gpus, interval=job["poll_interval"], timeout=5.0)
               for i in range(n)]
    reporters = [voc.Reporter(c.service, url=url, gpu=i % gpus, interval=job["report_interval"], timeout=5.0,
                              sink=c) for i, c in enumerate(clients)]
    stop = threading.Event()
    for i, (c, r) in enumerate(zip(clients, reporters)):  # spread over a second: pods are not in lockstep
        c.start()
        r.start()
        stop.wait(1.0 / n)

    def service_work() -> None:  # each service finishes a batch a second and reports it
        while not stop.wait(1.0):
            for i, (c, r) in enumerate(zip(clients, reporters)):
                batch = c.batch_size
                r.report(batch, peak_bytes=(2000 + 300 * batch + i) << 20)

    worker = threading.Thread(target=service_work, daemon=True)
    worker.start()

    def counts() -> dict[str, Any]:
        with lock:
            p = dict(polls)
        sent = rejected = failed = 0
        for r in reporters:
            st = r.stats
            sent, rejected, failed = sent + st.sent, rejected + st.rejected, failed + st.failed
        return {"polls": p, "reports": {"sent": sent, "rejected": rejected, "failed": failed}}

    print("started", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        print(json.dumps(counts()), flush=True)
    stop.set()
    for c in clients:
        c.stop()
    for r in reporters:
        r.stop()
    print(json.dumps(counts()), flush=True)


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    polls = {k: b["polls"].get(k, 0) - a["polls"].get(k, 0) for k in sorted(b["polls"])}
    reports = {k: b["reports"][k] - a["reports"][k] for k in b["reports"]}
    return {"polls": polls, "reports": reports,
            "requests": sum(polls.values()) - polls.get("failed", 0) + reports["sent"] + reports["rejected"]}


def slope_mib_per_h(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return round(3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var, 2) if var else 0.0


def load_run(server: Server, args: argparse.Namespace, gen_cpu: int | None) -> dict[str, Any]:
    job = {"url": server.base, "services": args.services, "gpus": 8, "poll_interval": 1.0,
           "report_interval": args.report_interval}
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "client"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--client-load", json.dumps(job)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=pin(gen_cpu))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "started":
            raise RuntimeError("the client load did not start")
        time.sleep(args.load_warmup)  # the first polls register the services and open connections
        proc.stdin.write("mark\n")
        proc.stdin.flush()
        pid = server.proc.pid
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        first = json.loads(proc.stdout.readline())
        rss = [(0.0, rss_mib(pid))]
        every = max(1.0, args.load_duration / 60)
        while (left := args.load_duration - (time.monotonic() - t0)) > 0:
            time.sleep(min(every, left))
            rss.append((time.monotonic() - t0, rss_mib(pid)))
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
        proc.stdin.write("mark\n")
        proc.stdin.flush()
        last = json.loads(proc.stdout.readline())
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    d = _delta(first, last)
    wall, cpu = t1 - t0, cpu1 - cpu0
    half = [s for s in rss if s[0] >= wall / 2]
    return {"server": server.name, "seconds": round(wall, 1), "requests": d["requests"],
            "rps": round(d["requests"] / wall, 1), "polls": d["polls"], "reports": d["reports"],
            "cpu_s": round(cpu, 3), "cpu_share": round(cpu / wall, 5),
            "cpu_us_per_request": round(1e6 * cpu / max(1, d["requests"]), 1),
            "rss_start_mib": round(rss[0][1], 1), "rss_end_mib": round(rss[-1][1], 1),
            "rss_peak_mib": round(max(y for _, y in rss), 1), "rss_slope_mib_per_h": slope_mib_per_h(rss),
            "rss_second_half_slope_mib_per_h": slope_mib_per_h(half), "rss_samples": len(rss)}


def measure_load(args: argparse.Namespace, tmp: str, cpus: tuple[int | None, int | None],
                 progress: Callable[[str], None]) -> dict[str, Any]:
    server_cpu, gen_cpu = cpus
    sc = write_scenario(tmp, scenario(8, 0, "hot-paths-8gpus"))
    with running(lambda: start_optimizer(sc, server_cpu)) as (opt,):
        spec: dict[str, Any] = {"polls": {}, "reports": {}}
        expected: Expected = []
        for i in range(args.services):  # registers the names as the clients will, and takes their answers
            svc = f"load-{i}"
            spec["polls"][svc] = poll_answers(opt.base, f"/batch-size?service={svc}&gpu={i % 8}", expected)
            headers = {"Content-Type": "application/json"}
            body = json.dumps({"service": svc, "gpu": i % 8, "batch_size": 4, "peak_bytes": 3200 << 20}).encode()
            rep = http(opt.base, "/reports", headers, body)
            if rep.status != 200:
                raise RuntimeError(f"POST /reports answered {rep.status}: {rep.body[:200]!r}")
            spec["reports"][svc] = {"body": rep.body.decode(), "headers": rep.served()}
            expected.append(("/reports", headers, body, rep))
        progress(f"load: {args.services} services against the optimizer for {args.load_duration:g} s")
        opt_run = load_run(opt, args, gen_cpu)
    with running(lambda: start_bare(spec, tmp, server_cpu, "/batch-size?service=load-0")) as (bare,):
        check_same(bare, expected)
        progress(f"load: the same clients against the bare app for {args.load_duration:g} s")
        bare_run = load_run(bare, args, gen_cpu)
    ratio = round(opt_run["cpu_s"] / bare_run["cpu_s"], 2) if bare_run["cpu_s"] else None
    return {"services": args.services, "gpus": 8, "poll_interval_s": 1.0, "report_interval_s": args.report_interval,
            "seconds": args.load_duration, "optimizer": opt_run, "bare": bare_run, "cpu_ratio": ratio,
            "target": "cpu <= 1.3, RSS flat"}


# --------------------------------------------------------------------------- output


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = [head] + rows
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)


def statuses(s: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in s.items())


def report(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    out = [f"machine: {m['cpu']}, {m['cpus']} CPUs (this process may use {m['affinity']}), Linux {m['kernel']}, "
           f"Python {m['python']}, aiohttp {m['aiohttp']} ({m['event_loop']})",
           f"pinning: servers on CPU {s['server_cpu']}, load generator on CPU {s['generator_cpu']}"]
    if doc["rounds"]:
        out += [f"rounds: {s['rounds']} x {s['duration']:g} s per server and kind, {s['connections']} keep-alive "
                f"connections, pairs alternate (optimizer first in odd rounds)", ""]
        rows = []
        for r in doc["rounds"]:
            o, b = r["optimizer"], r["bare"]
            rows.append([r["kind"], str(r["round"]), f"{o['rps']:.0f}", f"{b['rps']:.0f}", f"{r['rps_ratio']:.2f}",
                         f"{o['cpu_us_per_request']:.1f}", f"{b['cpu_us_per_request']:.1f}", f"{r['cpu_ratio']:.2f}",
                         f"{o['busy']:.2f}", f"{b['busy']:.2f}", f"{max(o['generator_busy'], b['generator_busy']):.2f}",
                         statuses(o["statuses"]) + (f" err:{o['errors']}" if o["errors"] else ""),
                         statuses(b["statuses"]) + (f" err:{b['errors']}" if b["errors"] else "")])
        out.append(table(["kind", "round", "opt req/s", "bare req/s", "rps ratio", "opt us/req", "bare us/req",
                          "cpu ratio", "opt busy", "bare busy", "gen busy", "opt statuses", "bare statuses"], rows))
        out.append("(us/req: the server's CPU per answer; busy: its CPU over the run's wall time, 1.00 = a whole core; "
                   "gen busy: the generator's)")
        out.append("")
        out.append(table(["medians", "rounds", "rps ratio", "(range)", "cpu ratio", "(range)", "opt us/req",
                          "bare us/req", "errors", "issue 15 asks"],
                         [[x["kind"], str(x["rounds"]), f"{x['rps_ratio']:.2f}",
                           f"{x['rps_ratio_range'][0]:.2f}-{x['rps_ratio_range'][1]:.2f}", f"{x['cpu_ratio']:.2f}",
                           f"{x['cpu_ratio_range'][0]:.2f}-{x['cpu_ratio_range'][1]:.2f}", f"{x['optimizer_cpu_us']:.1f}",
                           f"{x['bare_cpu_us']:.1f}", str(x["errors"]), x["target"]] for x in doc["summary"]]))
        if doc.get("metrics_bytes"):
            out.append(f"(/metrics: 8 GPUs x 32 services, {doc['metrics_bytes']} bytes served by the bare app, "
                       f"the optimizer's {doc.get('metrics_bytes_at_end')} bytes at the end)")
    ld = doc.get("load")
    if ld:
        out += ["", f"production-shaped load: {ld['services']} services (vlm_optimizer_client BatchSizeClient + "
                    f"Reporter), polls every {ld['poll_interval_s']:g} s, reports every {ld['report_interval_s']:g} s, "
                    f"{ld['gpus']} GPUs, {ld['seconds']:g} s measured per server", ""]
        rows = []
        for name in ("optimizer", "bare"):
            r = ld[name]
            rows.append([name, str(r["requests"]), f"{r['rps']:.1f}", statuses(r["polls"]),
                         statuses(r["reports"]), f"{100 * r['cpu_share']:.2f}", f"{r['cpu_us_per_request']:.0f}",
                         f"{r['rss_start_mib']:.1f}", f"{r['rss_end_mib']:.1f}", f"{r['rss_peak_mib']:.1f}",
                         f"{r['rss_slope_mib_per_h']:+.2f}", f"{r['rss_second_half_slope_mib_per_h']:+.2f}"])
        out.append(table(["server", "requests", "req/s", "polls", "reports", "% of a core", "us/req",
                          "RSS start", "RSS end", "RSS peak", "MiB/h", "2nd half MiB/h"], rows))
        out.append(f"optimizer/bare CPU: {ld['cpu_ratio']} (issue 15 asks: {ld['target']})")
    out.append(f"total wall time {doc['wall_s']:.0f} s; load average (1 min) {m['load_average_1min']} at the start, "
               f"{doc['load_average_1min_at_end']} at the end")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per kind (default: 5)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of load per server and round (default: 5)")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connections of the generator (default: 64)")
    ap.add_argument("--load-duration", type=float, default=60.0,
                    help="seconds of the production-shaped load per server (default: 60; the issue's 20 minutes: 1200)")
    ap.add_argument("--load-warmup", type=float, default=3.0, help="seconds of that load before measuring (default: 3)")
    ap.add_argument("--services", type=int, default=50, help=f"services of the production-shaped load, 1 to {MAX_SERVICES} (default: 50)")
    ap.add_argument("--report-interval", type=float, default=5.0,
                    help="the reporters' interval, seconds (default: 5, the client's default)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: polls, metrics, load (default: all)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the servers and the generator")
    ap.add_argument("--json", action="store_true", help="print a JSON document instead of the tables")
    ap.add_argument("--serve-bare", nargs=2, metavar=("PORT", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--generate", metavar="JOB", help=argparse.SUPPRESS)
    ap.add_argument("--client-load", metavar="JOB", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    bad = [x for x in only if x not in SECTIONS]
    if bad or not only:
        ap.error(f"--only: must be a comma-separated list of {', '.join(SECTIONS)}, got {args.only!r}")
    args.only = only
    for name in ("rounds", "connections", "services"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: must be an integer >= 1, got {getattr(args, name)}")
    if args.services > MAX_SERVICES:
        ap.error(f"--services: must be at most {MAX_SERVICES} (the optimizer's default max_services), "
                 f"got {args.services}")
    for name in ("duration", "load_duration", "report_interval"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')}: must be a number of seconds > 0, got {getattr(args, name)}")
    if args.load_warmup < 0:
        ap.error(f"--load-warmup: must be a number of seconds >= 0, got {args.load_warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare:
        asyncio.run(serve_bare(int(args.serve_bare[0]), args.serve_bare[1]))
        return 0
    if args.generate:
        job = json.loads(args.generate)
        print(json.dumps(generate("127.0.0.1", job["port"], job["path"], job["connections"], job["seconds"],
                                  job["etag"], job["follow"])))
        return 0
    if args.client_load:
        client_load(json.loads(args.client_load))
        return 0
    started = time.monotonic()
    cpus = sorted(os.sched_getaffinity(0))
    pinned = args.pin and len(cpus) >= 2
    server_cpu, gen_cpu = (cpus[0], cpus[1]) if pinned else (None, None)
    if gen_cpu is not None:
        os.sched_setaffinity(0, {gen_cpu})  # this script mostly waits; it stays off the servers' CPU

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", file=sys.stderr, flush=True)

    doc: dict[str, Any] = {"machine": machine(), "command": " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
                           "settings": {"rounds": args.rounds, "duration": args.duration, "connections": args.connections,
                                        "server_cpu": server_cpu, "generator_cpu": gen_cpu},
                           "rounds": [], "summary": []}
    with tempfile.TemporaryDirectory(prefix="hot-paths-") as tmp:
        rs: list[Round] = []
        if "polls" in args.only:
            rs += measure_polls(args, tmp, (server_cpu, gen_cpu), progress)
        if "metrics" in args.only:
            m, size, end_size = measure_metrics(args, tmp, (server_cpu, gen_cpu), progress)
            rs += m
            doc["metrics_bytes"] = size
            doc["metrics_bytes_at_end"] = end_size
        doc["rounds"] = [asdict(r) for r in rs]
        doc["summary"] = [summary([r for r in rs if r.kind == k]) for k in dict.fromkeys(r.kind for r in rs)]
        if "load" in args.only:
            doc["load"] = measure_load(args, tmp, (server_cpu, gen_cpu), progress)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    doc["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(doc, indent=2) if args.json else report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
