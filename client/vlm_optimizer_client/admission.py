"""Admission control for VLM services: refuse work the GPU has no room for (VRAM checks and the guard).

The pieces follow the CLAMS SDK's GPU memory management and the "retry signal + semaphores per kind
of work" pattern:

- :class:`VRAMProfiles` remembers, per parameter set, the peak GPU memory of previous runs, under
  ``$XDG_CACHE_HOME/vlm-gpu-optimizer/memory_profiles/<app_id>/<sha256>.txt`` (one integer, bytes);
- :func:`check_vram` and :class:`VRAMGuard` refuse work that would not fit with
  :class:`InsufficientVRAMError`, and :func:`vram_middleware` turns that refusal into
  ``503 Service Unavailable`` with ``Retry-After`` in an aiohttp service;
- the worker count (:mod:`vlm_optimizer_client.workers`), the hardware summary
  (:mod:`~vlm_optimizer_client.hardware`) and the concurrency limits (:mod:`~vlm_optimizer_client.limits`)
  that go with admission live in their own modules.

Units: memory is in bytes unless a name ends in ``_mb`` (mebibytes, 2**20 bytes, which is what
``nvidia-smi`` and CLAMS call "MB"); times are in seconds.

Nothing here imports the optimizer's server side, pynvml, kubernetes or prometheus_client. aiohttp is
imported only by :func:`vram_middleware`; PyTorch is never imported: the ``*_torch`` defaults use it when
the service has loaded it (:mod:`vlm_optimizer_client._torch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm_optimizer_client import validate
from vlm_optimizer_client._torch import torch_available_bytes, torch_peak_bytes, torch_total_bytes
from vlm_optimizer_client.hardware import MIB
from vlm_optimizer_client.profiles import VRAMProfiles

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware

__all__ = ["DEFAULT_RETRY_AFTER_S", "Admission", "InsufficientVRAMError", "VRAMGuard", "check_vram", "vram_middleware"]

log = logging.getLogger("vlm_optimizer_client")

DEFAULT_RETRY_AFTER_S = 10.0
"""Seconds a refused caller is told to wait before retrying."""


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


def _check_bytes(name: str, value: object) -> int:
    return validate.integer(name, value, 0, unit="bytes")


def _check_retry_after(retry_after_s: object) -> float:
    return validate.seconds("retry_after_s", retry_after_s, zero=True)


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
