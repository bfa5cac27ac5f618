"""Publishing into pod annotations, against the fake API server through the official client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from optimizer.kube.client import core_v1, default_api_factory
from optimizer.kube.errors import KubeApiError, wrap
from optimizer.pods import BATCH_SIZE_ANNOTATION, CLEANUP_EPOCH_ANNOTATION, PodInfo, pod_from_object
from optimizer.kube.publisher import AnnotationPublisher
from optimizer.kube.watcher import PodWatcher
from tests.fake_kube import FakeKube, make_pod
from tests.fakes import FakeClock
from tests.kube_helpers import Changes, Pods, kube_settings, running

BATCH, EPOCH = BATCH_SIZE_ANNOTATION, CLEANUP_EPOCH_ANNOTATION


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as k:
        k.add_pod(make_pod("a"))
        k.add_pod(make_pod("b", namespace="team-2"))
        yield k


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def publisher(kube: FakeKube, tmp_path: Path, clock: FakeClock) -> AsyncIterator[AnnotationPublisher]:
    """publish_interval 15 s, backoff_max 4 s."""
    settings = kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig")), publish=True)
    pub = AnnotationPublisher(settings, clock=clock)
    yield pub
    await pub.close()


def pods_of(kube: FakeKube) -> dict[str, PodInfo]:
    """What a watcher that is up to date would hold."""
    return {f"{ns}/{name}": pod_from_object(obj, "app.kubernetes.io/name")[0] for (ns, name), obj in kube.pods.items()}


def annotations_of(kube: FakeKube, ns: str, name: str) -> dict[str, str]:
    return dict(kube.pods[(ns, name)]["metadata"]["annotations"])


def patches(kube: FakeKube) -> int:
    return sum(1 for r in kube.requests if r.method == "PATCH")


async def test_patches_only_what_changed_with_a_merge_patch(kube: FakeKube, publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    kube.update_pod("default", "a", lambda p: p["metadata"]["annotations"].update(other="kept"))
    await publisher.sync({"default/a": {BATCH: "8", EPOCH: "0"}}, pods_of(kube))
    assert annotations_of(kube, "default", "a") == {"other": "kept", BATCH: "8", EPOCH: "0"}
    request = [r for r in kube.requests if r.method == "PATCH"][0]
    assert request.content_type == "application/merge-patch+json"
    assert request.query["fieldManager"] == "vlm-gpu-optimizer"
    assert publisher.stats.patches_total == 1
    clock.advance(100)
    await publisher.sync({"default/a": {BATCH: "8", EPOCH: "0"}}, pods_of(kube))  # already there
    await publisher.sync({"default/gone": {BATCH: "8"}}, pods_of(kube))  # not a pod of ours
    assert patches(kube) == 1


async def test_rate_limited_per_pod_and_sent_later(kube: FakeKube, publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    await publisher.sync({"default/a": {BATCH: "8"}, "team-2/b": {BATCH: "4"}}, pods_of(kube))
    assert patches(kube) == 2
    clock.advance(10)  # publish_interval is 15 s
    await publisher.sync({"default/a": {BATCH: "6"}, "team-2/b": {BATCH: "4"}}, pods_of(kube))
    assert patches(kube) == 2 and annotations_of(kube, "default", "a")[BATCH] == "8"
    assert publisher.stats.deferred_total == 1
    clock.advance(5)
    await publisher.sync({"default/a": {BATCH: "6"}, "team-2/b": {BATCH: "4"}}, pods_of(kube))
    assert patches(kube) == 3 and annotations_of(kube, "default", "a")[BATCH] == "6"


async def test_no_second_patch_before_the_first_comes_back(kube: FakeKube, publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    stale = pods_of(kube)
    await publisher.sync({"default/a": {BATCH: "8"}}, stale)
    clock.advance(100)
    await publisher.sync({"default/a": {BATCH: "8"}}, stale)  # the watcher has not seen our patch yet
    assert patches(kube) == 1
    kube.update_pod("default", "a", lambda p: p["metadata"]["annotations"].update({BATCH: "1"}))  # someone undid it
    await publisher.sync({"default/a": {BATCH: "8"}}, pods_of(kube))
    assert patches(kube) == 2 and annotations_of(kube, "default", "a")[BATCH] == "8"


async def test_forbidden_is_logged_once_counted_and_retried_later(kube: FakeKube,
                                                                  publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    kube.forbidden_namespaces.add("team-2")
    desired = {"team-2/b": {BATCH: "4"}, "default/a": {BATCH: "8"}}
    with capture_logs() as logs:
        await publisher.sync(desired, pods_of(kube))
        assert patches(kube) == 2
        clock.advance(2)
        await publisher.sync(desired, pods_of(kube))  # team-2 is not tried again before backoff_max (4 s)...
        assert patches(kube) == 2
        clock.advance(30)
        await publisher.sync(desired, pods_of(kube))  # ...then it is, and still refused
        assert patches(kube) == 3
    told = [e for e in logs if e["event"] == "kube_publish_forbidden"]
    assert len(told) == 1 and told[0]["namespace"] == "team-2" and told[0]["log_level"] == "error"
    assert "RBAC permission to patch pods in namespace team-2" in told[0]["message"]
    assert publisher.stats.patch_errors_total == {"forbidden": 2}
    assert set(publisher.stats.forbidden_namespaces) == {"team-2"}
    assert annotations_of(kube, "default", "a")[BATCH] == "8" and publisher.stats.patches_total == 1
    kube.forbidden_namespaces.clear()
    clock.advance(30)
    await publisher.sync(desired, pods_of(kube))
    assert annotations_of(kube, "team-2", "b")[BATCH] == "4" and publisher.stats.forbidden_namespaces == {}


async def test_a_pod_gone_is_ignored_and_errors_are_retried(kube: FakeKube, publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    stale = pods_of(kube)
    kube.delete_pod("default", "a")
    kube.down = True
    with capture_logs() as logs:
        await publisher.sync({"team-2/b": {BATCH: "4"}}, stale)
        kube.down = False
        await publisher.sync({"default/a": {BATCH: "8"}}, stale)
    assert publisher.stats.pods_gone_total == 1
    assert publisher.stats.patch_errors_total == {"http_503": 1}
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == ["kube_api_error"]  # nothing for the 404
    clock.advance(15)
    await publisher.sync({"team-2/b": {BATCH: "4"}}, pods_of(kube))
    assert annotations_of(kube, "team-2", "b")[BATCH] == "4"


async def test_only_published_keys(publisher: AnnotationPublisher, kube: FakeKube) -> None:
    with pytest.raises(ValueError, match="vlm-gpu-optimizer/per_item_mb"):
        await publisher.sync({"default/a": {"vlm-gpu-optimizer/per_item_mb": "3"}}, pods_of(kube))
    assert patches(kube) == 0


async def test_the_fake_checks_the_content_type_as_the_server_does(kube: FakeKube, tmp_path: Path) -> None:
    api = default_api_factory(kube_settings(kube.write_kubeconfig(str(tmp_path / "kubeconfig"))))
    body = {"metadata": {"annotations": {BATCH: "2"}}}

    def patch(**kwargs: str) -> None:  # blocking: run in a thread, the fake serves on this loop
        try:
            core_v1(api).patch_namespaced_pod("a", "default", body, **kwargs)
        except Exception as e:
            raise wrap(e) from e
    try:
        await asyncio.to_thread(patch)  # the client's own choice for a dict body
        assert kube.requests[-1].content_type == "application/strategic-merge-patch+json"
        assert annotations_of(kube, "default", "a") == {BATCH: "2"}
        with pytest.raises(KubeApiError) as caught:
            await asyncio.to_thread(patch, _content_type="application/json")
        assert caught.value.status == 415 and caught.value.status_reason == "UnsupportedMediaType"
    finally:
        api.close()


async def test_published_values_come_back_through_the_watcher(kube: FakeKube, publisher: AnnotationPublisher,
        clock: FakeClock) -> None:
    changes = Changes()
    watcher = PodWatcher(publisher.settings, on_change=changes)
    async with running(watcher):
        pods: Pods = await changes.wait_for(lambda p: len(p) == 2)
        await publisher.sync({"default/a": {BATCH: "8"}}, pods)
        pods = await changes.wait_for(lambda p: p["default/a"].published.get(BATCH) == "8")
        clock.advance(100)
        await publisher.sync({"default/a": {BATCH: "8"}}, pods)
    assert patches(kube) == 1
