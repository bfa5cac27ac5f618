"""Discover the VLM pods on this node: list, then watch, through the official client.

One *scope* per namespace in ``settings.namespaces`` (``list_namespaced_pod``), or a single scope
over all namespaces (``list_pod_for_all_namespaces``). Each scope runs its own loop, as a named,
guarded task, with its own resource version; all of them feed one mapping of pods.

A scope's loop:

1. list the pods (``fieldSelector=spec.nodeName=<node>``, ``labelSelector``): the scope's pods are
   replaced by what the list returned, so pods deleted meanwhile disappear;
2. watch from the list's ``resourceVersion`` with bookmarks and ``timeoutSeconds``; every event
   (bookmarks included) advances the resource version;
3. a watch that ends normally (its time-out) is renewed from the last resource version, without
   a list; ``410 Gone`` (an ERROR event, or the response) goes back to 1; any other error waits
   (exponential back-off from 0.5 s to ``settings.backoff_max``, full jitter) and renews the watch
   from the last resource version (or lists again, if the list failed). Pods are never cleared
   on an error: the last known ones keep being served.

The client blocks, so every call runs in its own thread (:mod:`optimizer.kube._threads`); watch
events come back to the loop one by one through ``call_soon_threadsafe``. Cancelling :meth:`run`
shuts the watch's socket down and waits for the threads (a list in flight: at most about
``settings.request_timeout``).

This module stays one file of about 400 lines on purpose: it is one state machine (list, watch, renew,
back off, per scope) whose steps share the scope's resource version and the pod mapping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import structlog

from optimizer.kube._threads import Stream, grace_for, post, run_blocking
from optimizer.kube.client import ApiFactory, core_v1, default_api_factory
from optimizer.kube.errors import KubeError, KubeGone, KubeProtocolError, from_status, wrap
from optimizer.pods import AnnotationProblem, PodInfo, pod_from_object
from optimizer.config.kube import KubeSettings

log = structlog.get_logger("optimizer.kube")

OnChange = Callable[[Mapping[str, PodInfo]], None]
Sleep = Callable[[float], Awaitable[None]]
BACKOFF_MIN = 0.5  # seconds: the first retry waits up to this long


class Rng(Protocol):
    def random(self) -> float: ...


@dataclass
class WatcherStats:
    """Counters of a :class:`PodWatcher`, updated on the event loop's thread (read them there)."""

    synced: bool = False  # every scope has listed and its watch is connected
    lists_total: int = 0  # successful lists
    watch_restarts_total: dict[str, int] = field(default_factory=dict)  # by reason: timeout, expired, error
    api_errors_total: dict[str, int] = field(default_factory=dict)  # by KubeError.reason (410: a restart, not here)
    events_total: dict[str, int] = field(default_factory=dict)  # by type: ADDED ... BOOKMARK, ERROR
    last_error: str | None = None
    last_sync_at: float | None = None  # Unix seconds of the last successful list
    resource_versions: dict[str, str] = field(default_factory=dict)  # per scope ("" = all namespaces)


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def _same(a: PodInfo, b: PodInfo) -> bool:
    """Equal but for the resource version (which every update changes)."""
    return dataclasses.replace(a, resource_version=b.resource_version) == b


Parsed = tuple[PodInfo | None, list[AnnotationProblem], str | None]  # pod, problems, why it was skipped


def _parse(obj: Any, service_label: str) -> Parsed:
    if not isinstance(obj, dict):
        return None, [], "not an object"
    try:
        pod, problems = pod_from_object(obj, service_label)
    except (ValueError, TypeError, AttributeError) as e:
        return None, [], str(e)
    return pod, problems, None


@dataclass
class _Scope:
    namespace: str | None  # None: all namespaces

    @property
    def label(self) -> str:
        return self.namespace or ""

    def owns(self, pod: PodInfo) -> bool:
        return self.namespace is None or pod.namespace == self.namespace


