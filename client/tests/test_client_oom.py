"""OOM recovery of the client library (vlm_optimizer_client.oom): detection, the order of the strategies,
their bounds, the decorator (sync and async), the attempts loop, and the reports each OOM makes.

The OOM raised is PyTorch's ``torch.cuda.OutOfMemoryError`` when PyTorch is installed (the dev extras
install it, and under CI its absence fails), else a class of the same name and base (``RuntimeError``),
as the library sees it without PyTorch.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from client_fakes import OOM_ERROR, OOM_TEXT, FakeReporter, OutOfMemoryError, oom
from vlm_optimizer_client import (
    OOM_MESSAGES,
    RecoveryPolicy,
    empty_cache,
    is_cpu_device,
    is_oom_error,
    oom_attempts,
    recover_oom,
)


@dataclass
class Work:
    """A function that runs out of memory on its first ``fails`` calls, recording each call."""

    fails: int
    cleanups: list[int] = field(default_factory=list)  # one entry per cleanup
    calls: list[tuple[int, Any, int]] = field(default_factory=list)  # (batch, device, cleanups so far)

    def cleanup(self) -> None:
        self.cleanups.append(len(self.calls))

    def __call__(self, batch_size: int, device: Any) -> str:
        self.calls.append((batch_size, device, len(self.cleanups)))
        if len(self.calls) <= self.fails:
            raise oom(f" (call {len(self.calls)})")
        return f"done at {batch_size} on {device}"


@pytest.fixture
def attempts_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[str, int]]]:
    """The (strategy, batch size) of each attempt, as logged."""
    caplog.set_level(logging.DEBUG, logger="vlm_optimizer_client")

    def read() -> list[tuple[str, int]]:
        return [(getattr(r, "strategy"), getattr(r, "batch_size")) for r in caplog.records
                if r.name == "vlm_optimizer_client" and r.getMessage().startswith(("oom_attempt", "oom_retry"))]

    return read


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("message", [
    OOM_TEXT,
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY",
    "HIP out of memory. Tried to allocate 20.00 MiB",
    "MPS backend out of memory (MPS allocated: 1.2 GB)",
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.",
    "OOM when allocating tensor with shape[1024,1024] and type float on /job:localhost/device:GPU:0",
    "cudaMalloc failed: CUDA_ERROR_OUT_OF_MEMORY",
])
def test_known_oom_messages_are_ooms(message: str) -> None:
    assert is_oom_error(RuntimeError(message))
    assert is_oom_error(MemoryError(message))


def test_every_listed_message_is_recognised() -> None:
    for message in OOM_MESSAGES:
        assert is_oom_error(RuntimeError(f"prefix {message} suffix")), message


def test_a_tensorflow_like_error_that_is_no_runtime_error_counts() -> None:
    class ResourceExhaustedError(Exception):
        pass

    assert is_oom_error(ResourceExhaustedError("OOM when allocating tensor with shape[8,3,224,224]"))


def test_the_oom_class_counts_by_name_whatever_its_message() -> None:
    assert is_oom_error(oom())
    assert is_oom_error(OutOfMemoryError("allocation failed"))

    class Narrower(OutOfMemoryError):
        pass

    assert is_oom_error(Narrower(""))


def test_an_error_raised_from_an_oom_counts() -> None:
    try:
        try:
            raise oom()
        except RuntimeError as inner:
            raise ValueError("the batch failed") from inner
    except ValueError as outer:
        assert is_oom_error(outer)


@pytest.mark.parametrize("exc", [
    ValueError("bad input"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("Expected all tensors to be on the same device"),
    MemoryError(),  # the host ran out of RAM: not a GPU OOM (see is_oom_error)
    MemoryError("Unable to allocate 12.0 GiB for an array"),
    KeyboardInterrupt(),
    SystemExit(1),
])
def test_other_errors_are_not_ooms(exc: BaseException) -> None:
    assert not is_oom_error(exc)


def test_an_error_whose_message_cannot_be_read_is_not_an_oom() -> None:
    class Broken(RuntimeError):
        def __str__(self) -> str:
            raise TypeError("no message")

    assert not is_oom_error(Broken())


def test_with_pytorch_loaded_its_oom_class_counts_by_isinstance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``torch`` whose OOM class has an unknown name (the real class: test_client_torch)."""
    class CudaOom(RuntimeError):  # a name the fallback would not recognise
        pass

    torch = types.ModuleType("torch")
    setattr(torch, "cuda", types.SimpleNamespace(OutOfMemoryError=CudaOom))
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert is_oom_error(CudaOom("allocation failed"))
    assert not is_oom_error(RuntimeError("allocation failed"))


