"""A fake Kubernetes API server: a real aiohttp server on an ephemeral port, for the official client.

It speaks the REST protocol for what the optimizer calls: listing pods (all namespaces, or one),
with ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, comma for AND) and
``fieldSelector`` (``spec.nodeName``, ``metadata.name``, ``metadata.namespace``; ``=``, ``==``,
``!=``); watching them (newline-delimited JSON events from a resource version, replayed from a
bounded history; an RV older than the history gets an ERROR event with a 410 ``Expired`` Status,
as the API server's watch cache answers; ``allowWatchBookmarks``; ``timeoutSeconds``; a pod that
starts or stops matching a watch's selectors arrives as ADDED or DELETED, as the real server
sends it); and PATCH of a pod with a merge patch (``application/merge-patch+json`` or
``application/strategic-merge-patch+json``, both applied as RFC 7386 merges; anything else is
415, as the server answers). Requests must carry ``Authorization: Bearer <token>``.

Switches: ``down`` (503 for every request), ``forbid_patch`` / ``forbidden_namespaces`` (403),
``authorize`` (RBAC: asked ``(verb, namespace)`` for every list, watch and patch, ``None`` for the
cluster scope; 403 where it answers False), ``admit_patch`` (validating admission: asked
``(old, new)`` for every patch, before it is stored; the Status it returns refuses the patch),
``delay`` (seconds before each answer), ``gate`` (an ``asyncio.Event``: answers wait while it is
clear), :meth:`expire_history` (every RV so far becomes too old), :meth:`end_watches` (open
watches end as by their time-out), :meth:`bookmark` (BOOKMARK to the watches that allow them).

Tests wait with :meth:`wait_for` (a predicate over the server, re-checked on every change), never
with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

Obj = dict[str, Any]
PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
USERNAME = "system:serviceaccount:medical-kg:vlm-gpu-memory-optimizer"  # who the token is (in 403 messages)


def make_pod(name: str, namespace: str = "default", node: str = "node-a", labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None, ready: bool = True, phase: str = "Running",
             ip: str | None = "127.0.0.1") -> Obj:
    """A pod as the API server returns it (without resourceVersion: the server sets it).

    ``ip`` is its pod IP (``status.podIP`` and ``status.podIPs``, as the API server fills both once the
    sandbox has one; ``None``: not assigned yet, neither field present). The default is the address the
    tests' clients connect from, so that the pod-IP check admits them.
    """
    pod_status: Obj = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip is not None:
        pod_status.update(podIP=ip, podIPs=[{"ip": ip}], hostIP="192.0.2.1", hostIPs=[{"ip": "192.0.2.1"}])
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                     "labels": dict(labels if labels is not None else {"vlm-gpu-optimizer/client": "true"}),
                     "annotations": dict(annotations or {}), "creationTimestamp": "2026-11-22T00:00:00Z"},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "vlm:latest"}]},
        "status": pod_status,
    }


def status(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _label_terms(selector: str) -> list[tuple[str, str, str]]:
    """``(key, op, value)`` for each comma-separated term; op is ``=``, ``!=``, ``exists`` or ``!exists``."""
    terms: list[tuple[str, str, str]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if m := re.fullmatch(r"([^!=\s]+)\s*(!=|==|=)\s*(\S*)", term):
            op = "!=" if m.group(2) == "!=" else "="
            terms.append((m.group(1), op, m.group(3)))
        elif m := re.fullmatch(r"!([^!=\s]+)", term):
            terms.append((m.group(1), "!exists", ""))
        elif re.fullmatch(r"[^!=\s()]+", term):
            terms.append((term, "exists", ""))
        else:
            raise ValueError(f"label selector term not supported by the fake: {term!r}")
    return terms


def _label_ok(terms: list[tuple[str, str, str]], labels: Mapping[str, str]) -> bool:
    for k, op, v in terms:
        ok = {"=": labels.get(k) == v, "!=": labels.get(k) != v, "exists": k in labels,
              "!exists": k not in labels}[op]
        if not ok:
            return False
    return True


_FIELDS = {"spec.nodeName": ("spec", "nodeName"), "metadata.name": ("metadata", "name"),
           "metadata.namespace": ("metadata", "namespace")}


def _field_terms(selector: str) -> list[tuple[str, str, bool, str]]:
    """``(section, name, negated, value)`` for each comma-separated term."""
    terms: list[tuple[str, str, bool, str]] = []
    for term in filter(None, (t.strip() for t in selector.split(","))):
        m = re.fullmatch(r"([\w.]+)\s*(!=|==|=)\s*(\S*)", term)
        if not m or m.group(1) not in _FIELDS:
            raise ValueError(f"field selector not supported: {term!r}")
        a, b = _FIELDS[m.group(1)]
        terms.append((a, b, m.group(2) == "!=", m.group(3)))
    return terms


def _field_ok(terms: list[tuple[str, str, bool, str]], obj: Obj) -> bool:
    return all(((obj.get(a) or {}).get(b, "") == v) != neg for a, b, neg, v in terms)


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    old: Obj | None
    new: Obj


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str


@dataclass
class FakeKube:
    """The server's state and switches; :meth:`start` serves it. Use ``async with FakeKube() as kube``."""

    token: str = "fake-token"
    history_size: int = 1000
    down: bool = False
    forbid_patch: bool = False
    forbidden_namespaces: set[str] = field(default_factory=set)
    delay: float = 0.0
    authorize: Callable[[str, str | None], bool] | None = None
    admit_patch: Callable[[Obj, Obj], Obj | None] | None = None
    pods: dict[tuple[str, str], Obj] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    watches_opened: int = 0
    watches_active: int = 0
    held: int = 0  # requests waiting for the gate
    rv: int = 1000
    compacted: int = 1000  # watches from an RV below this get 410

    def __post_init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self._history: deque[_Event] = deque(maxlen=self.history_size)
        self._waiters: list[asyncio.Future[None]] = []
        self._bookmarks = 0
        self._ends = 0
        self._end_rv = 0
        self._closing = False
        self._server: TestServer | None = None

    # -- serving ----------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeKube:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._list_or_watch)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_or_watch)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", self._patch)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self.gate.set()
        self._touch()
        assert self._server is not None
        await self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None and self._server.port is not None
        return f"http://127.0.0.1:{self._server.port}"

    def write_kubeconfig(self, path: str) -> str:
        """A kubeconfig pointing the official client at this server with the bearer token; returns ``path``."""
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {"token": self.token}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
        return path

    # -- waiting ----------------------------------------------------------------------------------

    def _touch(self) -> None:
        """Something changed: wake everything waiting for a change."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _next_change(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    async def wait_for(self, predicate: Callable[[FakeKube], bool], timeout: float = 5.0) -> None:
        """Until ``predicate(self)`` holds (checked at every change); ``TimeoutError`` is a test failure."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await self._next_change()

    def watch_requests(self) -> list[Request]:
        return [r for r in self.requests if r.query.get("watch") in ("true", "1")]

    def list_requests(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.query.get("watch") not in ("true", "1")]

    # -- changing the world -----------------------------------------------------------------------

    def _record(self, kind: str, old: Obj | None, new: Obj) -> None:
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        if len(self._history) == self._history.maxlen:
            self.compacted = self._history[0].rv
        self._history.append(_Event(self.rv, kind, old, json.loads(json.dumps(new))))
        self._touch()

    def add_pod(self, pod: Obj) -> Obj:
        m = pod["metadata"]
        key = (m["namespace"], m["name"])
        assert key not in self.pods, f"pod {key} exists"
        self.pods[key] = pod
        self._record("ADDED", None, pod)
        return pod

    def update_pod(self, namespace: str, name: str, change: Callable[[Obj], None]) -> Obj:
        pod = self.pods[(namespace, name)]
        old = json.loads(json.dumps(pod))
        change(pod)
        self._record("MODIFIED", old, pod)
        return pod

    def set_ready(self, namespace: str, name: str, ready: bool) -> Obj:
        def change(pod: Obj) -> None:
            pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        return self.update_pod(namespace, name, change)

    def delete_pod(self, namespace: str, name: str) -> None:
        pod = self.pods.pop((namespace, name))
        self._record("DELETED", pod, pod)

    def expire_history(self) -> None:
        """Every resource version so far is too old: open watches get a 410 ERROR, and so do watches from them."""
        self.rv += 1  # as if another object changed: a fresh list's RV stays usable
        self.compacted = self.rv
        self._history.clear()
        self._touch()

    def bookmark(self) -> None:
        """A BOOKMARK at the current resource version, to every open watch that allows bookmarks."""
        self._bookmarks += 1
        self._touch()

    def end_watches(self) -> None:
        """Open watches end normally, as when their ``timeoutSeconds`` runs out."""
        self._ends += 1
        self._end_rv = self.rv  # what happens after this is for the next watch
        self._touch()

    # -- handlers ---------------------------------------------------------------------------------

    def _error(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status(code, reason, message), status=code)

    async def _admit(self, request: web.Request) -> web.Response | None:
        self.requests.append(Request(request.method, request.path, dict(request.query),
                                     request.headers.get("Content-Type", "")))
        self._touch()
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "Unauthorized", "Unauthorized")
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow server, not a synchronisation
        if not self.gate.is_set():
            self.held += 1
            self._touch()
            try:
                await self.gate.wait()
            finally:
                self.held -= 1
        if self.down:
            return self._error(503, "ServiceUnavailable", "the server is currently unable to handle the request")
        return None

    def _forbidden(self, verb: str, namespace: str | None) -> web.Response | None:
        """403 as RBAC answers it, where ``authorize`` does not allow ``verb`` on pods there."""
        if self.authorize is None or self.authorize(verb, namespace):
            return None
        where = "at the cluster scope" if namespace is None else f'in the namespace "{namespace}"'
        return self._error(403, "Forbidden", f'pods is forbidden: User "{USERNAME}" cannot {verb} resource '
                                             f'"pods" in API group "" {where}')

    def _matcher(self, request: web.Request) -> Callable[[Obj], bool]:
        ns = request.match_info.get("ns")
        labels = _label_terms(request.query.get("labelSelector", ""))
        fields = _field_terms(request.query.get("fieldSelector", ""))

        def match(o: Obj) -> bool:
            return ((ns is None or o["metadata"]["namespace"] == ns)
                    and _label_ok(labels, o["metadata"].get("labels") or {}) and _field_ok(fields, o))
        return match

    async def _list_or_watch(self, request: web.Request) -> web.StreamResponse:
        if (refused := await self._admit(request)) is not None:
            return refused
        verb = "watch" if request.query.get("watch") in ("true", "1") else "list"
        if (refused := self._forbidden(verb, request.match_info.get("ns"))) is not None:
            return refused
        try:
            match = self._matcher(request)
        except ValueError as e:
            return self._error(400, "BadRequest", str(e))
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, match)
        items = [p for _, p in sorted(self.pods.items()) if match(p)]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})

    async def _watch(self, request: web.Request, match: Callable[[Obj], bool]) -> web.StreamResponse:
        q = request.query
        rv_text = q.get("resourceVersion", "")
        cursor = int(rv_text) if rv_text.isdigit() else self.rv
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        self.watches_opened += 1
        self.watches_active += 1
        self._touch()
        seen_bookmarks, seen_ends = self._bookmarks, self._ends
        try:
            async with asyncio.timeout(timeout):
                while not self._closing:
                    change = self._next_change()  # before reading: a change while writing wakes us too
                    if cursor < self.compacted:
                        msg = f"too old resource version: {cursor} ({self.compacted})"
                        await self._send(resp, "ERROR", status(410, "Expired", msg))
                        break
                    limit = self._end_rv if self._ends != seen_ends else self.rv
                    for ev in [e for e in self._history if cursor < e.rv <= limit]:
                        kind = self._filtered(ev, match)
                        if kind:
                            await self._send(resp, kind, ev.new)
                        cursor = ev.rv
                    if self._bookmarks != seen_bookmarks:
                        seen_bookmarks = self._bookmarks
                        cursor = self.rv
                        if bookmarks:
                            await self._send(resp, "BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                                                "metadata": {"resourceVersion": str(self.rv)}})
                    if self._ends != seen_ends:
                        break
                    await change
        except (TimeoutError, ConnectionResetError):
            pass  # timeoutSeconds ran out, or the client went away
        finally:
            self.watches_active -= 1
            self._touch()
        return resp

    @staticmethod
    def _filtered(ev: _Event, match: Callable[[Obj], bool]) -> str | None:
        was = ev.old is not None and match(ev.old)
        now = match(ev.new)
        if ev.type == "DELETED":
            return "DELETED" if was else None
        if now:
            return "MODIFIED" if was else "ADDED"
        return "DELETED" if was else None

    @staticmethod
    async def _send(resp: web.StreamResponse, kind: str, obj: Obj) -> None:
        await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    async def _patch(self, request: web.Request) -> web.StreamResponse:
        if (refused := await self._admit(request)) is not None:
            return refused
        ns, name = request.match_info["ns"], request.match_info["name"]
        if (refused := self._forbidden("patch", ns)) is not None:
            return refused
        if self.forbid_patch or ns in self.forbidden_namespaces:
            return self._error(403, "Forbidden", f'pods "{name}" is forbidden: User "system:serviceaccount:'
                                                 f'vlm:optimizer" cannot patch resource "pods" in API group "" '
                                                 f'in the namespace "{ns}"')
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype not in PATCH_TYPES:
            return self._error(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                                                            f"- accepted media types include: {', '.join(PATCH_TYPES)}")
        if (ns, name) not in self.pods:
            return self._error(404, "NotFound", f'pods "{name}" not found')
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "BadRequest", "the patch is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "BadRequest", "a merge patch must be a JSON object")

        old = self.pods[(ns, name)]
        patched = merge_patch(old, body)
        patched["metadata"].update(name=name, namespace=ns, uid=old["metadata"]["uid"])
        if self.admit_patch is not None and (refusal := self.admit_patch(old, patched)) is not None:
            return web.json_response(refusal, status=int(refusal["code"]))

        def change(pod: Obj) -> None:
            pod.clear()
            pod.update(patched)

        return web.json_response(self.update_pod(ns, name, change))
