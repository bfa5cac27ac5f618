"""The engine: owns the policy state and everything derived from it, and calls the policy core.

One engine serves one process. The sampler loop feeds it snapshots (:meth:`Engine.observe`), the
HTTP handlers feed it polls and reports, the virtual-time simulator does both with its own clock.
Everything here is synchronous and runs on one thread (the event loop's), so no locks are needed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import ipaddress
import json
from collections import defaultdict, deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from optimizer import coordination
from optimizer.config import (
    FILE_ONLY_KEYS,
    RUNTIME_KEYS,
    SETTING_KEYS,
    ConfigError,
    Settings,
    apply_settings,
    settings_to_dict,
)
from optimizer.gpu.types import MIG_SELECTOR_RE, GpuSample
from optimizer import policy
from optimizer.pods import PodInfo
from optimizer.policy.types import Event, PolicyState, Pressure, ServiceReport, ServiceState, Snapshot

log = structlog.get_logger(__name__)

EVENT_HISTORY = 1000


class UnknownGpu(LookupError):
    """A request named a GPU this host does not have.

    ``available`` lists the valid indexes; ``selectors`` the other names that work: every entry's UUID
    and, for a MIG device, its ``parent:gpu_instance`` form.
    """

    def __init__(self, selector: str | int, available: list[int], selectors: list[str] | None = None) -> None:
        names = f"; or by UUID / parent:instance: {', '.join(selectors)}" if selectors else ""
        super().__init__(f"no GPU {selector!r}; available GPU indexes: {available or 'none'}{names}")
        self.available = available
        self.selectors = selectors or []


class Refused(Exception):
    """The trust model refuses a poll or report (docs/api.md, "Trust model"); nothing was changed.

    ``status`` is the HTTP status (403: not allowed from this client; 429: a cap on registered services
    is reached), ``reason`` the label of ``vlm_optimizer_requests_refused_total``, ``body`` the answer.
    """

    def __init__(self, status: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.body: dict[str, Any] = {"error": message, "field": "service", "reason": reason, **extra}


#: Why the trust model refused a request: the ``reason`` label of ``vlm_optimizer_requests_refused_total``.
REFUSAL_REASONS = ("unknown_service", "not_pod_ip", "max_services_per_gpu", "max_services")
#: What became of OOM reports: the ``outcome`` label of ``vlm_optimizer_oom_reports_total``.
OOM_OUTCOMES = ("counted", "contradicted", "rate_limited")


def _ip(text: str) -> str:
    """An address in one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.5``) as IPv4; anything unparsable as is."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True)
