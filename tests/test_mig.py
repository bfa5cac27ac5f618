"""MIG end to end: a real read API over the NVML backend on the fake ``pynvml`` with MIG mode on.

The board of the issue's done-when: an 80 GB A100 with two 1g.10gb and one 3g.40gb instances
(``tests/test_nvml_backend.py``: ``mig_gpu``). Each instance is its own entry, sized on its own
memory, named by UUID or ``parent:instance``, and labelled in the metrics like dcgm-exporter does.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from optimizer.api.schemas import parse_gpu
from vlm_optimizer_client import BatchSizeClient
from optimizer.config import ServiceProfile, Settings
from optimizer.gpu.nvml import NvmlBackend
from optimizer.gpu.types import MAX_GPU_INDEX, GpuSample, mig_index
from optimizer.simulation.scenario import ScenarioError, parse_scenario
from optimizer.simulation.world import World
from tests.api_harness import Api, MakeApi
from tests.test_nvml_backend import GIB, MIB, FakeNvml, mig_gpu, three_gpus

# A service whose batch is bound by memory on a 10 GB slice and on an 80 GB GPU alike.
SETTINGS = Settings(max_batch_size=512, profiles=(ServiceProfile(name="vlm", per_item_mb=256.0, max_batch_size=512),))
SMALL, OTHER_SMALL, BIG = mig_index(0, 7, 0), mig_index(0, 8, 0), mig_index(0, 2, 0)


class OneGpu:
    """A whole GPU with exactly the figures of one sample (to size the same service on it)."""

    name = "scripted"
    blocking = False

    def __init__(self, sample: GpuSample) -> None:
        self.template = sample

    def sample(self, now: float) -> list[GpuSample]:
        return [replace(self.template, timestamp=now)]

    def close(self) -> None:
        return None


async def mig_api(make_api: MakeApi) -> tuple[Api, FakeNvml]:
    fake = FakeNvml([mig_gpu(), three_gpus()[0]])  # GPU 0 in MIG mode, GPU 1 a whole 80 GB A100
    api = await make_api(backend=NvmlBackend(nvml=fake), settings=SETTINGS)
    await api.tick()
    return api, fake


async def settled(api: Api, gpu: str, ticks: int = 3) -> dict[str, object]:
    """The decision for ``vlm`` on ``gpu`` once the optimizer has seen it for a few samples."""
    for _ in range(ticks):
        await api.get(f"/batch-size?service=vlm&gpu={gpu}")
        await api.tick(advance=SETTINGS.optimization_interval)  # the optimum is recomputed once an interval
    body: dict[str, object] = await api.get(f"/batch-size?service=vlm&gpu={gpu}")
    return body


async def test_status_shows_each_instance_with_its_own_memory(make_api: MakeApi) -> None:
    api, _ = await mig_api(make_api)
    status = await api.get("/status")
    gpus = {g["uuid"]: g for g in status["gpus"]}
    assert sorted(gpus) == ["GPU-aaaa", "MIG-1111", "MIG-2222", "MIG-3333"]  # no entry for the MIG parent
    for uuid, gi, profile, mb in (("MIG-1111", 2, "3g.40gb", 40192), ("MIG-2222", 7, "1g.10gb", 9728),
                                  ("MIG-3333", 8, "1g.10gb", 9728)):
        g = gpus[uuid]
        assert g["memory_total_bytes"] == mb * MIB
        assert g["index"] == mig_index(0, gi, 0)
        assert g["mig"] == {"parent_index": 0, "parent_uuid": "GPU-mmmm", "gpu_instance_id": gi,
                            "compute_instance_id": 0, "profile": profile, "selector": f"0:{gi}"}
        assert g["temperature_celsius"] == 52.0  # the parent's sensor
    assert gpus["GPU-aaaa"]["mig"] is None and gpus["GPU-aaaa"]["memory_total_bytes"] == 80 * GIB


async def test_batch_size_on_a_mig_uuid_is_sized_on_the_slice(make_api: MakeApi) -> None:
    api, fake = await mig_api(make_api)
    on_slice = await settled(api, "MIG-2222")
    gpu = on_slice["gpu"]
    assert isinstance(gpu, dict)
    assert gpu["index"] == SMALL and gpu["uuid"] == "MIG-2222" and gpu["memory_total_bytes"] == 9728 * MIB
    # the same service on a whole GPU with the slice's very figures gets the same batch ...
    sample = next(s for s in api.engine.snapshot.gpus if s.index == SMALL)  # type: ignore[union-attr]
    whole = await make_api(backend=OneGpu(replace(sample, index=0, uuid="GPU-same", parent_index=None,
                                                  parent_uuid=None, gpu_instance_id=None,
                                                  compute_instance_id=None, mig_profile=None)), settings=SETTINGS)
    await whole.tick()
    same = await settled(whole, "0")
    assert (on_slice["optimal_batch_size"], on_slice["batch_size"]) == (same["optimal_batch_size"], same["batch_size"])
    # ... and far less than on the 80 GB GPU next to it (what sizing against the parent would give)
    on_parent_sized = await settled(api, "1")
    assert isinstance(on_parent_sized["optimal_batch_size"], int) and isinstance(on_slice["optimal_batch_size"], int)
    assert on_slice["optimal_batch_size"] * 4 < on_parent_sized["optimal_batch_size"]


@pytest.mark.parametrize(("selector", "index"), [("MIG-2222", SMALL), ("0:7", SMALL), ("0:7:0", SMALL),
                                                 ("0:2", BIG), (str(OTHER_SMALL), OTHER_SMALL), ("1", 1)])
async def test_a_mig_device_is_named_by_uuid_or_parent_instance(make_api: MakeApi, selector: str, index: int) -> None:
    api, _ = await mig_api(make_api)
    body = await api.get(f"/batch-size?service=vlm&gpu={selector}")
    assert body["gpu"]["index"] == index
    report = await api.post({"service": "vlm", "gpu": selector, "batch_size": 2, "peak_bytes": GIB})
    assert report["gpu"]["index"] == index
    assert api.engine.resolve_gpu("vlm", parse_gpu(selector)) == index  # what discovery calls, by UUID too


@pytest.mark.parametrize("selector", ["GPU-mmmm", "0:9", "5:1", "MIG-nope"])
async def test_an_unknown_mig_selector_is_a_400_naming_the_available_ones(make_api: MakeApi, selector: str) -> None:
    api, _ = await mig_api(make_api)
    before = dict(api.engine.state.services)
    body = await api.get(f"/batch-size?service=vlm&gpu={selector}", status=400)
    assert body["parameter"] == "gpu" and selector in body["error"]
    assert body["available"] == [1, BIG, SMALL, OTHER_SMALL]
    assert body["selectors"] == ["GPU-aaaa", "MIG-1111", "0:2", "MIG-2222", "0:7", "MIG-3333", "0:8"]
    assert "MIG-2222" in body["error"] and "0:7" in body["error"]
    bad = await api.post({"service": "vlm", "gpu": selector, "batch_size": 2}, status=400)
    assert bad["field"] == "gpu" and bad["selectors"] == body["selectors"]
    assert api.engine.state.services == before


@pytest.mark.parametrize("selector", ["0:", ":1", "0:1:2:3", "100:1", "a:b", str(MAX_GPU_INDEX + 1)])
async def test_a_malformed_selector_is_a_400_naming_the_forms(make_api: MakeApi, selector: str) -> None:
    api, _ = await mig_api(make_api)
    body = await api.get(f"/batch-size?service=vlm&gpu={selector}", status=400)
    assert body["parameter"] == "gpu"
    assert "parent:instance" in body["error"] or f"[0, {MAX_GPU_INDEX}]" in body["error"]


async def test_metrics_carry_the_mig_labels(make_api: MakeApi) -> None:
    api, _ = await mig_api(make_api)
    await settled(api, "MIG-2222", ticks=1)
    text = await api.metrics()
    assert (f'vlm_memory_total_bytes{{gpu="{SMALL}",gpu_instance_id="7",mig_uuid="MIG-2222",profile="1g.10gb",'
            f'uuid="GPU-mmmm"}} {float(9728 * MIB):.10e}') in text
    assert (f'vlm_memory_total_bytes{{gpu="{BIG}",gpu_instance_id="2",mig_uuid="MIG-1111",profile="3g.40gb",'
            f'uuid="GPU-mmmm"}}') in text
    assert 'vlm_memory_total_bytes{gpu="1",gpu_instance_id="",mig_uuid="",profile="",uuid="GPU-aaaa"}' in text
    assert (f'vlm_current_batch_size{{gpu="{SMALL}",gpu_instance_id="7",mig_uuid="MIG-2222",profile="1g.10gb",'
            f'service="vlm",uuid="GPU-mmmm"}}') in text
    assert 'vlm_gpu_up{gpu="%d",gpu_instance_id="8",mig_uuid="MIG-3333",profile="1g.10gb",uuid="GPU-mmmm"} 1.0' % (
        OTHER_SMALL) in text


def test_the_client_accepts_the_mig_forms() -> None:
    for gpu in ("MIG-2222", "0:7", "0:7:0", SMALL, str(SMALL)):
        assert BatchSizeClient("vlm", url="http://127.0.0.1:1", gpu=gpu).gpu == gpu
    for bad in ("0:", "0:1:2:3", MAX_GPU_INDEX + 1):
        with pytest.raises(ValueError, match="gpu"):
            BatchSizeClient("vlm", url="http://127.0.0.1:1", gpu=bad)


def test_the_client_and_server_agree_on_the_largest_index() -> None:
    from vlm_optimizer_client import validate

    assert validate.MAX_GPU_INDEX == MAX_GPU_INDEX


# -- the simulated backend ---------------------------------------------------------------------------


def mig_scenario(**mig: object) -> dict[str, object]:
    return {"name": "m", "duration_s": 60, "gpus": [{"index": 0, "name": "A100", "total_mb": 81920, "mig": [
        {"profile": "1g.10gb", "memory_gb": 10, **mig}, {"profile": "3g.40gb"}]}],
        "services": [{"name": "vlm", "gpu": "0:1", "base_mb": 2000, "per_item_mb": 500, "item_ms": 10}]}


def test_a_scenario_gpu_with_mig_is_one_entry_per_instance() -> None:
    sc = parse_scenario(mig_scenario())
    assert [(g.index, g.total_mb, g.mig_profile, g.gpu_instance_id) for g in sc.gpus] == [
        (mig_index(0, 1, 0), 10240, "1g.10gb", 1), (mig_index(0, 2, 0), 40960, "3g.40gb", 2)]
    assert sc.services[0].gpu == mig_index(0, 1, 0)
    samples = World(sc).sample(1.0)
    assert [(s.uuid, s.parent_uuid, s.mig_profile, s.memory_total_bytes) for s in samples] == [
        ("MIG-sim-0000-0000-01", "GPU-sim-0000-0000", "1g.10gb", 10240 * MIB),
        ("MIG-sim-0000-0000-02", "GPU-sim-0000-0000", "3g.40gb", 40960 * MIB)]
    assert all(s.is_mig and s.parent_index == 0 and s.compute_instance_id == 0 for s in samples)


@pytest.mark.parametrize(("mig", "field"), [
    ({"profile": "big"}, "gpus[0].mig[0].profile"),
    ({"memory_gb": 0}, "gpus[0].mig[0]"),
    ({"memory_gb": 50}, "gpus[0].mig"),  # 50 + 40 > 80
    ({"gpu_instance_id": 2}, "gpus[0].mig[1].gpu_instance_id"),  # the second defaults to 2
    ({"gpu_instance_id": 40}, "gpus[0].mig[0].gpu_instance_id"),
    ({"uuid": "GPU-x"}, "gpus[0].mig[0].uuid"),
    ({"slices": 1}, "gpus[0].mig[0].slices"),
])
def test_bad_mig_declarations_name_the_field(mig: dict[str, object], field: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(mig_scenario(**mig))
    assert info.value.field.startswith(field), info.value


def test_a_service_on_an_unknown_instance_names_the_choices() -> None:
    raw = mig_scenario()
    raw["services"] = [{"name": "vlm", "gpu": "0:5", "base_mb": 1, "per_item_mb": 1, "item_ms": 1}]
    with pytest.raises(ScenarioError, match=r"0:1.*0:2"):
        parse_scenario(raw)


async def test_state_on_a_mig_device_survives_a_restart(make_api: MakeApi) -> None:
    """The MIG index is stable, so a restarted optimizer finds the service's state on the same slice."""
    from optimizer.engine import Engine
    from optimizer.persistence import dump, restore

    api, _ = await mig_api(make_api)
    await settled(api, "MIG-2222", ticks=1)
    before = api.engine.state.services[(SMALL, "vlm")]
    again, _ = await mig_api(make_api)  # a new process: a fresh engine on a freshly started backend
    fresh = Engine(SETTINGS)
    restore(fresh, dump(api.engine), api.clock())
    assert fresh.state.services[(SMALL, "vlm")].batch_size == before.batch_size
    assert {g.index for g in again.engine.snapshot.gpus} >= {SMALL}  # type: ignore[union-attr]


async def test_the_status_command_shows_a_slice_on_its_parent(make_api: MakeApi) -> None:
    from optimizer.manage.render import gpu_lines

    api, _ = await mig_api(make_api)
    gpus = {g["uuid"]: g for g in (await api.get("/status"))["gpus"]}
    assert gpu_lines(gpus["MIG-2222"])[0] == (f"GPU {SMALL}  NVIDIA A100-SXM4-80GB MIG 1g.10gb  (MIG-2222)  "
                                              "MIG 1g.10gb 0:7 on GPU 0 (GPU-mmmm)")
    assert gpu_lines(gpus["GPU-aaaa"])[0] == "GPU 1  NVIDIA A100-SXM4-80GB  (GPU-aaaa)"