class PodWatcher:
    """Keeps :attr:`pods` current: the pods on ``settings.node_name`` matching ``settings.label_selector``.

    ``on_change(pods)`` is called on the event loop's thread with the complete, immutable mapping
    (keyed ``namespace/name``) after every list or watch event that changed a pod (a change of
    ``resource_version`` alone does not count; bookmarks never do). It must not block; an exception
    it raises is logged and ignored. ``api_factory(settings)`` builds the client's ``ApiClient``
    (default: :func:`optimizer.kube.client.default_api_factory`). ``rng.random()`` draws the
    back-off jitter and ``sleep(seconds)`` waits it out (both injectable for tests).

    Raises ``ValueError`` here when ``settings.node_name`` is not set.
    """

    def __init__(self, settings: KubeSettings, *, on_change: OnChange, api_factory: ApiFactory | None = None,
                 rng: Rng | None = None, sleep: Sleep = asyncio.sleep) -> None:
        if not settings.node_name:
            raise ValueError("kubernetes.node_name is required to watch this node's pods")
        self.settings = settings
        self.stats = WatcherStats()
        self._on_change = on_change
        self._api_factory = api_factory or default_api_factory
        self._rng: Rng = rng or random.Random()
        self._sleep = sleep
        self._pods: dict[str, PodInfo] = {}
        self._view: Mapping[str, PodInfo] = MappingProxyType({})
        self._logged: set[tuple[str, str, str]] = set()
        self._scopes = [_Scope(None)] if settings.all_namespaces else [_Scope(ns) for ns in settings.namespaces]
        self._synced: dict[str, bool] = {s.label: False for s in self._scopes}
        self._api: Any = None

    @property
    def pods(self) -> Mapping[str, PodInfo]:
        """The latest pods, keyed ``namespace/name`` (an immutable snapshot)."""
        return self._view

    async def run(self) -> None:
        """List and watch until cancelled; raises nothing but ``CancelledError``."""
        tasks: list[asyncio.Task[None]] = []
        try:
            self._api = await self._build_client()
            tasks = [asyncio.create_task(self._guarded(scope), name=f"kube-watch:{scope.label or '*'}")
                     for scope in self._scopes]
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                if not t.done() and not t.cancelling():  # gather may have cancelled them already
                    t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._set_synced(None, False)
            if self._api is not None:
                self._api.close()  # closes pooled connections; no thread of ours is left to use them
                self._api = None

    # -- the loop of one scope ------------------------------------------------------------------

    async def _build_client(self) -> Any:
        attempt = 0
        while True:
            try:
                return await run_blocking(lambda: self._api_factory(self.settings), name="kube-client",
                                          grace=grace_for(self.settings.request_timeout))
            except Exception as e:  # the factory may raise anything; ours are KubeConfigError
                err = wrap(e)
                await self._failed(None, "client", err, attempt)
                attempt += 1

    async def _guarded(self, scope: _Scope) -> None:
        while True:
            try:
                await self._scope_loop(scope)
            except Exception:  # a bug of ours: keep watching rather than go blind
                log.exception("kube_watcher_crashed", scope=scope.label)
                await self._sleep(self.settings.backoff_max)

    async def _scope_loop(self, scope: _Scope) -> None:
        attempt = 0  # consecutive failures, for the back-off
        need_list = True
        expired_in_a_row = 0
        quick_in_a_row = 0
        while True:
            op = "list" if need_list else "watch"
            try:
                if need_list:
                    await self._list(scope)
                    need_list = False
                    attempt = 0
                    op = "watch"
                started = asyncio.get_running_loop().time()
                events = await self._watch(scope)
            except KubeGone:
                self._restarted(scope, "expired")
                need_list = True
                expired_in_a_row += 1
                if expired_in_a_row > 1:  # 410 right after a list: the server is unwell, do not hammer it
                    await self._sleep(self._backoff(attempt))
                    attempt += 1
                continue
            except KubeError as err:
                if op == "watch":
                    self._restarted(scope, "error")
                await self._failed(scope, op, err, attempt)
                attempt += 1
                continue
            expired_in_a_row = 0
            self._restarted(scope, "timeout", events)
            if events == 0 and asyncio.get_running_loop().time() - started < 1.0:
                quick_in_a_row += 1
                if quick_in_a_row > 1:  # watches that end at once, empty, again and again: do not spin
                    await self._sleep(self._backoff(attempt))
                    attempt += 1
            else:
                quick_in_a_row = 0
                attempt = 0

    def _backoff(self, attempt: int) -> float:
        cap = min(self.settings.backoff_max, BACKOFF_MIN * 2.0 ** min(attempt, 60))
        return self._rng.random() * cap

    async def _failed(self, scope: _Scope | None, op: str, err: KubeError, attempt: int) -> None:
        delay = self._backoff(attempt)
        _bump(self.stats.api_errors_total, err.reason)
        self.stats.last_error = f"{op}: {err}"
        self._set_synced(scope, False)
        log.warning("kube_api_error", scope=scope.label if scope else None, operation=op, reason=err.reason,
                    status=getattr(err, "status", None), error=str(err), retry_in_s=round(delay, 3),
                    attempt=attempt + 1)
        await self._sleep(delay)

    def _restarted(self, scope: _Scope, reason: str, events: int | None = None) -> None:
        _bump(self.stats.watch_restarts_total, reason)
        self._set_synced(scope, False)
        log.info("kube_watch_restarted", scope=scope.label, reason=reason, events=events,
                 resource_version=self.stats.resource_versions.get(scope.label))

    def _set_synced(self, scope: _Scope | None, value: bool) -> None:
        for label in self._synced:
            if scope is None or label == scope.label:
                self._synced[label] = value
        self.stats.synced = all(self._synced.values())

    # -- list -------------------------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field_selector": f"spec.nodeName={self.settings.node_name}"}
        if self.settings.label_selector:
            out["label_selector"] = self.settings.label_selector
        return out

    def _call(self, scope: _Scope, **kwargs: Any) -> Any:
        api = core_v1(self._api)
        if scope.namespace is None:
            return api.list_pod_for_all_namespaces(**self._selectors(), **kwargs)
        return api.list_namespaced_pod(scope.namespace, **self._selectors(), **kwargs)

    def _list_blocking(self, scope: _Scope) -> tuple[str, list[Parsed]]:
        try:
            resp = self._call(scope, _preload_content=False, _request_timeout=self.settings.request_timeout)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
        except Exception as e:
            raise wrap(e) from e
        rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if not isinstance(rv, str) or not rv:
            raise KubeProtocolError("pod list without metadata.resourceVersion")
        return rv, [_parse(item, self.settings.service_label) for item in body.get("items") or ()]

    async def _list(self, scope: _Scope) -> None:
        rv, parsed = await run_blocking(lambda: self._list_blocking(scope), name=f"kube-list:{scope.label or '*'}",
                                        grace=grace_for(self.settings.request_timeout))
        listed: dict[str, PodInfo] = {}
        for pod, problems, skipped in parsed:
            if pod is not None:
                listed[pod.key] = pod
                self._report(problems)
            else:
                log.warning("kube_pod_unreadable", scope=scope.label, error=skipped)
        new = {k: p for k, p in self._pods.items() if not scope.owns(p)}
        new.update(listed)
        self.stats.lists_total += 1
        self.stats.last_sync_at = time.time()
        self.stats.resource_versions[scope.label] = rv
        log.info("kube_list", scope=scope.label, pods=len(listed), resource_version=rv)
        self._replace(new)

    # -- watch ------------------------------------------------------------------------------------

    def _watch_blocking(self, scope: _Scope, rv: str, stream: Stream,
                        deliver: Callable[[str, Parsed, str | None], None], connected: Callable[[], None]) -> bool:
        """Read one watch until it ends; True when it ended normally. Raises our KubeError."""
        from kubernetes.watch.watch import iter_resp_lines

        s = self.settings
        try:
            resp = self._call(scope, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=max(1, math.ceil(s.watch_timeout)), _preload_content=False,
                              _request_timeout=(s.request_timeout, s.watch_timeout + s.request_timeout))
        except Exception as e:
            raise wrap(e) from e
        try:
            if not stream.attach(resp):
                return True
            connected()
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if stream.stopped:
                    return True
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object")
                if kind == "ERROR":
                    raise from_status(obj)
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                new_rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
                parsed: Parsed = (None, [], None) if kind == "BOOKMARK" else _parse(obj, s.service_label)
                deliver(str(kind), parsed, new_rv if isinstance(new_rv, str) else None)
        except KubeError:
            raise
        except Exception as e:
            if stream.stopped:
                return True
            raise wrap(e) from e
        finally:
            stream.attach(None)
            resp.close()
            resp.release_conn()
        return True

    async def _watch(self, scope: _Scope) -> int:
        """One watch from the scope's resource version, until it ends normally; the events it delivered.

        Raises :class:`KubeGone` on 410, another :class:`KubeError` on any other failure.
        """
        loop = asyncio.get_running_loop()
        stream = Stream()
        seen = [0]

        def deliver(kind: str, parsed: Parsed, rv: str | None) -> None:
            def apply() -> None:
                if not stream.stopped:
                    seen[0] += 1
                    self._apply(scope, kind, parsed, rv)
            post(loop, apply)

        def connected() -> None:
            post(loop, lambda: None if stream.stopped else self._set_synced(scope, True))

        rv = self.stats.resource_versions[scope.label]
        try:
            await run_blocking(lambda: self._watch_blocking(scope, rv, stream, deliver, connected),
                               name=f"kube-watch:{scope.label or '*'}", grace=grace_for(self.settings.request_timeout),
                               interrupt=stream.stop)
        finally:
            stream.stopped = True
        return seen[0]

    def _apply(self, scope: _Scope, kind: str, parsed: Parsed, rv: str | None) -> None:
        _bump(self.stats.events_total, kind)
        if rv:
            self.stats.resource_versions[scope.label] = rv
        pod, problems, skipped = parsed
        if kind == "BOOKMARK":
            return
        if pod is None:
            log.warning("kube_pod_unreadable", scope=scope.label, event=kind, error=skipped)
            return
        new = dict(self._pods)
        if kind in ("ADDED", "MODIFIED"):
            new[pod.key] = pod
            self._report(problems)
        elif kind == "DELETED":
            new.pop(pod.key, None)
        else:
            log.warning("kube_event_unknown", scope=scope.label, event=kind)
            return
        self._replace(new)

    # -- the shared mapping -----------------------------------------------------------------------

    def _replace(self, new: dict[str, PodInfo]) -> None:
        old = self._pods
        changed = new.keys() != old.keys() or any(not _same(old[k], p) for k, p in new.items())
        self._pods = new
        self._view = MappingProxyType(dict(new))
        for gone in old.keys() - new.keys():
            self._logged = {t for t in self._logged if t[0] != gone}  # a pod made again is reported again
        if changed:
            try:
                self._on_change(self._view)
            except Exception:
                log.exception("kube_on_change_failed")

    def _report(self, problems: list[AnnotationProblem]) -> None:
        for p in problems:
            key = (p.pod, p.key, p.value)
            if key not in self._logged:
                self._logged.add(key)
                log.warning("pod_annotation_invalid", pod=p.pod, key=p.key, value=p.value, problem=p.message)
