"""The worker count ``GET /workers`` serves: ``min(cores*2 + 1, floor(total VRAM / one worker's typical use))``.

A pure function of three numbers. The client distribution has the same formula
(``vlm_optimizer_client.workers``, which a service runs before it can ask anyone, with the
``VLM_OPTIMIZER_WORKERS`` override); the server keeps this copy so that it never imports the client
(docs/architecture.md, "The client"), and tests/test_workers_endpoint.py checks the two agree.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers to start, and why (the body of ``GET /workers``, less its ``gpu``).

    ``cpu_workers``: ``cores * 2 + 1``; ``vram_workers``: ``floor(total_vram_mb / gpu_mem_typ_mb)``,
    ``None`` when not GPU-bound; ``source``: always ``"computed"`` (the server reads no override).
    """

    workers: int
    cpu_workers: int
    vram_workers: int | None
    cores: int
    source: str = "computed"

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "cpu_workers": self.cpu_workers, "vram_workers": self.vram_workers,
                "source": self.source, "cores": self.cores}


def default_cores() -> int:
    """The CPUs this process may run on (affinity) where the OS says, else ``os.cpu_count()``."""
    sched_getaffinity = getattr(os, "sched_getaffinity", None)
    if sched_getaffinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def plan_workers(cores: int, total_vram_mb: float | None, gpu_mem_typ_mb: float) -> WorkerPlan:
    """``min(cores*2 + 1, floor(total_vram_mb / gpu_mem_typ_mb))``, at least 1; CPU-only without a GPU
    figure or with ``gpu_mem_typ_mb <= 0``. The caller has checked its inputs (the route's parsing)."""
    cpu_workers = cores * 2 + 1
    vram_workers: int | None = None
    if total_vram_mb is not None and math.isfinite(gpu_mem_typ_mb) and gpu_mem_typ_mb > 0:
        vram_workers = math.floor(total_vram_mb / gpu_mem_typ_mb)
    workers = cpu_workers if vram_workers is None else min(cpu_workers, vram_workers)
    return WorkerPlan(max(1, workers), cpu_workers, vram_workers, cores)
