"""What the shipped RBAC and ValidatingAdmissionPolicy allow, evaluated rather than only read.

The policy (ops/k8s/publish/admissionpolicy.yaml) is validated by kubernetes-validate and its CEL
expressions are run (tests/admission_policy.py) on sample old and new pods. Then the fake API
server (tests/fake_kube.py) enforces the shipped Roles (as RBAC would) and the policy (as admission
would), and the real watcher and publisher run against it through the official client: what they
send must pass, and a forged patch with the optimizer's token must not.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from optimizer.kube.client import core_v1, default_api_factory
from optimizer.pods import PUBLISHED, pod_from_object
from optimizer.kube.publisher import AnnotationPublisher
from optimizer.kube.watcher import PodWatcher
from tests.admission_policy import AdmissionPolicy, Verdict
from tests.fake_kube import FakeKube, make_pod, status
from tests.fakes import FakeClock
from tests.kube_helpers import Changes, kube_settings, running
from tests.policy_helpers import ROOT
from tests.tools import require

Obj = dict[str, Any]
PUBLISH = ROOT / "ops/k8s/publish"
OPTIMIZER = "system:serviceaccount:medical-kg:vlm-gpu-memory-optimizer"
BATCH, EPOCH = PUBLISHED


def kustomize(path: Path) -> list[Obj]:
    out = subprocess.run([require("kubectl"), "kustomize", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[Obj], kind: str) -> Obj:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def publish_overlay() -> list[Obj]:
    return kustomize(PUBLISH)


@pytest.fixture(scope="module")
def policy(publish_overlay: list[Obj]) -> AdmissionPolicy:
    return AdmissionPolicy(one(publish_overlay, "ValidatingAdmissionPolicy"))


# --------------------------------------------------------------------------- the objects


def test_the_policy_is_valid_from_kubernetes_1_30_and_bound(publish_overlay: list[Obj]) -> None:
    vap, binding = one(publish_overlay, "ValidatingAdmissionPolicy"), one(publish_overlay,
                                                                          "ValidatingAdmissionPolicyBinding")
    for version in ("1.30.0", kubernetes_validate.latest_version()):  # admissionregistration.k8s.io/v1: 1.30+
        for obj in (vap, binding):
            kubernetes_validate.validate(obj, version, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(vap, "1.29.0", strict=True)  # what the overlay's comment says: 1.30 or later
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert "Deny" in binding["spec"]["validationActions"]
    assert "matchResources" not in binding["spec"]  # every namespace, where any copy of the Role may grant patch
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"  # an expression that errors refuses the patch
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [""] and rule["operations"] == ["UPDATE"] and "pods" in rule["resources"]


def test_the_policy_names_the_optimizers_account_and_annotations(publish_overlay: list[Obj]) -> None:
    base = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "ops/k8s/vlm-gpu-memory-optimizer.yaml").read_text())
            if d}
    sa = base["ServiceAccount"]["metadata"]
    assert OPTIMIZER == f"system:serviceaccount:{sa['namespace']}:{sa['name']}"
    (condition,) = one(publish_overlay, "ValidatingAdmissionPolicy")["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == '{OPTIMIZER}'"
    variables = {v["name"]: v["expression"] for v in one(publish_overlay, "ValidatingAdmissionPolicy")["spec"]
                 ["variables"]}
    assert yaml.safe_load(variables["published"]) == list(PUBLISHED)  # what the publisher writes, no more


# --------------------------------------------------------------------------- the policy, evaluated


def vlm_pod() -> Obj:
    pod = make_pod("vlm-0", namespace="medical-kg", annotations={"vlm-gpu-optimizer/per_item_mb": "1800",
                                                                 "team": "imaging"})
    pod["metadata"].update(resourceVersion="1001", generateName="vlm-",
                           ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "vlm-7f",
                                             "uid": "u-1", "controller": True}])
    return pod


def annotate(values: dict[str, str | None]) -> Callable[[Obj], None]:
    """Set (or, for None, remove) these annotations."""
    def change(pod: Obj) -> None:
        annotations = pod["metadata"].setdefault("annotations", {})
        for key, value in values.items():
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
    return change


def publish(batch: str | None = "8", epoch: str | None = "3") -> Callable[[Obj], None]:
    return annotate({BATCH: batch, EPOCH: epoch})


def set_path(*path: str, value: Any) -> Callable[[Obj], None]:
    """Set the field at ``path`` (list indexes as digits), or remove it for None."""
    def change(pod: Obj) -> None:
        node: Any = pod
        for key in path[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(path[-1])] = value
        elif value is None:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return change


def server_side(pod: Obj) -> None:
    """What the API server changes itself on every update: resourceVersion, managedFields."""
    pod["metadata"]["resourceVersion"] = str(int(pod["metadata"]["resourceVersion"]) + 1)
    pod["metadata"]["managedFields"] = [{"manager": "vlm-gpu-optimizer", "operation": "Update"}]


def changed(*changes: Callable[[Obj], None], start: Obj | None = None) -> tuple[Obj, Obj]:
    """(old, new): ``start`` (default :func:`vlm_pod`), and a copy with ``changes`` and the server's own."""
    old = start or vlm_pod()
    new = copy.deepcopy(old)
    for change in changes:
        change(new)
    server_side(new)
    return old, new


