"""The kubelet's pod-resources API: our proto and stubs, the client, the poller and discovery.

Against :class:`tests.fake_kubelet.FakeKubelet`, a real gRPC server on a unix socket serving
``v1.PodResourcesLister/List`` with the kubelet's messages; a slow one, a missing socket and
malformed answers (garbage bytes, bytes that are no response, bad device IDs, other resources).
"""

from __future__ import annotations

import asyncio
import dataclasses
import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from optimizer import coordination
from optimizer.api import build_app
from optimizer.config import Settings
from optimizer.engine import Engine
from optimizer.kube.discovery import Discovery
from optimizer.kube.podresources import api_pb2
from optimizer.kube.podresources.client import PodResourcesClient, PodResourcesError, gpu_devices, normalise_device_id
from optimizer.kube.podresources.poller import PodResourcesPoller
from optimizer.config.kube import KubeSettingError, KubeSettings, apply_kube
from optimizer.pods import DeclaredProfile, PodInfo
from optimizer.sampler import Sampler
from tests.fake_kube import FakeKube, make_pod
from tests.fake_kubelet import FakeKubelet, GarbageSocket, answer, short_dir
from tests.fakes import FakeClock, ScriptedBackend, no_sleep, uuid_of
from tests.kube_helpers import kube_settings, kube_threads, notify_pod_changes
from tests.policy_helpers import ROOT, gpu

PKG = ROOT / "optimizer" / "kube" / "podresources"
MIG = "MIG-11111111-2222-5333-8444-555555555555"


# --------------------------------------------------------------------------- the proto and its stubs


def test_the_proto_keeps_the_kubelets_names_and_field_numbers() -> None:
    """The wire format is the names and numbers: /v1.PodResourcesLister/List and these fields."""
    fd = api_pb2.DESCRIPTOR
    assert fd.package == "v1"
    service = fd.services_by_name["PodResourcesLister"]
    assert service.full_name == "v1.PodResourcesLister"
    method = service.methods_by_name["List"]
    assert (method.input_type.full_name, method.output_type.full_name) == (
        "v1.ListPodResourcesRequest", "v1.ListPodResourcesResponse")
    fields = {m.name: {f.name: (f.number, f.type, f.is_repeated) for f in m.fields}
              for m in fd.message_types_by_name.values()}
    F = api_pb2.PodResources.DESCRIPTOR.fields_by_name["name"]
    string, message, repeated, optional = F.TYPE_STRING, F.TYPE_MESSAGE, True, False
    assert fields == {
        "ListPodResourcesRequest": {},
        "ListPodResourcesResponse": {"pod_resources": (1, message, repeated)},
        "PodResources": {"name": (1, string, optional), "namespace": (2, string, optional),
                         "containers": (3, message, repeated)},
        "ContainerResources": {"name": (1, string, optional), "devices": (2, message, repeated)},
        "ContainerDevices": {"resource_name": (1, string, optional), "device_ids": (2, string, repeated)},
    }


def test_fields_we_left_out_are_skipped_when_a_kubelet_sends_them() -> None:
    """A current kubelet also sends ContainerResources.cpu_ids (3) and ContainerDevices.topology (3)."""
    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field
        return bytes([number << 3 | 2, len(payload)]) + payload
    topology = field(1, b"\x08\x01")  # TopologyInfo{nodes: [NUMANode{ID: 1}]}
    device = field(1, b"nvidia.com/gpu") + field(2, b"GPU-a") + field(3, topology)
    container = field(1, b"c0") + field(2, device) + b"\x18\x07"  # cpu_ids: [7], a varint field 3
    pod = field(1, b"one") + field(2, b"vlm") + field(3, container)
    parsed = api_pb2.ListPodResourcesResponse.FromString(field(1, pod))
    assert gpu_devices(parsed).devices == {"vlm/one": ("GPU-a",)}


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extras) not installed")
def test_the_committed_stubs_equal_a_fresh_generation(tmp_path: Path) -> None:
    work = tmp_path / "optimizer" / "kube" / "podresources"
    work.mkdir(parents=True)
    shutil.copy(PKG / "api.proto", work / "api.proto")
    shutil.copy(PKG / "generate.sh", work / "generate.sh")
    subprocess.run(["sh", str(work / "generate.sh")], check=True, env={**os.environ, "PYTHON": sys.executable},
                   cwd=tmp_path)
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        assert filecmp.cmp(work / name, PKG / name, shallow=False), f"{name} is stale: run make podresources-stubs"


