"""Discovery end to end: the fake Kubernetes API server (a real HTTP server, through the official
client and a kubeconfig) feeds the optimizer's read API, its shares, its metrics and, with
publishing on, the pods' annotations.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from optimizer.api import build_app
from optimizer.cli import main
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.kube.discovery import Discovery
from optimizer.pods import BATCH_SIZE_ANNOTATION, CLEANUP_EPOCH_ANNOTATION, PodInfo
from optimizer.sampler import Sampler
from tests.fake_kube import FakeKube, make_pod
from tests.fakes import FakeClock, ScriptedBackend, no_sleep
from tests.kube_helpers import kube_settings, notify_pod_changes
from tests.policy_helpers import ROOT

Client = TestClient[web.Request, web.Application]


def labels(service: str) -> dict[str, str]:
    return {"vlm-gpu-optimizer/client": "true", "app.kubernetes.io/name": service}


async def never(_: float) -> None:
    """The publishing loop's wait: only a change of the pods wakes it in these tests."""
    await asyncio.Event().wait()


@dataclass
class Node:
    client: Client
    engine: Engine
    sampler: Sampler
    discovery: Discovery
    kube: FakeKube
    changed: asyncio.Condition

    async def pods_where(self, predicate: Callable[[Mapping[str, PodInfo]], bool], timeout: float = 5.0) -> None:
        """Until the engine's pods satisfy ``predicate`` (each change of the pods wakes this)."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: predicate(self.engine.pods))

    async def get(self, path: str, status: int = 200) -> Any:
        resp = await self.client.get(path)
        assert resp.status == status, await resp.text()
        return await resp.json()

    async def metrics(self) -> str:
        resp = await self.client.get("/metrics")
        return await resp.text()


class MakeNode(Protocol):
    def __call__(self, **kube_overrides: Any) -> Awaitable[Node]: ...


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as k:
        yield k


@pytest.fixture
def make_node(kube: FakeKube, tmp_path: Path, aiohttp_client: AiohttpClient) -> MakeNode:
    async def make(**kube_overrides: Any) -> Node:
        clock = FakeClock()
        engine = Engine(Settings())
        sampler = Sampler(ScriptedBackend(1), engine, clock=clock, sleep=no_sleep)
        await sampler.tick()
        changed = notify_pod_changes(engine)
        settings = kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig")), **kube_overrides)
        discovery = Discovery(engine, settings, clock=clock, sleep=never)
        client = await aiohttp_client(build_app(engine, sampler, run_sampler=False, discovery=discovery))
        return Node(client, engine, sampler, discovery, kube, changed)
    return make


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name.split(" ")[0]:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_discovered_pods_share_the_gpu_and_the_share_moves_as_pods_come_and_go(
        kube: FakeKube, make_node: MakeNode) -> None:
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    kube.add_pod(make_pod("elsewhere", node="node-b", labels=labels("captioner")))
    node = await make_node()
    await node.pods_where(lambda p: "default/cap-1" in p)
    await node.get("/batch-size?service=captioner&pod=cap-1")

    def share(body: Any, pod: str) -> float:
        (row,) = [r for r in body["pods"] if r["pod"] == pod]
        return float(row["share"])

    body = await node.get("/services")
    assert [r["pod"] for r in body["pods"]] == ["default/cap-1"]  # not the pod on node-b
    assert body["discovery"]["enabled"] is True and body["discovery"]["node"] == "node-a"
    assert share(body, "default/cap-1") == 1.0

    # A second service is scheduled: it holds a share from now on (starting), and its model's memory
    # is held back until it is ready.
    kube.add_pod(make_pod("vqa-1", labels=labels("vqa"), ready=False, phase="Pending",
                          annotations={"vlm-gpu-optimizer/gpu_mem_typ": "8000"}))
    await node.pods_where(lambda p: "default/vqa-1" in p)
    body = await node.get("/services")
    assert share(body, "default/cap-1") == 0.5
    (vqa,) = [r for r in body["pods"] if r["pod"] == "default/vqa-1"]
    assert vqa["state"] == "starting" and vqa["reserved_bytes"] == 8000 * 1024 * 1024
    assert body["gpus"] == [{"index": 0, "total_weight": 2.0, "reserved_bytes": 8000 * 1024 * 1024}]

    kube.set_ready("default", "vqa-1", True)
    await node.pods_where(lambda p: p["default/vqa-1"].ready)
    body = await node.get("/services")
    assert body["gpus"][0]["reserved_bytes"] == 0 and share(body, "default/cap-1") == 0.5

    # Unready after having been ready: its share is released.
    kube.set_ready("default", "vqa-1", False)
    await node.pods_where(lambda p: not p["default/vqa-1"].ready)
    assert share(await node.get("/services"), "default/cap-1") == 1.0
    kube.set_ready("default", "vqa-1", True)
    await node.pods_where(lambda p: p["default/vqa-1"].ready)
    assert share(await node.get("/services"), "default/cap-1") == 0.5

    kube.delete_pod("default", "vqa-1")
    await node.pods_where(lambda p: "default/vqa-1" not in p)
    assert share(await node.get("/services"), "default/cap-1") == 1.0

    text = await node.metrics()
    assert 'vlm_optimizer_discovered_pods{state="ready"} 1.0' in text
    assert 'vlm_optimizer_discovered_pods{state="starting"} 0.0' in text
    assert "vlm_optimizer_kube_synced 1.0" in text


async def test_relisting_after_410_keeps_the_shares_right(kube: FakeKube, make_node: MakeNode) -> None:
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    kube.add_pod(make_pod("vqa-1", labels=labels("vqa")))
    node = await make_node()
    await node.pods_where(lambda p: len(p) == 2)
    await kube.wait_for(lambda k: k.watches_active == 1)
    kube.delete_pod("default", "vqa-1")  # lost with the history: only a relist can tell
    kube.expire_history()
    kube.end_watches()
    await node.pods_where(lambda p: set(p) == {"default/cap-1"})
    assert node.discovery.watcher.stats.watch_restarts_total.get("expired", 0) >= 1
    assert 'vlm_optimizer_kube_watch_restarts_total{reason="expired"}' in await node.metrics()


async def test_a_slow_or_unreachable_api_server_does_not_hold_up_batch_size(kube: FakeKube,
                                                                           make_node: MakeNode) -> None:
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    kube.gate.clear()  # the API server holds every answer
    node = await make_node()
    await kube.wait_for(lambda k: k.held >= 1)  # discovery's list is waiting on the server
    body = await node.get("/batch-size?service=captioner")  # answered while the list hangs
    assert body["batch_size"] == 4
    services = await node.get("/services")
    assert services["discovery"]["synced"] is False and services["pods"] == []
    kube.gate.set()
    await node.pods_where(lambda p: "default/cap-1" in p)
    # once a pod added after the watch opened has arrived, the watch is running
    await kube.wait_for(lambda k: k.watches_active == 1)
    kube.add_pod(make_pod("probe", labels=labels("captioner")))
    await node.pods_where(lambda p: "default/probe" in p)
    assert (await node.get("/services"))["discovery"]["synced"] is True


async def test_publishing_writes_batch_size_and_cleanup_epoch_into_the_pod(kube: FakeKube,
                                                                          make_node: MakeNode) -> None:
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    node = await make_node(publish=True)

    def annotations(k: FakeKube) -> dict[str, str]:
        out: dict[str, str] = k.pods[("default", "cap-1")]["metadata"].get("annotations") or {}
        return out

    await kube.wait_for(lambda k: BATCH_SIZE_ANNOTATION in annotations(k))
    decision = node.engine.state.services[(0, "captioner")]  # registered by publishing, without a poll
    assert annotations(kube)[BATCH_SIZE_ANNOTATION] == str(decision.batch_size)
    assert annotations(kube)[CLEANUP_EPOCH_ANNOTATION] == "0"
    patches = [r for r in kube.requests if r.method == "PATCH"]
    assert len(patches) == 1 and patches[0].content_type == "application/merge-patch+json"
    await node.pods_where(lambda p: p["default/cap-1"].published.get(BATCH_SIZE_ANNOTATION) is not None)
    # The watch can bring the patched pod back before the patch's own call has returned and been
    # counted: wait for the publishing pass that counts it.
    publisher = node.discovery.publisher
    assert publisher is not None
    async with asyncio.timeout(5):
        rounds = 1
        while publisher.stats.patches_total < 1:  # each pass of publishing wakes this
            await node.discovery.wait_publish_rounds(rounds)
            rounds += 1
    assert "vlm_optimizer_kube_annotation_patches_total 1.0" in await node.metrics()


async def test_publishing_without_permission_is_counted_and_serving_goes_on(kube: FakeKube,
                                                                           make_node: MakeNode) -> None:
    kube.forbid_patch = True
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    node = await make_node(publish=True)
    await kube.wait_for(lambda k: any(r.method == "PATCH" for r in k.requests))
    publisher = node.discovery.publisher
    assert publisher is not None
    async with asyncio.timeout(5):
        rounds = 1
        while "default" not in publisher.stats.forbidden_namespaces:  # each pass of publishing wakes this
            await node.discovery.wait_publish_rounds(rounds)
            rounds += 1
    status = (await node.get("/services"))["discovery"]
    assert status["forbidden_namespaces"] == ["default"] and status["patches"] == 0
    assert 'vlm_optimizer_kube_api_errors_total{reason="forbidden"} 1.0' in await node.metrics()
    assert (await node.get("/batch-size?service=captioner"))["batch_size"] == 4


# --------------------------------------------------------------------------- serve, as a real process


async def test_serve_with_discovery_reads_the_pods_through_a_kubeconfig(kube: FakeKube, tmp_path: Path) -> None:
    """``serve --kube-discovery --kubeconfig`` as a separate process, against the fake API server."""
    kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_OPTIMIZER_") and k != "NODE_NAME"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "optimizer", "serve", "--backend", "simulated", "--host", "127.0.0.1", "--port",
        str(port), "--log-format", "json", "--kube-discovery", "--kubeconfig",
        kube.write_kubeconfig(str(tmp_path / "kubeconfig")), "--node-name", "node-a", "--admin-port", "0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:  # until the process answers and has listed the pods; the back-off is not the sync
                try:
                    async with session.get(f"http://127.0.0.1:{port}/services") as resp:
                        body = await resp.json()
                        if body["pods"]:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        assert [p["pod"] for p in body["pods"]] == ["default/cap-1"]
        assert body["discovery"]["node"] == "node-a"
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode in (0, -15), err.decode()
    assert b'"event": "discovery_stopped"' in err


@pytest.mark.parametrize(("flags", "key"), [
    (["--kube-discovery"], "kubernetes.node_name"),
    (["--kube-publish"], "kubernetes.publish"),
    (["--kube-discovery", "--node-name", "Not_A_Node"], "kubernetes.node_name"),
])
def test_bad_kubernetes_settings_exit_2_naming_the_key(flags: list[str], key: str,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert main(["serve", "--backend", "none", *flags]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
