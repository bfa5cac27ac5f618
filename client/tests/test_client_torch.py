"""The client library against the real PyTorch (the CPU build of the dev extras): its OOM class, its
allocator functions and ``empty_cache``, on a machine where CUDA is absent.

What must hold there (docs/client.md): ``torch.cuda.OutOfMemoryError`` is recognised and recovered from,
a real model's activations of a failed attempt are freed before the retry, the cleanups run without
raising and without initialising CUDA, ``measure`` reports the batch size alone (nothing for a CPU
device), no GPU identity is guessed, the VRAM guard admits, and no client path imports PyTorch for a
service that did not. Where CUDA is present the stand-in ``torch`` modules of test_client_oom and of
the server's tests/test_client_telemetry and tests/test_client_follow test those paths; this file is
what runs for real here.

Under CI a missing PyTorch fails these tests (client_fakes.py): make test installs it.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from client_fakes import HOUR, Upstream, require_module
from client_fakes import OOM_TEXT, FakeReporter

from vlm_optimizer_client import (
    Admission,
    Reporter,
    VRAMGuard,
    VRAMProfiles,
    default_cleanup,
    empty_cache,
    gpu_identity,
    hw_summary_from_torch,
    is_oom_error,
    measure,
    oom_attempts,
    recover_oom,
    torch_available_bytes,
    torch_peak_bytes,
    torch_total_bytes,
)


@pytest.fixture(scope="module")
def torch() -> ModuleType:
    return require_module("torch")


@pytest.fixture
def cpu_only(torch: ModuleType) -> Iterator[ModuleType]:
    """The real module on a machine without CUDA; afterwards, CUDA is still not initialised."""
    if torch.cuda.is_available():  # pragma: no cover - a CUDA build on a GPU machine
        pytest.skip("CUDA is available here: bench/gpu_check.py tests the CUDA paths on it")
    yield torch
    assert not torch.cuda.is_initialized()


def cuda_oom(torch: ModuleType, note: str = "") -> BaseException:
    error: BaseException = torch.cuda.OutOfMemoryError(OOM_TEXT + note)
    return error


def tiny_net(torch: ModuleType) -> Any:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


# --------------------------------------------------------------------------- what counts as an OOM


def test_the_real_oom_class_is_recognised_by_its_type(cpu_only: ModuleType) -> None:
    torch = cpu_only
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # one class, a RuntimeError
    assert issubclass(torch.cuda.OutOfMemoryError, RuntimeError)
    assert is_oom_error(torch.cuda.OutOfMemoryError("allocation failed"))  # by isinstance, whatever the text

    class Custom(torch.cuda.OutOfMemoryError):  # type: ignore[misc,name-defined]
        pass

    assert is_oom_error(Custom("no known text"))
    try:
        try:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        except RuntimeError as exc:
            raise ValueError("the batch failed") from exc
    except ValueError as wrapped:
        assert is_oom_error(wrapped)


def test_a_real_host_allocation_failure_is_not_an_oom(cpu_only: ModuleType) -> None:
    """PyTorch's CPU allocator failing (host RAM) is not a GPU OOM: a smaller GPU batch does not fix it."""
    torch = cpu_only
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: beyond any address space
    assert "DefaultCPUAllocator" in str(caught.value)
    assert not is_oom_error(caught.value)


# --------------------------------------------------------------------------- recovery of a real model


def test_a_real_models_failed_activations_are_freed_before_the_retry(cpu_only: ModuleType) -> None:
    """An OOM raised in the middle of a forward pass: the activations computed so far are gone when the
    cleanup runs (reference counting alone: the garbage collector is off), and the retry finishes."""
    torch = cpu_only
    net = tiny_net(torch)
    activations: list[weakref.ref[Any]] = []

    def hook(module: Any, inputs: Any, output: Any) -> None:
        activations.append(weakref.ref(output))
        if len(activations) == 1:
            raise cuda_oom(torch)

    net[1].register_forward_hook(hook)
    freed: list[bool] = []
    reporter = FakeReporter()
    gc.disable()
    try:
        for attempt in oom_attempts(batch_size=4, reporter=reporter,
                                    cleanup=lambda: freed.append(activations[0]() is None)):
            with attempt:
                out = net(torch.randn(attempt.batch_size, 3, 16, 16))
    finally:
        gc.enable()
    assert freed == [True]
    assert attempt.strategy == "empty_cache" and tuple(out.shape) == (4, 4)
    assert reporter.calls == [(4, True)]


