"""The Kubernetes bundle (ops/k8s): valid objects, a generated single file that is up to date, and
probes, ports, labels and selectors that agree with each other and with the service itself."""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from optimizer.api.app import build_app
from optimizer.cli import build_parser
from optimizer.config import BackendName, ServerSettings, Settings, load_config
from optimizer.engine import Engine
from optimizer.config.kube import KubeSettings
from optimizer.gpu.none import NoGpuBackend
from optimizer.sampler import Sampler
from tests.policy_helpers import ROOT
from tests.tools import require

K8S = ROOT / "ops/k8s"
BUNDLE = K8S / "vlm-gpu-memory-optimizer.yaml"
APP = "vlm-gpu-memory-optimizer"
NAMESPACE = "medical-kg"
Obj = dict[str, Any]


def load_all(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> dict[str, Obj]:
    """The single-file bundle, by kind."""
    docs = load_all(BUNDLE)
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object per kind expected"
    return by_kind


def pod(objects: dict[str, Obj]) -> Obj:
    spec: Obj = objects["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def container(objects: dict[str, Obj]) -> Obj:
    (main,) = [c for c in pod(objects)["containers"] if c["name"] == "optimizer"]
    found: Obj = main
    return found


def test_one_object_per_source_file() -> None:
    sources = [p for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", BUNDLE.name, "config.yaml")]
    assert sources
    for path in sources:
        assert len(load_all(path)) == 1, path


@pytest.mark.parametrize("kind", ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service",
                                  "NetworkPolicy", "ClusterRole", "ClusterRoleBinding"])
def test_every_object_is_valid_for_a_current_kubernetes(objects: dict[str, Obj], kind: str) -> None:
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(objects[kind], version, strict=True)  # raises ValidationError


# Keeps the bundle's two header comment lines; the test ignores comment lines.
REGENERATE = ("{ head -n 2 ops/k8s/vlm-gpu-memory-optimizer.yaml; kubectl kustomize ops/k8s; } > /tmp/bundle.yaml "
              "&& mv /tmp/bundle.yaml ops/k8s/vlm-gpu-memory-optimizer.yaml")


def kustomize(path: Path) -> dict[str, Obj]:
    """``kubectl kustomize path``, by kind (one object per kind in every kustomization here)."""
    out = subprocess.run([require("kubectl"), "kustomize", str(path)], check=True, capture_output=True,
                         text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), f"{path}: one object per kind expected"
    return by_kind


def test_the_single_file_manifest_is_kustomize_output() -> None:
    kubectl = require("kubectl")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], check=True, capture_output=True, text=True).stdout
    committed = "".join(line for line in BUNDLE.read_text().splitlines(keepends=True) if not line.startswith("#"))
    diff = "".join(list(difflib.unified_diff(committed.splitlines(keepends=True), rendered.splitlines(keepends=True),
                                             "committed", "kubectl kustomize ops/k8s"))[:40])
    assert committed == rendered, f"{BUNDLE.name} is out of date; from the repository root, regenerate it with\n" \
                                  f"  {REGENERATE}\n{diff}"


POD_READER = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}]  # what discovery calls


