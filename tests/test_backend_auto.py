"""``--backend auto`` fails closed: the GPU-less backend only where no NVIDIA driver is present.

Where a driver is present and NVML fails, the service is not ready and says why (``/ready``,
``/status``, an error-level log line), publishes the default batch rather than the maximum, and
becomes ready once NVML starts. The NVML backend runs on the fake ``pynvml`` of
``tests/test_nvml_backend.py`` (the real library's errors); the read API is a real server.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pynvml
import pytest

from optimizer.config import BackendName, ServiceProfile, Settings
from optimizer.gpu.driver import DRIVER_PATHS, LINUX_LIBRARY, nvidia_driver, nvml_library
from optimizer.gpu.factory import make_hardware_backend
from optimizer.gpu.none import NoGpuBackend
from optimizer.gpu.nvml import NvmlBackend
from optimizer.gpu.pending import PendingNvmlBackend
from optimizer.gpu.types import BackendError, GpuBackend
from tests.api_harness import MakeApi
from tests.fakes import ScriptedBackend
from tests.logcapture import LogList, events_named
from tests.test_nvml_backend import INIT, FakeNvml, three_gpus

DEFAULT = Settings().default_batch(Settings().default_profile)  # 4
MAXIMUM = Settings().max_batch_size  # 16
DRIVER = "/dev/nvidiactl exists"
DECLARED = Settings(profiles=(ServiceProfile(name="vlm"),))  # a service the optimizer knows


def failing_nvml() -> GpuBackend:
    raise BackendError("NVML could not be initialised: Driver Not Loaded (is the NVIDIA driver loaded?)")


# -- is a driver present? ----------------------------------------------------------------------------


def test_no_device_file_and_no_library_is_no_driver(tmp_path: Path) -> None:
    paths = [str(tmp_path / "nvidiactl"), str(tmp_path / "nvidia")]
    assert nvidia_driver(paths, library=lambda: None) is None


@pytest.mark.parametrize("which", range(len(DRIVER_PATHS)))
def test_any_driver_path_is_a_driver(which: int) -> None:
    present = DRIVER_PATHS[which]
    assert nvidia_driver(exists=lambda p: p == present, library=lambda: None) == f"{present} exists"


def test_a_device_file_on_disk_is_found(tmp_path: Path) -> None:
    ctl = tmp_path / "nvidiactl"
    ctl.touch()
    assert nvidia_driver([str(tmp_path / "absent"), str(ctl)], library=lambda: None) == f"{ctl} exists"


def test_a_loadable_nvml_library_is_a_driver() -> None:
    assert nvidia_driver(exists=lambda p: False, library=lambda: LINUX_LIBRARY) == f"{LINUX_LIBRARY} loads"


def test_the_library_probe_loads_what_pynvml_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []

    def loads(name: str) -> object:
        loaded.append(name)
        return object()

    def fails(name: str) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", loads)
    assert nvml_library() == LINUX_LIBRARY and loaded == ["libnvidia-ml.so.1"]
    monkeypatch.setattr(ctypes, "CDLL", fails)
    assert nvml_library() is None


# -- the factory's choice ----------------------------------------------------------------------------


def test_auto_without_a_driver_is_the_gpu_less_backend(logs: LogList) -> None:
    backend = make_hardware_backend(BackendName.AUTO, nvml=failing_nvml, driver=lambda: None)
    assert isinstance(backend, NoGpuBackend)
    (line,) = events_named(logs, "nvml_unavailable_using_none")
    assert "Driver Not Loaded" in line["reason"]


def test_auto_uses_nvml_when_it_starts() -> None:
    fake = FakeNvml(three_gpus())
    backend = make_hardware_backend(BackendName.AUTO, nvml=lambda: NvmlBackend(nvml=fake),
                                    driver=lambda: pytest.fail("the driver probe is only for a failed NVML"))
    assert isinstance(backend, NvmlBackend) and backend.device_count == 3


def test_explicit_nvml_that_fails_is_an_error_whatever_the_driver() -> None:
    with pytest.raises(BackendError, match="Driver Not Loaded"):
        make_hardware_backend(BackendName.NVML, nvml=failing_nvml, driver=lambda: None)


def test_auto_with_a_driver_and_failing_nvml_says_why_at_error_level(logs: LogList) -> None:
    backend = make_hardware_backend(BackendName.AUTO, nvml=failing_nvml, driver=lambda: DRIVER)
    assert isinstance(backend, PendingNvmlBackend) and backend.name == "nvml" and not backend.started
    (line,) = events_named(logs, "nvml_failed_on_a_gpu_host")
    assert line["log_level"] == "error"
    assert "Driver Not Loaded" in line["reason"] and line["driver"] == DRIVER
    assert not events_named(logs, "nvml_unavailable_using_none")


# -- a GPU host whose NVML fails, over the read API ---------------------------------------------------


async def test_driver_present_and_nvml_failing_is_not_ready_and_never_the_maximum(make_api: MakeApi,
                                                                                   logs: LogList) -> None:
    fake = FakeNvml(three_gpus())
    fake.fail(None, INIT, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    backend = make_hardware_backend(BackendName.AUTO, nvml=lambda: NvmlBackend(nvml=fake), driver=lambda: DRIVER)
    assert isinstance(backend, PendingNvmlBackend)
    a = await make_api(backend=backend, settings=DECLARED)
    for _ in range(3):  # every sample retries NVML and fails
        assert await a.sampler.tick() is None
    assert fake.count(INIT) == 4  # the start, then once per sample

    ready = await a.get("/ready", status=503)
    assert ready["status"] == "not ready" and ready["backend"] == "nvml"
    assert "Driver Not Loaded" in ready["reason"] and DRIVER in ready["reason"]
    status = await a.get("/status")
    assert status["ready"] is False and status["not_ready_reason"] == ready["reason"]

    poll = await a.get("/batch-size?service=vlm")
    assert poll["batch_size"] == DEFAULT != MAXIMUM
    oom = await a.post({"service": "vlm", "batch_size": poll["batch_size"], "oom": True})
    assert oom["batch_size"] < DEFAULT
    assert (await a.get("/batch-size?service=vlm"))["batch_size"] < DEFAULT

    fake.heal(None, INIT)  # the driver finishes loading: the next sample starts NVML
    assert await a.sampler.tick() is not None
    assert backend.started
    assert await a.get("/ready") == {"status": "ready", "backend": "nvml"}
    assert (await a.get("/status"))["not_ready_reason"] is None
    assert [g["uuid"] for g in (await a.get("/status"))["gpus"]] == [g.uuid for g in three_gpus()]
    assert events_named(logs, "nvml_started_after_retry")
    backend.close()
    assert fake.count("nvmlShutdown") == 1


async def test_a_gpu_backend_that_sees_no_gpu_is_not_ready_and_publishes_the_default(make_api: MakeApi) -> None:
    a = await make_api(backend=ScriptedBackend(0), settings=DECLARED)  # e.g. NVML in a container given no GPU
    assert await a.sampler.tick() is not None
    ready = await a.get("/ready", status=503)
    assert ready["reason"] == "the GPU backend scripted found no GPU"
    assert (await a.get("/batch-size?service=vlm"))["batch_size"] == DEFAULT


async def test_every_gpu_failed_is_the_reason(make_api: MakeApi) -> None:
    backend = ScriptedBackend(2)
    backend.failed = {0, 1}
    a = await make_api(backend=backend)
    await a.tick()
    ready = await a.get("/ready", status=503)
    assert ready["reason"] == "every GPU failed: GPU 0: GPU is lost; GPU 1: GPU is lost"