def bare_pod() -> Obj:
    pod = vlm_pod()
    del pod["metadata"]["annotations"]
    return pod


PUBLISHED_POD = changed(publish())[1]
ALLOWED: dict[str, tuple[Obj, Obj]] = {
    "publish both": changed(publish()),
    "publish again, new values": changed(publish("4", "4"), start=PUBLISHED_POD),
    "publish one": changed(publish(epoch=None)),
    "remove its own": changed(publish(None, None), start=PUBLISHED_POD),
    "a pod without annotations": changed(publish(), start=bare_pod()),
    "nothing at all": changed(),
}
DENIED: dict[str, tuple[tuple[Obj, Obj], str]] = {
    "the image": (changed(publish(), set_path("spec", "containers", "0", "image", value="evil:1")), "spec"),
    "a container added": (changed(lambda p: p["spec"]["containers"].append({"name": "x", "image": "x"})), "spec"),
    "the node": (changed(set_path("spec", "nodeName", value="node-b")), "spec"),
    "a label": (changed(set_path("metadata", "labels", "vlm-gpu-optimizer/client", value="false")), "labels"),
    "a label added": (changed(set_path("metadata", "labels", "app", value="other")), "labels"),
    "all labels removed": (changed(set_path("metadata", "labels", value=None)), "labels"),
    "another annotation": (changed(publish(), annotate({"team": "other"})), "only the annotations"),
    "a declaration of the pod's": (changed(annotate({"vlm-gpu-optimizer/per_item_mb": "1"})),
                                   "only the annotations"),
    "an annotation added": (changed(annotate({"extra": "1"})), "only the annotations"),
    "an annotation removed": (changed(annotate({"team": None})), "only the annotations"),
    "all annotations removed": (changed(set_path("metadata", "annotations", value=None)), "only the annotations"),
    "annotations added to a bare pod": (changed(annotate({"extra": "1"}), start=bare_pod()), "only the annotations"),
    "a value that is not a number": (changed(publish("8; rm -rf /")), "decimal integers"),
    "an empty value": (changed(publish(epoch="")), "decimal integers"),
    "the owner": (changed(set_path("metadata", "ownerReferences", value=None)), "owner references"),
    "a finalizer": (changed(set_path("metadata", "finalizers", value=["example.com/hold"])), "finalizers"),
    "generateName": (changed(set_path("metadata", "generateName", value="x-")), "generateName"),
}


@pytest.mark.parametrize("case", list(ALLOWED))
def test_the_optimizer_may_change_its_own_annotations(policy: AdmissionPolicy, case: str) -> None:
    old, new = ALLOWED[case]
    assert policy.review(username=OPTIMIZER, old=old, new=new) == Verdict(matched=True, allowed=True)


