"""Surviving GPU out-of-memory errors inside a VLM service (seed 003's recovery strategies).

An OOM is retried with the next strategy, in this order:

1. ``empty_cache``: collect garbage, empty the allocator cache, and retry at the same batch size;
2. ``lower_batch``: retry at ``floor(batch * factor)`` (at least 1 less, never below ``min_batch_size``);
3. ``cpu``: retry on ``device="cpu"``, only with ``allow_cpu=True``.

Attempts that remain after these lower the batch again, until nothing is left to change. Each OOM is
reported (``reporter.report(batch_size, oom=True)``) so the optimizer lowers the service's batch size
for everyone; an OOM on the CPU is not, since it says nothing about the GPU. The cleanup runs before
every retry, after the failed attempt's exception has been dropped, so the tensors its frames held can
be freed.

Two forms: the decorator :func:`recover_oom` for a function that takes ``batch_size`` (and optionally
``device``), sync or async; and the attempts loop :func:`oom_attempts` for code that is not a function::

    for attempt in oom_attempts(batch_size=16, reporter=reporter):
        with attempt:
            run(attempt.batch_size, attempt.device)

PyTorch is used only when the application has already imported it: this module never imports it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast

from vlm_optimizer_client import validate
from vlm_optimizer_client._torch import empty_cache, is_cpu_device, loaded_torch

log = logging.getLogger("vlm_optimizer_client")

F = TypeVar("F", bound=Callable[..., Any])

# Texts of out-of-memory errors, matched case-insensitively anywhere in the message.
OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",  # PyTorch (torch.cuda.OutOfMemoryError)
    "CUDA error: out of memory",  # a kernel launch or cudaMalloc outside the caching allocator
    "CUDA_ERROR_OUT_OF_MEMORY",  # the driver API (CuPy, Numba, TensorRT)
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_NOT_ENOUGH_MEMORY",  # "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY"
    "HIP out of memory",  # PyTorch on ROCm
    "MPS backend out of memory",  # PyTorch on Apple silicon
    "XPU out of memory",  # PyTorch on Intel GPUs
    "RESOURCE_EXHAUSTED: Out of memory",  # JAX / XLA
    "OOM when allocating tensor",  # TensorFlow (ResourceExhaustedError)
)
_OOM_LOWER = tuple(m.lower() for m in OOM_MESSAGES)
_OOM_CLASS_NAME = "OutOfMemoryError"  # torch.cuda.OutOfMemoryError, torch.OutOfMemoryError, cupy's

STRATEGIES = ("first", "empty_cache", "lower_batch", "cpu")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of an accelerator.

    True for ``torch.cuda.OutOfMemoryError`` (by ``isinstance`` when PyTorch is loaded, else for any
    class named ``OutOfMemoryError`` in the exception's class hierarchy), and for any exception whose
    message holds one of :data:`OOM_MESSAGES`. An exception raised ``from`` such an error counts too.

    A plain :class:`MemoryError` (the host ran out of RAM) is *not* one: a smaller GPU batch does not
    reliably fix it, and reporting it would make the optimizer bar a batch size for the wrong reason.
    ``KeyboardInterrupt`` and other non-``Exception`` errors never are.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if _is_oom_itself(current):
            return True
        current, seen = current.__cause__, seen + 1
    return False


def _is_oom_itself(exc: BaseException) -> bool:
    if not isinstance(exc, Exception):
        return False
    torch = loaded_torch()
    if torch is not None:
        classes = tuple(c for c in (getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
                                    getattr(torch, "OutOfMemoryError", None)) if isinstance(c, type))
        if classes and isinstance(exc, classes):
            return True
    if any(c.__name__ == _OOM_CLASS_NAME for c in type(exc).__mro__):
        return True
    try:
        text = str(exc).lower()
    except Exception:  # a broken __str__ must not turn into a second error
        return False
    return any(m in text for m in _OOM_LOWER)


class OomReporter(Protocol):
    """What recovery needs of a reporter (:class:`vlm_optimizer_client.telemetry.Reporter` is one)."""

    def report(self, batch_size: int, *, oom: bool = ...) -> None: ...


@dataclass(frozen=True)
class RecoveryPolicy:
    """The knobs of OOM recovery, checked once.

    ``factor``: what ``lower_batch`` multiplies the batch by, in (0, 1). ``min_batch_size``: the
    smallest batch ``lower_batch`` goes to (>= 1). ``max_attempts``: calls in total, the first
    included (>= 1); ``None`` gives one per strategy: 3, or 4 with ``allow_cpu``. ``cleanup``: what
    runs before each retry (default :func:`empty_cache`). Raises :class:`~vlm_optimizer_client.validate.InvalidArgument` when out of range.
    """

    reporter: OomReporter | None = None
    factor: float = 0.5
    min_batch_size: int = 1
    max_attempts: int | None = None
    allow_cpu: bool = False
    cleanup: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        validate.number("factor", self.factor, "a number in (0, 1)", lo=0, hi=1, lo_open=True, hi_open=True)
        validate.integer("min_batch_size", self.min_batch_size, 1)
        validate.optional_integer("max_attempts", self.max_attempts, 1)

    @property
    def attempts(self) -> int:
        if self.max_attempts is not None:
            return self.max_attempts
        return 4 if self.allow_cpu else 3

    def lowered(self, batch_size: int) -> int:
        """The next smaller batch: ``floor(batch * factor)``, at least 1 less, never below the minimum."""
        return max(self.min_batch_size, min(batch_size - 1, math.floor(batch_size * self.factor)))


class Attempt:
    """One try: run the work at ``batch_size`` on ``device`` inside ``with attempt:``.

    ``strategy`` names what this try does differently (:data:`STRATEGIES`); ``number`` counts from 1.
    Leaving the block with an OOM suppresses it when another attempt follows, and lets it propagate
    when none does; any other exception propagates at once.
    """

    def __init__(self, schedule: _Schedule, number: int, strategy: str, batch_size: int, device: Any) -> None:
        self._schedule = schedule
        self.number = number
        self.strategy = strategy
        self.batch_size = batch_size
        self.device = device
        self.entered = False
        self.outcome: str | None = None  # "ok", "oom" (retried), "raised"

    @property
    def max_attempts(self) -> int:
        return self._schedule.policy.attempts

    def __repr__(self) -> str:
        return (f"Attempt(number={self.number}, strategy={self.strategy!r}, batch_size={self.batch_size}, "
                f"device={self.device!r})")

    def __enter__(self) -> Attempt:
        if self.entered:
            raise RuntimeError("an Attempt can be entered once")
        self.entered = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None:
            self.outcome = "ok"
            return False
        if not is_oom_error(exc):
            self.outcome = "raised"
            return False
        retry = self._schedule.failed(exc)
        self.outcome = "oom" if retry else "raised"
        return retry


class _Schedule:
    """The sequence of attempts of one call: which strategy comes next, and the bookkeeping of each OOM."""

    def __init__(self, policy: RecoveryPolicy, batch_size: int, device: Any, what: str) -> None:
        self.policy = policy
        self.what = what
        self.current = Attempt(self, 1, "first", batch_size, device)
        self.used: set[str] = set()
        self.next: Attempt | None = None
        if log.isEnabledFor(logging.DEBUG):  # every batch passes here: keep it cheap
            log.debug("oom_attempt %s: attempt 1/%d strategy=first batch_size=%d device=%s", what,
                      policy.attempts, batch_size, device,
                      extra={"strategy": "first", "attempt": 1, "batch_size": batch_size, "device": str(device)})

    def failed(self, exc: BaseException) -> bool:
        """The current attempt ran out of memory: report it and plan the next. False when none is left."""
        a = self.current
        if self.policy.reporter is not None and not is_cpu_device(a.device):
            try:
                self.policy.reporter.report(a.batch_size, oom=True)
            except Exception:  # a reporter must never turn an OOM into another error
                log.exception("reporting the OOM failed")
        self.next = self._plan(a)
        message = _first_line(exc)
        if self.next is None:
            log.error("oom_recovery_exhausted %s: attempt %d/%d strategy=%s batch_size=%d device=%s failed: %s",
                      self.what, a.number, self.policy.attempts, a.strategy, a.batch_size, a.device, message,
                      extra={"strategy": a.strategy, "attempt": a.number, "batch_size": a.batch_size,
                             "device": str(a.device)})
            return False
        # The traceback's finished frames hold the failed attempt's tensors: free them now.
        traceback.clear_frames(exc.__traceback__)
        return True

    def _plan(self, a: Attempt) -> Attempt | None:
        if a.number >= self.policy.attempts:
            return None
        can_lower = a.batch_size > self.policy.min_batch_size
        can_cpu = self.policy.allow_cpu and not is_cpu_device(a.device)
        if "empty_cache" not in self.used:
            strategy = "empty_cache"
        elif "lower_batch" not in self.used and can_lower:
            strategy = "lower_batch"
        elif can_cpu:
            strategy = "cpu"
        elif can_lower:
            strategy = "lower_batch"
        else:
            return None
        batch = self.policy.lowered(a.batch_size) if strategy == "lower_batch" else a.batch_size
        device = "cpu" if strategy == "cpu" else a.device
        return Attempt(self, a.number + 1, strategy, batch, device)

    def advance(self) -> Attempt:
        """Run the cleanup and make the planned attempt current (after the failed one's exception is gone)."""
        nxt = self.next
        assert nxt is not None
        self.next = None
        self.used.add(nxt.strategy)
        try:
            (self.policy.cleanup or empty_cache)()
        except Exception:
            log.exception("the cleanup before an OOM retry failed")
        log.warning("oom_retry %s: attempt %d/%d strategy=%s batch_size=%d device=%s", self.what, nxt.number,
                    self.policy.attempts, nxt.strategy, nxt.batch_size, nxt.device,
                    extra={"strategy": nxt.strategy, "attempt": nxt.number, "batch_size": nxt.batch_size,
                           "device": str(nxt.device)})
        self.current = nxt
        return nxt


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class OomAttempts:
    """An iterator of :class:`Attempt`: the next one after an OOM, none after a success.

    See :func:`oom_attempts`.
    """

    def __init__(self, schedule: _Schedule) -> None:
        self._schedule = schedule
        self._started = False

    def __iter__(self) -> OomAttempts:
        return self

    def __next__(self) -> Attempt:
        s = self._schedule
        if not self._started:
            self._started = True
            return s.current
        a = s.current
        if not a.entered:
            raise RuntimeError("run each attempt inside `with attempt:` so that its OOM is handled")
        if a.outcome != "oom":
            raise StopIteration
        return s.advance()


def oom_attempts(batch_size: int, device: Any = None, *, reporter: OomReporter | None = None,
                 factor: float = 0.5, min_batch_size: int = 1, max_attempts: int | None = None,
                 allow_cpu: bool = False, cleanup: Callable[[], None] | None = None,
                 name: str = "block") -> OomAttempts:
    """Attempts of a block of code, for use as ``for attempt in oom_attempts(...): with attempt: ...``.

    The loop ends after the first attempt that finishes; an OOM moves on to the next strategy; the
    OOM of the last attempt, and any other exception, propagate out of the loop. ``name`` labels the
    log lines. Raises :class:`ValueError` for settings out of range (see :class:`RecoveryPolicy`).
    """
    policy = RecoveryPolicy(reporter, factor, min_batch_size, max_attempts, allow_cpu, cleanup)
    return OomAttempts(_Schedule(policy, _batch(batch_size), device, name))


def _batch(value: Any) -> int:
    return validate.integer("batch_size", value, 1)


def recover_oom(*, reporter: OomReporter | None = None, factor: float = 0.5, min_batch_size: int = 1,
                max_attempts: int | None = None, allow_cpu: bool = False,
                cleanup: Callable[[], None] | None = None) -> Callable[[F], F]:
    """Decorate a function (sync or ``async``) that takes a ``batch_size`` parameter to survive OOMs.

    Each call runs ``fn(..., batch_size=b, device=d)``: ``b`` and ``d`` start as the call's own
    arguments (or the function's defaults) and change with each strategy. ``device`` is passed only
    to a function that has that parameter. The last OOM is re-raised when no attempt is left; any
    other exception at once, without a retry.

    Raises :class:`TypeError` at decoration time when the function has no ``batch_size`` parameter,
    or has no ``device`` parameter while ``allow_cpu`` is set; :class:`ValueError` for settings out
    of range (see :class:`RecoveryPolicy`).
    """
    policy = RecoveryPolicy(reporter, factor, min_batch_size, max_attempts, allow_cpu, cleanup)

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        if "batch_size" not in sig.parameters:
            validate.fail("fn", "a function with a batch_size parameter (@recover_oom)", fn)
        has_device = "device" in sig.parameters
        if allow_cpu and not has_device:
            validate.fail("fn", "a function with a device parameter (@recover_oom(allow_cpu=True))", fn)
        what = getattr(fn, "__qualname__", repr(fn))

        def begin(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[inspect.BoundArguments, _Schedule]:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            device = bound.arguments.get("device") if has_device else None
            return bound, _Schedule(policy, _batch(bound.arguments["batch_size"]), device, what)

        def call_args(bound: inspect.BoundArguments, a: Attempt) -> tuple[tuple[Any, ...], dict[str, Any]]:
            bound.arguments["batch_size"] = a.batch_size
            if has_device:
                bound.arguments["device"] = a.device
            return bound.args, bound.kwargs

        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                bound, schedule = begin(args, kwargs)
                while True:
                    with schedule.current as attempt:
                        a, kw = call_args(bound, attempt)
                        return await async_fn(*a, **kw)
                    schedule.advance()  # reached only when the attempt's OOM was suppressed

            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound, schedule = begin(args, kwargs)
            while True:
                with schedule.current as attempt:
                    a, kw = call_args(bound, attempt)
                    return fn(*a, **kw)
                schedule.advance()  # reached only when the attempt's OOM was suppressed

        return cast(F, wrapper)

    return decorate


__all__ = ["OOM_MESSAGES", "STRATEGIES", "Attempt", "OomAttempts", "OomReporter", "RecoveryPolicy", "empty_cache",
           "is_cpu_device", "is_oom_error", "loaded_torch", "oom_attempts", "recover_oom"]