# --------------------------------------------------------------------------- device IDs


@pytest.mark.parametrize("raw, expected", [
    ("GPU-8f2c0000-1111-2222-3333-444455556666", "GPU-8f2c0000-1111-2222-3333-444455556666"),
    ("GPU-8f2c0000-1111-2222-3333-444455556666::3", "GPU-8f2c0000-1111-2222-3333-444455556666"),  # time-sliced
    (MIG, MIG), ("1", 1), ("", None), ("nvidia0/gi1", None), ("GPU-x/../../etc", None), ("-1", None),
    ("GPU-" + "a" * 200, None),
])
def test_device_ids_are_uuids_replicas_or_indexes_and_nothing_else(raw: str, expected: str | int | None) -> None:
    assert normalise_device_id(raw) == expected


# --------------------------------------------------------------------------- the client, over the real transport


def test_list_maps_each_pod_to_its_gpu_devices() -> None:
    with FakeKubelet() as kubelet:
        kubelet.response = answer({
            "vlm/one": [("nvidia.com/gpu", [uuid_of(0)])],
            "vlm/two": [("nvidia.com/gpu", [uuid_of(0), uuid_of(1)])],  # one container on two GPUs
            "vlm/split": [("nvidia.com/gpu", [uuid_of(1)]), ("nvidia.com/gpu", [uuid_of(0)])],  # two containers
            "vlm/shared": [("nvidia.com/gpu.shared", [uuid_of(1) + "::0", uuid_of(1) + "::1"])],
            "vlm/slice": [("nvidia.com/mig-1g.10gb", [MIG])],
            "vlm/nic": [("example.com/sriov", ["0000:3b:00.1"])],
            "vlm/odd": [("nvidia.com/gpu", ["nvidia0/vgpu1", ""])],
        })
        listing = PodResourcesClient(kubelet.socket, timeout=5.0).list()
    assert dict(listing.devices) == {
        "vlm/one": (uuid_of(0),), "vlm/two": (uuid_of(0), uuid_of(1)), "vlm/split": (uuid_of(1), uuid_of(0)),
        "vlm/shared": (uuid_of(1),), "vlm/slice": (MIG,),
    }
    assert listing.ignored_resources == ("example.com/sriov",)
    assert listing.bad_device_ids == 2
    assert kubelet.calls == 1


def test_a_slow_kubelet_is_a_timeout_not_a_hang() -> None:
    with FakeKubelet() as kubelet:
        kubelet.hang = True
        with pytest.raises(PodResourcesError) as err:
            PodResourcesClient(kubelet.socket, timeout=0.3).list()
    assert err.value.reason == "timeout"


def test_bytes_that_are_no_response_and_garbage_on_the_socket_are_errors() -> None:
    with FakeKubelet() as kubelet:
        kubelet.raw = b"\xff\xff\xff\xff\x0f\x0a\x99"
        with pytest.raises(PodResourcesError) as err:
            PodResourcesClient(kubelet.socket, timeout=2.0).list()
    assert err.value.reason == "internal"  # grpc: exception deserializing the response
    with GarbageSocket() as garbage:
        with pytest.raises(PodResourcesError) as err:
            PodResourcesClient(garbage.socket, timeout=2.0).list()
    assert err.value.reason in ("unavailable", "internal", "unknown")


# --------------------------------------------------------------------------- the poller: never raises, logs once


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, tuple[str, ...]]] = []

    def __call__(self, devices: Mapping[str, tuple[str, ...]]) -> None:
        self.calls.append(dict(devices))


def poller(socket: str, changes: Recorder, timeout: float = 2.0) -> PodResourcesPoller:
    return PodResourcesPoller(socket, interval=10.0, timeout=timeout, on_change=changes, clock=FakeClock(),
                              sleep=no_sleep)


async def test_a_missing_socket_falls_back_and_is_logged_once() -> None:
    changes = Recorder()
    empty = short_dir()
    p = poller(str(empty / "kubelet.sock"), changes)
    with capture_logs() as logs:
        for _ in range(3):
            await p.poll_once()
    shutil.rmtree(empty)
    assert [e["event"] for e in logs] == ["pod_resources_absent"]
    assert changes.calls == [{}]
    assert p.status()["state"] == "absent" and p.status()["errors"] == {"absent": 3}
    assert p.polls == 3


