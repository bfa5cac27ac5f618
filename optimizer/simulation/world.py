"""A deterministic model of GPUs and the VLM services on them, stepped in scenario time.

Each service runs batches back to back at the batch size it last polled. A batch needs
``base_mb + b * per_item_mb * (1 + jitter)`` plus fragmentation waste. Memory held stays held; what a
party asks for beyond it is served from the free memory, arriving memory (a co-tenant, a starting
service's weights) first, and whatever does not fit fails (:func:`~optimizer.simulation.physics.allocate`):

- a service whose batch does not fit loses it (an OOM): it reports it and, in ``oom_mode: recover``,
  goes on after ``oom_recovery_s`` with the batch size the reply carries; in ``oom_mode: crash`` its
  process dies and restarts after a Kubernetes-style back-off and ``restart_s`` of start-up;
- a co-tenant whose memory does not fit fails (counted) and retries after a back-off.

Every poll interval a service reports its telemetry and polls (adopting the batch size; a raised
``cleanup_epoch`` makes it empty its cache: its fragmentation waste is freed, at the cost of
``cleanup_stall_s`` without items). Throughput is ``b / (overhead_ms + b * item_ms)`` items per ms at
full clocks; a GPU above its slowdown temperature runs slower (:mod:`optimizer.simulation.physics`).

The same seed gives the same run: jitter comes from one ``random.Random(seed)``.

The world's records (a service's run, a co-tenant's, the trace, the limits) are
:mod:`optimizer.simulation.world_types`; what the oracle measures credit is :mod:`optimizer.simulation.world_oracle`;
what NVML would read of the world (its samples) is :mod:`optimizer.simulation.world_nvml`.
"""

from __future__ import annotations

import math
import random

from optimizer.simulation.physics import (
    BACKOFF_RESET_S,
    Demand,
    allocate,
    backoff_s,
    clock_fraction,
    compute_share,
    fits,
    temperature_c,
    throughput_per_ms,
)
from optimizer.simulation.scenario import Scenario
from optimizer.simulation.world_nvml import MIB, NvmlView
from optimizer.simulation.world_oracle import OracleView
from optimizer.simulation.world_types import BackgroundRun, GpuRun, Limits, ServiceLink, ServiceRun, Start, Trace

__all__ = ["Limits", "ServiceLink", "ServiceRun", "Start", "Trace", "World", "throughput_per_ms"]