def test_is_cpu_device() -> None:
    assert is_cpu_device("cpu") and is_cpu_device("cpu:0")
    assert not is_cpu_device(None) and not is_cpu_device("cuda:0") and not is_cpu_device(0)


# --------------------------------------------------------------------------- the order of the strategies


def test_the_strategies_run_in_order(attempts_log: Callable[[], list[tuple[str, int]]]) -> None:
    """first -> empty_cache (same batch, after a cleanup) -> lower_batch (half) -> cpu."""
    work, reporter = Work(fails=3), FakeReporter()

    @recover_oom(reporter=reporter, allow_cpu=True, cleanup=work.cleanup)
    def run(batch_size: int, device: Any = "cuda:0") -> str:
        return work(batch_size, device)

    assert run(batch_size=16) == "done at 8 on cpu"
    assert work.calls == [(16, "cuda:0", 0), (16, "cuda:0", 1), (8, "cuda:0", 2), (8, "cpu", 3)]
    assert attempts_log() == [("first", 16), ("empty_cache", 16), ("lower_batch", 8), ("cpu", 8)]
    assert reporter.calls == [(16, True), (16, True), (8, True)]  # every GPU OOM, none for the CPU


def test_three_attempts_then_the_last_oom_is_raised(attempts_log: Callable[[], list[tuple[str, int]]]) -> None:
    work, reporter = Work(fails=99), FakeReporter()

    @recover_oom(reporter=reporter, cleanup=work.cleanup)
    def run(batch_size: int, device: Any = None) -> str:
        return work(batch_size, device)

    with pytest.raises(OOM_ERROR) as raised:
        run(batch_size=16)
    assert "(call 3)" in str(raised.value)  # the last one, with its traceback
    assert raised.value.__traceback__ is not None
    assert [(b, d) for b, d, _ in work.calls] == [(16, None), (16, None), (8, None)]
    assert attempts_log() == [("first", 16), ("empty_cache", 16), ("lower_batch", 8)]
    assert reporter.calls == [(16, True), (16, True), (8, True)]
    assert len(work.cleanups) == 2  # before each retry, not after the last failure


def test_a_success_needs_no_retry(attempts_log: Callable[[], list[tuple[str, int]]]) -> None:
    work, reporter = Work(fails=0), FakeReporter()
    run = recover_oom(reporter=reporter, cleanup=work.cleanup)(work.__call__)
    assert run(batch_size=4, device="cuda:1") == "done at 4 on cuda:1"
    assert attempts_log() == [("first", 4)]
    assert reporter.calls == [] and work.cleanups == []


def test_without_allow_cpu_the_cpu_is_never_tried() -> None:
    work = Work(fails=99)
    run = recover_oom(max_attempts=6, cleanup=work.cleanup)(work.__call__)
    with pytest.raises(OOM_ERROR):
        run(batch_size=16, device="cuda:0")
    assert [(b, d) for b, d, _ in work.calls] == [(16, "cuda:0"), (16, "cuda:0"), (8, "cuda:0"), (4, "cuda:0"),
                                                  (2, "cuda:0"), (1, "cuda:0")]


def test_more_attempts_keep_lowering_after_the_cpu() -> None:
    work = Work(fails=99)
    run = recover_oom(max_attempts=6, allow_cpu=True, cleanup=work.cleanup)(work.__call__)
    with pytest.raises(OOM_ERROR):
        run(batch_size=16, device="cuda:0")
    assert [(b, d) for b, d, _ in work.calls] == [(16, "cuda:0"), (16, "cuda:0"), (8, "cuda:0"), (8, "cpu"),
                                                  (4, "cpu"), (2, "cpu")]


def test_max_attempts_bounds_the_calls() -> None:
    work = Work(fails=99)
    run = recover_oom(max_attempts=1, cleanup=work.cleanup)(work.__call__)
    with pytest.raises(OOM_ERROR):
        run(batch_size=16, device=None)
    assert len(work.calls) == 1 and work.cleanups == []


def test_the_factor_and_the_minimum_bound_the_lowered_batch() -> None:
    work = Work(fails=99)
    run = recover_oom(factor=0.25, min_batch_size=6, max_attempts=10, cleanup=work.cleanup)(work.__call__)
    with pytest.raises(OOM_ERROR):
        run(batch_size=16, device=None)
    # 16 * 0.25 = 4 is below the minimum: 6; at the minimum nothing is left to change
    assert [b for b, _, _ in work.calls] == [16, 16, 6]


