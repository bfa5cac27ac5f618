"""Measure one batch and report it: :func:`measure` (a context manager and a decorator).

With PyTorch loaded by the service and CUDA, it reads the allocator's peak and figures; without them
it reports the batch size alone. An OOM is reported (and re-raised).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast

from vlm_optimizer_client import validate
from vlm_optimizer_client._torch import is_cpu_device, loaded_torch
from vlm_optimizer_client.oom import is_oom_error

__all__ = ["ReportTarget", "measure"]

log = logging.getLogger("vlm_optimizer_client")

F = TypeVar("F", bound=Callable[..., Any])


class ReportTarget(Protocol):
    """What :func:`measure` reports to: a :class:`Reporter` or an :class:`AsyncReporter`."""

    def report(self, batch_size: int, peak_bytes: int | None = ..., allocated_bytes: int | None = ...,
               reserved_bytes: int | None = ..., inactive_split_bytes: int | None = ..., oom: bool = ...) -> None: ...


def _cuda_of(device: Any) -> Any:
    """``torch.cuda`` when PyTorch is loaded, CUDA is available and ``device`` is not the CPU, else None."""
    if is_cpu_device(device):
        return None
    torch = loaded_torch()
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:
        return None


class measure:
    """Measure one batch and report it: a context manager, and a decorator.

    ``with measure(reporter, batch_size=8):`` runs the block; with PyTorch and CUDA it first resets the
    allocator's peak (``torch.cuda.reset_peak_memory_stats(device)``) and afterwards reports
    ``max_memory_allocated`` as the peak, with ``memory_allocated``, ``memory_reserved`` and the
    ``inactive_split_bytes.all.current`` allocator statistic; without them, the batch size alone.
    A block that runs out of memory (:func:`is_oom_error`) is reported with ``oom=True`` and its
    error re-raised; a block that fails otherwise is not reported. Nothing is reported for a CPU
    ``device``. Reading the figures never raises.

    As a decorator (sync or async functions), ``batch_size`` and ``device`` left ``None`` are read from
    each call's arguments of those names. Stacked under :func:`vlm_optimizer_client.oom.recover_oom`, give the
    reporter to one of the two, or each OOM is reported twice.
    """

    def __init__(self, reporter: ReportTarget, batch_size: int | None = None, device: Any = None) -> None:
        self.reporter = reporter
        self.batch_size = batch_size
        self.device = device
        self._cuda: Any = None

    def __enter__(self) -> measure:
        if self.batch_size is None:
            validate.fail("batch_size", "an integer >= 1 (measure() needs one to report)", None)
        self._cuda = _cuda_of(self.device)
        if self._cuda is not None:
            try:
                self._cuda.reset_peak_memory_stats(self.device)
            except Exception as exc:
                log.debug("reset_peak_memory_stats failed: %s", exc)
                self._cuda = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        cuda, self._cuda = self._cuda, None
        batch = cast(int, self.batch_size)
        if is_cpu_device(self.device):
            return
        if exc is None:
            f = self._figures(cuda, peak=True)
        elif is_oom_error(exc):
            f = self._figures(cuda, peak=False)
        else:
            return
        self.reporter.report(batch, f.get("peak_bytes"), f.get("allocated_bytes"), f.get("reserved_bytes"),
                             f.get("inactive_split_bytes"), oom=exc is not None)

    def _figures(self, cuda: Any, *, peak: bool) -> dict[str, int | None]:
        if cuda is None:
            return {}
        d = self.device
        out: dict[str, int | None] = {}
        readers: list[tuple[str, Callable[[], Any]]] = [
            ("allocated_bytes", lambda: cuda.memory_allocated(d)),
            ("reserved_bytes", lambda: cuda.memory_reserved(d)),
            ("inactive_split_bytes", lambda: cuda.memory_stats(d).get("inactive_split_bytes.all.current")),
        ]
        if peak:
            readers.insert(0, ("peak_bytes", lambda: cuda.max_memory_allocated(d)))
        for key, read in readers:
            try:
                value = read()
                out[key] = None if value is None else int(value)
            except Exception as exc:
                log.debug("reading %s failed: %s", key, exc)
        return out

    def __call__(self, fn: F) -> F:
        sig = inspect.signature(fn)
        if self.batch_size is None and "batch_size" not in sig.parameters:
            validate.fail("fn", "a function with a batch_size parameter, or measure() given a batch_size", fn)

        def for_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> measure:
            batch, device = self.batch_size, self.device
            if batch is None or (device is None and "device" in sig.parameters):
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                batch = batch if batch is not None else bound.arguments.get("batch_size")
                device = device if device is not None else bound.arguments.get("device")
            return measure(self.reporter, batch, device)

        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with for_call(args, kwargs):
                    return await async_fn(*args, **kwargs)

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with for_call(args, kwargs):
                return fn(*args, **kwargs)

        return cast(F, wrapper)
