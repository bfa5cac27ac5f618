"""Reading pods (service, readiness, declared profile, GPU, published values) and the Kubernetes settings."""

from __future__ import annotations

from typing import Any

import pytest

from optimizer.pods import BATCH_SIZE_ANNOTATION, DeclaredProfile, parse_profile, pod_from_object
from optimizer.config.kube import KubeSettingError, KubeSettings, apply_kube, finish, kube_env

P = "vlm-gpu-optimizer/"


def pod(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None, **extra: Any) -> Any:
    obj: dict[str, Any] = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "resourceVersion": "7",
                                        "annotations": annotations or {}, "labels": labels or {}},
                           "spec": {"nodeName": "node-a"},
                           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    for path, value in extra.items():
        section, key = path.split("__")
        obj[section][key] = value
    return obj


def test_service_from_the_annotation_else_the_label() -> None:
    info, problems = pod_from_object(pod({P + "service": "captioner"}, {"app": "web"}), "app")
    assert (info.key, info.service, info.uid, info.node, info.resource_version) == ("ns/p", "captioner", "u-1",
                                                                                    "node-a", "7")
    assert problems == []
    info, problems = pod_from_object(pod({P + "service": "bad name!"}, {"app": "web"}), "app")
    assert info.service == "web"
    assert [(p.pod, p.key, p.value) for p in problems] == [("ns/p", P + "service", "bad name!")]
    assert pod_from_object(pod(), "app")[0].service is None


@pytest.mark.parametrize(("phase", "ready", "deleting", "state"), [
    ("Running", True, False, "ready"),
    ("Running", False, False, "unready"),
    ("Pending", False, False, "starting"),
    ("Running", True, True, "terminating"),
    ("Succeeded", False, False, "finished"),
    ("Failed", False, False, "finished"),
])
def test_states(phase: str, ready: bool, deleting: bool, state: str) -> None:
    obj = pod(status__phase=phase, status__conditions=[{"type": "Ready", "status": str(ready)}])
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    info = pod_from_object(obj, "app")[0]
    assert info.state == state
    assert info.ready == (ready and not deleting)


def test_a_pod_without_a_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="metadata.name"):
        pod_from_object({"metadata": {}}, "app")


def test_the_declared_profile() -> None:
    profile, problems = parse_profile("ns/p", {P + "per_item_mb": "12.5", P + "min_batch_size": "2",
                                               P + "max_batch_size": "32", P + "default_batch_size": "8",
                                               P + "weight": "2", P + "gpu_mem_min": "9000", P + "gpu": "GPU-abc-1"})
    assert problems == []
    assert profile == DeclaredProfile(per_item_mb=12.5, min_batch_size=2, max_batch_size=32, default_batch_size=8,
                                      weight=2.0, gpu_mem_min_mb=9000, gpu=("GPU-abc-1"))
    assert profile.footprint_mb == 9000
    assert parse_profile("ns/p", {P + "gpu": "3"})[0].gpu == 3


@pytest.mark.parametrize(("key", "value"), [
    ("per_item_mb", "0"), ("per_item_mb", "nan"), ("per_item_mb", "inf"), ("per_item_mb", "1e8"),
    ("min_batch_size", "0"), ("max_batch_size", "4097"), ("default_batch_size", "2.5"), ("weight", "-1"),
    ("gpu_mem_min", "-1"), ("gpu", "1024"), ("gpu", "cuda:0"),
    ("max_batch_size", "1_000"), ("min_batch_size", "\u0661\u0662"), ("per_item_mb", "1_5"),  # int()/float() take these
])
def test_an_invalid_value_is_reported_and_ignored(key: str, value: str) -> None:
    profile, problems = parse_profile("ns/p", {P + key: value, P + "weight" if key != "weight" else P + "gpu": "1"})
    assert [(p.pod, p.key, p.value) for p in problems] == [("ns/p", P + key, value)]
    assert "must" in problems[0].message
    assert getattr(profile, {"gpu_mem_min": "gpu_mem_min_mb"}.get(key, key)) is None


def test_relations_between_values() -> None:
    profile, problems = parse_profile("ns/p", {P + "min_batch_size": "16", P + "max_batch_size": "4"})
    assert (profile.min_batch_size, profile.max_batch_size) == (None, None) and len(problems) == 1
    profile, problems = parse_profile("ns/p", {P + "gpu_mem_min": "9000", P + "gpu_mem_typ": "5000"})
    assert profile.gpu_mem_typ_mb == 9000 and problems[0].key == P + "gpu_mem_typ"


def test_published_values_are_read_back() -> None:
    info = pod_from_object(pod({BATCH_SIZE_ANNOTATION: "8", P + "unrelated": "x"}), "app")[0]
    assert dict(info.published) == {BATCH_SIZE_ANNOTATION: "8"}


def test_settings_from_the_environment_and_their_checks() -> None:
    env = {"NODE_NAME": "node-a", "VLM_OPTIMIZER_KUBE_DISCOVERY": "true", "VLM_OPTIMIZER_KUBE_NAMESPACES": "a, b,a"}
    settings = finish(apply_kube(KubeSettings(), kube_env(env, "VLM_OPTIMIZER_")))
    assert (settings.discovery, settings.node_name, settings.namespaces) == (True, "node-a", ("a", "b"))
    assert not settings.all_namespaces
    for key, value in [("watch_timeout", "5"), ("namespaces", "Bad_NS"), ("node_name", "Node A"),
                       ("service_label", "no spaces"), ("publish", "maybe"), ("nope", 1)]:
        with pytest.raises(KubeSettingError) as caught:
            apply_kube(settings, {key: value})
        assert caught.value.key == f"kubernetes.{key}"
    with pytest.raises(KubeSettingError, match="node_name"):
        finish(KubeSettings(discovery=True))
    with pytest.raises(KubeSettingError, match="publish"):
        finish(KubeSettings(publish=True))


@pytest.mark.parametrize(("status", "ips"), [
    ({"podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}]},
     ("10.244.1.7", "fd00:10:244:1::7")),  # dual stack: both families, podIP first
    ({"podIP": "10.244.1.7"}, ("10.244.1.7",)),  # an older server: podIP only
    ({"podIPs": [{"ip": "10.244.1.7"}, {"nope": 1}, "bad"]}, ("10.244.1.7",)),  # what is not an address is skipped
    ({}, ()),  # not assigned yet
])
def test_pod_ips_from_the_status(status: dict[str, Any], ips: tuple[str, ...]) -> None:
    obj = pod()
    obj["status"].update(status)
    assert pod_from_object(obj, "app")[0].ips == ips