async def test_a_slow_kubelet_times_out_without_stalling_the_loop_and_drops_to_the_fallback() -> None:
    changes = Recorder()
    with FakeKubelet() as kubelet:
        kubelet.response = answer({"vlm/one": [("nvidia.com/gpu", [uuid_of(1)])]})
        p = poller(kubelet.socket, changes, timeout=0.5)
        await p.poll_once()
        assert changes.calls == [{"vlm/one": (uuid_of(1),)}] and p.stats.state == "ok"
        kubelet.hang, kubelet.entered = True, type(kubelet.entered)()
        task = asyncio.create_task(p.poll_once())
        loop = asyncio.get_running_loop()
        # The event loop goes on while List hangs in the kubelet: it runs this wait, and the poll is pending.
        assert await loop.run_in_executor(None, kubelet.entered.wait, 5.0)
        assert not task.done()
        await task
        assert p.stats.state == "failing" and p.status()["errors"] == {"timeout": 1}
        assert changes.calls[-1] == {}  # annotations and reports decide again
        kubelet.release.set()
    assert [t for t in kube_threads() if t == "kube-podresources"] == []


async def test_malformed_answers_never_crash_the_poller_and_it_recovers() -> None:
    changes = Recorder()
    with GarbageSocket() as garbage:
        p = poller(garbage.socket, changes)
        with capture_logs() as logs:
            await p.poll_once()
            await p.poll_once()
        assert p.stats.state == "failing" and sum(p.stats.errors_total.values()) == 2
        assert [e["event"] for e in logs].count("pod_resources_failed") == 1  # once per change of state
    with FakeKubelet() as kubelet:
        kubelet.raw = b"\x0a\x05\x0a\x03\xff\xfe\xfd"  # a pod whose name is not UTF-8
        p.socket_path = kubelet.socket
        p.client = PodResourcesClient(kubelet.socket, timeout=2.0)
        await p.poll_once()
        assert p.stats.state == "failing"
        kubelet.raw = None
        kubelet.response = answer({"vlm/one": [("nvidia.com/gpu", ["not-a-gpu", uuid_of(0)])],
                                   "vlm/fpga": [("example.com/fpga", [uuid_of(1)])]})
        with capture_logs() as logs:
            await p.poll_once()
        assert [e["event"] for e in logs] == ["pod_resources_ok"]
    assert p.status() | {"socket": None} == {
        "socket": None, "state": "ok", "last_ok_at": 1_000.0, "last_error": None, "pods": 1,
        "errors": p.stats.errors_total, "ignored_resources": ["example.com/fpga"], "bad_device_ids": 1}
    assert changes.calls == [{}, {"vlm/one": (uuid_of(0),)}]


# --------------------------------------------------------------------------- the roster: devices decide


def pod(name: str, service: str, *, gpu_: int | str | None = None, typ_mb: int | None = None,
        ready: bool = True) -> PodInfo:
    return PodInfo(namespace="vlm", name=name, uid=f"uid-{name}", node="node-a", service=service,
                   phase="Running" if ready else "Pending", ready=ready, deleting=False, resource_version="1",
                   profile=DeclaredProfile(gpu=gpu_, gpu_mem_typ_mb=typ_mb))


def test_a_pods_devices_decide_its_gpus_and_a_pod_on_two_gpus_counts_on_both() -> None:
    gpus = [gpu(10, index=0), gpu(10, index=1), gpu(10, index=2)]
    ps = {p.key: p for p in (pod("a", "a", gpu_=2), pod("b", "b", typ_mb=500, ready=False), pod("c", "c", gpu_=2),
                             pod("d", "d"))}
    devices = {"vlm/a": ("GPU-test-1",),  # the kubelet wins over the annotation
               "vlm/b": ("GPU-test-0", "GPU-test-2"),  # two GPUs: counted, and its memory held back, on both
               "vlm/c": ("GPU-unknown",),  # matches no GPU here: its annotation decides
               "vlm/d": ("1",)}  # deviceIDStrategy index
    roster = coordination.build_roster(ps, set(), {}, gpus, devices)
    assert {i: dict(c) for i, c in roster.pods.items()} == {0: {"b": 1}, 1: {"a": 1, "d": 1}, 2: {"b": 1, "c": 1}}
    assert dict(roster.reserved_bytes) == {0: 500 * 2**20, 2: 500 * 2**20}
    assert coordination.pod_gpus(ps["vlm/b"], {}, gpus, devices) == ((0, 2), "kubelet")
    assert coordination.pod_gpus(ps["vlm/c"], {}, gpus, devices) == ((2,), "annotation")
    assert coordination.pod_gpus(ps["vlm/d"], {}, gpus, {}) == ((), "unknown")


