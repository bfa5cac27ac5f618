"""Admission control for VLM services: VRAM checks, memory profiles, worker counts, concurrency limits.

The pieces follow the CLAMS SDK's GPU memory management and the "retry signal + semaphores per kind
of work" pattern:

- :class:`VRAMProfiles` remembers, per parameter set, the peak GPU memory of previous runs, under
  ``$XDG_CACHE_HOME/vlm-gpu-optimizer/memory_profiles/<app_id>/<sha256>.txt`` (one integer, bytes);
- :func:`check_vram` and :class:`VRAMGuard` refuse work that would not fit with
  :class:`InsufficientVRAMError`, and :func:`vram_middleware` turns that refusal into
  ``503 Service Unavailable`` with ``Retry-After`` in an aiohttp service;
- :func:`plan_workers` / :func:`worker_count` size a pre-forked server (``min(cores*2+1,
  total_vram / typical_use)``, overridden by ``VLM_OPTIMIZER_WORKERS``);
- :func:`hw_summary` and friends format the ``hwFetch``-style one-liner;
- :class:`ConcurrencyLimits` caps concurrent work per kind (``{"extraction": 4, "classification": 1}``)
  for coroutines and threads alike.

Units: memory is in bytes unless a name ends in ``_mb`` (mebibytes, 2**20 bytes, which is what
``nvidia-smi`` and CLAMS call "MB"); times are in seconds.

Nothing here imports the optimizer's server side, pynvml, kubernetes or prometheus_client. aiohttp is
imported only by :func:`vram_middleware`; PyTorch is never imported: the ``*_torch`` defaults use it when
the service has loaded it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import types
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optimizer.client.oom import loaded_torch

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

__all__ = [
    "DEFAULT_FIRST_RUN_SHARE",
    "DEFAULT_HEADROOM",
    "DEFAULT_RETRY_AFTER_S",
    "MIB",
    "WORKERS_ENV",
    "Admission",
    "ConcurrencyLimits",
    "InsufficientVRAMError",
    "VRAMGuard",
    "VRAMProfiles",
    "WorkerPlan",
    "check_vram",
    "hw_summary",
    "hw_summary_from_decision",
    "hw_summary_from_torch",
    "plan_workers",
    "torch_available_bytes",
    "torch_peak_bytes",
    "torch_total_bytes",
    "vram_middleware",
    "worker_count",
]

log = logging.getLogger("optimizer.client")

MIB = 1024**2
"""Bytes in the "MB" of ``nvidia-smi``, CLAMS's ``gpu_mem_typ`` and :func:`hw_summary`."""
DEFAULT_RETRY_AFTER_S = 10.0
"""Seconds a refused caller is told to wait before retrying."""
DEFAULT_FIRST_RUN_SHARE = 0.8
"""Share of the GPU's total memory a parameter set with no profile yet is assumed to need."""
DEFAULT_HEADROOM = 1.2
"""Factor applied to a profile's recorded peak to get the estimate (20% buffer)."""
WORKERS_ENV = "VLM_OPTIMIZER_WORKERS"
"""Environment variable that overrides the computed worker count (a positive integer)."""
PROFILE_NAMESPACE = ("vlm-gpu-optimizer", "memory_profiles")


# --------------------------------------------------------------------------------------------------
# The refusal


class InsufficientVRAMError(RuntimeError):
    """Raised when a piece of work needs more GPU memory than is available now.

    Attributes:
        required_bytes: what the work is estimated to need, in bytes.
        available_bytes: what was available when checked, in bytes.
        retry_after_s: seconds after which a retry is worth trying (``Retry-After``).
    """

    def __init__(self, required_bytes: int, available_bytes: int,
                 retry_after_s: float = DEFAULT_RETRY_AFTER_S, message: str | None = None) -> None:
        if message is None:
            message = (f"insufficient GPU memory: {required_bytes // MIB} MB required, "
                       f"{available_bytes // MIB} MB available; retry after {retry_after_s:g} s")
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.retry_after_s = float(retry_after_s)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the figures across pickling (multiprocessing, executors): the default would call
        # ``cls(message)`` and fail on the missing arguments.
        return (type(self), (self.required_bytes, self.available_bytes, self.retry_after_s, str(self)))