def test_the_decorator_lowers_the_batch_of_a_real_model(cpu_only: ModuleType) -> None:
    torch = cpu_only
    net = tiny_net(torch)
    capacity, reporter = 4, FakeReporter()

    @recover_oom(reporter=reporter)  # the default cleanup: empty_cache() on the real module
    def run(batch_size: int) -> Any:
        if batch_size > capacity:
            raise cuda_oom(torch, f" (batch {batch_size})")
        with torch.inference_mode():
            return net(torch.randn(batch_size, 3, 16, 16))

    out = run(batch_size=8)
    assert tuple(out.shape) == (4, 4)  # 8, 8 again after empty_cache, then half
    assert reporter.calls == [(8, True), (8, True)]


def test_the_cleanups_run_on_the_real_module_without_cuda(cpu_only: ModuleType) -> None:
    """gc and the cache emptying, on a PyTorch without CUDA: nothing raised, CUDA not initialised."""
    torch = cpu_only
    torch.cuda.memory_allocated()  # what a service reads does not initialise CUDA either
    empty_cache()
    default_cleanup()
    assert torch.cuda.memory_stats() == {}  # the allocator's figures without CUDA: empty, zero
    assert torch.cuda.memory_allocated() == 0 and torch.cuda.memory_reserved() == 0


# --------------------------------------------------------------------------- telemetry


async def test_measure_on_the_real_module_without_cuda_reports_the_batch_size_alone(
        cpu_only: ModuleType, upstream: Upstream) -> None:
    torch = cpu_only
    net = tiny_net(torch)
    reporter = Reporter("svc-a", url=upstream.url, gpu=0, interval=HOUR)
    for device in (None, "cuda:0", torch.device("cuda", 0)):  # CUDA absent: no figures, no error
        with measure(reporter, batch_size=3, device=device), torch.inference_mode():
            net(torch.randn(3, 3, 16, 16))
    with measure(reporter, batch_size=5, device=torch.device("cpu")):  # the CPU says nothing of the GPU
        net(torch.randn(5, 3, 16, 16))
    await asyncio.to_thread(reporter.flush)
    assert upstream.bodies == [{"service": "svc-a", "gpu": 0, "batch_size": 3}]  # no figure: none measured
    assert reporter.stats.queued == 3 and reporter.stats.invalid == 0


async def test_measure_reports_a_real_oom_and_reraises_it(cpu_only: ModuleType, upstream: Upstream) -> None:
    torch = cpu_only
    reporter = Reporter("svc", url=upstream.url, gpu=0, interval=HOUR)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with measure(reporter, batch_size=16):
            raise cuda_oom(torch)
    await asyncio.to_thread(reporter.flush)
    assert upstream.bodies == [{"service": "svc", "gpu": 0, "batch_size": 16, "oom": True}]


def test_without_cuda_no_gpu_identity_is_guessed(cpu_only: ModuleType) -> None:
    assert gpu_identity() is None


def test_real_tensors_as_figures(cpu_only: ModuleType) -> None:
    """0-d integer tensors are counts; float, many-element and bool tensors are refused (counted invalid)."""
    torch = cpu_only
    reporter = Reporter("svc", interval=HOUR)
    reporter.report(torch.tensor(8), peak_bytes=torch.tensor(1 << 30))
    assert reporter.stats.queued == 1
    for bad in (torch.tensor(2.5), torch.tensor([1, 2]), torch.tensor(True)):
        reporter.report(bad)
    reporter.report(4, peak_bytes=torch.tensor(True))
    assert reporter.stats.queued == 1 and reporter.stats.invalid == 4


# --------------------------------------------------------------------------- admission


def test_the_vram_guard_admits_on_the_real_module_without_cuda(cpu_only: ModuleType, tmp_path: Path) -> None:
    assert torch_available_bytes() is None and torch_total_bytes() is None and torch_peak_bytes() is None
    assert hw_summary_from_torch() is None
    with VRAMGuard(VRAMProfiles("app", cache_dir=tmp_path)).admit({"images": 2}) as a:
        pass
    assert a == Admission(None, None, None, None)


# --------------------------------------------------------------------------- never imported for the service


def test_no_client_path_imports_pytorch_for_a_service_that_did_not(torch: ModuleType, tmp_path: Path) -> None:
    """PyTorch installed but not imported by the service: every CUDA path of the client leaves it so."""
    code = textwrap.dedent(f"""
        import sys
        from vlm_optimizer_client import (Reporter, VRAMGuard, VRAMProfiles, default_cleanup, empty_cache,
                                          gpu_identity, hw_summary_from_torch, is_oom_error, measure)
        empty_cache(); default_cleanup()
        assert gpu_identity() is None and not is_oom_error(RuntimeError("x"))
        with measure(Reporter("svc", interval=3600), batch_size=2, device="cuda:0"):
            pass
        with VRAMGuard(VRAMProfiles("app", cache_dir={str(tmp_path)!r})).admit({{"n": 1}}):
            pass
        assert hw_summary_from_torch() is None
        assert "torch" not in sys.modules, "a client path imported torch"
        import torch  # installed all along
        print("ok", torch.__version__)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
