"""Measure the service's resident memory and CPU under polling load (for the Kubernetes requests/limits).

Starts ``vlm-gpu-optimizer serve --backend simulated`` (default interval 5 s) as a subprocess, runs
POLLERS clients that each poll ``GET /batch-size`` once a second and a scraper that reads /metrics
every 5 s, for SECONDS, and reports the process's RSS (VmRSS, VmHWM from /proc) and CPU seconds
(utime+stime from /proc/<pid>/stat) as a share of one core. Linux only.

    .venv/bin/python bench/measure_resources.py [--seconds 120] [--pollers 50] [--scenario FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


async def load(base: str, seconds: float, pollers: int) -> int:
    deadline = time.monotonic() + seconds
    done = 0

    async def poller(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal done
        etag = None
        while time.monotonic() < deadline:
            headers = {"If-None-Match": etag} if etag else {}
            async with session.get(f"{base}/batch-size?service=svc{i % 10}", headers=headers) as r:
                etag = r.headers.get("ETag", etag)
                await r.read()
            done += 1
            await asyncio.sleep(1.0)

    async def scraper(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            async with session.get(f"{base}/metrics") as r:
                await r.read()
            await asyncio.sleep(5.0)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(scraper(session), *(poller(session, i) for i in range(pollers)))
    return done


async def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{base}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            await asyncio.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--scenario", default=None)
    args = ap.parse_args()
    port, admin = free_port(), free_port()
    cmd = [sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1", "--port",
           str(port), "--admin-port", str(admin), "--log-level", "warning"]
    if args.scenario:
        cmd += ["--scenario", args.scenario]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base))
        idle = memory_kib(proc.pid)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        requests = asyncio.run(load(base, args.seconds, args.pollers))
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        mem = memory_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(json.dumps({
        "seconds": round(t1 - t0, 1), "pollers": args.pollers, "requests": requests,
        "rss_idle_mib": round(idle["VmRSS"] / 1024, 1), "rss_end_mib": round(mem["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(mem["VmHWM"] / 1024, 1),
        "cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