def _check_bytes(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value}")
    return value


def _check_retry_after(retry_after_s: float) -> float:
    if not math.isfinite(retry_after_s) or retry_after_s < 0:
        raise ValueError(f"retry_after_s must be a finite number of seconds >= 0, got {retry_after_s!r}")
    return float(retry_after_s)


def check_vram(required_bytes: int, available_bytes: int,
               retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
    """Refuse work that needs more GPU memory than is available.

    Args:
        required_bytes: estimated need, in bytes.
        available_bytes: free memory now, in bytes.
        retry_after_s: seconds to put in the error's ``retry_after_s``.

    Raises:
        InsufficientVRAMError: when ``required_bytes > available_bytes``.
        ValueError: a negative figure or a negative/non-finite ``retry_after_s``.
        TypeError: a figure that is not an int.
    """
    _check_bytes("required_bytes", required_bytes)
    _check_bytes("available_bytes", available_bytes)
    retry_after_s = _check_retry_after(retry_after_s)
    if required_bytes > available_bytes:
        log.info("vram refused: %d MB required, %d MB available",
                 required_bytes // MIB, available_bytes // MIB)
        raise InsufficientVRAMError(required_bytes, available_bytes, retry_after_s)


# --------------------------------------------------------------------------------------------------
# PyTorch defaults (only when torch and CUDA are present)


def _torch_cuda() -> Any | None:
    """``torch.cuda`` when the service has loaded PyTorch and a CUDA device is usable, else None.

    PyTorch is never imported here (as in :func:`optimizer.client.oom.loaded_torch`): the guard runs
    on the request path, where a first ``import torch`` would block the event loop for a second or more,
    and a process that did not import it has no CUDA memory of its own to measure.
    """
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        return cuda if cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken driver means "cannot measure", not a crash
        log.info("torch.cuda unusable", exc_info=True)
        return None


def torch_available_bytes(device: int | None = None) -> int | None:
    """Bytes this process could allocate now on ``device`` (None: the current device).

    That is the driver's free memory (``torch.cuda.mem_get_info()[0]``) plus what PyTorch's caching
    allocator holds but does not use (``memory_reserved - memory_allocated``), which the process can
    reuse without asking the driver. None unless the service loaded PyTorch and CUDA is usable.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    free, _total = cuda.mem_get_info(device)
    cached = max(0, int(cuda.memory_reserved(device)) - int(cuda.memory_allocated(device)))
    return int(free) + cached


def torch_total_bytes(device: int | None = None) -> int | None:
    """Total bytes of ``device`` (``torch.cuda.mem_get_info()[1]``); None unless the service loaded PyTorch
    and CUDA is usable."""
    cuda = _torch_cuda()
    if cuda is None:
        return None
    return int(cuda.mem_get_info(device)[1])


def torch_peak_bytes(device: int | None = None) -> int | None:
    """Peak bytes PyTorch allocated on ``device`` (``torch.cuda.max_memory_allocated``).

    This is the peak since the process started or since the last
    ``torch.cuda.reset_peak_memory_stats`` (this module never resets it: other code may rely on it).
    Only PyTorch allocations are seen. None unless the service loaded PyTorch and CUDA is usable.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    return int(cuda.max_memory_allocated(device))


# --------------------------------------------------------------------------------------------------
# Memory profiles


def _cache_home(environ: Mapping[str, str]) -> Path:
    """``$XDG_CACHE_HOME``, or ``~/.cache`` when it is unset, empty or relative (XDG base dir spec)."""
    value = environ.get("XDG_CACHE_HOME", "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / ".cache"


def _check_app_id(app_id: str) -> str:
    if not isinstance(app_id, str) or not app_id or app_id in (".", "..") \
            or any(c in app_id for c in "/\\\0") or app_id != app_id.strip():
        raise ValueError(f"app_id must be a non-empty file name (no slashes, not '.' or '..'), got {app_id!r}")
    return app_id


class VRAMProfiles:
    """Peak GPU memory of previous runs, per parameter set, on disk.

    Files: ``<cache>/vlm-gpu-optimizer/memory_profiles/<app_id>/<key>.txt`` where ``<cache>`` is
    ``cache_dir`` when given, else ``$XDG_CACHE_HOME`` (``~/.cache`` when unset), ``<key>`` is
    :meth:`key` of the parameters, and the file holds one integer: the peak in bytes.

    Reading never raises: a missing, unreadable or corrupt file means "no profile" (the last two are
    logged). Writing is atomic (temporary file + ``os.replace``); a failed write is logged and
    reported as ``False``. Concurrent writers (several workers) cannot tear a file, but two workers
    recording at the same moment may keep the lower of their two peaks: the next larger run fixes it.
    """

    def __init__(self, app_id: str, cache_dir: str | os.PathLike[str] | None = None, *,
                 first_run_share: float = DEFAULT_FIRST_RUN_SHARE, headroom: float = DEFAULT_HEADROOM,
                 environ: Mapping[str, str] | None = None) -> None:
        """
        Args:
            app_id: the service's name; one file name (no slashes).
            cache_dir: replaces ``$XDG_CACHE_HOME`` as the cache root.
            first_run_share: share of total memory assumed for a parameter set without profile,
                in ``(0, 1]``.
            headroom: factor over a recorded peak, ``>= 1``.
            environ: where ``XDG_CACHE_HOME`` is read (default ``os.environ``), read once here.

        Raises:
            ValueError: a bad ``app_id``, ``first_run_share`` or ``headroom``.
        """
        self.app_id = _check_app_id(app_id)
        if not (0.0 < first_run_share <= 1.0):
            raise ValueError(f"first_run_share must be in (0, 1], got {first_run_share!r}")
        if not (math.isfinite(headroom) and headroom >= 1.0):
            raise ValueError(f"headroom must be a finite factor >= 1, got {headroom!r}")
        self.first_run_share = float(first_run_share)
        self.headroom = float(headroom)
        root = Path(cache_dir) if cache_dir is not None else _cache_home(os.environ if environ is None else environ)
        self.directory = root.joinpath(*PROFILE_NAMESPACE, self.app_id)

    @staticmethod
    def key(params: Mapping[str, Any]) -> str:
        """The profile key of ``params``: sha256 (hex) of their canonical JSON (sorted keys, compact).

        The same parameters in any order give the same key.

        Raises:
            TypeError: ``params`` is not JSON-serialisable (or its keys are not all strings).
        """
        if any(not isinstance(k, str) for k in params):
            raise TypeError("params keys must be strings")
        canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               allow_nan=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, params: Mapping[str, Any]) -> Path:
        """The profile file of ``params`` (it may not exist)."""
        return self.directory / f"{self.key(params)}.txt"

    def peak(self, params: Mapping[str, Any]) -> int | None:
        """The recorded peak of ``params`` in bytes, or None when there is no usable profile."""
        path = self.path(params)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError, ValueError) as exc:
            log.warning("vram profile unreadable, treated as unknown: %s (%s)", path, exc)
            return None
        try:
            value = int(text.strip())
        except ValueError:
            value = -1
        if value < 0:
            log.warning("vram profile corrupt, treated as unknown: %s (content %r)", path, text[:40])
            return None
        return value

    def estimate(self, params: Mapping[str, Any], total_bytes: int) -> int:
        """Bytes ``params`` are expected to need: ``ceil(peak * headroom)`` with a profile, else
        ``ceil(total_bytes * first_run_share)``.

        Args:
            params: the parameter set.
            total_bytes: the GPU's total memory, in bytes.

        Raises:
            ValueError / TypeError: a bad ``total_bytes``; TypeError: non-serialisable ``params``.
        """
        _check_bytes("total_bytes", total_bytes)
        peak = self.peak(params)
        if peak is None:
            return math.ceil(total_bytes * self.first_run_share)
        return math.ceil(peak * self.headroom)

    def record(self, params: Mapping[str, Any], peak_bytes: int) -> bool:
        """Remember ``peak_bytes`` for ``params`` when it exceeds the recorded peak (or none is).

        Returns:
            True when the profile was written, False when it was kept (not exceeded) or the write failed
            (logged).

        Raises:
            ValueError / TypeError: a bad ``peak_bytes``; TypeError: non-serialisable ``params``.
        """
        _check_bytes("peak_bytes", peak_bytes)
        path = self.path(params)
        stored = self.peak(params)
        if stored is not None and peak_bytes <= stored:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(f"{peak_bytes}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("vram profile not written: %s (%s)", path, exc)
            return False
        log.info("vram profile %s: peak %d MB (was %s)", path.name, peak_bytes // MIB,
                 "unknown" if stored is None else f"{stored // MIB} MB")
        return True

    def forget(self, params: Mapping[str, Any]) -> bool:
        """Delete the profile of ``params``; True when one existed. Raises OSError on other failures."""
        try:
            self.path(params).unlink()
        except FileNotFoundError:
            return False
        return True


# --------------------------------------------------------------------------------------------------
# The guard


BytesFn = Callable[[], "int | None"]


@dataclass
class Admission:
    """What :meth:`VRAMGuard.admit` decided (all in bytes; None: not measured).

    ``peak_bytes`` is filled when the block exits and a peak could be read.
    """

    required_bytes: int | None
    available_bytes: int | None
    total_bytes: int | None
    peak_bytes: int | None = None


@dataclass
class VRAMGuard:
    """Checks a parameter set against free GPU memory before work, records its peak after.

    ``available_fn``, ``total_fn`` and ``peak_fn`` return bytes or None ("cannot measure"); by default
    they use PyTorch on ``device`` (:func:`torch_available_bytes`, :func:`torch_total_bytes`,
    :func:`torch_peak_bytes`). Without PyTorch loaded by the service, or without CUDA, nothing can be
    measured and **every request is admitted** (logged once at info): the guard never blocks work it
    cannot judge.

    ``min_bytes`` is a floor on the estimate (CLAMS's ``gpu_mem_min``, in bytes).

    The default peak is PyTorch's process-wide peak since start (or since the last
    ``reset_peak_memory_stats``), so it includes resident model weights; in a long-lived worker that
    loaded its model before the check, compare with an injected ``peak_fn`` that measures what a run
    adds on top of what is resident, or the estimate will exceed what is really needed.
    """

    profiles: VRAMProfiles
    available_fn: BytesFn | None = None
    total_fn: BytesFn | None = None
    peak_fn: BytesFn | None = None
    retry_after_s: float = DEFAULT_RETRY_AFTER_S
    min_bytes: int = 0
    device: int | None = None
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.retry_after_s = _check_retry_after(self.retry_after_s)
        _check_bytes("min_bytes", self.min_bytes)

    def _measure(self, fn: BytesFn | None, default: Callable[[int | None], int | None]) -> int | None:
        value = fn() if fn is not None else default(self.device)
        return None if value is None else _check_bytes("measured bytes", value)

    def measure(self, params: Mapping[str, Any]) -> Admission:
        """Measure and estimate without deciding: an :class:`Admission` with what could be known."""
        available = self._measure(self.available_fn, torch_available_bytes)
        total = self._measure(self.total_fn, torch_total_bytes)
        required: int | None = None
        if total is not None:
            required = max(self.min_bytes, self.profiles.estimate(params, total))
        elif self.profiles.peak(params) is not None:
            # No total needed when the profile is known.
            required = max(self.min_bytes, self.profiles.estimate(params, 0))
        return Admission(required, available, total)

    def check(self, params: Mapping[str, Any]) -> Admission:
        """Admit ``params`` or refuse them.

        Returns:
            The :class:`Admission` (figures may be None where nothing could be measured: admitted).

        Raises:
            InsufficientVRAMError: the estimate exceeds the available bytes (with both figures and
                this guard's ``retry_after_s``).
            TypeError: ``params`` not JSON-serialisable.
        """
        a = self.measure(params)
        if a.required_bytes is None or a.available_bytes is None:
            if not self._warned:
                self._warned = True
                log.info("vram check skipped (cannot measure: available=%s, total=%s); admitting",
                         a.available_bytes, a.total_bytes)
            return a
        check_vram(a.required_bytes, a.available_bytes, self.retry_after_s)
        return a

    @contextlib.contextmanager
    def admit(self, params: Mapping[str, Any]) -> Iterator[Admission]:
        """``with guard.admit(params) as admission:`` check before the block, record the peak after.

        The peak is recorded whether the block succeeds or raises (a failed run's peak is a lower
        bound of its need, and only a larger peak replaces the stored one). A ``peak_fn`` that fails
        or returns None skips recording (logged); it never masks the block's own exception.

        Raises:
            InsufficientVRAMError: on entry, as :meth:`check`.
        """
        admission = self.check(params)
        try:
            yield admission
        finally:
            try:
                peak = self._measure(self.peak_fn, torch_peak_bytes)
            except Exception:  # noqa: BLE001 - e.g. CUDA in a bad state after the block failed
                log.warning("vram peak not measured", exc_info=True)
                peak = None
            if peak is not None:
                admission.peak_bytes = peak
                self.profiles.record(params, peak)


# --------------------------------------------------------------------------------------------------
# aiohttp: 503 + Retry-After


def vram_middleware(retry_after_s: float | None = None) -> Middleware:
    """An aiohttp middleware turning :class:`InsufficientVRAMError` into ``503 Service Unavailable``.

    The answer has ``Retry-After`` (whole seconds, rounded up, at least 1) and the JSON body
    ``{"error": str(exc), "required_bytes": ..., "available_bytes": ..., "retry_after_s": ...}``.
    ``retry_after_s`` given here overrides the one carried by the error; None keeps the error's.
    Every other exception, HTTP ones included, passes through untouched.

    Place it *inside* any catch-all error middleware (after it in ``middlewares=[...]``, aiohttp runs
    the first one outermost), or the catch-all turns the refusal into a 500 before this one sees it.

    Raises:
        ValueError: a negative or non-finite ``retry_after_s``.
        ImportError: aiohttp is not installed.
    """
    from aiohttp import web

    override = None if retry_after_s is None else _check_retry_after(retry_after_s)

    @web.middleware
    async def insufficient_vram_as_503(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except InsufficientVRAMError as exc:
            wait = exc.retry_after_s if override is None else override
            seconds = max(1, math.ceil(wait)) if math.isfinite(wait) else 1
            log.info("503 for %s %s: %s", request.method, request.path, exc)
            return web.json_response(
                {"error": str(exc), "required_bytes": exc.required_bytes,
                 "available_bytes": exc.available_bytes, "retry_after_s": seconds},
                status=503, headers={"Retry-After": str(seconds)})

    return insufficient_vram_as_503


# --------------------------------------------------------------------------------------------------
# Worker count


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
        raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {raw!r}")
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
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be a positive integer, got {cores!r}")
    if total_vram_mb is not None and not (math.isfinite(total_vram_mb) and total_vram_mb >= 0):
        raise ValueError(f"total_vram_mb must be a finite number >= 0, got {total_vram_mb!r}")
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


# --------------------------------------------------------------------------------------------------
# hwFetch-style summary


def hw_summary(name: str, total_bytes: int | None, available_bytes: int | None,
               peak_bytes: int | None) -> str:
    """One line like CLAMS's ``hwFetch``, figures in MB (MiB, rounded down)::

        NVIDIA H100 80GB HBM3, 81559 MB total, 20480 MB available, 3584 MB peak used

    A figure that is None is left out.
    """
    parts = [name.strip() or "unknown GPU"]
    for value, label in ((total_bytes, "total"), (available_bytes, "available"), (peak_bytes, "peak used")):
        if value is not None:
            parts.append(f"{value // MIB} MB {label}")
    return ", ".join(parts)


def hw_summary_from_torch(device: int | None = None) -> str | None:
    """:func:`hw_summary` of ``device`` (None: current) from PyTorch; None unless the service loaded
    PyTorch and CUDA is usable.

    Available is the driver's free memory (``mem_get_info``); peak is
    ``torch.cuda.max_memory_allocated``.
    """
    cuda = _torch_cuda()
    if cuda is None:
        return None
    free, total = cuda.mem_get_info(device)
    return hw_summary(str(cuda.get_device_name(device)), int(total), int(free),
                      int(cuda.max_memory_allocated(device)))


def hw_summary_from_decision(decision: Mapping[str, Any], peak_bytes: int | None = None) -> str:
    """:func:`hw_summary` from the optimizer's ``GET /batch-size`` answer (its ``gpu`` block).

    Available is ``memory_total_bytes - memory_used_bytes`` (all processes, as NVML sees them);
    ``peak_bytes`` is the caller's own measurement, if any. A ``null`` ``gpu`` gives ``"no GPU"``.

    Raises:
        ValueError: the ``gpu`` block is missing or its figures are not non-negative integers.
    """
    if "gpu" not in decision:
        raise ValueError("decision has no 'gpu' block")
    gpu = decision["gpu"]
    if gpu is None:
        return "no GPU"
    if not isinstance(gpu, Mapping):
        raise ValueError(f"decision 'gpu' must be an object or null, got {type(gpu).__name__}")
    figures: dict[str, int] = {}
    for key in ("memory_total_bytes", "memory_used_bytes"):
        value = gpu.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"decision gpu.{key} must be a non-negative integer, got {value!r}")
        figures[key] = value
    total = figures["memory_total_bytes"]
    available = max(0, total - figures["memory_used_bytes"])
    name = gpu.get("name")
    return hw_summary(name if isinstance(name, str) else "unknown GPU", total, available, peak_bytes)


# --------------------------------------------------------------------------------------------------
# Concurrency per kind of work


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter's future is done already
        future.set_result(None)


class _Waiter:
    """One queued acquirer: a coroutine (future on its loop) or a thread (event)."""

    __slots__ = ("future", "loop", "event", "granted")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] | None = loop.create_future() if loop is not None else None
        self.event = threading.Event() if loop is None else None
        self.granted = False

    def grant(self) -> bool:
        """Hand the slot over (caller holds the lock); False when the waiter cannot be woken."""
        self.granted = True
        if self.event is not None:
            self.event.set()
            return True
        assert self.loop is not None and self.future is not None
        try:
            self.loop.call_soon_threadsafe(_wake, self.future)
        except RuntimeError:  # its loop is closed: nobody will take the slot
            self.granted = False
            return False
        return True


class _Slot:
    """The bookkeeping of one kind: limit, holders, FIFO of waiters; a thread lock guards it."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.in_use = 0
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.lock = threading.Lock()

    def try_take(self) -> bool:
        # Caller holds the lock. Queued waiters go first (FIFO).
        if self.in_use < self.limit and not self.waiters:
            self.in_use += 1
            return True
        return False

    def release(self) -> None:
        with self.lock:
            while self.waiters:
                if self.waiters.popleft().grant():
                    return  # handed over: in_use unchanged
            if self.in_use <= 0:
                raise RuntimeError(f"{self.kind}: released more than acquired")
            self.in_use -= 1

    def abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled, timed out, interrupted): pass its slot on, or leave the queue."""
        with self.lock:
            if not waiter.granted:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                return
        self.release()

    async def acquire(self) -> None:
        with self.lock:
            if self.try_take():
                return
            waiter = _Waiter(asyncio.get_running_loop())
            self.waiters.append(waiter)
        assert waiter.future is not None
        try:
            await waiter.future
        except BaseException:
            self.abandon(waiter)
            raise

    def acquire_sync(self, timeout: float | None) -> None:
        with self.lock:
            if self.try_take():
                return
            if timeout is not None and timeout <= 0:
                raise TimeoutError(f"{self.kind}: all {self.limit} slots in use")
            waiter = _Waiter(None)
            self.waiters.append(waiter)
        assert waiter.event is not None
        try:
            woken = waiter.event.wait(timeout)
        except BaseException:
            self.abandon(waiter)
            raise
        if not woken:
            with self.lock:
                if waiter.granted:  # granted just after the wait ran out: keep it
                    return
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise TimeoutError(f"{self.kind}: no slot free within {timeout} s (limit {self.limit})")


class _AsyncHold:
    def __init__(self, slot: _Slot) -> None:
        self._slot = slot

    async def __aenter__(self) -> None:
        await self._slot.acquire()
        log.debug("%s started (concurrent: %d/%d)", self._slot.kind, self._slot.in_use, self._slot.limit)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: types.TracebackType | None) -> None:
        self._slot.release()