class Known:
    """Who may take a share of a GPU, from the settings and the pods (rebuilt when either changes).

    ``declared``: the services with a profile (configured or declared by their pods); ``pod_ips``: the
    services with pods on this node, and the IP addresses of those pods that have not finished.
    """

    declared: frozenset[str]
    pod_ips: dict[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a service is told (``GET /batch-size`` and the reply to ``POST /reports``)."""

    service: str
    batch_size: int
    optimal_batch_size: int
    strategy: str
    pressure: str
    cleanup_epoch: int
    reason: str
    updated_at: float
    gpu_index: int | None
    gpu_uuid: str | None
    gpu_name: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    registered: bool = True  # False: an unknown name, answered without taking a share (docs/api.md)

    def to_dict(self) -> dict[str, Any]:
        gpu = None
        if self.gpu_index is not None:
            gpu = {
                "index": self.gpu_index,
                "uuid": self.gpu_uuid,
                "name": self.gpu_name,
                "memory_used_bytes": self.memory_used_bytes,
                "memory_total_bytes": self.memory_total_bytes,
            }
        return {
            "service": self.service,
            "batch_size": self.batch_size,
            "optimal_batch_size": self.optimal_batch_size,
            "strategy": self.strategy,
            "pressure": self.pressure,
            "cleanup_epoch": self.cleanup_epoch,
            "reason": self.reason,
            "updated_at": self.updated_at,
            "gpu": gpu,
            "registered": self.registered,
        }

    @property
    def etag(self) -> str:
        """A weak validator over what a service acts on (not the memory figures, which move every sample)."""
        key = json.dumps([self.service, self.gpu_index, self.batch_size, self.optimal_batch_size, self.strategy,
                          self.pressure, self.cleanup_epoch, self.reason, self.registered])
        return 'W/"' + hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + '"'


@dataclass(frozen=True)
class SettingsChange:
    """What a change of the runtime layer did.

    ``changed``: the effective values that moved, {key: (old, new)}. ``pinned``: keys the runtime layer
    gained or whose pinned value moved. ``unpinned``: keys it lost (now at their base value).
    ``unchanged``: keys a :meth:`Engine.set_runtime` named that already had the value (not pinned).
    """

    changed: dict[str, tuple[Any, Any]]
    pinned: tuple[str, ...] = ()
    unpinned: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


def _refuse_file_only(keys: Collection[str]) -> None:
    for key in FILE_ONLY_KEYS:
        if key in keys:
            raise ConfigError(key, "profiles are set only in the config file (--config), not at runtime: "
                                   "change the file and restart")


@dataclass
class GpuCounters:
    """Monotonic totals per GPU; labelled by trigger where the metric has one."""

    optimizations: collections.Counter[str] = field(default_factory=collections.Counter)
    successes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    cleanups: collections.Counter[str] = field(default_factory=collections.Counter)
    freed_bytes: int = 0
    batch_changes: collections.Counter[str] = field(default_factory=collections.Counter)  # by service


class Engine:
    def __init__(self, settings: Settings) -> None:
        self._base = settings  # file < environment < flags (and a simulated scenario's profiles)
        self._runtime: dict[str, Any] = {}  # set through the admin API, by key, JSON-ready; persisted
        self._settings = settings  # the base with the runtime layer applied
        self._effective: Settings | None = None
        self.state = PolicyState()
        self.snapshot: Snapshot | None = None
        self.history: dict[int, deque[GpuSample]] = {}
        self.events: deque[Event] = deque(maxlen=EVENT_HISTORY)
        self.counters: dict[int, GpuCounters] = defaultdict(GpuCounters)
        self.has_gpus = True  # False on backend "none"
        self.revision = 0  # rises on every change of state; the persister saves when it moved
        # Kubernetes discovery (see optimizer.coordination): the pods on this node, by namespace/name.
        self.discovery = False
        self.pods: dict[str, PodInfo] = {}
        self.ever_ready: set[str] = set()  # uids of the pods seen ready
        self.pod_gpus: dict[str, int] = {}  # a pod's name (or namespace/name), as its polls and reports gave it
        self.pod_devices: dict[str, tuple[str, ...]] = {}  # namespace/name -> GPU device IDs, from the kubelet
        self._known: Known | None = None
        self.refused: collections.Counter[str] = collections.Counter()  # requests refused, by reason
        self.oom_reports: collections.Counter[str] = collections.Counter()  # OOM reports, by outcome

    # ------------------------------------------------------------------ settings

    @property
    def settings(self) -> Settings:
        """The effective settings: the base settings with the runtime layer applied."""
        return self._settings

    @property
    def base_settings(self) -> Settings:
        """The settings from the config file, environment and flags (what a key falls back to when unpinned)."""
        return self._base

    @property
    def runtime(self) -> dict[str, Any]:
        """The runtime layer (a copy): the keys pinned through the admin API, by key, as JSON-ready values."""
        return dict(self._runtime)

    def set_runtime(self, updates: Mapping[str, Any], now: float | None = None) -> SettingsChange:
        """Set ``updates`` at runtime (``PATCH /admin/config``), all-or-nothing (raises :class:`ConfigError`).

        Only a key whose value differs from the effective one is pinned; one that already has the
        value is reported ``unchanged`` and pins nothing.
        """
        _refuse_file_only(updates)
        current = settings_to_dict(self._settings)
        wanted = settings_to_dict(apply_settings(self._settings, updates))
        differ = [k for k in updates if wanted[k] != current[k]]
        change = self._install({**self._runtime, **{k: wanted[k] for k in differ}}, now)
        return dataclasses.replace(change, unchanged=tuple(sorted(k for k in updates if k not in differ)))

    def replace_runtime(self, layer: Mapping[str, Any], now: float | None = None) -> SettingsChange:
        """Make ``layer`` the whole runtime layer (``import-config``), all-or-nothing (raises :class:`ConfigError`).

        A key ``layer`` leaves out takes its base value (file, environment, flags), not a built-in default.
        """
        _refuse_file_only(layer)
        values = settings_to_dict(apply_settings(self._base, layer))
        return self._install({k: values[k] for k in layer}, now)

    def reset_runtime(self, keys: Collection[str] | None = None, now: float | None = None) -> SettingsChange:
        """Unpin ``keys`` (``None``: every key): each takes its base value again at once.

        All-or-nothing: raises :class:`ConfigError` for a key that is not a runtime setting, or when the
        base values would not fit the keys that stay pinned (e.g. a pinned minimum above the file's maximum).
        """
        if keys is not None:
            for key in keys:
                if key not in RUNTIME_KEYS:
                    why = ("profiles are set only in the config file and are never pinned" if key in FILE_ONLY_KEYS
                           else "not a setting")
                    raise ConfigError("keys", f"{key!r}: {why}; allowed keys are {', '.join(RUNTIME_KEYS)}")
        gone = set(self._runtime) if keys is None else set(keys)
        return self._install({k: v for k, v in self._runtime.items() if k not in gone}, now)

    def restore_runtime(self, saved: Mapping[str, Any]) -> dict[str, str]:
        """Re-apply a saved runtime layer on top of the base, key by key (at start, before anything is served).

        A key that is no longer valid (unknown, a bad value, a file-only key, or one that no longer fits
        the base's other settings) is skipped; the others are kept. Returns the skipped keys and why.
        """
        skipped = {k: "profiles are set only in the config file" for k in saved if k in FILE_ONLY_KEYS}
        pending = {k: v for k, v in saved.items() if k not in FILE_ONLY_KEYS}
        layer: dict[str, Any] = {}
        errors: dict[str, str] = {}
        progress = True
        while pending and progress:  # a key may fit only once another is back (a pinned min under a pinned max)
            progress = False
            for key, value in list(pending.items()):
                try:
                    values = settings_to_dict(apply_settings(self._base, {**layer, key: value}))
                except ConfigError as exc:
                    errors[key] = str(exc)
                    continue
                layer[key] = values[key]
                del pending[key]
                progress = True
        skipped.update({k: errors[k] for k in pending})
        self._runtime = layer
        self._settings = apply_settings(self._base, layer)
        self._effective = None
        self._known = None
        self.revision += 1
        return skipped

    def update_settings(self, updates: dict[str, Any], now: float | None = None) -> dict[str, tuple[Any, Any]]:
        """:meth:`set_runtime`, returning only the effective changes: {key: (old, new)}."""
        return self.set_runtime(updates, now).changed

    def _install(self, layer: dict[str, Any], now: float | None) -> SettingsChange:
        """Make ``layer`` the runtime layer; act on a change of ``enabled``. Raises :class:`ConfigError`.

        Turning optimization off publishes the default batches at once; turning it on optimizes at once
        (where the samples allow).
        """
        new = apply_settings(self._base, layer)
        before, after = settings_to_dict(self._settings), settings_to_dict(new)
        changed = {k: (before[k], after[k]) for k in SETTING_KEYS if before[k] != after[k]}
        old_layer = self._runtime
        pinned = tuple(sorted(k for k in layer if k not in old_layer or old_layer[k] != layer[k]))
        unpinned = tuple(sorted(k for k in old_layer if k not in layer))
        self._runtime = dict(layer)
        self._settings = new
        self._effective = None
        self._known = None
        if changed or layer != old_layer:
            self.revision += 1
        if "enabled" in changed:
            if new.enabled:
                self.optimize_now()
            else:
                at = now if now is not None else (self.snapshot.timestamp if self.snapshot else 0.0)
                outcome = policy.apply_disabled(self.state, self.policy_settings, at)
                self.state = outcome.state
                self._account(outcome.events)
        return SettingsChange(changed=changed, pinned=pinned, unpinned=unpinned)

    @property
    def policy_settings(self) -> Settings:
        """What the policy runs with: the configured settings, with the pods' declared profiles."""
        if self._effective is None:
            self._effective = coordination.effective_settings(self._settings, self.pods)
        return self._effective

    # ------------------------------------------------------------------ discovery

    def set_pods(self, pods: dict[str, PodInfo], now: float | None = None) -> tuple[Event, ...]:
        """Discovery's latest view of the pods on this node. Shares move at once.

        Services whose batch no longer fits their (smaller) share are lowered now, not at the next sample.
        """
        self.discovery = True
        self.pods = dict(pods)
        present = {p.uid for p in pods.values()}
        self.ever_ready = {u for u in self.ever_ready if u in present} | {p.uid for p in pods.values() if p.ready}
        names = {p.key for p in pods.values()} | {p.name for p in pods.values()}
        self.pod_gpus = {k: v for k, v in self.pod_gpus.items() if k in names}
        self._effective = None
        self._known = None
        return self._rebalance(now)

    def set_pod_devices(self, devices: Mapping[str, tuple[str, ...]], now: float | None = None) -> tuple[Event, ...]:
        """The kubelet's latest answer: each pod's GPU device IDs (empty: none known, the fallbacks decide)."""
        new = {k: tuple(v) for k, v in devices.items()}
        if new == self.pod_devices:
            return ()
        self.pod_devices = new
        return self._rebalance(now)

    def _rebalance(self, now: float | None) -> tuple[Event, ...]:
        """The roster from the pods as they are now, and the batches that no longer fit lowered at once."""
        self._update_roster()
        if self.snapshot is None:
            self.revision += 1
            return ()
        at = now if now is not None else self.snapshot.timestamp
        outcome = policy.rebalance(self.snapshot, self.state, self.policy_settings, at)
        self.state = outcome.state
        self._account(outcome.events)
        return outcome.events

    def _update_roster(self) -> None:
        gpus = list(self.snapshot.gpus) if self.snapshot else []
        roster = coordination.build_roster(self.pods, self.ever_ready, self.pod_gpus, gpus, self.pod_devices)
        if roster != self.state.roster:
            self.state = dataclasses.replace(self.state, roster=roster)

    def _note_pod(self, pod: str | None, index: int, peer: str | None = None) -> None:
        """A poll or report said which pod it came from: its GPU is known from now on.

        Only for a pod discovery knows, and (``peer``: the client's address; ``None``: in-process) only
        when the request came from that pod's IP: no client moves another pod's share to another GPU.
        """
        if pod is None or not self.discovery or self.pod_gpus.get(pod) == index:
            return  # (without discovery nothing would ever prune the table: not kept)
        found = [p for p in self.pods.values() if pod in (p.key, p.name)]
        if not found or (peer is not None and not any(_ip(peer) in {_ip(a) for a in p.ips} for p in found)):
            return
        self.pod_gpus[pod] = index
        if self.pods:
            self._update_roster()

    # ------------------------------------------------------------------ trust (docs/api.md, "Trust model")

    @property
    def known(self) -> Known:
        """The declared services and the pods' services with their IPs (cached until settings or pods change)."""
        if self._known is None:
            ips: dict[str, set[str]] = {}
            for p in self.pods.values():
                if p.service is not None:  # a finished pod's address may already be another pod's
                    ips.setdefault(p.service, set()).update(() if p.terminal else (_ip(a) for a in p.ips))
            self._known = Known(declared=frozenset(p.name for p in self.policy_settings.profiles),
                                pod_ips={k: frozenset(v) for k, v in ips.items()})
        return self._known

    def _refuse(self, status: int, reason: str, message: str, **extra: Any) -> Refused:
        self.refused[reason] += 1
        log.warning("request_refused", reason=reason, detail=message)
        return Refused(status, reason, message, **extra)

    def _check_peer(self, service: str, peer: str | None) -> None:
        """With discovery on, a service that has pods on this node is heard only from their IPs (403 else)."""
        ips = self.known.pod_ips.get(service) if self.discovery else None
        if ips is None or peer is None or _ip(peer) in ips:
            return
        raise self._refuse(403, "not_pod_ip", f"service: {service!r} has pods on this node, and {peer} is the "
                           "address of none of them: only its own pods may register it or report for it",
                           peer=peer)

    def admit(self, service: str, index: int, peer: str | None) -> str | None:
        """May ``service`` register on GPU ``index`` now? ``None``: yes. A text: it is not known, and why.

        Raises :class:`Refused`: 403 from a client that is not one of the service's pods (discovery on),
        429 when a cap on registered services is reached (an unknown name; declared and discovered
        services are bounded by the configuration and the node, and are never locked out by a flood).
        """
        known = self.known
        self._check_peer(service, peer)
        if service in known.declared or service in known.pod_ips:
            return None
        s = self.settings
        if not s.register_unknown:
            return ("not a declared profile" + (" nor a discovered pod on this node" if self.discovery else "")
                    + ", and register_unknown is off")
        on_gpu = sum(1 for gi, _ in self.state.services if gi == index)
        if on_gpu >= s.max_services_per_gpu:
            raise self._refuse(429, "max_services_per_gpu", f"service: cannot register {service!r} on GPU {index}: "
                               f"{on_gpu} services are registered there, the limit (setting max_services_per_gpu)",
                               limit=s.max_services_per_gpu, setting="max_services_per_gpu", gpu=index)
        if len(self.state.services) >= s.max_services:
            raise self._refuse(429, "max_services", f"service: cannot register {service!r}: {len(self.state.services)}"
                               " services are registered, the limit (setting max_services)",
                               limit=s.max_services, setting="max_services")
        return None

    def _unregistered(self, service: str, index: int, now: float, why: str) -> Decision:
        """The answer to an unknown name: the minimum batch, no share of the GPU, nothing registered."""
        s = self.policy_settings
        lo, _ = s.batch_limits(s.profile(service))
        gs = self.state.gpus.get(index)
        sample = self.gpu_sample(index)
        return Decision(service=service, batch_size=lo, optimal_batch_size=lo, strategy=self.settings.strategy.value,
                        pressure=(gs.pressure if gs else Pressure.NORMAL).value, cleanup_epoch=gs.cleanup_epoch if gs
                        else 0, reason=f"not registered ({why}): the minimum batch size, with no share of the GPU",
                        updated_at=now, gpu_index=index, gpu_uuid=sample.uuid if sample else (gs.uuid if gs else None),
                        gpu_name=sample.name if sample else (gs.name if gs else None),
                        memory_used_bytes=sample.memory_used_bytes if sample else None,
                        memory_total_bytes=sample.memory_total_bytes if sample else None, registered=False)

    # ------------------------------------------------------------------ inputs

    def observe(self, snapshot: Snapshot) -> tuple[Event, ...]:
        """One sampler tick: keep the snapshot and its history, run the policy, account its events."""
        self.snapshot = snapshot
        present = {g.index for g in snapshot.gpus}
        for gone in [i for i in self.history if i not in present]:
            del self.history[gone]
            self.counters.pop(gone, None)
        for g in snapshot.gpus:
            h = self.history.get(g.index)
            if h is None or h.maxlen != self.settings.history_size:
                h = self.history[g.index] = deque(h or (), maxlen=self.settings.history_size)
            h.append(g)
        if self.pods:
            self._update_roster()
        outcome = policy.decide(snapshot, self.state, self.policy_settings)
        self.state = outcome.state
        self._account(outcome.events)
        for index, c in self.counters.items():  # forgotten services' counts go with them (names may churn)
            for name in [n for n in c.batch_changes if (index, n) not in self.state.services]:
                del c.batch_changes[name]
        return outcome.events

    # ------------------------------------------------------------------ operator actions (admin API)

    def optimize_now(self) -> tuple[Event, ...]:
        """Run the periodic optimization on every GPU now, from the latest snapshot (none before the first)."""
        if self.snapshot is None:
            return ()
        outcome = policy.optimize_now(self.snapshot, self.state, self.policy_settings)
        self.state = outcome.state
        self._account(outcome.events)
        return outcome.events

    def deferred_optimizations(self) -> tuple[policy.Deferral, ...]:
        """The operator's optimizations that wait for a settled sample (see :func:`policy.optimize_now`)."""
        if self.snapshot is None or not self.policy_settings.enabled:
            return ()
        return policy.deferred_optimizations(self.state, self.snapshot)

    def set_override(self, service: str, gpu: int | str | None, batch: int, ttl_s: float | None,
                     now: float) -> Decision:
        """Fix a service's batch size (for ``ttl_s`` seconds, or until cleared). Raises :class:`UnknownGpu`."""
        index = self.resolve_gpu(service, gpu)
        if index is None:
            raise UnknownGpu(gpu if gpu is not None else "any", [])
        until = None if ttl_s is None else now + ttl_s
        outcome = policy.set_override(self.state, service, index, batch, until, now, self.policy_settings,
                                      self.gpu_sample(index))
        self.state = outcome.state
        self._account(outcome.events)
        return self.decision_of(self.state.services[(index, service)])

    def clear_override(self, service: str, gpu: int | str | None, now: float) -> Decision | None:
        """Drop a service's override; ``None`` if the service is not known there."""
        index = self.resolve_gpu(service, gpu)
        if index is None or (index, service) not in self.state.services:
            return None
        outcome = policy.clear_override(self.state, service, index, now)
        self.state = outcome.state
        self._account(outcome.events)
        return self.decision_of(self.state.services[(index, service)])

    def poll(self, service: str, gpu: int | str | None, now: float, *, pod: str | None = None,
             peer: str | None = None) -> Decision:
        """A service asks for its batch size. Registers it on first contact, where the trust model admits it
        (:meth:`admit`; an unknown name gets an answer with ``registered`` false and changes nothing).
        Raises :class:`UnknownGpu`, :class:`Refused`.

        ``pod`` (its pod's name) tells discovery which GPU that pod uses; ``peer`` is the client's IP
        address (``None``: an in-process caller, trusted).
        """
        index = self.resolve_gpu(service, gpu)
        if index is None:
            return self._cpu_decision(service, now)
        new = (index, service) not in self.state.services
        if new:
            why = self.admit(service, index, peer)
            if why is not None:
                return self._unregistered(service, index, now, why)
        self._note_pod(pod, index, peer)
        self.state, svc = policy.touch(self.state, service, index, now, self.policy_settings, self.gpu_sample(index))
        if new:
            self.revision += 1  # a new service is state worth saving
        return self.decision_of(svc)

    def report(self, service: str, gpu: int | str | None, now: float, *, batch_size: int | None = None,
               peak_bytes: int | None = None, allocated_bytes: int | None = None,
               reserved_bytes: int | None = None, oom: bool = False, pod: str | None = None,
               inactive_split_bytes: int | None = None, peer: str | None = None) -> Decision:
        """A service's telemetry; the returned decision already reflects it (an OOM lowers the batch).

        Raises :class:`UnknownGpu`, :class:`Refused` (an unknown name that may not register, a client that
        is not one of the service's pods, a cap reached); ``peer`` as for :meth:`poll`.
        """
        index = self.resolve_gpu(service, gpu)
        if index is None:
            return self._cpu_decision(service, now)
        if (index, service) not in self.state.services:
            why = self.admit(service, index, peer)
            if why is not None:
                raise self._refuse(403, "unknown_service", f"service: {service!r} is not registered ({why}): "
                                   "its reports are not taken")
        else:
            self._check_peer(service, peer)
        self._note_pod(pod, index, peer)
        report = ServiceReport(service=service, gpu=index, timestamp=now, batch_size=batch_size,
                               peak_bytes=peak_bytes, allocated_bytes=allocated_bytes,
                               reserved_bytes=reserved_bytes, oom=oom,
                               inactive_split_bytes=inactive_split_bytes)
        sample = self.gpu_sample(index)
        if oom:
            verdict = policy.oom_verdict(self.state.services.get((index, service)), report, self.policy_settings,
                                         sample)
            self.oom_reports[verdict] += 1
            (log.info if verdict == "rate_limited" else log.warning)(
                "oom_reported", service=service, gpu=index, batch_size=batch_size, outcome=verdict)
        outcome = policy.apply_report(self.state, report, self.policy_settings, sample)
        self.state = outcome.state  # (_account below bumps the revision)
        self._account(outcome.events)
        return self.decision_of(self.state.services[(index, service)])

    # ------------------------------------------------------------------ lookups

    def gpu_sample(self, index: int) -> GpuSample | None:
        if self.snapshot is None:
            return None
        for g in self.snapshot.gpus:
            if g.index == index:
                return g
        return None

    def gpu_indexes(self) -> list[int]:
        return sorted(g.index for g in self.snapshot.gpus) if self.snapshot else []

    def resolve_gpu(self, service: str, selector: int | str | None) -> int | None:
        """A GPU index from an index, a UUID, or nothing (the service's known GPU, else the first working one).

        ``None`` means this host has no GPU (backend ``none``).
        """
        indexes = self.gpu_indexes()
        if selector is None:
            # After a sample every service is on one of its GPUs (decide drops the others): look those up,
            # a few dictionary lookups, rather than scan every service on every poll.
            candidates = indexes if self.snapshot is not None else sorted({gi for gi, _ in self.state.services})
            known = [gi for gi in candidates if (gi, service) in self.state.services]
            if known:
                return known[0]
            if not indexes:
                if self.has_gpus:
                    return 0  # before the first sample (or NVML sees none yet): assume the usual first GPU
                return None
            working = [g.index for g in self.snapshot.gpus if not g.failed] if self.snapshot else []
            return (working or indexes)[0]
        if isinstance(selector, int):
            if selector in indexes or (self.snapshot is None and self.has_gpus):
                return selector
            raise UnknownGpu(selector, indexes, self.gpu_selectors())
        found = self.gpu_by_name(selector)
        if found is not None:
            return found
        raise UnknownGpu(selector, indexes, self.gpu_selectors())

    def gpu_by_name(self, selector: str) -> int | None:
        """The index of the entry named by UUID (``GPU-...``, ``MIG-...``) or ``parent:gi[:ci]``; None if none.

        ``parent:gi`` is the MIG device of GPU instance ``gi`` on parent ``parent`` (its lowest compute
        instance, where a GPU instance is split; ``parent:gi:ci`` names one). What discovery calls with the
        device IDs the kubelet lists (GPU or MIG UUIDs).
        """
        gpus = self.snapshot.gpus if self.snapshot else ()
        for g in gpus:
            if g.uuid == selector:
                return g.index
        m = MIG_SELECTOR_RE.fullmatch(selector)
        if m is None:
            return None
        parent, gi = int(m.group(1)), int(m.group(2))
        ci = None if m.group(3) is None else int(m.group(3))
        mig = sorted((g.compute_instance_id or 0, g.index) for g in gpus
                     if g.parent_index == parent and g.gpu_instance_id == gi
                     and (ci is None or g.compute_instance_id == ci))
        return mig[0][1] if mig else None

    def gpu_selectors(self) -> list[str]:
        """The names besides the index that select an entry now: UUIDs, and ``parent:instance`` for MIG."""
        out: list[str] = []
        for g in sorted(self.snapshot.gpus, key=lambda g: g.index) if self.snapshot else ():
            out.append(g.uuid)
            if g.mig_selector is not None:
                out.append(g.mig_selector)
        return out

    def decision_of(self, svc: ServiceState) -> Decision:
        gs = self.state.gpus.get(svc.gpu)
        sample = self.gpu_sample(svc.gpu)
        return Decision(
            service=svc.service,
            batch_size=svc.batch_size,
            optimal_batch_size=svc.optimal,
            strategy=self.settings.strategy.value,
            pressure=(gs.pressure if gs else Pressure.NORMAL).value,
            cleanup_epoch=gs.cleanup_epoch if gs else 0,
            reason=svc.reason,
            updated_at=svc.updated_at,
            gpu_index=svc.gpu,
            gpu_uuid=sample.uuid if sample else (gs.uuid if gs else None),
            gpu_name=sample.name if sample else (gs.name if gs else None),
            memory_used_bytes=sample.memory_used_bytes if sample else None,
            memory_total_bytes=sample.memory_total_bytes if sample else None,
        )

    def decisions(self) -> list[Decision]:
        return [self.decision_of(v) for _, v in sorted(self.state.services.items())]

    def _cpu_decision(self, service: str, now: float) -> Decision:
        """No GPU on this host: no GPU memory constrains the batch (seed 003: CPU takes the maximum)."""
        s = self.policy_settings
        _, hi = s.batch_limits(s.profile(service))
        return Decision(service=service, batch_size=hi, optimal_batch_size=hi,
                        strategy=self.settings.strategy.value, pressure=Pressure.NORMAL.value, cleanup_epoch=0,
                        reason="no GPU on this host: the maximum batch size", updated_at=now, gpu_index=None,
                        gpu_uuid=None, gpu_name=None, memory_used_bytes=None, memory_total_bytes=None)

    # ------------------------------------------------------------------ accounting

    def _account(self, events: tuple[Event, ...]) -> None:
        self.revision += 1
        for e in events:
            self.events.append(e)
            c = self.counters[e.gpu]
            if e.kind == "optimization_started":
                c.optimizations[e.trigger or "unknown"] += 1
            elif e.kind in ("optimization_succeeded", "optimization_failed"):
                (c.successes if e.kind == "optimization_succeeded" else c.failures)[e.trigger or "unknown"] += 1
                c.freed_bytes += e.freed_bytes or 0
            elif e.kind == "cleanup_raised":
                c.cleanups[e.trigger or "unknown"] += 1
            elif e.kind == "batch_changed":
                c.batch_changes[e.service or ""] += 1
            fields = {k: v for k, v in (("service", e.service), ("trigger", e.trigger), ("old", e.old),
                                        ("new", e.new), ("freed_bytes", e.freed_bytes), ("detail", e.detail))
                      if v is not None}
            # Pressure crossing a threshold back and forth is normal near the target: debug only.
            (log.debug if e.kind == "pressure_changed" else log.info)(e.kind, gpu=e.gpu, **fields)