@pytest.mark.parametrize(("batch", "factor", "minimum", "lowered"), [
    (16, 0.5, 1, 8), (15, 0.5, 1, 7), (3, 0.5, 1, 1), (2, 0.5, 1, 1), (10, 0.95, 1, 9), (2, 0.99, 1, 1),
    (16, 0.1, 1, 1), (16, 0.1, 4, 4), (16, 0.75, 1, 12),
])
def test_lowered_is_at_least_one_less_and_never_below_the_minimum(batch: int, factor: float, minimum: int,
                                                                  lowered: int) -> None:
    assert RecoveryPolicy(factor=factor, min_batch_size=minimum).lowered(batch) == lowered


def test_at_the_minimum_batch_lower_batch_is_skipped() -> None:
    work = Work(fails=99)
    run = recover_oom(allow_cpu=True, cleanup=work.cleanup)(work.__call__)
    with pytest.raises(OOM_ERROR):
        run(batch_size=1, device="cuda:0")
    assert [(b, d) for b, d, _ in work.calls] == [(1, "cuda:0"), (1, "cuda:0"), (1, "cpu")]


def test_a_non_oom_error_propagates_at_once() -> None:
    reporter = FakeReporter()
    cleanups: list[None] = []
    calls: list[int] = []

    @recover_oom(reporter=reporter, cleanup=lambda: cleanups.append(None))
    def run(batch_size: int) -> None:
        calls.append(batch_size)
        raise ValueError("a bad image")

    with pytest.raises(ValueError, match="a bad image"):
        run(batch_size=16)
    assert calls == [16] and reporter.calls == [] and cleanups == []


def test_a_non_oom_error_after_an_oom_propagates_without_more_retries() -> None:
    calls: list[int] = []

    @recover_oom(cleanup=lambda: None, max_attempts=5)
    def run(batch_size: int) -> None:
        calls.append(batch_size)
        if len(calls) == 1:
            raise oom()
        raise KeyError("missing")

    with pytest.raises(KeyError):
        run(batch_size=16)
    assert calls == [16, 16]


def test_batch_size_and_device_bind_like_the_function_does() -> None:
    """Positional arguments and defaults work; device goes only to a function that takes it."""
    seen: list[tuple[str, int]] = []

    @recover_oom(cleanup=lambda: None)
    def embed(images: list[str], batch_size: int = 16) -> int:
        seen.append((images[0], batch_size))
        if len(seen) == 1:
            raise oom()
        return batch_size

    assert embed(["a.png"]) == 16
    assert seen == [("a.png", 16), ("a.png", 16)]
    assert embed(["b.png"], 12) == 12
    assert embed.__name__ == "embed"  # functools.wraps


def test_bad_uses_are_refused_when_decorating() -> None:
    def no_batch(x: int) -> int:
        return x

    def no_device(batch_size: int) -> int:
        return batch_size

    with pytest.raises(TypeError, match="batch_size"):
        recover_oom()(no_batch)
    with pytest.raises(TypeError, match="device"):
        recover_oom(allow_cpu=True)(no_device)
    for bad in ({"factor": 1.0}, {"factor": 0.0}, {"min_batch_size": 0}, {"max_attempts": 0}):
        with pytest.raises(ValueError):
            recover_oom(**bad)
    with pytest.raises(ValueError, match="batch_size"):
        recover_oom()(no_device)(batch_size=0)