class _SyncHold:
    def __init__(self, slot: _Slot, timeout: float | None) -> None:
        self._slot = slot
        self._timeout = timeout

    def __enter__(self) -> None:
        self._slot.acquire_sync(self._timeout)
        log.debug("%s started (concurrent: %d/%d)", self._slot.kind, self._slot.in_use, self._slot.limit)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self._slot.release()


class ConcurrencyLimits:
    """At most ``limits[kind]`` pieces of work of each kind at once, queued first come, first served.

    ``async with limits.acquire("classification"):`` in coroutines, ``with
    limits.acquire_sync("classification"):`` in threads; both draw on the same slots, so a limit
    holds across an event loop and a thread pool together. The object is bound to no event loop: it
    can be created at import time and used from several loops and threads (do not call
    :meth:`acquire_sync` from an event loop's thread: it blocks the loop).

    A waiting coroutine that is cancelled leaves the queue, or passes on a slot handed to it.
    """

    def __init__(self, limits: Mapping[str, int]) -> None:
        """
        Raises:
            ValueError: a limit that is not a positive int (the message names the kind), or no kinds.
        """
        if not limits:
            raise ValueError("ConcurrencyLimits needs at least one kind")
        self._slots: dict[str, _Slot] = {}
        for kind, limit in limits.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"limit of {kind!r} must be a positive integer, got {limit!r}")
            self._slots[kind] = _Slot(kind, limit)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The known kinds, in declaration order."""
        return tuple(self._slots)

    def _slot(self, kind: str) -> _Slot:
        try:
            return self._slots[kind]
        except KeyError:
            raise KeyError(f"unknown kind of work {kind!r}; known: {', '.join(sorted(self._slots))}") from None

    def acquire(self, kind: str) -> contextlib.AbstractAsyncContextManager[None]:
        """An async context manager holding one ``kind`` slot. Raises KeyError for an unknown kind
        (here, before entering)."""
        return _AsyncHold(self._slot(kind))

    def acquire_sync(self, kind: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """A context manager holding one ``kind`` slot from a thread.

        Raises:
            KeyError: unknown kind (here, before entering).
            TimeoutError: on entering, no slot came free within ``timeout`` seconds (0: do not wait).
        """
        return _SyncHold(self._slot(kind), timeout)

    def limit(self, kind: str) -> int:
        """The limit of ``kind``. Raises KeyError for an unknown kind."""
        return self._slot(kind).limit

    def in_use(self, kind: str) -> int:
        """Slots of ``kind`` held now (including one handed to a waiter about to resume)."""
        return self._slot(kind).in_use

    def waiting(self, kind: str) -> int:
        """Acquirers of ``kind`` queued now."""
        return len(self._slot(kind).waiters)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{kind: {"limit", "in_use", "waiting"}}`` for status pages and logs."""
        out: dict[str, dict[str, int]] = {}
        for kind, slot in self._slots.items():
            with slot.lock:
                out[kind] = {"limit": slot.limit, "in_use": slot.in_use, "waiting": len(slot.waiters)}
        return out
