"""What the engine knows of the pods on this node: discovery's pods, the GPUs their requests named,
the kubelet's device IDs, and which pods have been ready (see ``optimizer/coordination.py``).

Only the engine changes it (:meth:`Engine.set_pods`, :meth:`Engine.set_pod_devices`, the ``pod`` of a poll or
report); it turns what changed into a new roster and new shares.
"""

from __future__ import annotations

from collections.abc import Mapping

from optimizer import coordination, trust
from optimizer.gpu.types import GpuSample
from optimizer.pods import PodInfo
from optimizer.policy.types import Roster


class DiscoveredPods:
    """The pods on this node and what is known of their GPUs. ``attached``: discovery runs (pods count)."""

    def __init__(self) -> None:
        self.attached = False
        self.pods: dict[str, PodInfo] = {}  # by namespace/name
        self.ever_ready: frozenset[str] = frozenset()  # uids of the pods seen ready
        self.pod_gpus: dict[str, int] = {}  # a pod's name (or namespace/name), as its polls and reports gave it
        self.devices: dict[str, tuple[str, ...]] = {}  # namespace/name -> GPU device IDs, from the kubelet
        self.changes = 0  # rises with every change of the above (the engine's :attr:`~Engine.changes` reads it)

    def set_pods(self, pods: Mapping[str, PodInfo]) -> None:
        """Discovery's latest view; what is known of pods that are gone is forgotten."""
        self.attached = True
        self.changes += 1
        self.pods = dict(pods)
        present = {p.uid for p in pods.values()}
        self.ever_ready = frozenset({u for u in self.ever_ready if u in present}
                                    | {p.uid for p in pods.values() if p.ready})
        names = {p.key for p in pods.values()} | {p.name for p in pods.values()}
        self.pod_gpus = {k: v for k, v in self.pod_gpus.items() if k in names}

    def set_devices(self, devices: Mapping[str, tuple[str, ...]]) -> bool:
        """The kubelet's latest answer; whether it changed anything."""
        new = {k: tuple(v) for k, v in devices.items()}
        if new == self.devices:
            return False
        self.devices = new
        self.changes += 1
        return True

    def note(self, pod: str | None, index: int, peer: str | None) -> bool:
        """A poll or report named its pod: that pod's GPU is ``index`` from now on. Whether that is new.

        Only for a pod discovery knows, and (``peer``: the client's address; ``None``: in-process) only
        when the request came from that pod's IP: no client moves another pod's share to another GPU.
        """
        if pod is None or not self.attached or self.pod_gpus.get(pod) == index:
            return False  # (without discovery nothing would ever prune the table: not kept)
        if not trust.sent_by(trust.pods_named(self.pods, pod), peer):
            return False
        self.pod_gpus[pod] = index
        self.changes += 1
        return True

    def roster(self, gpus: list[GpuSample]) -> Roster:
        """Who shares each GPU now (:func:`coordination.build_roster`)."""
        return coordination.build_roster(self.pods, self.ever_ready, self.pod_gpus, gpus, self.devices)