class World(OracleView, NvmlView):
    def __init__(self, scenario: Scenario, *, initial_batch: int = 1, limits: Limits | None = None,
                 poll_interval: float = 5.0) -> None:
        self.scenario = scenario
        self.limits = limits or Limits()
        self.poll_interval = poll_interval
        self.t = 0.0
        self.rng = random.Random(scenario.seed)
        self.runs = [ServiceRun(spec=s, batch=initial_batch, next_poll=s.start_s, start_at=s.start_s)
                     for s in scenario.services]
        self.backgrounds = [BackgroundRun(spec=b) for b in scenario.background]
        self.gpu_runs = {g.index: GpuRun() for g in scenario.gpus}
        self.used_mb = {g.index: 0.0 for g in scenario.gpus}
        self.util = {g.index: 0.0 for g in scenario.gpus}
        self.temperature = {g.index: g.idle_temperature_c for g in scenario.gpus}
        self.clock = {g.index: 1.0 for g in scenario.gpus}
        self.trace: Trace | None = None

    def record(self) -> Trace:
        """Start recording memory used per GPU and OOMs at every step (unbounded: for finite runs only)."""
        self.trace = Trace(used_mb={g.index: [] for g in self.scenario.gpus})
        return self.trace

    # ------------------------------------------------------------------ the world's physics

    def _productive(self, r: ServiceRun, t: float, dt: float) -> float:
        """The fraction of the step ``[t, t + dt)`` the service runs batches in."""
        if t < r.loaded_at - 1e-9:
            return 0.0
        return max(0.0, min(1.0, (t + dt - max(t, r.busy_until)) / dt))

    def _weights(self, r: ServiceRun, t: float, dt: float) -> float:
        """What the service holds besides its batch in the step at ``t``: its weights, rising while they load."""
        full = r.pool_mb if r.pool_mb is not None else self._base(r)
        if t >= r.loaded_at - 1e-9 or r.spec.load_s <= 0:
            return full
        return full * min(1.0, (t + dt - r.up_since) / r.spec.load_s)

    def _step(self, t: float, dt: float, link: ServiceLink | None) -> None:
        for gpu in self.scenario.gpus:
            runs = [r for r in self.runs if r.spec.gpu == gpu.index and r.alive]
            bgs = [b for b in self.backgrounds if b.spec.gpu == gpu.index]
            demands: list[Demand] = []
            alloc: dict[str, float] = {}
            need_act: dict[str, float] = {}
            running: dict[str, int] = {}
            productive: dict[str, float] = {}
            fresh: dict[str, bool] = {}
            held_before: dict[str, float] = {}
            for r in runs:
                name = r.spec.name
                jitter = self.rng.uniform(-r.spec.noise, r.spec.noise) if r.spec.noise else 0.0
                per_item = r.spec.per_item_at(t) * (1 + jitter)
                base = self._base(r)
                productive[name] = self._productive(r, t, dt)
                weights = self._weights(r, t, dt)
                if productive[name] <= 0:
                    n, act = 0, 0.0
                elif r.pool_mb is not None:  # a static pool: as many items as fit in it run
                    n, act = min(r.batch, fits(r.pool_mb - base, per_item, r.batch)), 0.0
                else:
                    n = r.batch
                    act = n * per_item
                running[name] = n
                alloc[name] = base + (n * per_item if r.pool_mb is not None else act)
                need_act[name] = act / (1 - r.fragmentation)
                fresh[name] = r.held_base_mb == 0 or t < r.loaded_at - 1e-9  # still loading its weights
                held_before[name] = r.held_base_mb
                demands.append(Demand(f"s:{name}:base", r.held_base_mb, weights, arriving=fresh[name]))
                demands.append(Demand(f"s:{name}:act", r.held_act_mb, need_act[name], arriving=False,
                                      needs=f"s:{name}:base"))
                r.held_base_mb = weights
            wants = [b.wants(t) for b in bgs]
            for i, b in enumerate(bgs):
                demands.append(Demand(f"b:{i}", b.held_mb, wants[i], arriving=True))
            failed = set(allocate(gpu.total_mb, demands))
            for i, b in enumerate(bgs):
                if f"b:{i}" in failed:
                    self.gpu_runs[gpu.index].cotenant_failures += 1
                    if self.trace is not None:
                        self.trace.cotenant_failures.append((t, gpu.index))
                    b.failed(t, dt)
                    b.held_mb = 0.0
                else:
                    if b.held_mb == 0 and wants[i] > 0:
                        b.up_since = t
                    b.held_mb = wants[i]
            lost: set[str] = set()
            for r in runs:
                name = r.spec.name
                base_failed = f"s:{name}:base" in failed
                if not base_failed and f"s:{name}:act" not in failed:
                    r.held_act_mb = need_act[name]
                    continue
                lost.add(name)
                if base_failed:  # what it held stays; what it asked for more (a leak's growth) it did not get
                    r.held_base_mb = min(held_before[name], r.held_base_mb)
                self._oom(r, t, dt, link, gpu.index, start_failed=base_failed and fresh[name])
                alloc[name] = self._base(r) if r.alive else 0.0
            used = sum(b.held_mb for b in bgs) + sum(r.held_base_mb + r.held_act_mb for r in runs)
            self.used_mb[gpu.index] = used
            if self.trace is not None:
                self.trace.used_mb[gpu.index].append((t, used))
            self._account(gpu.index, t, dt, runs, running, productive, lost, alloc, used)

    def _oom(self, r: ServiceRun, t: float, dt: float, link: ServiceLink | None, gpu: int, *,
             start_failed: bool) -> None:
        """``r``'s batch did not fit: it loses it, reports it, and recovers or (crash mode) restarts."""
        r.ooms += 1
        if self.trace is not None:
            self.trace.ooms.append((t, gpu, r.spec.name))
        crash = start_failed or self.scenario.oom_mode == "crash"
        if link is not None and not start_failed:  # a process that could not load its model reports nothing
            new = link.report(r.spec.name, gpu, t, batch_size=r.batch, peak_bytes=None, allocated_bytes=None,
                              reserved_bytes=None, oom=True)
            if not crash:
                self._adopt(r, new, t)
        r.held_act_mb = 0.0
        if crash:
            self._crash(r, t, dt)
        else:
            r.busy_until = t + dt + self.scenario.oom_recovery_s

    def _crash(self, r: ServiceRun, t: float, dt: float) -> None:
        """The process dies: it holds nothing and is restarted after the back-off and its start-up time."""
        if t - r.up_since >= BACKOFF_RESET_S:
            r.failures = 0
        r.failures += 1
        r.alive = False
        r.held_base_mb = r.held_act_mb = 0.0
        r.pool_mb = None
        r.restarts += 1
        r.start_at = t + dt + backoff_s(r.failures) + self.scenario.restart_s

    def _account(self, gpu_index: int, t: float, dt: float, runs: list[ServiceRun], running: dict[str, int],
                 productive: dict[str, float], lost: set[str], alloc: dict[str, float], used: float) -> None:
        gpu = self.scenario.gpu(gpu_index)
        thermal = self._thermal(gpu_index, t)
        busy = sum(compute_share(running[r.spec.name], r.spec) * productive[r.spec.name] for r in runs
                   if r.spec.name not in lost)
        util = min(1.0, busy)
        clock = clock_fraction(gpu, util, thermal)
        self.util[gpu_index] = 100.0 * util
        self.clock[gpu_index] = clock
        self.temperature[gpu_index] = temperature_c(gpu, util, thermal, clock)
        if clock < 1.0:
            self.gpu_runs[gpu_index].seconds_throttled += dt
        safe_total = self.limits.safe_bound_mb(gpu.total_mb)
        if used > safe_total:
            self.gpu_runs[gpu_index].seconds_above_bound += dt
        started = self._started(gpu_index, t)
        running = {**{r.spec.name: 0 for r in started}, **running}
        productive = {**{r.spec.name: 0.0 for r in started}, **productive}
        background = self._scheduled(gpu_index, t) + self._loading(gpu_index, t)
        # The ceilings: the largest batches that fit what is there now, as if cleanups were free.
        oracle = self._oracle(started, gpu.total_mb, background, t, fragmentation=0.0)
        safe = self._oracle(started, safe_total, background, t, fragmentation=0.0)
        step_ms = dt * 1000
        for ideal, attr in ((oracle, "oracle_items"), (safe, "safe_oracle_items")):
            share = min(1.0, sum(compute_share(ideal[r.spec.name], r.spec) for r in started))
            ideal_clock = clock_fraction(gpu, share, thermal)
            for r in started:
                setattr(r, attr, getattr(r, attr) + throughput_per_ms(ideal[r.spec.name], r.spec) * ideal_clock * step_ms)
        for r in started:
            if used >= gpu.total_mb * self.limits.critical_fraction:
                r.seconds_above_critical += dt
            if not r.alive:
                r.seconds_down += dt
                continue
            name = r.spec.name
            part = 0.0 if name in lost else productive[name]
            r.items += throughput_per_ms(running[name], r.spec) * clock * step_ms * part
            r.seconds_down += dt * (1 - part)
            r.allocated_mb = self._base(r)
            r.reserved_mb = r.held_base_mb + r.held_act_mb
            r.waste_mb = max(0.0, r.held_act_mb - (alloc[name] - self._base(r))) if r.pool_mb is None else 0.0
            if part > 0 and running[name] > 0:  # a batch ran: a PyTorch service measures it (and reports it)
                r.peak_mb = max(r.peak_mb, alloc[name])
            if r.pool_mb is None:  # a static pool (paged memory) does not fragment
                r.fragmentation = min(0.9, r.fragmentation + r.spec.fragmentation_growth_per_min * dt / 60)
            r.leak_mb += r.spec.leak_mb_per_min * dt / 60

    def _adopt(self, run: ServiceRun, batch: int, t: float) -> None:
        if batch != run.batch:
            run.batch = batch
            run.batches.append((t, batch))
            run.peak_mb = 0.0  # the client reports the peak at its latest batch size only (client/telemetry.py)

    def _start(self, r: ServiceRun, t: float, link: ServiceLink) -> None:
        """A service process starts (or restarts): it holds nothing yet and polls before it runs."""
        gpu = self.scenario.gpu(r.spec.gpu)
        start = link.started(r.spec.name, r.spec.gpu, t, free_mb=gpu.total_mb - self.used_mb[r.spec.gpu],
                             total_mb=gpu.total_mb)
        if start is not None and start.failed:
            self._crash(r, t, 0.0)
            return
        r.alive = True
        r.start_at = None
        r.up_since = t
        r.loaded_at = t + r.spec.load_s
        r.leak_mb = 0.0
        r.fragmentation = 0.0
        r.busy_until = float("-inf")
        r.pool_mb = start.pool_mb if start is not None else None
        r.held_base_mb = r.held_act_mb = 0.0
        r.peak_mb = 0.0
        r.next_poll = t

    def _poll(self, t: float, link: ServiceLink) -> None:
        for r in self.runs:
            if r.start_at is not None and t >= r.start_at - 1e-9:
                self._start(r, t, link)
            if not r.alive or t < r.next_poll - 1e-9:
                continue
            r.next_poll = t + self.poll_interval
            name, gpu = r.spec.name, r.spec.gpu
            if r.peak_mb > 0:
                link.report(name, gpu, t, batch_size=r.batch, peak_bytes=int(r.peak_mb * MIB),
                            allocated_bytes=int(r.allocated_mb * MIB), reserved_bytes=int(r.reserved_mb * MIB),
                            oom=False, inactive_split_bytes=int(r.waste_mb * MIB))
                r.peak_mb = 0.0
            batch, epoch = link.poll(name, gpu, t)
            if epoch > r.epoch:
                r.epoch = epoch
                r.fragmentation = 0.0  # gc + empty the allocator cache frees the waste ...
                r.cleanups += 1
                r.busy_until = max(r.busy_until, t + self.scenario.cleanup_stall_s)  # ... and costs a stall
            if not r.batches:
                r.batches.append((t, batch))
                r.batch = batch
            else:
                self._adopt(r, batch, t)

    def advance_to(self, t_end: float, link: ServiceLink | None) -> None:
        """Run the world until scenario time ``t_end`` (whole steps only).

        Without a link the services start with their initial batch, never poll and never report.
        """
        dt = self.scenario.step_s
        while self.t + dt <= t_end + 1e-9:
            if link is not None:
                self._poll(self.t, link)
            else:
                for r in self.runs:
                    if r.start_at is not None and self.t >= r.start_at - 1e-9:
                        r.alive, r.start_at, r.up_since, r.loaded_at = True, None, self.t, self.t + r.spec.load_s
            self._step(self.t, dt, link)
            self.t = round(self.t + dt, 9)