def test_the_default_cleanup_collects_and_empties_an_initialised_cuda_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``torch`` with CUDA initialised, which the CPU build cannot be (test_client_torch runs the
    real module without CUDA)."""
    emptied: list[None] = []
    cuda = types.SimpleNamespace(is_initialized=lambda: True, empty_cache=lambda: emptied.append(None))
    torch = types.ModuleType("torch")
    setattr(torch, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "torch", torch)
    empty_cache()
    assert emptied == [None]
    cuda.is_initialized = lambda: False  # nothing cached, and no CUDA to initialise for it
    empty_cache()
    assert emptied == [None]


def test_without_pytorch_the_default_cleanup_only_collects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    empty_cache()  # gc.collect() alone; does not import torch
    assert "torch" not in sys.modules


def test_a_failing_reporter_or_cleanup_does_not_change_the_outcome() -> None:
    class Broken:
        def report(self, batch_size: int, *, oom: bool = False) -> None:
            raise OSError("disk full")

    def cleanup() -> None:
        raise RuntimeError("cleanup failed")

    work = Work(fails=1)
    run = recover_oom(reporter=Broken(), cleanup=cleanup)(work.__call__)
    assert run(batch_size=8, device=None) == "done at 8 on None"


# --------------------------------------------------------------------------- async


async def test_async_functions_recover_in_the_same_order(attempts_log: Callable[[], list[tuple[str, int]]]) -> None:
    work, reporter = Work(fails=3), FakeReporter()

    @recover_oom(reporter=reporter, allow_cpu=True, cleanup=work.cleanup)
    async def run(batch_size: int, device: Any = "cuda:0") -> str:
        await asyncio.sleep(0)  # a real suspension point inside the attempt
        return work(batch_size, device)

    assert asyncio.iscoroutinefunction(run)
    assert await run(batch_size=16) == "done at 8 on cpu"
    assert work.calls == [(16, "cuda:0", 0), (16, "cuda:0", 1), (8, "cuda:0", 2), (8, "cpu", 3)]
    assert attempts_log() == [("first", 16), ("empty_cache", 16), ("lower_batch", 8), ("cpu", 8)]
    assert reporter.calls == [(16, True), (16, True), (8, True)]


async def test_async_functions_raise_the_last_oom_and_other_errors_at_once() -> None:
    work = Work(fails=99)

    @recover_oom(cleanup=work.cleanup)
    async def run(batch_size: int, device: Any = None) -> str:
        return work(batch_size, device)

    with pytest.raises(OOM_ERROR, match=r"\(call 3\)"):
        await run(batch_size=16)

    calls: list[int] = []

    @recover_oom(cleanup=work.cleanup)
    async def fails(batch_size: int) -> None:
        calls.append(batch_size)
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        await fails(batch_size=16)
    assert calls == [16]


# --------------------------------------------------------------------------- the attempts loop


def test_the_attempts_loop_runs_the_strategies_in_order() -> None:
    work, reporter = Work(fails=3), FakeReporter()
    seen: list[tuple[int, str, int, Any]] = []
    result = None
    for attempt in oom_attempts(batch_size=16, device="cuda:0", reporter=reporter, allow_cpu=True,
                                cleanup=work.cleanup):
        seen.append((attempt.number, attempt.strategy, attempt.batch_size, attempt.device))
        with attempt:
            result = work(attempt.batch_size, attempt.device)
    assert result == "done at 8 on cpu"
    assert seen == [(1, "first", 16, "cuda:0"), (2, "empty_cache", 16, "cuda:0"), (3, "lower_batch", 8, "cuda:0"),
                    (4, "cpu", 8, "cpu")]
    assert work.cleanups == [1, 2, 3]
    assert reporter.calls == [(16, True), (16, True), (8, True)]


def test_the_attempts_loop_ends_at_the_first_success() -> None:
    seen: list[str] = []
    for attempt in oom_attempts(batch_size=8, cleanup=lambda: None):
        seen.append(attempt.strategy)
        with attempt:
            pass
    assert seen == ["first"]


def test_the_attempts_loop_reraises_the_last_oom() -> None:
    seen: list[int] = []
    with pytest.raises(OOM_ERROR, match=r"\(call 3\)"):
        for attempt in oom_attempts(batch_size=16, cleanup=lambda: None):
            with attempt:
                seen.append(attempt.batch_size)
                raise oom(f" (call {len(seen)})")
    assert seen == [16, 16, 8]


def test_the_attempts_loop_lets_other_errors_through_at_once() -> None:
    seen: list[int] = []
    with pytest.raises(ZeroDivisionError):
        for attempt in oom_attempts(batch_size=16, cleanup=lambda: None):
            with attempt:
                seen.append(attempt.batch_size)
                _ = 1 / 0
    assert seen == [16]


def test_an_attempt_not_run_inside_with_is_an_error() -> None:
    attempts = oom_attempts(batch_size=16)
    next(attempts)
    with pytest.raises(RuntimeError, match="with attempt"):
        next(attempts)


def test_a_failed_attempts_frames_are_freed_before_the_cleanup() -> None:
    """Its frames hold the tensors of the failed batch: cleared, they go even when the error is kept."""

    class Tensor:
        pass

    refs: list[weakref.ref[Tensor]] = []
    kept: list[BaseException] = []

    def forward() -> None:
        t = Tensor()
        refs.append(weakref.ref(t))
        raise oom()

    freed_at_cleanup: list[bool] = []
    for attempt in oom_attempts(batch_size=4, max_attempts=2,
                                cleanup=lambda: freed_at_cleanup.append(refs[0]() is None)):
        with attempt:
            try:
                if attempt.number == 1:
                    forward()
            except RuntimeError as exc:
                kept.append(exc)  # say, for a later error report
                raise
    assert freed_at_cleanup == [True]
    assert len(kept) == 1