def test_rbac_is_list_and_watch_pods_and_nothing_else(objects: dict[str, Obj]) -> None:
    role, binding = objects["ClusterRole"], objects["ClusterRoleBinding"]
    assert role["rules"] == POD_READER  # not get (discovery never reads one pod), no other resource
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    sa = objects["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    assert {k for k in objects if "Role" in k} == {"ClusterRole", "ClusterRoleBinding"}


def test_the_publish_overlay_adds_patch_pods_in_one_namespace_and_the_policy_that_limits_it(
        objects: dict[str, Obj]) -> None:
    docs = kustomize(K8S / "publish")
    assert set(docs) == {"Role", "RoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    for d in docs.values():
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    assert docs["Role"]["metadata"]["namespace"] == NAMESPACE
    assert docs["Role"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]  # no subresource
    assert docs["RoleBinding"]["subjects"] == objects["ClusterRoleBinding"]["subjects"]
    assert docs["RoleBinding"]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                              "name": docs["Role"]["metadata"]["name"]}
    # what the policy allows and refuses is in tests/test_k8s_admission.py


def test_the_namespaced_variant_reads_pods_only_in_its_namespaces(tmp_path: Path) -> None:
    docs = kustomize(ROOT / "ops/k8s-namespaced")
    assert not {k for k in docs if k.startswith("Cluster")}  # no ClusterRole, no ClusterRoleBinding
    for d in docs.values():
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    role, binding = docs["Role"], docs["RoleBinding"]
    assert role["rules"] == POD_READER
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    sa = docs["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    # discovery, configured by the DaemonSet's environment, watches exactly where the Role applies
    (c,) = [c for c in docs["DaemonSet"]["spec"]["template"]["spec"]["containers"] if c["name"] == "optimizer"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    f = tmp_path / "config.yaml"
    f.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(f, environ={**env, "NODE_NAME": "gpu-node-1"})
    assert cfg.kube.namespaces == (role["metadata"]["namespace"],) == (binding["metadata"]["namespace"],)
    # everything else is the base bundle's
    base = load_all(BUNDLE)
    assert {d["kind"] for d in base} - set(docs) == {"ClusterRole", "ClusterRoleBinding"}


def test_the_monitoring_overlay_renders() -> None:
    kubectl = require("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "monitoring")], check=True, capture_output=True,
                         text=True).stdout
    kinds = {d["kind"] for d in yaml.safe_load_all(out) if d}
    assert kinds == {"ServiceMonitor", "PrometheusRule", "ConfigMap"}  # the ConfigMap: Grafana's dashboard


def test_namespace_and_label_everywhere(objects: dict[str, Obj]) -> None:
    for kind, obj in objects.items():
        if kind == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
            continue
        if kind.startswith("Cluster"):
            assert "namespace" not in obj["metadata"], kind  # cluster-scoped
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, kind
        assert obj["metadata"]["labels"]["app"] == APP, kind


def test_selectors_find_the_pods(objects: dict[str, Obj]) -> None:
    ds = objects["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app"] == APP  # kubectl get pods -n medical-kg -l app=vlm-gpu-memory-optimizer
    for selector in (ds["spec"]["selector"]["matchLabels"], objects["Service"]["spec"]["selector"],
                     objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()


def _routes() -> set[str]:
    engine = Engine(Settings())
    app = build_app(engine, Sampler(NoGpuBackend(), engine), run_sampler=False)
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_ports_and_probes_match_the_service(objects: dict[str, Obj]) -> None:
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": ServerSettings().port, "admin": ServerSettings().admin_port}
    routes = _routes()
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert {"/health", "/ready", "/metrics", "/batch-size"} <= routes
    annotations = objects["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] in routes
    svc_ports = objects["Service"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in svc_ports] == [(8080, "http")]  # no admin port in the Service
    assert objects["Service"]["spec"]["internalTrafficPolicy"] == "Local"


def test_network_policy_admits_only_the_read_api(objects: dict[str, Obj]) -> None:
    np = objects["NetworkPolicy"]["spec"]
    assert np["policyTypes"] == ["Ingress"]
    (rule,) = np["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]  # 8081 from nowhere
    sources = rule["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in sources
    assert any(s.get("podSelector", {}).get("matchLabels") == {"vlm-gpu-optimizer/client": "true"} for s in sources)


def test_gpu_node_placement_without_taking_a_gpu(objects: dict[str, Obj]) -> None:
    spec = pod(objects)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    c = container(objects)
    env = {e["name"]: e for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    for ctr in spec["containers"] + spec.get("initContainers", []):
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in ctr["resources"].get(section, {})


def test_resources_are_set(objects: dict[str, Obj]) -> None:
    for ctr in pod(objects)["containers"] + pod(objects)["initContainers"]:
        res = ctr["resources"]
        assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"cpu", "memory"}


def test_pod_security(objects: dict[str, Obj]) -> None:
    spec = pod(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is True  # discovery reads pods with the account's token
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False  # other pods using it get none
    assert spec["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    c = container(objects)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    # the one exception: hands the hostPath state directory to the optimizer's UID, with CAP_CHOWN alone
    (init,) = spec["initContainers"]
    isc = init["securityContext"]
    assert isc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert isc["allowPrivilegeEscalation"] is False and isc["readOnlyRootFilesystem"] is True
    assert str(spec["securityContext"]["runAsUser"]) in " ".join(init["command"])


def _mounts(c: Obj) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in c["volumeMounts"]}


def test_config_map_is_the_full_configuration(objects: dict[str, Obj], tmp_path: Path) -> None:
    c = container(objects)
    cm = objects["ConfigMap"]
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    config_path = c["args"][c["args"].index("--config") + 1]
    assert config_path == f"{_mounts(c)['config']}/config.yaml"
    text = cm["data"]["config.yaml"]
    assert text == (K8S / "config.yaml").read_text()
    f = tmp_path / "config.yaml"
    f.write_text(text)
    env = {e["name"] for e in c["env"]}
    assert "NODE_NAME" in env
    cfg = load_config(f, environ={"NODE_NAME": "gpu-node-1"})
    assert cfg.settings == Settings(register_unknown=False)  # every policy key at its default, but that one
    assert cfg.kube == KubeSettings(discovery=True, node_name="gpu-node-1")
    # the label discovery selects the VLM pods by is the one the NetworkPolicy admits to the read API
    policy = objects["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert cfg.kube.label_selector == ",".join(f"{k}={v}" for k, v in policy.items())
    expected = ServerSettings(backend=BackendName.NVML, log_format="json",
                              state_path="/var/lib/vlm-gpu-optimizer/state.json")
    assert cfg.server == expected
    assert "backend: nvml" in text
    # the state file is on the hostPath volume, whose directory the init container hands over
    state_dir = str(Path(cfg.server.state_path or "").parent)
    assert _mounts(c)["state"] == state_dir
    assert volumes["state"]["hostPath"] == {"path": state_dir, "type": "DirectoryOrCreate"}
    (init,) = pod(objects)["initContainers"]
    assert _mounts(init)["state"] == state_dir and state_dir in " ".join(init["command"])


ADMIN_SECRET = "vlm-gpu-memory-optimizer-admin"


def test_the_admin_token_is_a_read_only_file_from_the_optional_secret(objects: dict[str, Obj]) -> None:
    spec = pod(objects)
    for ctr in iter_containers(objects):  # never an environment variable
        for e in ctr.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}) and "TOKEN" not in e["name"], (ctr["name"], e)
        assert "envFrom" not in ctr
    volumes = {v["name"]: v for v in spec["volumes"]}
    (name,) = [n for n, v in volumes.items() if "secret" in v]
    secret = volumes[name]["secret"]
    # optional: the pod starts before the Secret exists; only the key "token", as the file "token"
    assert secret == {"secretName": ADMIN_SECRET, "optional": True, "defaultMode": 0o400,
                      "items": [{"key": "token", "path": "token"}]}
    c = container(objects)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == name]
    assert mount["readOnly"] is True and "subPath" not in mount  # subPath would freeze the file at start
    args = c["args"]
    assert args[args.index("--admin-token-file") + 1] == f"{mount['mountPath']}/token"
    assert all(m["name"] != name for m in spec["initContainers"][0]["volumeMounts"])
    # the kubelet makes the file root-owned, mode 0400; with fsGroup it gives it that group and adds
    # group read (0440), so the optimizer's user reads it through its group
    sc = spec["securityContext"]
    assert sc["fsGroup"] == sc["runAsGroup"] and sc["runAsUser"] != 0


def test_no_secret_is_shipped(objects: dict[str, Obj]) -> None:
    """Applying the bundle again must not replace (empty) the token an operator created."""
    assert "Secret" not in objects
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not kustomization.get("secretGenerator")
    assert not [r for r in kustomization["resources"] if (K8S / r).is_file() and
                any(d.get("kind") == "Secret" for d in load_all(K8S / r))]
    for overlay in (K8S / "publish", K8S / "monitoring", ROOT / "ops/k8s-namespaced"):
        assert "Secret" not in kustomize(overlay), overlay


def test_the_daemonset_runs_nvml_explicitly(objects: dict[str, Obj], tmp_path: Path) -> None:
    """Parsed by the real command line: a GPU node never falls back to the "none" backend."""
    c = container(objects)
    assert "command" not in c  # the image's ENTRYPOINT, vlm-gpu-optimizer, runs these args
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve" and args.backend == BackendName.NVML.value
    f = tmp_path / "config.yaml"
    f.write_text(objects["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(f, cli_server={"backend": args.backend, "admin_token_file": args.admin_token_file},
                      environ={"NODE_NAME": "gpu-node-1"})
    assert cfg.server.backend is BackendName.NVML
    assert cfg.server.admin_token_file == "/var/run/secrets/vlm-gpu-optimizer/token"


def servicemonitor() -> Obj:
    (sm,) = load_all(K8S / "monitoring/servicemonitor.yaml")
    return sm


def test_service_monitor_scrapes_the_service(objects: dict[str, Obj]) -> None:
    sm = servicemonitor()
    assert sm["spec"]["selector"]["matchLabels"].items() <= objects["Service"]["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == objects["Service"]["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]
    assert endpoint["honorLabels"] is True  # the metrics' `service` label is the VLM service, not ours


def iter_containers(objects: dict[str, Obj]) -> Iterator[Obj]:
    yield from pod(objects)["containers"]
    yield from pod(objects)["initContainers"]


def test_every_container_uses_the_same_pinned_image(objects: dict[str, Obj]) -> None:
    images = {c["image"] for c in iter_containers(objects)}
    assert len(images) == 1
    (image,) = images
    assert image.startswith("medical-kg/vlm-gpu-memory-optimizer:") and not image.endswith(":latest")


def test_the_kubelets_pod_resources_directory_is_mounted_read_only_where_the_config_looks(
        objects: dict[str, Obj], tmp_path: Path) -> None:
    """The kubelet's pod-resources socket: hostPath, read-only, at the path the configuration names."""
    c = container(objects)
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "pod-resources"]
    assert mount == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
    assert volumes["pod-resources"]["hostPath"] == {"path": "/var/lib/kubelet/pod-resources",
                                                    "type": "DirectoryOrCreate"}
    f = tmp_path / "config.yaml"
    f.write_text(objects["ConfigMap"]["data"]["config.yaml"])
    socket = load_config(f, environ={"NODE_NAME": "gpu-node-1"}).kube.pod_resources_socket
    assert str(Path(socket).parent) == mount["mountPath"]
    assert all(m["name"] != "pod-resources" for m in pod(objects)["initContainers"][0]["volumeMounts"])


def test_the_kubelet_variant_runs_the_optimizer_as_uid_0_with_nothing_else_granted(objects: dict[str, Obj]) -> None:
    """ops/k8s-kubelet: UID 0 for the kubelet's root-only socket; capabilities, escalation, filesystem as the base."""
    docs = kustomize(ROOT / "ops/k8s-kubelet")
    for d in docs.values():
        kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "optimizer"]
    sc = c["securityContext"]
    assert (sc["runAsUser"], sc["runAsNonRoot"], spec["securityContext"]["runAsUser"]) == (0, False, 0)
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsGroup"] == spec["securityContext"]["fsGroup"] == 10001
    (init,) = spec["initContainers"]
    assert "os.chown(d, 0, 10001)" in " ".join(init["command"])  # UID 0 without CAP_DAC_OVERRIDE owns its state
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # everything else is the base bundle's
    base = {d["kind"]: d for d in load_all(BUNDLE)}
    assert set(docs) == set(base)
    for kind in set(docs) - {"DaemonSet"}:
        assert docs[kind] == base[kind], kind
    assert c["volumeMounts"] == container(objects)["volumeMounts"]
    assert spec["volumes"] == pod(objects)["volumes"]
