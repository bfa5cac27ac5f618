"""``GET /services`` and the ``pod`` a poll or report names, over a real server on an ephemeral port.

The pods are handed to the engine as discovery would (``engine.set_pods``); discovery itself, against
a fake Kubernetes API server, is tested in ``tests/test_kube_*.py`` and ``tests/test_discovery.py``.
"""

from __future__ import annotations

import pytest

from optimizer.pods import DeclaredProfile, PodInfo
from tests.fakes import uuid_of
from tests.api_harness import Api, MakeApi


def pod(name: str, service: str, *, ready: bool = True, phase: str = "Running", **declared: object) -> PodInfo:
    return PodInfo(namespace="vlm", name=name, uid=f"uid-{name}", node="node-a", service=service, phase=phase,
                   ready=ready, deleting=False, resource_version="1", ips=("127.0.0.1",),  # the tests' client
                   profile=DeclaredProfile(**declared))  # type: ignore[arg-type]


async def test_without_discovery_services_lists_the_reporting_services(api: Api) -> None:
    await api.get("/batch-size?service=svc-a")
    body = await api.get("/services")
    assert body["discovery"] == {"enabled": False}
    assert body["pods"] == []
    assert body["services"] == [{"service": "svc-a", "gpu": 0, "share": 1.0, "batch_size": 4,
                                 "optimal_batch_size": 4, "source": "reports"}]


async def test_services_shows_pods_their_gpu_share_and_batch(make_api: MakeApi) -> None:
    api = await make_api(gpus=2)
    await api.tick()
    api.engine.set_pods({p.key: p for p in (
        pod("cap-1", "captioner", weight=1.0, per_item_mb=1800.0),
        pod("vqa-1", "vqa", weight=2.0, gpu=1),
        pod("new-1", "newcomer", ready=False, phase="Pending", gpu_mem_typ_mb=4000),
    )}, now=api.clock())
    await api.get("/batch-size?service=captioner&gpu=0&pod=cap-1")
    await api.get("/batch-size?service=other")  # not in Kubernetes: reports only, on GPU 0
    body = await api.get("/services")
    rows = {r["pod"]: r for r in body["pods"]}
    cap, vqa, new = rows["vlm/cap-1"], rows["vlm/vqa-1"], rows["vlm/new-1"]
    assert cap["gpu"] == {"index": 0, "uuid": uuid_of(0)} and cap["gpu_source"] == "reports"
    assert cap["state"] == "ready" and cap["counted"] is True and cap["gpus_counted"] == [0]
    assert cap["batch_size"] == api.engine.state.services[(0, "captioner")].batch_size
    assert cap["declared"] == {"per_item_mb": 1800.0, "weight": 1.0}
    assert vqa["gpu_source"] == "annotation" and vqa["gpus_counted"] == [1] and vqa["batch_size"] is None
    # the newcomer has not said where it runs: counted on both GPUs, its footprint held back on each
    assert new["state"] == "starting" and new["gpu"] is None and new["gpu_source"] == "unknown"
    assert new["gpus_counted"] == [0, 1] and new["reserved_bytes"] == 4000 * 1024 * 1024
    # GPU 0: captioner 1 + newcomer 1 + other 1 = 3; GPU 1: vqa 2 + newcomer 1 = 3
    assert cap["share"] == pytest.approx(1 / 3, abs=1e-4)
    assert vqa["share"] == pytest.approx(2 / 3, abs=1e-4)
    assert new["share"] == pytest.approx(1 / 3, abs=1e-4)
    assert body["services"] == [{"service": "other", "gpu": 0, "share": pytest.approx(1 / 3, abs=1e-4),
                                 "batch_size": api.engine.state.services[(0, "other")].batch_size,
                                 "optimal_batch_size": api.engine.state.services[(0, "other")].optimal,
                                 "source": "reports"}]
    assert body["gpus"] == [{"index": 0, "total_weight": 3.0, "reserved_bytes": 4000 * 1024 * 1024},
                            {"index": 1, "total_weight": 3.0, "reserved_bytes": 4000 * 1024 * 1024}]


async def test_a_report_naming_its_pod_pins_the_pod_to_its_gpu(make_api: MakeApi) -> None:
    api = await make_api(gpus=2)
    await api.tick()
    api.engine.set_pods({"vlm/a-1": pod("a-1", "a")}, now=api.clock())
    assert {i: dict(c) for i, c in api.engine.state.roster.pods.items()} == {0: {"a": 1}, 1: {"a": 1}}
    await api.post({"service": "a", "gpu": 1, "pod": "vlm/a-1", "batch_size": 4})
    assert {i: dict(c) for i, c in api.engine.state.roster.pods.items()} == {1: {"a": 1}}
    rows = (await api.get("/services"))["pods"]
    assert rows[0]["gpu"]["index"] == 1 and rows[0]["gpu_source"] == "reports"


@pytest.mark.parametrize("value", ["Upper", "a/b/c", "-lead", "x" * 300, "a b"])
async def test_a_bad_pod_is_a_400_naming_it_and_changes_nothing(api: Api, value: str) -> None:
    body = await api.get(f"/batch-size?service=svc-a&pod={value}", status=400)
    assert body["parameter"] == "pod" and "pod name" in body["error"]
    body = await api.post({"service": "svc-a", "pod": value}, status=400)
    assert body["field"] == "pod"
    assert (0, "svc-a") not in api.engine.state.services
