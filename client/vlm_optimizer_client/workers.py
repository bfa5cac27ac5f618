"""How many workers a pre-forked VLM server should start: ``min(cores*2 + 1, total_vram / typical_use)``.

The optimizer serves the same figure for the GPU it sees (``GET /workers``, computed by its own copy
of this formula in ``optimizer/workers.py``: docs/architecture.md says why there are two). This one
runs in the service, before it can ask anyone, and honours ``VLM_OPTIMIZER_WORKERS``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vlm_optimizer_client import validate

__all__ = ["WORKERS_ENV", "WorkerPlan", "plan_workers", "worker_count"]

log = logging.getLogger("vlm_optimizer_client")

WORKERS_ENV = "VLM_OPTIMIZER_WORKERS"
"""Environment variable that overrides the computed worker count (a positive integer)."""


@dataclass(frozen=True)
class WorkerPlan:
    """How many server workers to start, and why.

    Attributes:
        workers: the number to start (>= 1).
        cpu_workers: ``cores * 2 + 1``.
        vram_workers: ``floor(total_vram_mb / gpu_mem_typ_mb)``, None when not GPU-bound.
        source: ``"env"`` when ``VLM_OPTIMIZER_WORKERS`` decided, else ``"computed"``.
        cores: the CPU count used.
    """

    workers: int
    cpu_workers: int
    vram_workers: int | None
    source: Literal["env", "computed"]
    cores: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``GET /workers`` serialises)."""
        return {"workers": self.workers, "cpu_workers": self.cpu_workers,
                "vram_workers": self.vram_workers, "source": self.source, "cores": self.cores}


def _default_cores() -> int:
    # The CPUs this process may run on (affinity, e.g. taskset/cpusets) where the OS says; cgroup
    # CPU quotas are not seen by either call.
    sched_getaffinity = getattr(os, "sched_getaffinity", None)
    if sched_getaffinity is not None:
        with contextlib.suppress(OSError):
            return max(1, len(sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _env_workers(environ: Mapping[str, str]) -> int | None:
    raw = environ.get(WORKERS_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        validate.fail(WORKERS_ENV, "a positive integer", raw)
    return value


def plan_workers(cores: int | None = None, total_vram_mb: float | None = None, gpu_mem_typ_mb: float = 0,
                 environ: Mapping[str, str] | None = None) -> WorkerPlan:
    """Plan the worker count: ``min(cores*2 + 1, floor(total_vram_mb / gpu_mem_typ_mb))``, at least 1.

    CPU-only (``cores*2 + 1``) when ``total_vram_mb`` is None or ``gpu_mem_typ_mb <= 0``.
    ``VLM_OPTIMIZER_WORKERS`` in ``environ`` (default ``os.environ``), when set and not blank,
    decides instead; the computed figures are still reported.

    Args:
        cores: CPU count (default: the CPUs this process may use, else ``os.cpu_count()``).
        total_vram_mb: the GPU's total memory, in MB (MiB).
        gpu_mem_typ_mb: typical memory of one worker, in MB (MiB).
        environ: the environment to read.

    Raises:
        ValueError: ``VLM_OPTIMIZER_WORKERS`` is not a positive integer (the message names it);
            ``cores`` < 1; ``total_vram_mb`` negative or not finite.
    """
    if cores is None:
        cores = _default_cores()
    validate.integer("cores", cores, 1)
    if total_vram_mb is not None:
        validate.number("total_vram_mb", total_vram_mb, "a finite number >= 0", lo=0.0)
    cpu_workers = cores * 2 + 1
    vram_workers: int | None = None
    if total_vram_mb is not None and math.isfinite(gpu_mem_typ_mb) and gpu_mem_typ_mb > 0:
        vram_workers = math.floor(total_vram_mb / gpu_mem_typ_mb)
        if vram_workers < 1:
            log.warning("one worker's typical use (%s MB) exceeds the GPU's %s MB; starting 1 worker",
                        gpu_mem_typ_mb, total_vram_mb)
    env = _env_workers(os.environ if environ is None else environ)
    if env is not None:
        return WorkerPlan(env, cpu_workers, vram_workers, "env", cores)
    workers = cpu_workers if vram_workers is None else min(cpu_workers, vram_workers)
    return WorkerPlan(max(1, workers), cpu_workers, vram_workers, "computed", cores)


def worker_count(cores: int | None = None, total_vram_mb: float | None = None, gpu_mem_typ_mb: float = 0,
                 environ: Mapping[str, str] | None = None) -> int:
    """The number of workers of :func:`plan_workers` (same arguments, same errors)."""
    return plan_workers(cores, total_vram_mb, gpu_mem_typ_mb, environ).workers