def test_a_mig_device_is_matched_by_the_entrys_uuid() -> None:
    gpus = [gpu(80, index=0), dataclasses.replace(gpu(10, index=1), uuid=MIG)]
    assert coordination.pod_gpus(pod("s", "s"), {}, gpus, {"vlm/s": (MIG,)}) == ((1,), "kubelet")
    assert coordination.pod_gpus(pod("s", "s"), {}, gpus, {"vlm/s": ("1",)}) == ((), "unknown")  # an index: whole GPUs


async def test_the_engine_moves_shares_when_the_kubelets_answer_changes() -> None:
    engine = Engine(Settings())
    sampler = Sampler(ScriptedBackend(2), engine, clock=FakeClock(), sleep=no_sleep)
    await sampler.tick()
    engine.set_pods({"vlm/a": pod("a", "a")})
    assert {i: dict(c) for i, c in engine.state.roster.pods.items()} == {0: {"a": 1}, 1: {"a": 1}}
    engine.set_pod_devices({"vlm/a": (uuid_of(1),)})
    assert {i: dict(c) for i, c in engine.state.roster.pods.items()} == {1: {"a": 1}}
    assert engine.set_pod_devices({"vlm/a": (uuid_of(1),)}) == ()
    engine.set_pod_devices({})
    assert {i: dict(c) for i, c in engine.state.roster.pods.items()} == {0: {"a": 1}, 1: {"a": 1}}


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("key, value", [("pod_resources_socket", "relative/kubelet.sock"),
                                        ("pod_resources_socket", 7), ("pod_resources_interval", "0.5"),
                                        ("pod_resources_interval", "soon")])
def test_bad_pod_resources_settings_name_the_key_and_change_nothing(key: str, value: object) -> None:
    base = KubeSettings()
    with pytest.raises(KubeSettingError) as err:
        apply_kube(base, {key: value})
    assert err.value.key == f"kubernetes.{key}"
    assert base.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"


def test_pod_resources_settings_accept_a_path_off_and_an_interval() -> None:
    s = apply_kube(KubeSettings(), {"pod_resources_socket": "", "pod_resources_interval": "30"})
    assert (s.pod_resources_socket, s.pod_resources_interval) == ("", 30.0)


# --------------------------------------------------------------------------- discovery end to end


def labels(service: str) -> dict[str, str]:
    return {"vlm-gpu-optimizer/client": "true", "app.kubernetes.io/name": service}


async def never(_: float) -> None:
    await asyncio.Event().wait()


