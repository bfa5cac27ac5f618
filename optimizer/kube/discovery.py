"""Discovery wired to the engine: the pod watcher feeds the engine's roster; the publisher writes decisions.

One :class:`Discovery` per process. ``run()`` is a background task of the application (started and
stopped in its ``cleanup_ctx``); it never raises but ``CancelledError``. The watcher's blocking
client calls run in a worker thread, so a slow API server never stalls ``GET /batch-size``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from optimizer import coordination
from optimizer.engine import Engine
from optimizer.metrics import KubeCounts
from optimizer.pods import BATCH_SIZE_ANNOTATION, CLEANUP_EPOCH_ANNOTATION, PodInfo
from optimizer.kube.podresources.poller import PodResourcesPoller
from optimizer.kube.publisher import AnnotationPublisher
from optimizer.config.kube import KubeSettings
from optimizer.kube.watcher import PodWatcher

log = structlog.get_logger(__name__)


class Discovery:
    """Keeps ``engine.pods`` current and, with ``settings.publish``, the pods' annotations.

    ``clock`` is the sampler's clock (seconds), ``sleep`` what the publishing loop waits with.
    """

    def __init__(self, engine: Engine, settings: KubeSettings, *, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 api_factory: Callable[[KubeSettings], Any] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.watcher = PodWatcher(settings, on_change=self._on_change, api_factory=api_factory)
        self.publisher = AnnotationPublisher(settings, api_factory=api_factory) if settings.publish else None
        self.pod_resources = (PodResourcesPoller(settings.pod_resources_socket, interval=settings.pod_resources_interval,
                                                 timeout=settings.request_timeout, on_change=self._on_devices,
                                                 clock=clock, sleep=sleep)
                              if settings.pod_resources_socket else None)
        self._changed = asyncio.Event()
        self.publish_rounds = 0  # publishing passes completed (successful or not)
        self._round = asyncio.Condition()
        engine.attach_discovery()

    def _on_change(self, pods: Mapping[str, PodInfo]) -> None:
        events = self.engine.set_pods(dict(pods), now=self.clock())
        counts: dict[str, int] = {}
        for p in pods.values():
            counts[p.state] = counts.get(p.state, 0) + 1
        log.debug("pods_changed", pods=len(pods), batch_changes=sum(e.kind == "batch_changed" for e in events),
                  **counts)
        self._changed.set()

    def _on_devices(self, devices: Mapping[str, tuple[str, ...]]) -> None:
        events = self.engine.set_pod_devices(devices, now=self.clock())
        log.debug("pod_devices_changed", pods=len(devices), batch_changes=sum(e.kind == "batch_changed" for e in events))
        self._changed.set()

    def desired(self) -> dict[str, dict[str, str]]:
        """What each pod's annotations should say: the batch size and cleanup epoch of its service on its GPU.

        Pods whose GPU is unknown are skipped (nothing exact to publish). Asking registers the service on
        its GPU and keeps it alive, as a poll would: a pod may read only its annotations, never HTTP.
        """
        e = self.engine
        gpus = list(e.snapshot.gpus) if e.snapshot else []
        now = self.clock()
        out: dict[str, dict[str, str]] = {}
        for key, pod in sorted(e.pods.items()):
            if pod.service is None or not coordination.counted(pod, e.ever_ready):
                continue
            known, _ = coordination.pod_gpus(pod, e.pod_gpus, gpus, e.pod_devices)
            if not known:
                continue
            index = known[0]  # a pod on several GPUs: its first one's (the service registers on each it polls)
            d = e.poll(pod.service, index, now)
            out[key] = {BATCH_SIZE_ANNOTATION: str(d.batch_size), CLEANUP_EPOCH_ANNOTATION: str(d.cleanup_epoch)}
        return out

    async def _publish_loop(self) -> None:
        assert self.publisher is not None
        interval = min(self.settings.publish_interval, self.engine.settings.monitoring_interval)
        while True:
            try:
                await self.publisher.sync(self.desired(), self.engine.pods)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - publishing is best effort; the API keeps serving
                log.exception("publish_failed")
            async with self._round:
                self.publish_rounds += 1
                self._round.notify_all()
            self._changed.clear()
            await self._wait(interval)

    async def wait_publish_rounds(self, n: int) -> None:
        """Until ``n`` publishing passes have completed (for tests and tools; no timeout of its own)."""
        async with self._round:
            await self._round.wait_for(lambda: self.publish_rounds >= n)

    async def _wait(self, seconds: float) -> None:
        """Until the pods change or ``seconds`` pass on the injected clock, whichever is first."""
        waiter = asyncio.ensure_future(self._changed.wait())
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, sleeper):
                t.cancel()
            await asyncio.gather(waiter, sleeper, return_exceptions=True)

    async def run(self) -> None:
        log.info("discovery_started", node=self.settings.node_name, namespaces=list(self.settings.namespaces) or "all",
                 selector=self.settings.label_selector, publish=self.settings.publish)
        tasks = [asyncio.create_task(self.watcher.run(), name="kube-watcher")]
        if self.publisher is not None:
            tasks.append(asyncio.create_task(self._publish_loop(), name="kube-publisher"))
        if self.pod_resources is not None:
            tasks.append(asyncio.create_task(self.pod_resources.run(), name="kube-podresources"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.publisher is not None:
                await self.publisher.close()

    def counts(self) -> KubeCounts:
        """The watcher's and publisher's totals, for the metrics."""
        w = self.watcher.stats
        errors = dict(w.api_errors_total)
        patches = 0
        if self.publisher is not None:
            p = self.publisher.stats
            patches = p.patches_total
            for reason, n in p.patch_errors_total.items():
                errors[reason] = errors.get(reason, 0) + n
        return KubeCounts(synced=w.synced, watch_restarts=dict(w.watch_restarts_total), api_errors=errors,
                          patches=patches)

    def status(self) -> dict[str, Any]:
        """For ``GET /services``: whether the watch is in sync, and what went wrong last."""
        st = self.watcher.stats
        out: dict[str, Any] = {
            "enabled": True,
            "node": self.settings.node_name,
            "namespaces": list(self.settings.namespaces) or "all",
            "label_selector": self.settings.label_selector,
            "synced": st.synced,
            "last_sync_at": st.last_sync_at,
            "last_error": st.last_error,
            "publish": self.settings.publish,
            # where the pods' GPUs come from: "kubelet" while its pod-resources API answers, else
            # "annotations" (the pods' gpu annotations and their own polls)
            "gpu_source": ("kubelet" if self.pod_resources is not None and self.pod_resources.stats.state == "ok"
                           else "annotations"),
            "pod_resources": self.pod_resources.status() if self.pod_resources is not None else {"enabled": False},
        }
        if self.publisher is not None:
            out["forbidden_namespaces"] = sorted(self.publisher.stats.forbidden_namespaces)
            out["patches"] = self.publisher.stats.patches_total
        return out
