"""A deterministic model of GPUs and the VLM services on them, stepped in scenario time.

Each service runs batches back to back at the batch size it last polled. A batch needs
``base_mb + b * per_item_mb * (1 + jitter)`` plus fragmentation waste; with the other tenants'
memory, above the GPU's total it is an OOM: the batch is lost, the service reports it and goes on
with the batch size the reply carries. Every poll interval a service polls (adopting the batch
size and acting on a raised ``cleanup_epoch``: its fragmentation waste is freed) and reports its
telemetry. Throughput is ``b / (overhead_ms + b * item_ms)`` items per ms.

The same seed gives the same run: jitter comes from one ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from optimizer.gpu.types import GpuProcess, GpuSample
from optimizer.simulation.scenario import Scenario, SimService

MIB = 1024 * 1024


class ServiceLink(Protocol):
    """How simulated services reach the optimizer (in process; an HTTP client would do the same)."""

    def poll(self, service: str, gpu: int, t: float) -> tuple[int, int]:
        """Return (batch size, cleanup epoch) for the service at scenario time ``t``."""
        ...

    def report(self, service: str, gpu: int, t: float, *, batch_size: int, peak_bytes: int | None,
               allocated_bytes: int | None, reserved_bytes: int | None, oom: bool) -> int:
        """Send telemetry; return the batch size the reply carries."""
        ...


@dataclass
class ServiceRun:
    spec: SimService
    batch: int
    epoch: int = 0
    fragmentation: float = 0.0
    next_poll: float = 0.0
    items: float = 0.0
    oracle_items: float = 0.0
    safe_oracle_items: float = 0.0
    ooms: int = 0
    batch_changes: int = 0
    seconds_above_critical: float = 0.0
    allocated_mb: float = 0.0
    reserved_mb: float = 0.0
    peak_mb: float = 0.0  # since the last report
    batches: list[tuple[float, int]] = field(default_factory=list)  # (t, batch) at every change


def throughput_per_ms(b: int, spec: SimService) -> float:
    return b / (spec.overhead_ms + b * spec.item_ms) if b > 0 else 0.0


@dataclass
class Trace:
    """What a run looked like over time, for plots (recorded only when asked: ``World.record()``).

    ``used_mb`` holds, per GPU index, ``(t, used)`` after every step: scenario seconds and MiB.
    ``ooms`` holds ``(t, gpu, service)`` for every batch lost to an OOM.
    """

    used_mb: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    ooms: list[tuple[float, int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """What the oracle measures need from the settings."""

    max_batch_size: int = 16
    safe_fraction: float = 0.95
    reserve_mb: float = 1024.0
    critical_fraction: float = 0.9


class World:
    def __init__(self, scenario: Scenario, *, initial_batch: int = 1, limits: Limits | None = None,
                 poll_interval: float = 5.0) -> None:
        self.scenario = scenario
        self.limits = limits or Limits()
        self.poll_interval = poll_interval
        self.t = 0.0
        self.rng = random.Random(scenario.seed)
        self.runs = [ServiceRun(spec=s, batch=initial_batch, next_poll=s.start_s) for s in scenario.services]
        self.used_mb = {g.index: 0.0 for g in scenario.gpus}
        self.util = {g.index: 0.0 for g in scenario.gpus}
        self.trace: Trace | None = None

    def record(self) -> Trace:
        """Start recording memory used per GPU and OOMs at every step (unbounded: for finite runs only)."""
        self.trace = Trace(used_mb={g.index: [] for g in self.scenario.gpus})
        return self.trace

    # ------------------------------------------------------------------ the world's physics

    def _background(self, gpu: int, t: float) -> float:
        return sum(b.level(t) for b in self.scenario.background if b.gpu == gpu)

    def _thermal(self, gpu: int, t: float) -> float:
        return sum(x.level(t) for x in self.scenario.thermal if x.gpu == gpu)

    def _oracle(self, runs: list[ServiceRun], total_mb: float, background: float,
                fragmentation: float | None = None) -> dict[str, int]:
        """Largest batch per service that fits ``total_mb`` with the jitter at its worst (shared by weight).

        ``fragmentation`` (a fraction) replaces every service's own when given.
        """
        avail = total_mb - background - sum(r.spec.base_mb for r in runs)
        weights = sum(r.spec.weight for r in runs)
        out = {}
        for r in runs:
            frag = r.fragmentation if fragmentation is None else fragmentation
            worst_item = r.spec.per_item_mb * (1 + r.spec.noise) / (1 - frag)
            b = math.floor(avail * r.spec.weight / weights / worst_item) if avail > 0 else 0
            out[r.spec.name] = max(0, min(self.limits.max_batch_size, b))
        return out

    def oracle_batch(self, service: str, gpu: int, t: float, *, fragmentation: float | None = None) -> int:
        """The batch the ``oracle_items`` measure credits ``service`` with in the step starting at ``t``.

        The same computation as the measure (the GPU's total memory, the other tenants' memory at
        ``t``, the services started by ``t``); ``fragmentation`` as in :meth:`_oracle`.
        """
        g = self.scenario.gpu(gpu)
        runs = [r for r in self.runs if r.spec.gpu == gpu and t >= r.spec.start_s]
        return self._oracle(runs, g.total_mb, self._background(gpu, t), fragmentation).get(service, 0)

    def _step(self, t: float, dt: float, link: ServiceLink | None) -> None:
        for gpu in self.scenario.gpus:
            runs = [r for r in self.runs if r.spec.gpu == gpu.index and t >= r.spec.start_s]
            bg = self._background(gpu.index, t)
            need: dict[str, float] = {}
            alloc: dict[str, float] = {}
            for r in runs:
                jitter = self.rng.uniform(-r.spec.noise, r.spec.noise) if r.spec.noise else 0.0
                act = r.batch * r.spec.per_item_mb * (1 + jitter)
                alloc[r.spec.name] = r.spec.base_mb + act
                need[r.spec.name] = r.spec.base_mb + act / (1 - r.fragmentation)
            failed: set[str] = set()
            while bg + sum(need.values()) > gpu.total_mb:
                victims = [r for r in runs if r.spec.name not in failed]
                if not victims:
                    break
                victim = max(victims, key=lambda r: (need[r.spec.name] - r.spec.base_mb, r.spec.name))
                name = victim.spec.name
                failed.add(name)
                need[name] = alloc[name] = victim.spec.base_mb
                victim.ooms += 1
                if self.trace is not None:
                    self.trace.ooms.append((t, gpu.index, name))
                if link is not None:
                    new = link.report(name, gpu.index, t, batch_size=victim.batch, peak_bytes=None,
                                      allocated_bytes=None, reserved_bytes=None, oom=True)
                    self._adopt(victim, new, t)
            used = bg + sum(need.values())
            self.used_mb[gpu.index] = used
            if self.trace is not None:
                self.trace.used_mb[gpu.index].append((t, used))
            busy = 0.0
            oracle = self._oracle(runs, gpu.total_mb, bg)
            safe_total = gpu.total_mb * self.limits.safe_fraction - self.limits.reserve_mb
            safe = self._oracle(runs, safe_total, bg)
            for r in runs:
                name = r.spec.name
                if name not in failed:
                    r.items += throughput_per_ms(r.batch, r.spec) * dt * 1000
                    busy += r.batch * r.spec.item_ms / (r.spec.overhead_ms + r.batch * r.spec.item_ms)
                r.oracle_items += throughput_per_ms(oracle[name], r.spec) * dt * 1000
                r.safe_oracle_items += throughput_per_ms(safe[name], r.spec) * dt * 1000
                r.allocated_mb = alloc[name]
                r.reserved_mb = need[name]
                r.peak_mb = max(r.peak_mb, alloc[name])
                if used >= gpu.total_mb * self.limits.critical_fraction:
                    r.seconds_above_critical += dt
                r.fragmentation = min(0.9, r.fragmentation + r.spec.fragmentation_growth_per_min * dt / 60)
            self.util[gpu.index] = min(100.0, 100.0 * busy)

    def _adopt(self, run: ServiceRun, batch: int, t: float) -> None:
        if batch != run.batch:
            run.batch = batch
            run.batch_changes += 1
            run.batches.append((t, batch))

    def _poll(self, t: float, link: ServiceLink) -> None:
        for r in self.runs:
            if t < r.next_poll:
                continue
            r.next_poll = t + self.poll_interval
            name, gpu = r.spec.name, r.spec.gpu
            if r.peak_mb > 0:
                link.report(name, gpu, t, batch_size=r.batch, peak_bytes=int(r.peak_mb * MIB),
                            allocated_bytes=int(r.allocated_mb * MIB), reserved_bytes=int(r.reserved_mb * MIB),
                            oom=False)
                r.peak_mb = 0.0
            batch, epoch = link.poll(name, gpu, t)
            if epoch > r.epoch:
                r.epoch = epoch
                r.fragmentation = 0.0  # gc + empty the allocator cache frees the waste
            if not r.batches:
                r.batches.append((t, batch))
                r.batch = batch
            else:
                self._adopt(r, batch, t)

    def advance_to(self, t_end: float, link: ServiceLink | None) -> None:
        """Run the world until scenario time ``t_end`` (whole steps only)."""
        dt = self.scenario.step_s
        if link is not None and self.t == 0.0:
            self._poll(0.0, link)
        while self.t + dt <= t_end + 1e-9:
            self._step(self.t, dt, link)
            self.t = round(self.t + dt, 9)
            if link is not None:
                self._poll(self.t, link)

    # ------------------------------------------------------------------ what NVML would read

    def sample(self, timestamp: float) -> list[GpuSample]:
        out = []
        for gpu in self.scenario.gpus:
            total = int(gpu.total_mb * MIB)
            used = min(total, int(self.used_mb[gpu.index] * MIB))
            util = self.util[gpu.index]
            temp = gpu.idle_temperature_c + gpu.load_temperature_rise_c * util / 100 + self._thermal(gpu.index, self.t)
            procs = tuple(
                GpuProcess(pid=10_000 + i, used_memory_bytes=int(r.reserved_mb * MIB))
                for i, r in enumerate(self.runs) if r.spec.gpu == gpu.index and self.t >= r.spec.start_s
            )
            out.append(GpuSample(
                index=gpu.index,
                uuid=gpu.uuid or f"GPU-sim-{self.scenario.seed:04d}-{gpu.index:04d}",
                name=gpu.name,
                timestamp=timestamp,
                memory_total_bytes=total,
                memory_used_bytes=used,
                memory_free_bytes=total - used,
                memory_reserved_bytes=0,
                temperature_celsius=round(temp, 1),
                power_usage_watts=round(gpu.power_limit_w * (0.2 + 0.8 * util / 100), 1),
                power_limit_watts=gpu.power_limit_w,
                utilization_percent=round(util, 1),
                processes=procs,
            ))
        return out