async def test_discovery_maps_pods_to_gpus_by_the_kubelets_devices_and_services_shows_it(
        tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    async with FakeKube() as kube:
        kube.add_pod(make_pod("cap-1", labels=labels("captioner")))
        kube.add_pod(make_pod("big-1", labels=labels("big")))
        kube.add_pod(make_pod("noted-1", labels=labels("noted"), annotations={"vlm-gpu-optimizer/gpu": "0"}))
        with FakeKubelet() as kubelet:
            kubelet.response = answer({"default/cap-1": [("nvidia.com/gpu", [uuid_of(1)])],
                                       "default/big-1": [("nvidia.com/gpu", [uuid_of(0), uuid_of(1)])]})
            engine = Engine(Settings())
            clock = FakeClock()
            sampler = Sampler(ScriptedBackend(2), engine, clock=clock, sleep=no_sleep)
            await sampler.tick()
            changed = notify_pod_changes(engine)
            settings = kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig")),
                                     pod_resources_socket=kubelet.socket)
            discovery = Discovery(engine, settings, clock=clock, sleep=never)
            client = await aiohttp_client(build_app(engine, sampler, run_sampler=False, discovery=discovery))
            assert discovery.pod_resources is not None
            await discovery.pod_resources.wait_polls(1)
            async with asyncio.timeout(5.0), changed:
                await changed.wait_for(lambda: len(engine.pods) == 3)
            roster = {i: dict(c) for i, c in engine.state.roster.pods.items()}
            assert roster == {0: {"big": 1, "noted": 1}, 1: {"captioner": 1, "big": 1}}
            resp = await client.get("/services")
            assert resp.status == 200
            body = await resp.json()
            assert body["discovery"]["gpu_source"] == "kubelet"
            assert body["discovery"]["pod_resources"]["state"] == "ok"
            assert body["discovery"]["pod_resources"]["pods"] == 2
            rows = {r["pod"]: r for r in body["pods"]}
            assert rows["default/big-1"]["gpu_source"] == "kubelet"
            assert rows["default/big-1"]["gpus_counted"] == [0, 1]
            assert [g["uuid"] for g in rows["default/big-1"]["gpus"]] == [uuid_of(0), uuid_of(1)]
            assert rows["default/big-1"]["devices"] == [uuid_of(0), uuid_of(1)]
            assert (rows["default/cap-1"]["gpu_source"], rows["default/cap-1"]["gpus_counted"]) == ("kubelet", [1])
            assert (rows["default/noted-1"]["gpu_source"], rows["default/noted-1"]["gpus_counted"]) == (
                "annotation", [0])
        # the kubelet gone (its socket removed): the next poll falls back to the annotations
        await discovery.pod_resources.poll_once()
        body = await (await client.get("/services")).json()
        assert body["discovery"]["gpu_source"] == "annotations"
        assert body["discovery"]["pod_resources"]["state"] == "absent"
        rows = {r["pod"]: r for r in body["pods"]}
        assert (rows["default/cap-1"]["gpu_source"], rows["default/cap-1"]["gpus_counted"]) == ("unknown", [0, 1])


_AS_KUBELET_DOES = 0o755, 0o750  # Go's net.Listen under umask 022; os.MkdirAll(dir, 0o750): both root's


def _kubelet_like(kubelet: FakeKubelet) -> None:
    os.chmod(kubelet.socket, _AS_KUBELET_DOES[0])
    os.chmod(kubelet.dir, _AS_KUBELET_DOES[1])


_CLIENT = ("from optimizer.kube.podresources.client import PodResourcesClient, PodResourcesError\n"
           "try:\n    print(len(PodResourcesClient(sys.argv[1], timeout=2.0).list().devices))\n"
           "except PodResourcesError as e:\n    print(e.reason)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the client as another UID")
def test_the_optimizers_non_root_uid_cannot_open_the_kubelets_socket() -> None:
    """As on most nodes: the kubelet's socket is root's, and the base bundle runs the optimizer as 10001."""
    with FakeKubelet() as kubelet:
        _kubelet_like(kubelet)
        script = ("import os, sys, grpc\n"  # everything imported while still root: then the UID changes
                  "from optimizer.kube.podresources import api_pb2, api_pb2_grpc, client\n"
                  "os.setgroups([]); os.setgid(10001); os.setuid(10001)\n" + _CLIENT)
        out = subprocess.run([sys.executable, "-c", script, kubelet.socket], capture_output=True, text=True,
                             timeout=30, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "permission_denied", out.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv, to run the client as UID 0 without capabilities")
def test_uid_0_without_any_capability_opens_it_and_writes_its_state_as_ops_k8s_kubelet_runs_it(
        tmp_path: Path) -> None:
    """ops/k8s-kubelet: UID 0, group 10001, every capability dropped; the state directory 0:10001 0700."""
    state = short_dir()
    os.chown(state, 0, 10001)
    os.chmod(state, 0o700)
    with FakeKubelet() as kubelet:
        kubelet.response = answer({"vlm/one": [("nvidia.com/gpu", [uuid_of(0)])]})
        _kubelet_like(kubelet)
        script = ("import sys, os\n" + _CLIENT + "open(os.path.join(sys.argv[2], 'state.json'), 'w').write('{}')\n"
                  "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n")
        out = subprocess.run(["setpriv", "--reuid=0", "--regid=10001", "--clear-groups", "--inh-caps=-all",
                              "--bounding-set=-all", sys.executable, "-c", script, kubelet.socket, str(state)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    shutil.rmtree(state, ignore_errors=True)
    assert out.stdout.split() == ["1", "0000000000000000"], out.stderr  # one pod listed; no capability at all
