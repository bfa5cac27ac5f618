"""Measure the cost of one sampling pass per GPU, and the sampling loop's CPU share.

Builds the engine, the backend and the sampler as ``serve`` does (the simulated backend with its
in-process services, or NVML), then:

1. **One pass.** Runs ``--passes`` sampler ticks (after ``--warmup``) on a virtual clock that moves
   one monitoring interval (5 s) per tick, timing each ``Sampler.tick()`` and, inside it,
   ``backend.sample()`` and ``engine.observe()``. The simulated backend's ``sample()`` includes
   advancing its world by 5 s of scenario time, where the scenario's services report to and poll
   the engine in process: that is the simulator's cost, not a GPU's. ``engine.observe()`` (history,
   policy, accounting) is what every backend pays.
2. **The loop's CPU share.** Runs ``Sampler.run()`` on the event loop for ``--ticks`` intervals and
   divides the process CPU time (``time.process_time()``: all threads, user + system) by the wall
   time. ``--interval`` below 5 s shortens the real wait between ticks while the virtual clock still
   moves 5 s per tick, so the world and the policy see the default interval; the share at 5 s is then
   the CPU per tick divided by 5 s (the run's own wall-time share is printed as well).

Scenarios: 1 GPU (the service's default scenario) and 8 GPUs (``bench/scenarios/eight-h100.yaml``).
With ``--backend nvml`` the GPUs NVML sees are sampled instead (the scenarios are not used).

    .venv/bin/python bench/sampling_cost.py [--backend simulated|nvml] [--passes 500] [--ticks 60]
        [--interval 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.gpu.types import GpuBackend, GpuSample
from optimizer.logs import configure_logging
from optimizer.policy.types import Event, Snapshot
from optimizer.sampler import Sampler

HERE = os.path.dirname(os.path.abspath(__file__))
EIGHT_GPUS = os.path.join(HERE, "scenarios", "eight-h100.yaml")
DEFAULT_INTERVAL = Settings().monitoring_interval  # 5 s
ORIGIN = 1_800_000_000.0  # virtual clock start (Unix seconds)


@dataclass
class Rig:
    label: str
    gpus: int
    engine: Engine
    backend: GpuBackend
    sampler: Sampler
    clock: list[float]  # the virtual clock's time, [0]


def build(backend_name: str, scenario_path: str | None, virtual: bool) -> Rig:
    """An engine, a backend and a sampler wired as ``serve`` wires them."""
    now = [ORIGIN if virtual else time.time()]
    clock: Callable[[], float] = (lambda: now[0]) if virtual else time.time
    if backend_name == "nvml":
        from optimizer.gpu.nvml import NvmlBackend

        engine = Engine(Settings())
        backend: GpuBackend = NvmlBackend()
        label = "nvml"
    else:
        from optimizer.simulation.backend import SimulatedBackend
        from optimizer.simulation.link import EngineLink
        from optimizer.simulation.run import with_scenario_profiles
        from optimizer.simulation.scenario import DEFAULT_SCENARIO, load_scenario

        scenario = load_scenario(scenario_path or DEFAULT_SCENARIO)
        settings = with_scenario_profiles(Settings(), scenario)
        engine = Engine(settings)
        sim = SimulatedBackend(scenario, settings, origin=now[0])
        sim.attach(EngineLink(engine, origin=sim.origin))
        backend = sim
        label = f"simulated {scenario.name}"

    async def sleep(delay: float) -> None:
        now[0] += delay
        await asyncio.sleep(0)

    sampler = Sampler(backend, engine, clock=clock, sleep=sleep)
    gpus = len(backend.sample(now[0])) if backend_name == "nvml" else len(getattr(backend, "scenario").gpus)
    return Rig(label, gpus, engine, backend, sampler, now)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def one_pass(rig: Rig, warmup: int, passes: int) -> dict[str, Any]:
    """Microseconds per tick, per backend.sample() and per engine.observe() (median and p99)."""
    split: dict[str, float] = {}
    sample, observe = rig.backend.sample, rig.engine.observe

    def timed_sample(now: float) -> list[GpuSample]:
        t0 = time.perf_counter()
        try:
            return sample(now)
        finally:
            split["sample"] = time.perf_counter() - t0

    def timed_observe(snapshot: Snapshot) -> tuple[Event, ...]:
        t0 = time.perf_counter()
        try:
            return observe(snapshot)
        finally:
            split["observe"] = time.perf_counter() - t0

    rig.backend.sample = timed_sample  # type: ignore[method-assign]
    rig.engine.observe = timed_observe  # type: ignore[method-assign]
    ticks: list[float] = []
    samples: list[float] = []
    observes: list[float] = []

    async def run() -> None:
        for i in range(warmup + passes):
            t0 = time.perf_counter()
            assert await rig.sampler.tick() is not None
            elapsed = time.perf_counter() - t0
            rig.clock[0] += DEFAULT_INTERVAL
            if i >= warmup:
                ticks.append(elapsed)
                samples.append(split["sample"])
                observes.append(split["observe"])

    try:
        asyncio.run(run())
    finally:
        rig.backend.sample = sample  # type: ignore[method-assign]
        rig.engine.observe = observe  # type: ignore[method-assign]
    us = 1e6
    return {
        "backend": rig.label, "gpus": rig.gpus, "passes": passes,
        "tick_us_p50": round(us * statistics.median(ticks), 1), "tick_us_p99": round(us * pct(ticks, 0.99), 1),
        "sample_us_p50": round(us * statistics.median(samples), 1),
        "observe_us_p50": round(us * statistics.median(observes), 1),
        "observe_us_p99": round(us * pct(observes, 0.99), 1),
        "tick_us_per_gpu": round(us * statistics.median(ticks) / rig.gpus, 1),
        "observe_us_per_gpu": round(us * statistics.median(observes) / rig.gpus, 1),
    }


def loop_share(backend_name: str, scenario_path: str | None, ticks: int, interval: float) -> dict[str, Any]:
    """CPU time of the process over wall time while ``Sampler.run()`` ticks ``ticks`` times."""
    rig = build(backend_name, scenario_path, virtual=True)
    scale = interval / DEFAULT_INTERVAL

    async def run() -> tuple[float, float]:
        finished = asyncio.Event()
        count = 0
        real_tick = rig.sampler.tick

        async def counting_tick() -> Snapshot | None:
            nonlocal count
            snap = await real_tick()
            count += 1
            if count >= ticks:
                finished.set()
            return snap

        async def scaled_sleep(delay: float) -> None:
            rig.clock[0] += delay  # the virtual clock moves the full interval
            await asyncio.sleep(delay * scale)

        rig.sampler.tick = counting_tick  # type: ignore[method-assign]
        rig.sampler.sleep = scaled_sleep
        cpu0, wall0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(rig.sampler.run())
        await finished.wait()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return cpu, wall

    cpu, wall = asyncio.run(run())
    rig.sampler.close()
    per_tick = cpu / ticks
    return {"backend": rig.label, "gpus": rig.gpus, "ticks": ticks, "real_interval_s": interval,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 4), "cpu_ms_per_tick": round(1000 * per_tick, 3),
            "share_of_run": round(cpu / wall, 5), "share_at_5s": round(per_tick / DEFAULT_INTERVAL, 6)}


def table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    lines = [list(cols)] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--backend", choices=["simulated", "nvml"], default="simulated",
                    help="simulated (1 and 8 GPUs, no GPU needed) or nvml (the GPUs of this host)")
    ap.add_argument("--warmup", type=int, default=50, help="ticks before timing (default: 50)")
    ap.add_argument("--passes", type=int, default=500, help="timed ticks per scenario (default: 500)")
    ap.add_argument("--ticks", type=int, default=60, help="ticks of the CPU-share run (default: 60)")
    ap.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                    help="real seconds between ticks in the CPU-share run; below 5 the run is shortened and "
                         "scaled to 5 s (default: 5)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)
    configure_logging("json", "warning")
    scenarios: list[str | None] = [None, EIGHT_GPUS] if args.backend == "simulated" else [None]
    passes = [one_pass(build(args.backend, s, virtual=True), args.warmup, args.passes) for s in scenarios
              ] if args.passes else []
    shares = [loop_share(args.backend, scenarios[-1], args.ticks, args.interval)] if args.ticks else []
    if args.json:
        print(json.dumps({"passes": passes, "loop": shares}, indent=2))
        return 0
    if passes:
        print(f"one sampling pass (Sampler.tick), {args.passes} ticks after {args.warmup}, microseconds:")
        print(table(passes, ["backend", "gpus", "tick_us_p50", "tick_us_p99", "sample_us_p50", "observe_us_p50",
                             "observe_us_p99", "tick_us_per_gpu", "observe_us_per_gpu"]))
    if shares:
        print(f"the sampling loop's CPU share ({args.ticks} ticks, {args.interval:g} s real between ticks, "
              f"{DEFAULT_INTERVAL:g} s virtual):")
        print(table(shares, ["backend", "gpus", "ticks", "real_interval_s", "wall_s", "cpu_s", "cpu_ms_per_tick",
                             "share_of_run", "share_at_5s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
