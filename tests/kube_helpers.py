"""Helpers of the Kubernetes tests: settings, an ``on_change`` recorder to await, a watcher run as a task."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from optimizer.config.kube import KubeSettings
from optimizer.engine import Engine
from optimizer.pods import PodInfo
from optimizer.kube.watcher import PodWatcher

Pods = Mapping[str, PodInfo]


def kube_settings(kubeconfig: str, **overrides: Any) -> KubeSettings:
    """Discovery of node-a's managed pods, with short timeouts for tests (seconds)."""
    base: dict[str, Any] = dict(discovery=True, kubeconfig=kubeconfig, node_name="node-a", watch_timeout=60.0,
                                request_timeout=2.0, backoff_max=4.0, publish_interval=15.0,
                                pod_resources_socket="")  # tests/test_podresources.py mounts a fake kubelet
    base.update(overrides)
    return KubeSettings(**base)



def notify_pod_changes(engine: Engine) -> asyncio.Condition:
    """A condition notified after every ``engine.set_pods`` (wrapped in place), for tests to await."""
    changed = asyncio.Condition()
    set_pods = engine.set_pods

    def recording(pods: dict[str, PodInfo], now: float | None = None) -> Any:
        out = set_pods(pods, now)

        async def notify() -> None:
            async with changed:
                changed.notify_all()
        asyncio.get_running_loop().create_task(notify())
        return out

    engine.set_pods = recording  # type: ignore[method-assign]
    return changed


class Changes:
    """Records every ``on_change`` call (and the thread it came on); tests await :meth:`wait_for`."""

    def __init__(self) -> None:
        self.calls: list[Pods] = []
        self.threads: set[int] = set()
        self._waiters: list[asyncio.Future[None]] = []

    def __call__(self, pods: Pods) -> None:
        self.calls.append(pods)
        self.threads.add(threading.get_ident())
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    @property
    def latest(self) -> Pods:
        return self.calls[-1] if self.calls else {}

    async def wait_for(self, predicate: Callable[[Pods], bool], timeout: float = 5.0) -> Pods:
        """The first mapping (the latest, or one still to come) for which ``predicate`` holds."""
        async with asyncio.timeout(timeout):
            while not (self.calls and predicate(self.latest)):
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut
        return self.latest


def kube_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kube-")]


@contextlib.asynccontextmanager
async def running(watcher: PodWatcher) -> AsyncIterator[asyncio.Task[None]]:
    """``watcher.run()`` as a task; on exit it is cancelled, and must have left no thread behind."""
    task = asyncio.create_task(watcher.run(), name="test-watcher")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert kube_threads() == [], kube_threads()


class FixedRng:
    """``random()`` always answers ``value``: the back-off delays become exact."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class RecordingSleep:
    """An injected ``sleep``: records each delay and returns at once (after one turn of the loop).

    ``on_delay(n)`` runs after the n-th delay is recorded (1-based), to change the world at that point.
    """

    def __init__(self, on_delay: Callable[[int], None] | None = None) -> None:
        self.delays: list[float] = []
        self.on_delay = on_delay

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.on_delay is not None:
            self.on_delay(len(self.delays))
        await asyncio.sleep(0)  # a turn of the loop, not a wait for anything