@pytest.mark.parametrize("case", list(DENIED))
def test_the_optimizer_may_change_nothing_else(policy: AdmissionPolicy, case: str) -> None:
    (old, new), message = DENIED[case]
    verdict = policy.review(username=OPTIMIZER, old=old, new=new)
    assert verdict.matched and not verdict.allowed
    assert verdict.message is not None and message in verdict.message, verdict


@pytest.mark.parametrize("subresource", ["status", "ephemeralcontainers", "resize"])
def test_the_optimizer_may_not_update_a_subresource(policy: AdmissionPolicy, subresource: str) -> None:
    old, new = changed(publish())
    verdict = policy.review(username=OPTIMIZER, old=old, new=new, subresource=subresource)
    assert verdict.matched and not verdict.allowed and "no subresource" in (verdict.message or "")


def test_everyone_else_is_left_alone(policy: AdmissionPolicy) -> None:
    old, new = DENIED["the image"][0]
    for user in ("system:serviceaccount:medical-kg:other", "system:serviceaccount:team-2:vlm-gpu-memory-optimizer",
                 "kubernetes-admin", "system:node:gpu-node-1"):
        assert policy.review(username=user, old=old, new=new) == Verdict(matched=False, allowed=True), user
    assert not policy.review(username=OPTIMIZER, old=old, new=new, operation="CREATE").matched


# --------------------------------------------------------------------------- enforced by the fake API server


def rbac(docs: list[Obj], user: str = OPTIMIZER) -> Callable[[str, str | None], bool]:
    """RBAC's answer for ``user`` and pods, from these Roles, ClusterRoles and their bindings."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d["rules"]
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    grants: list[tuple[str | None, list[Obj]]] = []  # (namespace, or None for every one and the cluster scope)
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(f"system:serviceaccount:{s['namespace']}:{s['name']}" == user for s in b["subjects"]
                   if s["kind"] == "ServiceAccount"):
            continue
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        ref = b["roleRef"]
        grants.append((ns, roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]))

    def allowed(verb: str, namespace: str | None) -> bool:
        return any((scope is None or scope == namespace) and "" in r["apiGroups"] and "pods" in r["resources"]
                   and verb in r["verbs"] for scope, rules in grants for r in rules)
    return allowed


def admission(policy: AdmissionPolicy) -> Callable[[Obj, Obj], Obj | None]:
    """The policy as the API server's admission step: a Status refusing the patch, or None."""
    def admit(old: Obj, new: Obj) -> Obj | None:
        verdict = policy.review(username=OPTIMIZER, old=old, new=new)
        if verdict.allowed:
            return None
        code = {"Forbidden": 403, "Invalid": 422}[verdict.reason or "Invalid"]
        return status(code, verdict.reason or "Invalid",
                      f'pods "{new["metadata"]["name"]}" is forbidden: ValidatingAdmissionPolicy '
                      f"'{policy.name}' denied request: {verdict.message}")
    return admit


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shipped_kube(policy: AdmissionPolicy, publish_overlay: list[Obj]) -> Iterator[Callable[[], FakeKube]]:
    """A fake API server with the base bundle's RBAC and the publish overlay's Role and policy."""
    base = [d for d in yaml.safe_load_all((ROOT / "ops/k8s/vlm-gpu-memory-optimizer.yaml").read_text()) if d]
    yield lambda: FakeKube(authorize=rbac(base + publish_overlay), admit_patch=admission(policy))


