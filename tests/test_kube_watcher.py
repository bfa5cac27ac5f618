"""The pod watcher against a fake API server (a real HTTP server), through the official client and a kubeconfig."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from optimizer.kube.watcher import PodWatcher
from tests.fake_kube import FakeKube, Obj, make_pod
from tests.kube_helpers import Changes, FixedRng, RecordingSleep, kube_settings, kube_threads, running

MANAGED = {"vlm-gpu-optimizer/client": "true", "app.kubernetes.io/name": "captioner"}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as k:
        yield k


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path) -> str:
    return kube.write_kubeconfig(str(tmp_path / "kubeconfig"))


async def synced(kube: FakeKube, changes: Changes, name: str = "probe") -> None:
    """Once the server has a watch open and a pod added then has arrived, the watcher is watching."""
    await kube.wait_for(lambda k: k.watches_active == 1)
    kube.add_pod(make_pod(name, labels=MANAGED))
    await changes.wait_for(lambda p: f"default/{name}" in p)


async def test_sees_only_the_matching_pods_on_this_node(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    kube.add_pod(make_pod("elsewhere", node="node-b", labels=MANAGED))
    kube.add_pod(make_pod("unmanaged", labels={"app.kubernetes.io/name": "web"}))
    kube.add_pod(make_pod("b", namespace="team-2", labels=MANAGED, ready=False, phase="Pending"))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes)
    async with running(watcher):
        pods = await changes.wait_for(lambda p: len(p) == 2)
        assert set(pods) == {"default/a", "team-2/b"}
        assert pods["default/a"].service == "captioner" and pods["default/a"].state == "ready"
        assert pods["team-2/b"].state == "starting"
        await synced(kube, changes)
        assert watcher.stats.synced and watcher.stats.lists_total == 1
        assert watcher.pods is changes.latest
        with pytest.raises(TypeError):
            watcher.pods["x"] = pods["default/a"]  # type: ignore[index]
    assert changes.threads == {threading.get_ident()}  # on_change ran on the loop's thread
    first = kube.list_requests()[0]
    assert first.path == "/api/v1/pods"
    assert first.query["fieldSelector"] == "spec.nodeName=node-a"
    assert first.query["labelSelector"] == "vlm-gpu-optimizer/client=true"
    watch = kube.watch_requests()[0]
    assert watch.query["allowWatchBookmarks"] == "true" and watch.query["timeoutSeconds"] == "60"
    assert watch.query["resourceVersion"] == "1004"  # the list's


async def test_readiness_arrivals_departures_and_selector_changes(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes)
    async with running(watcher):
        await changes.wait_for(lambda p: "default/a" in p)
        kube.set_ready("default", "a", False)
        assert (await changes.wait_for(lambda p: not p["default/a"].ready))["default/a"].state == "unready"
        kube.add_pod(make_pod("b", labels=MANAGED))
        await changes.wait_for(lambda p: "default/b" in p)
        kube.delete_pod("default", "a")
        await changes.wait_for(lambda p: "default/a" not in p)

        def unmanage(pod: Obj) -> None:
            pod["metadata"]["labels"].pop("vlm-gpu-optimizer/client")
        kube.update_pod("default", "b", unmanage)  # leaves the selection: the server sends DELETED
        await changes.wait_for(lambda p: p == {})
        assert watcher.stats.events_total == {"ADDED": 1, "MODIFIED": 1, "DELETED": 2}
        assert watcher.stats.lists_total == 1 and len(kube.watch_requests()) == 1


async def test_a_bookmark_moves_the_resource_version_and_changes_nothing(kube: FakeKube, kubeconfig: str) -> None:
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes)
    async with running(watcher):
        await synced(kube, changes)
        calls = len(changes.calls)
        kube.add_pod(make_pod("elsewhere", node="node-b", labels=MANAGED))  # not ours, but moves the RV
        kube.bookmark()
        kube.end_watches()
        await kube.wait_for(lambda k: len(k.watch_requests()) == 2)
        assert kube.watch_requests()[1].query["resourceVersion"] == str(kube.rv)  # the bookmark's
        assert watcher.stats.events_total["BOOKMARK"] == 1
        assert len(changes.calls) == calls
        assert len(kube.list_requests()) == 1


async def test_a_watch_that_times_out_is_renewed_without_a_list(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig, watch_timeout=1.0), on_change=changes)
    async with running(watcher):
        await changes.wait_for(lambda p: "default/a" in p)
        await kube.wait_for(lambda k: len(k.watch_requests()) == 2)  # the server ended the first after 1 s
        kube.set_ready("default", "a", False)
        await changes.wait_for(lambda p: not p["default/a"].ready)
    first, second = kube.watch_requests()[:2]
    assert first.query["timeoutSeconds"] == "1"
    assert second.query["resourceVersion"] == first.query["resourceVersion"]
    assert len(kube.list_requests()) == 1
    assert set(watcher.stats.watch_restarts_total) == {"timeout"}


async def test_410_relists_and_drops_pods_deleted_in_the_gap(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    kube.add_pod(make_pod("b", labels=MANAGED))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes)
    async with running(watcher):
        await synced(kube, changes)
        # in one step: the watch never sees these events, only a 410 ERROR event
        kube.delete_pod("default", "b")
        kube.set_ready("default", "a", False)
        kube.expire_history()
        pods = await changes.wait_for(lambda p: "default/b" not in p)
        assert not pods["default/a"].ready
        assert watcher.stats.lists_total == 2
        assert watcher.stats.watch_restarts_total == {"expired": 1}
        assert "DELETED" not in watcher.stats.events_total  # the relist replaced the set
        await kube.wait_for(lambda k: len(k.watch_requests()) == 2)
        assert kube.watch_requests()[1].query["resourceVersion"] == str(kube.rv)


async def test_api_down_keeps_the_pods_and_backs_off_with_jitter(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    changes = Changes()
    seen_while_down: list[set[str]] = []

    def world(n: int) -> None:
        seen_while_down.append(set(watcher.pods))
        if n == 6:
            kube.down = False

    sleep = RecordingSleep(world)
    watcher = PodWatcher(kube_settings(kubeconfig, backoff_max=4.0), on_change=changes, rng=FixedRng(0.5),
                         sleep=sleep)
    async with running(watcher):
        await changes.wait_for(lambda p: "default/a" in p)
        await kube.wait_for(lambda k: k.watches_active == 1)
        kube.down = True
        kube.end_watches()
        kube.set_ready("default", "a", False)  # happens while the watcher cannot watch
        pods = await changes.wait_for(lambda p: not p["default/a"].ready)
    # half of 0.5, 1, 2, 4, then the 4 s cap
    assert sleep.delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert seen_while_down == [{"default/a"}] * 6
    assert watcher.stats.api_errors_total == {"http_503": 6}
    assert watcher.stats.watch_restarts_total == {"timeout": 1, "error": 6}
    assert watcher.stats.last_error is not None and "503" in watcher.stats.last_error
    assert len(kube.list_requests()) == 1  # back from the last resource version, no relist
    assert pods["default/a"].state == "unready"


async def test_a_slow_api_does_not_stall_the_loop(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    kube.gate.clear()  # the server holds every answer
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig, request_timeout=30.0), on_change=changes)
    async with running(watcher):
        await kube.wait_for(lambda k: k.held == 1)
        ticks = 0
        for _ in range(200):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 200 and kube.held == 1 and watcher.stats.lists_total == 0
        kube.gate.set()
        await changes.wait_for(lambda p: "default/a" in p)


async def test_a_list_that_times_out_is_an_error_and_retried(kube: FakeKube, kubeconfig: str) -> None:
    kube.add_pod(make_pod("a", labels=MANAGED))
    kube.gate.clear()
    sleep = RecordingSleep(lambda n: kube.gate.set())
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig, request_timeout=0.2), on_change=changes, sleep=sleep,
                         rng=FixedRng(1.0))
    async with running(watcher):
        await changes.wait_for(lambda p: "default/a" in p)
    assert watcher.stats.api_errors_total == {"timeout": 1}
    assert sleep.delays == [0.5]
    assert len(kube.list_requests()) == 2  # urllib3 did not retry it on its own


async def test_cancel_interrupts_a_connected_watch_at_once(kube: FakeKube, kubeconfig: str) -> None:
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig, request_timeout=30.0, watch_timeout=600.0), on_change=changes)
    with capture_logs() as logs:
        async with running(watcher) as task:
            await synced(kube, changes)
            assert kube_threads() == ["kube-watch:*"]
            task.cancel()
            async with asyncio.timeout(5):  # far below the 30 s a stuck read would take
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert kube_threads() == []
    assert not [e for e in logs if e["event"] == "kube_thread_stuck"]
    assert not watcher.stats.synced


async def test_cancel_during_a_list_ends_within_the_request_timeout(kube: FakeKube, kubeconfig: str) -> None:
    kube.gate.clear()  # the list is never answered
    watcher = PodWatcher(kube_settings(kubeconfig, request_timeout=0.3), on_change=Changes())
    with capture_logs() as logs:
        async with running(watcher) as task:
            await kube.wait_for(lambda k: k.held == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert kube_threads() == []  # the read timed out; run() waited for it
    assert not [e for e in logs if e["event"] == "kube_thread_stuck"]
    kube.gate.set()


async def test_one_scope_per_namespace(kube: FakeKube, kubeconfig: str) -> None:
    for ns in ("ns-1", "ns-2", "ns-3"):
        kube.add_pod(make_pod("p", namespace=ns, labels=MANAGED))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig, namespaces=("ns-1", "ns-2")), on_change=changes)
    async with running(watcher):
        await changes.wait_for(lambda p: set(p) == {"ns-1/p", "ns-2/p"})
        await kube.wait_for(lambda k: k.watches_active == 2)
        kube.delete_pod("ns-1", "p")
        kube.delete_pod("ns-3", "p")
        kube.expire_history()  # both scopes relist; each replaces only its own namespace
        await changes.wait_for(lambda p: set(p) == {"ns-2/p"})
        await kube.wait_for(lambda k: len(k.list_requests()) == 4)
    assert {r.path for r in kube.requests} == {"/api/v1/namespaces/ns-1/pods", "/api/v1/namespaces/ns-2/pods"}
    assert set(watcher.stats.resource_versions) == {"ns-1", "ns-2"}


async def test_invalid_annotations_are_logged_once_per_pod_key_and_value(kube: FakeKube, kubeconfig: str) -> None:
    bad = {"vlm-gpu-optimizer/per_item_mb": "lots", "vlm-gpu-optimizer/max_batch_size": "16"}
    kube.add_pod(make_pod("a", labels=MANAGED, annotations=bad))
    changes = Changes()
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes)
    with capture_logs() as logs:
        async with running(watcher):
            pods = await changes.wait_for(lambda p: "default/a" in p)
            assert pods["default/a"].profile.max_batch_size == 16 and pods["default/a"].profile.per_item_mb is None
            kube.set_ready("default", "a", False)  # the same bad value again: not logged again
            await changes.wait_for(lambda p: not p["default/a"].ready)
            kube.add_pod(make_pod("b", labels=MANAGED, annotations=bad))
            await changes.wait_for(lambda p: "default/b" in p)
    invalid = [e for e in logs if e["event"] == "pod_annotation_invalid"]
    assert [(e["pod"], e["key"], e["value"]) for e in invalid] == [
        ("default/a", "vlm-gpu-optimizer/per_item_mb", "lots"), ("default/b", "vlm-gpu-optimizer/per_item_mb", "lots")]
    assert invalid[0]["log_level"] == "warning" and "MiB" in invalid[0]["problem"]


async def test_logs_one_event_per_happening(kube: FakeKube, kubeconfig: str) -> None:
    changes = Changes()
    sleep = RecordingSleep(lambda n: setattr(kube, "down", False))
    watcher = PodWatcher(kube_settings(kubeconfig), on_change=changes, sleep=sleep, rng=FixedRng(1.0))
    kube.down = True
    with capture_logs() as logs:
        async with running(watcher):
            await synced(kube, changes)
    events = [e["event"] for e in logs]
    assert events[:2] == ["kube_api_error", "kube_list"]
    error = logs[0]
    assert error["operation"] == "list" and error["reason"] == "http_503" and error["status"] == 503
    assert error["retry_in_s"] == 0.5 and error["log_level"] == "warning"
    assert logs[1]["pods"] == 0 and logs[1]["resource_version"] == "1000"


async def test_the_watcher_retries_a_bad_kubeconfig(tmp_path: Path) -> None:
    missing = tmp_path / "kubeconfig"
    sleep = RecordingSleep()
    watcher = PodWatcher(kube_settings(str(missing)), on_change=Changes(), sleep=sleep, rng=FixedRng(1.0))
    async with FakeKube() as kube:
        def fix(n: int) -> None:
            if n == 2:
                kube.write_kubeconfig(str(missing))
        sleep.on_delay = fix
        async with running(watcher):
            await kube.wait_for(lambda k: k.watches_active == 1)
    assert sleep.delays == [0.5, 1.0]
    assert watcher.stats.api_errors_total == {"config": 2}
