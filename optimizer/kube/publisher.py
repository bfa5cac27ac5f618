"""Publish decisions into the pods' annotations (``vlm-gpu-optimizer/batch_size``, ``.../cleanup_epoch``).

One JSON merge patch (``application/merge-patch+json``) on ``metadata.annotations`` per pod that
needs it, through ``patch_namespaced_pod``, each in its own worker thread with the request
timeout. The client would otherwise pick the content type itself: ``patch_namespaced_pod`` defaults
to ``application/json-patch+json``, which ``rest.py`` rewrites to
``application/strategic-merge-patch+json`` for a body that is not a list. We name it explicitly.

A pod is patched only when what it carries (``PodInfo.published``) differs from what is desired,
and at most once per ``settings.publish_interval`` (a change held back is sent on a later
:meth:`~AnnotationPublisher.sync`, once the interval has passed). After a patch, the pod is not
patched again until the watcher has seen a newer version of it (its ``resource_version`` moved):
our own change may simply not have come back yet.

Failures never raise: 403 is logged once per namespace (the service account lacks RBAC ``patch`` on
``pods``) and the namespace is skipped for ``settings.backoff_max`` seconds; 404 (the pod is gone)
is ignored; anything else is counted and retried after the interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from optimizer.kube._threads import grace_for, run_blocking
from optimizer.kube.client import FIELD_MANAGER, ApiFactory, core_v1, default_api_factory
from optimizer.kube.errors import KubeError, KubeForbidden, KubeNotFound, wrap
from optimizer.pods import PUBLISHED, PodInfo
from optimizer.config.kube import KubeSettings

log = structlog.get_logger("optimizer.kube")

MERGE_PATCH = "application/merge-patch+json"


@dataclass
class PublisherStats:
    """Counters of an :class:`AnnotationPublisher` (updated on the event loop's thread)."""

    patches_total: int = 0  # successful patches
    patch_errors_total: dict[str, int] = field(default_factory=dict)  # by KubeError.reason
    pods_gone_total: int = 0  # 404: the pod went away before its patch
    deferred_total: int = 0  # changes held back by publish_interval
    forbidden_namespaces: dict[str, float] = field(default_factory=dict)  # namespace -> retry at (clock seconds)


@dataclass
class _Sent:
    uid: str
    at: float  # clock seconds of the last attempt (successful or not)
    rv_before: str | None = None  # the pod's resource version when our patch succeeded; None: not yet seen


class AnnotationPublisher:
    """Writes the desired annotations into the pods, rate limited per pod.

    ``clock()`` gives monotonic seconds (injectable for tests); ``api_factory`` as for
    :class:`~optimizer.kube.watcher.PodWatcher`. Call :meth:`close` when done.
    """

    def __init__(self, settings: KubeSettings, *, api_factory: ApiFactory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.stats = PublisherStats()
        self._api_factory = api_factory or default_api_factory
        self._clock = clock
        self._api: Any = None
        self._sent: dict[str, _Sent] = {}
        self._told_forbidden: set[str] = set()

    async def sync(self, desired: Mapping[str, Mapping[str, str]], pods: Mapping[str, PodInfo]) -> None:
        """Patch the pods whose annotations differ from ``desired`` (pod key -> {annotation: value}).

        Only the keys in :data:`~optimizer.pods.PUBLISHED` may be set (``ValueError`` otherwise,
        before anything is sent); annotations not named are left alone. Pods not in ``pods`` are
        skipped. Raises nothing else (``CancelledError`` aside).
        """
        for key, wanted in desired.items():
            bad = [k for k in wanted if k not in PUBLISHED]
            if bad:
                raise ValueError(f"desired annotations of {key}: {bad} not publishable; allowed: {list(PUBLISHED)}")
        self._sent = {k: s for k, s in self._sent.items() if k in pods}
        for key, wanted in desired.items():
            pod = pods.get(key)
            if pod is None:
                continue
            diff = {k: str(v) for k, v in wanted.items() if pod.published.get(k) != str(v)}
            if diff and self._due(pod):
                await self._patch(pod, diff)

    def _due(self, pod: PodInfo) -> bool:
        now = self._clock()
        retry_at = self.stats.forbidden_namespaces.get(pod.namespace)
        if retry_at is not None and now < retry_at:
            return False
        sent = self._sent.get(pod.key)
        if sent is None or sent.uid != pod.uid:
            return True
        if sent.rv_before is not None and sent.rv_before == pod.resource_version:
            return False  # our last patch has not come back through the watch yet
        if now - sent.at < self.settings.publish_interval:
            self.stats.deferred_total += 1
            return False
        return True

    async def _patch(self, pod: PodInfo, diff: dict[str, str]) -> None:
        now = self._clock()
        sent = self._sent[pod.key] = _Sent(pod.uid, now)
        try:
            if self._api is None:
                self._api = await run_blocking(lambda: self._api_factory(self.settings), name="kube-client",
                                               grace=grace_for(self.settings.request_timeout))
            await run_blocking(lambda: self._patch_blocking(pod, diff), name=f"kube-patch:{pod.key}",
                               grace=grace_for(self.settings.request_timeout))
        except KubeNotFound:
            self.stats.pods_gone_total += 1
            log.debug("kube_publish_pod_gone", pod=pod.key)
        except KubeForbidden as e:
            self._forbidden(pod, e, now)
        except Exception as e:  # KubeError from the patch; anything the factory raised
            err = wrap(e)
            self.stats.patch_errors_total[err.reason] = self.stats.patch_errors_total.get(err.reason, 0) + 1
            log.warning("kube_api_error", operation="patch", pod=pod.key, reason=err.reason,
                        status=getattr(err, "status", None), error=str(err),
                        retry_in_s=self.settings.publish_interval)
        else:
            sent.rv_before = pod.resource_version
            self.stats.patches_total += 1
            self.stats.forbidden_namespaces.pop(pod.namespace, None)
            log.info("kube_published", pod=pod.key, annotations=diff)

    def _patch_blocking(self, pod: PodInfo, diff: dict[str, str]) -> None:
        body = {"metadata": {"annotations": diff}}
        try:
            resp = core_v1(self._api).patch_namespaced_pod(
                pod.name, pod.namespace, body, field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=self.settings.request_timeout)
            resp.data  # read it all, so that the connection goes back to the pool
            resp.release_conn()
        except Exception as e:
            raise wrap(e) from e

    def _forbidden(self, pod: PodInfo, err: KubeError, now: float) -> None:
        ns = pod.namespace
        self.stats.patch_errors_total["forbidden"] = self.stats.patch_errors_total.get("forbidden", 0) + 1
        self.stats.forbidden_namespaces[ns] = now + self.settings.backoff_max
        if ns not in self._told_forbidden:
            self._told_forbidden.add(ns)
            log.error("kube_publish_forbidden", namespace=ns, pod=pod.key, retry_in_s=self.settings.backoff_max,
                      error=str(err),
                      message=f"publishing needs RBAC permission to patch pods in namespace {ns} "
                              f"(verb patch on resource pods for the optimizer's service account)")

    async def close(self) -> None:
        """Close the client's connections."""
        if self._api is not None:
            self._api.close()
            self._api = None