async def test_the_publishers_patches_pass_and_a_forged_one_with_its_token_does_not(
        shipped_kube: Callable[[], FakeKube], tmp_path: Path, clock: FakeClock) -> None:
    async with shipped_kube() as kube:
        kube.add_pod(make_pod("vlm-0", namespace="medical-kg", annotations={"team": "imaging"}))
        kube.add_pod(make_pod("vlm-1", namespace="team-2"))  # no Role there
        settings = kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig")), publish=True)
        pods = {f"{ns}/{n}": pod_from_object(o, "app.kubernetes.io/name")[0] for (ns, n), o in kube.pods.items()}
        pub = AnnotationPublisher(settings, clock=clock)
        try:
            await pub.sync({"medical-kg/vlm-0": {BATCH: "8", EPOCH: "0"}, "team-2/vlm-1": {BATCH: "8"}}, pods)
        finally:
            await pub.close()
        assert kube.pods[("medical-kg", "vlm-0")]["metadata"]["annotations"] == {"team": "imaging", BATCH: "8",
                                                                               EPOCH: "0"}
        assert pub.stats.patches_total == 1 and pub.stats.patch_errors_total == {"forbidden": 1}  # team-2: RBAC
        assert BATCH not in kube.pods[("team-2", "vlm-1")]["metadata"]["annotations"]

        api = default_api_factory(settings)
        try:
            for body, refused in (({"spec": {"containers": [{"name": "main", "image": "evil:1"}]}}, "spec"),
                                  ({"metadata": {"labels": {"vlm-gpu-optimizer/client": None}}}, "labels"),
                                  ({"metadata": {"annotations": {"team": "evil"}}}, "only the annotations")):
                before = copy.deepcopy(kube.pods[("medical-kg", "vlm-0")])
                with pytest.raises(ApiException) as err:
                    await asyncio.to_thread(core_v1(api).patch_namespaced_pod, "vlm-0", "medical-kg", body,
                                            _content_type="application/merge-patch+json")
                assert err.value.status == 403 and refused in str(err.value.body)
                assert kube.pods[("medical-kg", "vlm-0")] == before
        finally:
            api.close()


async def test_the_base_rbac_is_all_discovery_needs(tmp_path: Path) -> None:
    base = [d for d in yaml.safe_load_all((ROOT / "ops/k8s/vlm-gpu-memory-optimizer.yaml").read_text()) if d]
    async with FakeKube(authorize=rbac(base)) as kube:
        kube.add_pod(make_pod("vlm-0", namespace="medical-kg"))
        kube.add_pod(make_pod("vlm-1", namespace="team-2"))
        changes = Changes()
        watcher = PodWatcher(kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig"))), on_change=changes)
        async with running(watcher):
            await changes.wait_for(lambda p: set(p) == {"medical-kg/vlm-0", "team-2/vlm-1"})
            await kube.wait_for(lambda k: k.watches_active == 1)
        assert watcher.stats.api_errors_total == {}


async def test_the_namespaced_variant_grants_what_its_discovery_watches(tmp_path: Path) -> None:
    docs = kustomize(ROOT / "ops/k8s-namespaced")
    (c,) = [c for c in one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"] if c["name"] == "optimizer"]
    namespaces = tuple(next(e["value"] for e in c["env"] if e["name"] == "VLM_OPTIMIZER_KUBE_NAMESPACES").split(","))
    async with FakeKube(authorize=rbac(docs)) as kube:
        kube.add_pod(make_pod("vlm-0", namespace="medical-kg"))
        kube.add_pod(make_pod("vlm-1", namespace="team-2"))
        kubeconfig = kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
        changes = Changes()
        watcher = PodWatcher(kube_settings(kubeconfig, namespaces=namespaces), on_change=changes)
        async with running(watcher):
            await changes.wait_for(lambda p: set(p) == {"medical-kg/vlm-0"})
            await kube.wait_for(lambda k: k.watches_active == 1)
        assert watcher.stats.api_errors_total == {}
        api = default_api_factory(kube_settings(kubeconfig))
        try:  # the cluster-wide list the base bundle's discovery makes is what this variant takes away
            with pytest.raises(ApiException) as err:
                await asyncio.to_thread(core_v1(api).list_pod_for_all_namespaces)
            assert err.value.status == 403
            with pytest.raises(ApiException) as err:
                await asyncio.to_thread(core_v1(api).list_namespaced_pod, "team-2")
            assert err.value.status == 403
        finally:
            api.close()
