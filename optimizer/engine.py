"""The engine: owns the policy state and everything derived from it, and calls the policy core.

One engine serves one process. The sampler loop feeds it snapshots (:meth:`Engine.observe`), the
HTTP handlers feed it polls and reports, the virtual-time simulator does both with its own clock.
Everything here is synchronous and runs on one thread (the event loop's), so no locks are needed.

Its state is private: other modules change it through methods that say what they want and read it
through read-only properties (docs/architecture.md, "The engine's API"). Its parts live beside it: the
settings layers (``runtime_settings.py``), the trust model (``trust.py``), GPU lookups (``gpu_lookup.py``),
decisions (``decision.py``), the pods (``discovered.py``), the history and counters (``accounting.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

import structlog

from optimizer import coordination, decision, gpu_lookup, policy, trust
from optimizer import runtime_settings as layers
from optimizer.accounting import EVENT_HISTORY, OOM_OUTCOMES, GpuCounters, Ledger
from optimizer.config import Settings
from optimizer.decision import Decision
from optimizer.discovered import DiscoveredPods
from optimizer.gpu.types import GpuSample
from optimizer.pods import PodInfo
from optimizer.policy.types import Event, GpuState, PolicyState, ServiceReport, ServiceState, Snapshot
from optimizer.runtime_settings import SettingsChange
from optimizer.gpu_lookup import UnknownGpu
from optimizer.trust import REFUSAL_REASONS, Known, Refused

__all__ = ["EVENT_HISTORY", "OOM_OUTCOMES", "REFUSAL_REASONS", "Decision", "Engine", "GpuCounters", "Known",
           "Refused", "SettingsChange", "UnknownGpu"]

log = structlog.get_logger(__name__)

#: A decision with what it was made from: the service's state, its GPU's state and sample, the strategy.
_Decided = tuple[ServiceState, GpuState | None, GpuSample | None, str, Decision]


class Engine:
    def __init__(self, settings: Settings, *, has_gpus: bool = True) -> None:
        """``has_gpus``: false on backend ``none`` (a CPU-only host: services get the maximum batch)."""
        self._layers = layers.SettingsLayers(settings)  # the base settings and the runtime layer over them
        self._effective: Settings | None = None
        self._state = PolicyState()
        self._snapshot: Snapshot | None = None
        self._ledger = Ledger()  # the samples' history, the event log and the totals
        self._has_gpus = has_gpus
        self._revision = 0  # rises on every change of state; the persister saves when it moved
        self._node = DiscoveredPods()  # Kubernetes discovery: the pods on this node (see optimizer.coordination)
        self._known: Known | None = None
        # The poll path (docs/architecture.md, "The hot paths"): a known service's poll changes no state.
        self._seen: dict[tuple[int, str], float] = {}  # last_seen of polls not yet folded into the state
        self._decided: dict[tuple[int, str], _Decided] = {}  # each service's last decision, with its inputs
        self._gpus = gpu_lookup.GpuIndex()  # the latest snapshot's GPUs by index and UUID
        # What :attr:`changes` last counted: the state (as a poll's liveness note leaves it), the snapshot,
        # the effective settings, discovery's count of its own changes.
        self._changes = 0
        self._counted: tuple[PolicyState, Snapshot | None, Settings, int] = (
            self._state, self._snapshot, self._layers.settings, self._node.changes)

    # ------------------------------------------------------------------ read-only views

    @property
    def changes(self) -> int:
        """A count that rises whenever anything a poll's answer or the metrics depend on may have changed:
        the policy state (all of it but ``last_seen``), the snapshot, the settings, the pods discovery knows.

        Not when a poll only notes a service's liveness (which no answer and no metric shows). Equal counts:
        a known service's poll would be answered the same (the read API keeps its answers by it) and the
        exposition would render the same. Reading it folds nothing: a few identity checks, no walk.
        """
        state, snapshot, settings, node = self._counted
        if (self._state is not state or self._snapshot is not snapshot or self._layers.settings is not settings
                or self._node.changes != node):
            self._counted = (self._state, self._snapshot, self._layers.settings, self._node.changes)
            self._changes += 1
        return self._changes

    def seen(self, key: tuple[int, str], now: float) -> None:
        """A registered service's poll at ``now``, answered from a kept answer: its liveness, as :meth:`poll` notes it."""
        self._seen[key] = now

    @property
    def state(self) -> PolicyState:
        """The policy's state (frozen): the GPUs, the registered services, the roster."""
        self._fold_seen()
        return self._state

    def _fold_seen(self) -> None:
        """Fold the polls' ``last_seen`` into the policy state, where the policy reads it (service expiry).

        A poll of a known service only notes its time here (a dictionary entry, not a new state: the
        poll path does no work proportional to the number of services); whatever reads the state or
        hands it to the policy folds first, so the policy sees what it saw when each poll rebuilt it.
        """
        if not self._seen:
            return
        counted = self._state is self._counted[0]  # liveness alone is no change (see :attr:`changes`)
        services = dict(self._state.services)
        for key, seen in self._seen.items():
            svc = services.get(key)
            if svc is not None and svc.last_seen != seen:
                services[key] = dataclasses.replace(svc, last_seen=seen)
        self._seen.clear()
        self._state = self._state.with_(services=services)
        if counted:
            self._counted = (self._state, *self._counted[1:])

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest sample (frozen); ``None`` before the first."""
        return self._snapshot

    @property
    def history(self) -> Mapping[int, tuple[GpuSample, ...]]:
        """The last ``history_size`` samples of each GPU present, oldest first (a copy)."""
        return MappingProxyType({i: tuple(h) for i, h in self._ledger.history.items()})

    @property
    def events(self) -> tuple[Event, ...]:
        """The last :data:`EVENT_HISTORY` events, oldest first (a copy)."""
        return tuple(self._ledger.events)

    @property
    def counters(self) -> Mapping[int, GpuCounters]:
        """The totals of each GPU that had an event (copies)."""
        return MappingProxyType({i: c.copy() for i, c in self._ledger.counters.items()})

    @property
    def refused(self) -> Mapping[str, int]:
        """Requests the trust model refused, by reason."""
        return MappingProxyType(self._ledger.refused)

    @property
    def oom_reports(self) -> Mapping[str, int]:
        """OOM reports, by outcome."""
        return MappingProxyType(self._ledger.oom_reports)

    @property
    def has_gpus(self) -> bool:
        """False on a CPU-only host (backend ``none``), from the constructor."""
        return self._has_gpus

    @property
    def revision(self) -> int:
        """Rises on every change of state worth saving; the persister saves when it moved."""
        return self._revision

    @property
    def discovery(self) -> bool:
        """Whether Kubernetes discovery is attached (:meth:`attach_discovery`): pods and pod IPs count."""
        return self._node.attached

    @property
    def pods(self) -> Mapping[str, PodInfo]:
        """The pods on this node discovery last saw, by ``namespace/name``."""
        return MappingProxyType(self._node.pods)

    @property
    def ever_ready(self) -> frozenset[str]:
        """The uids of the pods present that have been ready."""
        return self._node.ever_ready

    @property
    def pod_gpus(self) -> Mapping[str, int]:
        """A pod's GPU, by the name its polls and reports gave."""
        return MappingProxyType(self._node.pod_gpus)

    @property
    def pod_devices(self) -> Mapping[str, tuple[str, ...]]:
        """Each pod's GPU device IDs, by ``namespace/name``, from the kubelet."""
        return MappingProxyType(self._node.devices)

    # ------------------------------------------------------------------ settings and saved state

    @property
    def settings(self) -> Settings:
        """The effective settings: the base settings with the runtime layer applied."""
        return self._layers.settings

    @property
    def base_settings(self) -> Settings:
        """The settings from the config file, environment and flags (what a key falls back to when unpinned)."""
        return self._layers.base

    @property
    def runtime(self) -> dict[str, Any]:
        """The runtime layer (a copy): the keys pinned through the admin API, by key, as JSON-ready values."""
        return dict(self._layers.runtime)

    def set_runtime(self, updates: Mapping[str, Any], now: float | None = None) -> SettingsChange:
        """Set ``updates`` at runtime (``PATCH /admin/config``), all-or-nothing (raises :class:`ConfigError`).

        Only a key whose value differs from the effective one is pinned; the others are ``unchanged``.
        """
        return self._settings_moved(self._layers.set(updates), now)

    def replace_runtime(self, layer: Mapping[str, Any], now: float | None = None) -> SettingsChange:
        """Make ``layer`` the whole runtime layer (``import-config``), all-or-nothing (raises :class:`ConfigError`).

        A key ``layer`` leaves out takes its base value (file, environment, flags), not a built-in default.
        """
        return self._settings_moved(self._layers.replace(layer), now)

    def reset_runtime(self, keys: Collection[str] | None = None, now: float | None = None) -> SettingsChange:
        """Unpin ``keys`` (``None``: every key): each takes its base value again at once.

        All-or-nothing: raises :class:`ConfigError` for a key that is not a runtime setting, or when the
        base values would not fit the keys that stay pinned (e.g. a pinned minimum above the file's maximum).
        """
        return self._settings_moved(self._layers.reset(keys), now)

    def restore_runtime(self, saved: Mapping[str, Any]) -> dict[str, str]:
        """Re-apply a saved runtime layer over the base (at start): the keys no longer valid are skipped,
        returned with why (:func:`runtime_settings.restore_layer`)."""
        skipped = self._layers.restore(saved)
        self._effective = None
        self._known = None
        self._revision += 1
        return skipped

    def restore_services(self, services: Mapping[tuple[int, str], ServiceState]) -> None:
        """Put saved services back over those known (at start); no new :attr:`revision`: nothing to save."""
        self._fold_seen()
        self._state = self._state.with_(services={**self._state.services, **services})

    def update_settings(self, updates: dict[str, Any], now: float | None = None) -> dict[str, tuple[Any, Any]]:
        """:meth:`set_runtime`, returning only the effective changes: {key: (old, new)}."""
        return self.set_runtime(updates, now).changed

    def _settings_moved(self, change: SettingsChange, now: float | None) -> SettingsChange:
        """Act on a change of the runtime layer: a new revision; turning optimization off publishes the
        default batches at once, turning it on optimizes at once (where the samples allow)."""
        self._effective = None
        self._known = None
        if change.changed or change.pinned or change.unpinned:
            self._revision += 1
        if "enabled" in change.changed:
            self._fold_seen()
            if self._layers.settings.enabled:
                self.optimize_now()
            else:
                at = now if now is not None else (self._snapshot.timestamp if self._snapshot else 0.0)
                self._apply(policy.apply_disabled(self._state, self.policy_settings, at))
        return change

    @property
    def policy_settings(self) -> Settings:
        """What the policy runs with: the configured settings, with the pods' declared profiles."""
        if self._effective is None:
            self._effective = coordination.effective_settings(self._layers.settings, self._node.pods)
        return self._effective

    # ------------------------------------------------------------------ discovery (see discovered.py)

    def attach_discovery(self) -> None:
        """Kubernetes discovery runs: the pods it reports (:meth:`set_pods`) and their IPs count from now on."""
        self._node.attached = True
        self._node.changes += 1

    def set_pods(self, pods: dict[str, PodInfo], now: float | None = None) -> tuple[Event, ...]:
        """Discovery's latest view of the pods on this node. Shares move at once.

        Services whose batch no longer fits their (smaller) share are lowered now, not at the next sample.
        """
        self._node.set_pods(pods)
        self._effective = None
        self._known = None
        return self._rebalance(now)

    def set_pod_devices(self, devices: Mapping[str, tuple[str, ...]], now: float | None = None) -> tuple[Event, ...]:
        """The kubelet's latest answer: each pod's GPU device IDs (empty: none known, the fallbacks decide)."""
        return self._rebalance(now) if self._node.set_devices(devices) else ()

    def _rebalance(self, now: float | None) -> tuple[Event, ...]:
        """The roster from the pods as they are now, and the batches that no longer fit lowered at once."""
        self._update_roster()
        if self._snapshot is None:
            self._revision += 1
            return ()
        self._fold_seen()
        at = now if now is not None else self._snapshot.timestamp
        return self._apply(policy.rebalance(self._snapshot, self._state, self.policy_settings, at))

    def _update_roster(self) -> None:
        roster = self._node.roster(list(self._snapshot.gpus) if self._snapshot else [])
        if roster != self._state.roster:
            self._state = dataclasses.replace(self._state, roster=roster)

    # ------------------------------------------------------------------ trust (see trust.py)

    @property
    def known(self) -> Known:
        """The declared services and the pods' services with their IPs (cached until settings or pods change)."""
        if self._known is None:
            self._known = trust.known_of(self._node.pods.values(), (p.name for p in self.policy_settings.profiles))
        return self._known

    def _refuse(self, refusal: Refused) -> Refused:
        """Count and log a refusal (``vlm_optimizer_requests_refused_total``); returns it to be raised."""
        self._ledger.refused[refusal.reason] += 1
        log.warning("request_refused", reason=refusal.reason, detail=str(refusal))
        return refusal

    def admit(self, service: str, index: int, peer: str | None) -> str | None:
        """May ``service`` register on GPU ``index`` now? ``None``: yes. A text: it is not known, and why.

        Raises :class:`Refused` (counted): see :func:`trust.admit`.
        """
        try:
            return trust.admit(service, index, peer, known=self.known, discovery=self._node.attached,
                               settings=self._layers.settings, registered=self._state.services)
        except Refused as exc:
            raise self._refuse(exc) from None

    # ------------------------------------------------------------------ inputs

    def observe(self, snapshot: Snapshot) -> tuple[Event, ...]:
        """One sampler tick: keep the snapshot and its history, run the policy, account its events."""
        self._snapshot = snapshot
        self._gpus = gpu_lookup.GpuIndex.of(snapshot)
        self._ledger.sampled(snapshot, self._layers.settings.history_size)
        if self._node.pods:
            self._update_roster()
        self._fold_seen()
        events = self._apply(policy.decide(snapshot, self._state, self.policy_settings))
        self._ledger.forget(self._state.services)  # forgotten services' counts go with them
        if len(self._decided) > len(self._state.services):  # expired services' decisions go with them
            self._decided = {k: v for k, v in self._decided.items() if k in self._state.services}
        return events

    # ------------------------------------------------------------------ operator actions (admin API)

    def optimize_now(self) -> tuple[Event, ...]:
        """Run the periodic optimization on every GPU now, from the latest snapshot (none before the first)."""
        if self._snapshot is None:
            return ()
        self._fold_seen()
        return self._apply(policy.optimize_now(self._snapshot, self._state, self.policy_settings))

    def deferred_optimizations(self) -> tuple[policy.Deferral, ...]:
        """The operator's optimizations that wait for a settled sample (see :func:`policy.optimize_now`)."""
        if self._snapshot is None or not self.policy_settings.enabled:
            return ()
        return policy.deferred_optimizations(self._state, self._snapshot)

    def set_override(self, service: str, gpu: int | str | None, batch: int, ttl_s: float | None,
                     now: float) -> Decision:
        """Fix a service's batch size (for ``ttl_s`` seconds, or until cleared). Raises :class:`UnknownGpu`."""
        index = self.resolve_gpu(service, gpu)
        if index is None:
            raise UnknownGpu(gpu if gpu is not None else "any", [])
        self._fold_seen()
        until = None if ttl_s is None else now + ttl_s
        self._apply(policy.set_override(self._state, service, index, batch, until, now, self.policy_settings,
                                        self.gpu_sample(index)))
        return self.decision_of(self._state.services[(index, service)])

    def clear_override(self, service: str, gpu: int | str | None, now: float) -> Decision | None:
        """Drop a service's override; ``None`` if the service is not known there."""
        index = self.resolve_gpu(service, gpu)
        if index is None or (index, service) not in self._state.services:
            return None
        self._fold_seen()
        self._apply(policy.clear_override(self._state, service, index, now))
        return self.decision_of(self._state.services[(index, service)])

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
            return decision.cpu_only(service, now, self.policy_settings, self._layers.settings.strategy.value)
        key = (index, service)
        svc = self._state.services.get(key)
        if svc is not None:  # the hot path: its liveness noted, its decision reused while unchanged
            if self._node.note(pod, index, peer) and self._node.pods:
                self._update_roster()
            self._seen[key] = now
            return self.decision_of(svc)
        why = self.admit(service, index, peer)
        if why is not None:
            return decision.unregistered(service, index, now, why, self.policy_settings,
                                         self._layers.settings.strategy.value, self._state.gpus.get(index),
                                         self.gpu_sample(index))
        if self._node.note(pod, index, peer) and self._node.pods:
            self._update_roster()
        self._state, svc = policy.touch(self._state, service, index, now, self.policy_settings,
                                        self.gpu_sample(index))
        self._revision += 1  # a new service is state worth saving
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
            return decision.cpu_only(service, now, self.policy_settings, self._layers.settings.strategy.value)
        if (index, service) not in self._state.services:
            why = self.admit(service, index, peer)
            if why is not None:
                raise self._refuse(Refused(403, "unknown_service", f"service: {service!r} is not registered "
                                           f"({why}): its reports are not taken"))
        else:
            try:
                trust.check_peer(service, peer, self.known, self._node.attached)
            except Refused as exc:
                raise self._refuse(exc) from None
        if self._node.note(pod, index, peer) and self._node.pods:
            self._update_roster()
        report = ServiceReport(service=service, gpu=index, timestamp=now, batch_size=batch_size,
                               peak_bytes=peak_bytes, allocated_bytes=allocated_bytes,
                               reserved_bytes=reserved_bytes, oom=oom,
                               inactive_split_bytes=inactive_split_bytes)
        sample = self.gpu_sample(index)
        self._seen.pop((index, service), None)  # the report's own touch is later than any poll noted
        if oom:
            verdict = policy.oom_verdict(self._state.services.get((index, service)), report, self.policy_settings,
                                         sample)
            self._ledger.oom_reports[verdict] += 1
            (log.info if verdict == "rate_limited" else log.warning)(
                "oom_reported", service=service, gpu=index, batch_size=batch_size, outcome=verdict)
        self._apply(policy.apply_report(self._state, report, self.policy_settings, sample))
        return self.decision_of(self._state.services[(index, service)])

    # ------------------------------------------------------------------ lookups (see gpu_lookup.py)

    def gpu_sample(self, index: int) -> GpuSample | None:
        return self._gpus.by_index.get(index)

    def resolve_gpu(self, service: str, selector: int | str | None) -> int | None:
        """A GPU index from an index, a UUID, or nothing; ``None``: no GPU here (:func:`gpu_lookup.resolve_gpu`)."""
        return self._gpus.resolve(self._state.services, self._has_gpus, service, selector)

    def decision_of(self, svc: ServiceState) -> Decision:
        """``svc``'s decision; the one made last time while its inputs are the same values (frozen, by
        identity: the service's state, its GPU's state and sample, the strategy), so a poll between two
        changes builds nothing and the encoded answer it hits is found by identity."""
        gs = self._state.gpus.get(svc.gpu)
        sample = self._gpus.by_index.get(svc.gpu)
        strategy = self._layers.settings.strategy.value
        key = (svc.gpu, svc.service)
        kept = self._decided.get(key)
        if kept is not None and kept[0] is svc and kept[1] is gs and kept[2] is sample and kept[3] == strategy:
            return kept[4]
        made = decision.of_service(svc, strategy, gs, sample)
        self._decided[key] = (svc, gs, sample, strategy, made)
        return made

    def decisions(self) -> list[Decision]:
        return [self.decision_of(v) for _, v in sorted(self._state.services.items())]

    # ------------------------------------------------------------------ accounting

    def _apply(self, outcome: policy.Outcome) -> tuple[Event, ...]:
        """Take a policy outcome: its state, a new revision, and its events kept, counted and logged."""
        self._state = outcome.state
        self._revision += 1
        self._ledger.record(outcome.events)
        return outcome.events
