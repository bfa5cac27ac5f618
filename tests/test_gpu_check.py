"""bench/gpu_check.py, the one-shot check for a machine with an NVIDIA GPU, on a machine without one.

What can run here: the refusal (one line, exit code 2, nothing started) without NVML, with an NVML
that sees no GPU, and with NVML but a PyTorch without CUDA (the fake ``pynvml`` of
test_nvml_backend); the sampling timer on that fake; the search for the largest batch with PyTorch's
real ``torch.cuda.OutOfMemoryError``; the workload's step on the CPU; the report, which prints every
field ``/status`` gives per GPU. The check itself needs a GPU (docs/benchmarks.md, "GPU check").
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import structlog

from optimizer.gpu.nvml import NvmlBackend
from tests.policy_helpers import ROOT
from tests.test_nvml_backend import MEM_V2, SHUTDOWN, FakeNvml, three_gpus
from tests.tools import require_module

SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torch() -> ModuleType:
    return require_module("torch")


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """main() configures structlog (warnings only) and quiets the client's logger, as a script does:
    the tests after these must find both as they were."""
    saved, client = structlog.get_config(), logging.getLogger("vlm_optimizer_client")
    level = client.level
    yield
    structlog.configure(**saved)
    client.setLevel(level)


# --------------------------------------------------------------------------- no GPU: one line, exit 2


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(check: ModuleType) -> None:
    try:
        NvmlBackend().close()
    except Exception:
        pass
    else:  # pragma: no cover - a GPU machine: run the check itself
        pytest.skip("NVML starts here: run bench/gpu_check.py itself")
    done = subprocess.run([sys.executable, str(SCRIPT), "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no NVIDIA GPU to check here: NVML"), done.stderr


def test_nvml_without_a_gpu_exits_2(check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml([])
    assert check.main([], nvml=fake) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "gpu_check: no NVIDIA GPU to check here: NVML started but sees no GPU\n"
    assert fake.count(SHUTDOWN) == 1


def test_nvml_but_a_pytorch_without_cuda_exits_2_before_starting_anything(
        check: ModuleType, torch: ModuleType, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("PyTorch has CUDA here")
    started: list[object] = []
    monkeypatch.setattr(check.Optimizer, "__enter__", lambda self: started.append(self))
    fake = FakeNvml(three_gpus())
    assert check.main(["--follow-seconds", "1"], nvml=fake) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"gpu_check: no NVIDIA GPU to check here: PyTorch {torch.__version__} sees no CUDA device")
    assert started == [] and fake.count(SHUTDOWN) == 1  # no optimizer started, NVML closed


def test_bad_arguments_name_the_option(check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, option in ((["--image-size", "20"], "--image-size"), (["--passes", "0"], "--passes"),
                         (["--follow-seconds", "0"], "--follow-seconds")):
        with pytest.raises(SystemExit) as exited:
            check.main(argv, nvml=FakeNvml([]))
        assert exited.value.code == 2
        assert option in capsys.readouterr().err


# --------------------------------------------------------------------------- the pieces


def test_one_sampling_pass_is_timed_and_divided_by_the_gpus(check: ModuleType) -> None:
    fake = FakeNvml(three_gpus())
    backend = NvmlBackend(nvml=fake)
    ticks = iter(float(i) * 0.006 for i in range(100))  # every pass takes 6 ms on this clock
    cost = check.time_sampling(backend, 10, warmup=1, clock=lambda: next(ticks))
    backend.close()
    assert (cost.gpus, cost.passes, cost.pass_ms_median, cost.per_gpu_ms, cost.failed_gpus) == (3, 10, 6.0, 2.0, [])
    assert fake.count(MEM_V2) == 3 * 11  # every GPU on every pass, the warm-up included


def oom_above(torch: ModuleType, capacity: int, tried: list[int]) -> Callable[[int], None]:
    def step(batch_size: int) -> None:
        tried.append(batch_size)
        if batch_size > capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")

    return step


def test_the_largest_batch_is_found_by_real_ooms_doubling_then_bisecting(check: ModuleType,
                                                                         torch: ModuleType) -> None:
    tried: list[int] = []
    cleanups: list[int] = []
    step = oom_above(torch, 37, tried)
    largest, trials = check.largest_batch(lambda b: check.try_batch(step, b, 2, lambda: cleanups.append(b)), 4,
                                          1 << 16)
    assert largest == 37
    assert [t.batch_size for t in trials] == [4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert [t.fits for t in trials] == [True, True, True, True, False, False, False, True, False, True]
    assert cleanups == [t.batch_size for t in trials]  # gc + empty_cache after every try
    assert trials[4].error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 64 GiB"
    assert tried.count(4) == 2 and tried.count(64) == 1  # two steps per try, none after an OOM


def test_the_search_stops_at_its_bound_and_at_nothing(check: ModuleType, torch: ModuleType) -> None:
    def search(capacity: int, start: int, limit: int) -> tuple[int, list[int]]:
        largest, trials = check.largest_batch(
            lambda b: check.try_batch(oom_above(torch, capacity, []), b, 1, lambda: None), start, limit)
        return largest, [t.batch_size for t in trials]

    assert search(1000, 16, 100) == (100, [16, 32, 64, 100])
    assert search(0, 4, 100) == (0, [4, 2, 1])  # not even 1 fits
    assert search(5, 1, 100) == (5, [1, 2, 4, 8, 6, 5])


def test_an_error_that_is_no_oom_propagates(check: ModuleType) -> None:
    def step(batch_size: int) -> None:
        raise ValueError("a bug in the model")

    with pytest.raises(ValueError):
        check.try_batch(step, 4, 1, lambda: None)


def test_the_workload_trains_on_the_cpu(check: ModuleType, torch: ModuleType) -> None:
    workload = check.Workload(torch, "cpu", image_size=32, dim=16, depth=2)
    before = [p.detach().clone() for p in workload.params]
    workload.step(3)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, workload.params))  # it learned
    assert all(p.grad is None for p in workload.params)  # and let go of its gradients


def result(check: ModuleType, status_gpus: list[dict[str, Any]]) -> Any:
    following = check.Following(published_batch=48, optimal_batch_size=48, reason="fits", published_history=[4, 48],
                                batches=120, ooms=0, peak_bytes=30 * 2**30, gpu_named=True)
    trials = [check.Trial(64, True, 0.5), check.Trial(128, False, 0.4, "OutOfMemoryError: CUDA out of memory."),
              check.Trial(96, True, 0.6)]
    sampling = check.SamplingCost(gpus=2, passes=50, pass_ms_median=1.5, pass_ms_p95=2.5, per_gpu_ms=0.75)
    return check.Result(torch="2.13.0", cuda="12.8", device="cuda:0", gpu="GPU-aaaa", sampling=sampling,
                        optimizer_pass_ms=1.6, optimizer_samples=70, optimizer_sample_errors=0, following=following,
                        largest_batch=96, trials=trials, ratio=0.5, capped=False, status_gpus=status_gpus,
                        model={"image_size": 224, "dim": 768, "depth": 12}, elapsed_s=95.0)


def test_the_report_prints_every_field_status_gives(check: ModuleType) -> None:
    gpus = [{"index": 0, "uuid": "GPU-aaaa", "memory_total_bytes": 80 * 2**30, "pressure": "normal",
             "mig": {"mode": "enabled", "instances": [{"gpu_instance_id": 1}]}, "health": {"xid": {"79": 1}},
             "a_field_from_a_later_version": True},
            {"index": 1, "uuid": "GPU-bbbb", "failed": True}]
    text = check.render(result(check, gpus))
    for needle in ("mig.mode", "mig.instances", "health.xid.79", "a_field_from_a_later_version", "GPU 0", "GPU 1",
                   "ratio published / largest", "0.500", "64:y, 128:n, 96:y", "OOM errors seen: OutOfMemoryError",
                   "per GPU (median / GPUs)", "0.750 ms"):
        assert needle in text, needle
    doc = json.loads(json.dumps(result(check, gpus).to_json()))
    assert doc["status_gpus"] == gpus and doc["largest_batch"] == 96 and doc["following"]["published_batch"] == 48


class StandInCuda:
    """``torch.cuda`` with a device, which the CPU build has not: the CUDA-present paths of the check.
    Its OOM class is the real one."""

    def __init__(self, torch: ModuleType) -> None:
        self.OutOfMemoryError = torch.cuda.OutOfMemoryError
        self.emptied = 0

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def set_device(self, device: Any) -> None:
        pass

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, index: int) -> Any:
        return types.SimpleNamespace(uuid=None)  # no UUID: the optimizer chooses the GPU

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        pass

    def max_memory_allocated(self, device: Any = None) -> int:
        return 3 * 2**30

    def memory_allocated(self, device: Any = None) -> int:
        return 2**30

    def memory_reserved(self, device: Any = None) -> int:
        return 2 * 2**30

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        return {"inactive_split_bytes.all.current": 0}

    def empty_cache(self) -> None:
        self.emptied += 1


@pytest.mark.parametrize("capacity", [37, 1])
def test_the_whole_check_against_a_running_optimizer(check: ModuleType, torch: ModuleType,
                                                     monkeypatch: pytest.MonkeyPatch, capacity: int) -> None:
    """Everything but the GPU: fake NVML for the timed passes, ``serve --backend simulated`` for the
    optimizer (a subprocess on random ports), a stand-in CUDA and a step that runs out of memory above
    ``capacity`` items (the real OOM class), through the real client; then the JSON document.

    At 1 the optimizer's first batch (4) fails on every attempt (4, 4, 2): the check goes on, and the
    reported OOMs lower the published batch."""
    cuda = StandInCuda(torch)
    stand_in = types.SimpleNamespace(cuda=cuda, __version__=torch.__version__, version=torch.version,
                                     device=torch.device, zeros=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "torch", stand_in)  # what the client finds loaded
    monkeypatch.setattr(check, "cuda_torch", lambda device: stand_in)

    class Step:
        def __init__(self, torch: Any, device: str, *sizes: int) -> None:
            self.torch = torch

        def step(self, batch_size: int) -> None:
            if batch_size > capacity:
                raise cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} GiB")

    monkeypatch.setattr(check, "Workload", Step)
    args = check.parse_args(["--follow-seconds", "3", "--passes", "5", "--json"])
    r = check.run(args, nvml=FakeNvml(three_gpus()), optimizer_backend="simulated")
    assert r.sampling.gpus == 3 and r.sampling.passes == 5 and r.sampling.failed_gpus == []
    assert r.optimizer_samples >= 1 and r.optimizer_pass_ms is not None
    f = r.following
    assert f.published_history[0] == 4 and f.batches > 0 and not f.gpu_named  # the optimizer's default first
    assert r.largest_batch == capacity and r.trials[0].batch_size == f.published_batch
    assert r.ratio == round(f.published_batch / capacity, 4) and not r.capped
    if capacity == 1:
        assert f.exhausted >= 1 and f.published_batch < 4 and "OOM" in (f.reason or "")
    assert cuda.emptied >= len(r.trials)  # between the tries
    assert r.status_gpus and r.status_gpus[0]["uuid"].startswith("GPU-sim")  # /status's own fields, as given
    assert "pressure" in r.status_gpus[0] and "memory_total_bytes" in r.status_gpus[0]
    json.dumps(r.to_json())
